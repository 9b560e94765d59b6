"""Divergences and estimators against naive full-tensor reference code (values and gradients)."""

import itertools

import pytest
import torch

from opsd.divergence import chunked_divergence, token_divergence

N, H, V = 13, 8, 37


def naive_loss(hs, head, ht, head_t, weight, targets, reverse, *, kind, beta=0.5, temperature=1.0,
               clip_tau=None, estimator="full", top_k=5):
    """Straight from the definitions in METHODS.md, in probability space, one position at a time."""
    ps = torch.softmax(hs @ head.T / temperature, -1)
    pt = torch.softmax(ht @ head_t.T / temperature, -1).detach()
    total = 0.0
    for n in range(hs.shape[0]):
        p, q = ps[n], pt[n]
        if estimator == "sampled":
            y = targets[n]
            advantage = (torch.log(q[y]) - torch.log(p[y])).detach()
            total = total + weight[n] * (-advantage * torch.log(p[y]))
            continue
        if estimator == "topk":
            idx = torch.topk(q, top_k).indices
            rest = torch.ones(V, dtype=torch.bool)
            rest[idx] = False
            p = torch.cat([p[idx], p[rest].sum()[None]])
            q = torch.cat([q[idx], q[rest].sum()[None]])
        k = kind
        if kind == "branched":
            k = "reverse_kl" if reverse[n] else "forward_kl"
        if k == "jsd" and beta in (0.0, 1.0):
            k = "forward_kl" if beta == 0.0 else "reverse_kl"
        if k == "reverse_kl":
            terms = p * torch.log(p / q)
        elif k == "forward_kl":
            terms = q * torch.log(q / p)
        else:
            m = beta * q + (1 - beta) * p
            terms = beta * q * torch.log(q / m) + (1 - beta) * p * torch.log(p / m)
        if clip_tau is not None:
            terms = torch.clamp(terms, max=clip_tau)
        total = total + weight[n] * terms.sum()
    return total


def make_inputs(seed=0, same=False):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(N, H, generator=g, dtype=torch.float64)
    head = torch.randn(V, H, generator=g, dtype=torch.float64)
    ht = hs.clone() if same else torch.randn(N, H, generator=g, dtype=torch.float64)
    head_t = head.clone() if same else head + 0.3 * torch.randn(V, H, generator=g, dtype=torch.float64)
    weight = torch.rand(N, generator=g, dtype=torch.float64)
    targets = torch.randint(0, V, (N,), generator=g)
    reverse = torch.rand(N, generator=g) > 0.5
    return hs, head, ht, head_t, weight, targets, reverse


CASES = [
    dict(kind="reverse_kl"), dict(kind="forward_kl"), dict(kind="jsd", beta=0.5), dict(kind="jsd", beta=0.1),
    dict(kind="jsd", beta=0.0), dict(kind="jsd", beta=1.0), dict(kind="branched"),
    dict(kind="reverse_kl", temperature=1.1), dict(kind="forward_kl", clip_tau=0.05),
    dict(kind="jsd", beta=0.5, clip_tau=0.02, temperature=0.7), dict(kind="branched", clip_tau=0.05),
    dict(kind="reverse_kl", estimator="topk", top_k=5), dict(kind="forward_kl", estimator="topk", top_k=5),
    dict(kind="jsd", estimator="topk", top_k=5, clip_tau=0.05),
    dict(kind="reverse_kl", estimator="sampled"), dict(kind="reverse_kl", estimator="sampled", temperature=1.1),
]


@pytest.mark.parametrize("options", CASES, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("chunk_size", [4, 1000])
def test_chunked_matches_naive_values_and_gradients(options, chunk_size):
    hs, head, ht, head_t, weight, targets, reverse = make_inputs()
    hs1, head1 = hs.clone().requires_grad_(), head.clone().requires_grad_()
    expected = naive_loss(hs1, head1, ht, head_t, weight, targets, reverse, **options)
    expected.backward()
    hs2, head2 = hs.clone().requires_grad_(), head.clone().requires_grad_()
    result = chunked_divergence(hs2, head2, ht, head_t, weight, targets, reverse, chunk_size=chunk_size, **options)
    result.loss.backward()
    torch.testing.assert_close(result.loss, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hs2.grad, hs1.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(head2.grad, head1.grad, atol=1e-5, rtol=1e-5)
    assert result.value_N.shape == (N,)


@pytest.mark.parametrize("options", CASES[:11], ids=str)
def test_chunked_equals_unchunked_autograd(options):
    """The fused chunk loop gives what plain autograd through full logits gives."""
    hs, head, ht, head_t, weight, targets, reverse = make_inputs(seed=3)
    hs1, head1 = hs.clone().requires_grad_(), head.clone().requires_grad_()
    plain = token_divergence(hs1 @ head1.T, ht @ head_t.T, targets, reverse, **options)
    (plain.loss_N * weight).sum().backward()
    hs2, head2 = hs.clone().requires_grad_(), head.clone().requires_grad_()
    fused = chunked_divergence(hs2, head2, ht, head_t, weight, targets, reverse, chunk_size=5, **options)
    fused.loss.backward()
    torch.testing.assert_close(fused.loss, (plain.loss_N * weight).sum().detach())
    torch.testing.assert_close(fused.value_N, plain.value_N)
    torch.testing.assert_close(fused.entropy_N, plain.entropy_N)
    torch.testing.assert_close(hs2.grad, hs1.grad)
    torch.testing.assert_close(head2.grad, head1.grad)


@pytest.mark.parametrize("options", CASES, ids=str)
def test_zero_with_zero_gradient_when_teacher_equals_student(options):
    hs, head, ht, head_t, weight, targets, reverse = make_inputs(same=True)
    hs.requires_grad_()
    result = chunked_divergence(hs, head, ht, head_t, weight, targets, reverse, chunk_size=4, **options)
    result.loss.backward()
    assert abs(float(result.loss)) < 1e-10
    assert float(result.value_N.abs().max()) < 1e-10
    assert float(hs.grad.abs().max()) < 1e-10


def test_zero_weight_positions_contribute_nothing():
    hs, head, ht, head_t, weight, targets, reverse = make_inputs()
    weight[::2] = 0.0
    hs.requires_grad_()
    result = chunked_divergence(hs, head, ht, head_t, weight, targets, chunk_size=4, kind="reverse_kl")
    result.loss.backward()
    assert torch.all(hs.grad[::2] == 0)
    assert torch.any(hs.grad[1::2] != 0)
    kept = chunked_divergence(hs[1::2].detach(), head, ht[1::2], head_t, weight[1::2], targets[1::2], kind="reverse_kl")
    torch.testing.assert_close(result.loss.detach(), kept.loss)


def test_no_gradient_reaches_the_teacher():
    hs, head, ht, head_t, weight, targets, reverse = make_inputs()
    hs.requires_grad_()
    ht.requires_grad_()
    head_t.requires_grad_()
    for kind in ("reverse_kl", "forward_kl", "jsd", "branched"):
        chunked_divergence(hs, head, ht, head_t, weight, targets, reverse, kind=kind).loss.backward()
    assert ht.grad is None and head_t.grad is None
    assert hs.grad is not None


def test_clip_caps_each_term_and_stops_its_gradient():
    hs, head, ht, head_t, weight, targets, _ = make_inputs()
    unclipped = chunked_divergence(hs, head, ht, head_t, weight, targets, kind="reverse_kl")
    loose = chunked_divergence(hs, head, ht, head_t, weight, targets, kind="reverse_kl", clip_tau=1e9)
    tight = chunked_divergence(hs, head, ht, head_t, weight, targets, kind="reverse_kl", clip_tau=1e-4)
    torch.testing.assert_close(loose.loss, unclipped.loss)
    assert not loose.clipped_N.any() and tight.clipped_N.all()
    assert float(tight.loss) < float(unclipped.loss)
    # at most V terms of at most τ each, per position
    assert float(tight.value_N.max()) <= V * 1e-4 + 1e-12
    # every term capped: the loss is then constant in the student, so no gradient
    hs_grad = hs.clone().requires_grad_()
    capped = chunked_divergence(hs_grad, head, ht, head_t, weight, targets, kind="forward_kl", clip_tau=-1.0)
    capped.loss.backward()
    torch.testing.assert_close(capped.loss, -weight.sum() * V)
    assert float(hs_grad.grad.abs().max()) == 0.0


def test_temperature_divides_both_sides_logits():
    hs, head, ht, head_t, weight, targets, _ = make_inputs()
    for kind, t in itertools.product(("reverse_kl", "forward_kl", "jsd"), (0.5, 1.1, 3.0)):
        scaled = token_divergence(hs @ head.T, ht @ head_t.T, targets, kind=kind, temperature=t)
        manual = token_divergence(hs @ head.T / t, ht @ head_t.T / t, targets, kind=kind)
        torch.testing.assert_close(scaled.value_N, manual.value_N)


def test_jsd_interpolates_between_the_two_kls():
    hs, head, ht, head_t, weight, targets, _ = make_inputs()
    s, t = hs @ head.T, ht @ head_t.T
    forward = token_divergence(s, t, targets, kind="forward_kl").value_N
    reverse = token_divergence(s, t, targets, kind="reverse_kl").value_N
    torch.testing.assert_close(token_divergence(s, t, targets, kind="jsd", beta=0.0).value_N, forward)
    torch.testing.assert_close(token_divergence(s, t, targets, kind="jsd", beta=1.0).value_N, reverse)
    middle = token_divergence(s, t, targets, kind="jsd", beta=0.5).value_N
    assert torch.all(middle >= 0) and torch.all(middle <= torch.log(torch.tensor(2.0, dtype=middle.dtype)) + 1e-12)


def test_bf16_inputs_accumulate_in_float32():
    hs, head, ht, head_t, weight, targets, _ = make_inputs()
    exact = chunked_divergence(hs, head, ht, head_t, weight, targets, kind="reverse_kl")
    low = chunked_divergence(hs.bfloat16().requires_grad_(), head.bfloat16(), ht.bfloat16(), head_t.bfloat16(),
                             weight.float(), targets, kind="reverse_kl")
    assert low.loss.dtype == torch.float32
    torch.testing.assert_close(low.loss.double(), exact.loss, rtol=0.05, atol=0.05)


def test_no_positions_gives_zero_loss():
    hs, head, ht, head_t, weight, targets, _ = make_inputs()
    result = chunked_divergence(hs[:0].requires_grad_(), head, ht[:0], head_t, weight[:0], targets[:0])
    assert float(result.loss) == 0.0 and result.value_N.numel() == 0
