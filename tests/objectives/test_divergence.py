"""Divergences and estimators against a naive full-logits reference (values and gradients), and the
identities they must satisfy. The reference below is the only autograd version of the formulas."""

import itertools
import math

import pytest
import torch

from opsd.objectives.divergence import (
    DivergenceSpec,
    chunked_divergence,
    chunked_divergence_to,
    clip_terms,
    divergence_terms,
    topk_with_tail,
)

N, H, V = 13, 8, 37


def naive_terms(logp_s, logp_t, kind, beta):
    """Terms of METHODS.md's divergences for one position, as explicit KL sums."""
    kl_terms = lambda logp_a, logp_b: logp_a.exp() * (logp_a - logp_b)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        return kl_terms(logp_s, logp_t)
    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
        return kl_terms(logp_t, logp_s)
    logp_m = torch.log(beta * logp_t.exp() + (1 - beta) * logp_s.exp())
    return beta * kl_terms(logp_t, logp_m) + (1 - beta) * kl_terms(logp_s, logp_m)


def naive_loss(hs, head, ht, head_t, weight, targets, reverse, *, kind="reverse_kl", beta=0.5, temperature=1.0,
               clip_tau=None, estimator="full", top_k=64):
    """(Σ w·loss, value_N) with plain autograd on full [N × V] logits, one position at a time."""
    logp_s_N_V = torch.log_softmax(hs @ head.T / temperature, -1)
    logp_t_N_V = torch.log_softmax(ht @ head_t.T / temperature, -1).detach()
    losses, values = [], []
    for n in range(hs.shape[0]):
        logp_s, logp_t = logp_s_N_V[n], logp_t_N_V[n]
        if estimator == "sampled":
            y = targets[n]
            advantage = (logp_t[y] - logp_s[y]).detach()
            losses.append(-advantage * logp_s[y])
            values.append(-advantage)
            continue
        if estimator == "topk":
            kept = torch.topk(logp_t, top_k).indices
            tail = torch.ones(V, dtype=torch.bool)
            tail[kept] = False
            logp_s = torch.cat([logp_s[kept], torch.log(logp_s.exp()[tail].sum())[None]])
            logp_t = torch.cat([logp_t[kept], torch.log(logp_t.exp()[tail].sum())[None]])
        k = ("reverse_kl" if reverse[n] else "forward_kl") if kind == "branched" else kind
        terms = naive_terms(logp_s, logp_t, k, beta)
        if clip_tau is not None:
            terms = torch.clamp(terms, max=clip_tau)
        losses.append(terms.sum())
        values.append(terms.sum().detach())
    return (weight * torch.stack(losses)).sum(), torch.stack(values)


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


KINDS = [dict(kind="reverse_kl"), dict(kind="forward_kl"), dict(kind="jsd", beta=0.5), dict(kind="jsd", beta=0.1),
         dict(kind="jsd", beta=0.0), dict(kind="jsd", beta=1.0), dict(kind="branched")]
ESTIMATORS = [dict(estimator="full"), dict(estimator="topk", top_k=5), dict(estimator="sampled")]
GRID = [dict(**kind, **estimator, clip_tau=clip, temperature=t)
        for kind, estimator, clip, t in itertools.product(KINDS, ESTIMATORS, (None, 0.05), (1.0, 1.1))]
VALID = [o for o in GRID if o["estimator"] != "sampled" or (o["kind"] == "reverse_kl" and o["clip_tau"] is None)]
IGNORED = [o for o in GRID if o not in VALID]  # sampled with another kind or a clip
name = lambda o: "-".join(f"{k}={v}" for k, v in o.items())


@pytest.mark.parametrize("options", VALID, ids=name)
@pytest.mark.parametrize("chunk_size", [4, 1000])
def test_chunked_matches_naive_values_and_gradients(options, chunk_size):
    hs, head, ht, head_t, weight, targets, reverse = make_inputs()
    hs1, head1 = hs.clone().requires_grad_(), head.clone().requires_grad_()
    expected, expected_N = naive_loss(hs1, head1, ht, head_t, weight, targets, reverse, **options)
    expected.backward()
    hs2, head2 = hs.clone().requires_grad_(), head.clone().requires_grad_()
    result = chunked_divergence(hs2, head2, ht, head_t, weight, targets, reverse,
                                spec=DivergenceSpec(chunk_size=chunk_size, **options))
    result.loss.backward()
    torch.testing.assert_close(result.loss, expected)
    torch.testing.assert_close(result.value_N, expected_N)
    torch.testing.assert_close(hs2.grad, hs1.grad)
    torch.testing.assert_close(head2.grad, head1.grad)
    logp_s = torch.log_softmax(hs @ head.T / options["temperature"], -1)
    torch.testing.assert_close(result.entropy_N, -(logp_s.exp() * logp_s).sum(-1))
    assert float(hs1.grad.abs().max()) > 1e-3  # the comparison is not between two zeros
    if options["clip_tau"] is not None:  # the clip is exercised (and the gradient above is not all capped)
        assert result.clipped_N.any()


@pytest.mark.parametrize("options", IGNORED, ids=name)
def test_sampled_estimates_the_reverse_kl_whatever_kind_and_clip(options):
    hs, head, ht, head_t, weight, targets, reverse = make_inputs()
    plain = dict(options, kind="reverse_kl", clip_tau=None)
    got = chunked_divergence(hs, head, ht, head_t, weight, targets, reverse, spec=DivergenceSpec(**options))
    expected = chunked_divergence(hs, head, ht, head_t, weight, targets, reverse, spec=DivergenceSpec(**plain))
    assert not got.clipped_N.any()
    torch.testing.assert_close(got.loss, expected.loss)
    torch.testing.assert_close(got.value_N, expected.value_N)


@pytest.mark.parametrize("options", [dict(kind="branched"), dict(kind="kl"), dict(kind="jsd", beta=1.5),
                                     dict(estimator="exact"), dict(estimator="topk", top_k=0)], ids=name)
def test_bad_options_are_refused(options):
    hs, head, ht, head_t, weight, targets, _ = make_inputs()
    with pytest.raises(ValueError):
        chunked_divergence(hs, head, ht, head_t, weight, targets, None, spec=DivergenceSpec(**options))


@pytest.mark.parametrize("options", VALID, ids=name)
def test_zero_with_zero_gradient_when_teacher_equals_student(options):
    hs, head, ht, head_t, weight, targets, reverse = make_inputs(same=True)
    hs.requires_grad_()
    result = chunked_divergence(hs, head, ht, head_t, weight, targets, reverse, spec=DivergenceSpec(chunk_size=4,
                                                                                                    **options))
    result.loss.backward()
    assert abs(float(result.loss.detach())) < 1e-10
    assert float(result.value_N.abs().max()) < 1e-10
    assert float(hs.grad.abs().max()) < 1e-10


@pytest.mark.parametrize("options", [dict(kind="reverse_kl"), dict(kind="branched"),
                                     dict(kind="jsd", estimator="topk", top_k=5),
                                     dict(kind="reverse_kl", estimator="sampled")], ids=name)
def test_zero_weight_positions_contribute_nothing(options):
    hs, head, ht, head_t, weight, targets, reverse = make_inputs()
    weight[::2] = 0.0
    hs.requires_grad_()
    result = chunked_divergence(hs, head, ht, head_t, weight, targets, reverse, spec=DivergenceSpec(chunk_size=4,
                                                                                                    **options))
    result.loss.backward()
    assert torch.all(hs.grad[::2] == 0)
    assert torch.any(hs.grad[1::2] != 0)
    kept = chunked_divergence(hs[1::2].detach(), head, ht[1::2], head_t, weight[1::2], targets[1::2], reverse[1::2],
                              spec=DivergenceSpec(**options))
    torch.testing.assert_close(result.loss.detach(), kept.loss)


@pytest.mark.parametrize("estimator", ESTIMATORS, ids=name)
def test_gradient_flows_only_into_the_student(estimator):
    hs, head, ht, head_t, weight, targets, reverse = make_inputs()
    for tensor in (hs, head, ht, head_t):
        tensor.requires_grad_()
    kinds = ["reverse_kl"] if estimator["estimator"] == "sampled" else ["reverse_kl", "forward_kl", "jsd", "branched"]
    for kind in kinds:
        chunked_divergence(hs, head, ht, head_t, weight, targets, reverse, spec=DivergenceSpec(kind=kind,
                                                                                               **estimator)).loss.backward()
        chunked_divergence_to(hs, head, lambda part: ht[part] @ head_t.T, weight, targets, reverse,
                              spec=DivergenceSpec(kind=kind, **estimator)).loss.backward()
    assert ht.grad is None and head_t.grad is None
    assert hs.grad.abs().max() > 0 and head.grad.abs().max() > 0


def test_divergence_terms_slopes_are_their_derivatives():
    g = torch.Generator().manual_seed(1)
    logp_s = torch.log_softmax(torch.randn(3, 6, generator=g, dtype=torch.float64), -1)
    logp_t = torch.log_softmax(torch.randn(3, 6, generator=g, dtype=torch.float64), -1)
    reverse = torch.tensor([True, False, True])
    for options in KINDS:
        kind, beta = options["kind"], options.get("beta", 0.5)
        terms, slopes = divergence_terms(logp_s, logp_t, kind, beta, reverse)
        for n in range(3):
            k = ("reverse_kl" if reverse[n] else "forward_kl") if kind == "branched" else kind
            torch.testing.assert_close(terms[n], naive_terms(logp_s[n], logp_t[n], k, beta))
            # t_v depends only on log pS_v: the Jacobian is diagonal, with the slopes on it
            jacobian = torch.autograd.functional.jacobian(lambda x: naive_terms(x, logp_t[n], k, beta), logp_s[n])
            torch.testing.assert_close(jacobian, torch.diag(slopes[n]))


def test_jsd_endpoints_are_the_two_kls():
    g = torch.Generator().manual_seed(2)
    logp_s = torch.log_softmax(torch.randn(4, 9, generator=g, dtype=torch.float64), -1)
    logp_t = torch.log_softmax(torch.randn(4, 9, generator=g, dtype=torch.float64), -1)
    forward, reverse = (divergence_terms(logp_s, logp_t, k, 0.5) for k in ("forward_kl", "reverse_kl"))
    for got, want in zip(divergence_terms(logp_s, logp_t, "jsd", 0.0), forward):
        torch.testing.assert_close(got, want)
    for got, want in zip(divergence_terms(logp_s, logp_t, "jsd", 1.0), reverse):
        torch.testing.assert_close(got, want)
    middle = divergence_terms(logp_s, logp_t, "jsd", 0.5)[0].sum(-1)
    assert torch.all(middle > 0) and torch.all(middle <= math.log(2.0))
    hs, head, ht, head_t, weight, targets, _ = make_inputs()
    value = lambda **o: chunked_divergence(hs, head, ht, head_t, weight, targets, spec=DivergenceSpec(**o)).value_N
    torch.testing.assert_close(value(kind="jsd", beta=0.0), value(kind="forward_kl"))
    torch.testing.assert_close(value(kind="jsd", beta=1.0), value(kind="reverse_kl"))


def test_clip_terms_caps_each_term_and_kills_its_slope():
    terms = torch.tensor([[0.01, 0.2, -0.1], [0.0, 0.03, 0.04]])
    slopes = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    capped, capped_slopes, clipped = clip_terms(terms, slopes, 0.05)
    torch.testing.assert_close(capped, torch.tensor([[0.01, 0.05, -0.1], [0.0, 0.03, 0.04]]))
    torch.testing.assert_close(capped_slopes, torch.tensor([[1.0, 0.0, 3.0], [4.0, 5.0, 6.0]]))
    assert clipped.tolist() == [True, False]
    same_terms, same_slopes, none = clip_terms(terms, slopes, None)
    assert same_terms is terms and same_slopes is slopes and not none.any()


def test_chunked_clip_caps_each_term_and_stops_its_gradient():
    hs, head, ht, head_t, weight, targets, _ = make_inputs()
    unclipped = chunked_divergence(hs, head, ht, head_t, weight, targets, spec=DivergenceSpec(kind="reverse_kl"))
    loose = chunked_divergence(hs, head, ht, head_t, weight, targets, spec=DivergenceSpec(kind="reverse_kl",
                                                                                          clip_tau=1e9))
    tight = chunked_divergence(hs, head, ht, head_t, weight, targets, spec=DivergenceSpec(kind="reverse_kl",
                                                                                          clip_tau=1e-4))
    torch.testing.assert_close(loose.loss, unclipped.loss)
    assert not loose.clipped_N.any() and tight.clipped_N.all()
    assert float(tight.loss) < float(unclipped.loss)
    assert float(tight.value_N.max()) <= V * 1e-4 + 1e-12  # at most V terms of at most τ each
    # every term capped: the loss is then constant in the student, so no gradient
    hs_grad = hs.clone().requires_grad_()
    capped = chunked_divergence(hs_grad, head, ht, head_t, weight, targets, spec=DivergenceSpec(kind="forward_kl",
                                                                                                clip_tau=-1.0))
    capped.loss.backward()
    torch.testing.assert_close(capped.loss, -weight.sum() * V)
    assert float(hs_grad.grad.abs().max()) == 0.0


def test_topk_buckets_are_distributions_over_the_teachers_top_entries():
    g = torch.Generator().manual_seed(4)
    logp_s = torch.log_softmax(torch.randn(5, 11, generator=g, dtype=torch.float64), -1)
    logp_t = torch.log_softmax(torch.randn(5, 11, generator=g, dtype=torch.float64), -1)
    logq_s, logq_t, index = topk_with_tail(logp_s, logp_t, 3)
    assert logq_s.shape == logq_t.shape == (5, 4)
    torch.testing.assert_close(logq_s.logsumexp(-1), torch.zeros(5, dtype=torch.float64))
    torch.testing.assert_close(logq_t.logsumexp(-1), torch.zeros(5, dtype=torch.float64))
    assert torch.equal(logq_t[:, :3], logp_t.sort(-1, descending=True).values[:, :3])
    torch.testing.assert_close(logq_s[:, :3], logp_s.gather(-1, index))


@pytest.mark.parametrize("kind", KINDS, ids=name)
def test_topk_keeping_all_but_one_entry_is_the_full_divergence(kind):
    hs, head, ht, head_t, weight, targets, reverse = make_inputs()
    results, grads = [], []
    every_entry, more_than_every = dict(estimator="topk", top_k=V - 1), dict(estimator="topk", top_k=10 * V)
    for estimator in (dict(estimator="full"), every_entry, more_than_every):
        head_grad = head.clone().requires_grad_()
        results.append(chunked_divergence(hs, head_grad, ht, head_t, weight, targets, reverse,
                                          spec=DivergenceSpec(**kind, **estimator)))
        results[-1].loss.backward()
        grads.append(head_grad.grad)
    for result, grad in zip(results[1:], grads[1:]):
        torch.testing.assert_close(result.value_N, results[0].value_N)
        torch.testing.assert_close(grad, grads[0])


def test_sampled_estimator_is_unbiased_for_the_reverse_kl():
    """Over y ~ pS, the mean value is KL(pS‖pT) and the mean gradient is its gradient."""
    hs, head, ht, head_t, _, _, _ = make_inputs()
    t = 1.1
    p_s = torch.softmax(hs[:1] @ head.T / t, -1)[0]
    every_y = torch.arange(V)
    head_sampled, head_full = head.clone().requires_grad_(), head.clone().requires_grad_()
    sampled = chunked_divergence(hs[:1].expand(V, H), head_sampled, ht[:1].expand(V, H), head_t, p_s, every_y,
                                 spec=DivergenceSpec(estimator="sampled", temperature=t))
    full = chunked_divergence(hs[:1], head_full, ht[:1], head_t, torch.ones(1, dtype=hs.dtype), every_y[:1],
                              spec=DivergenceSpec(kind="reverse_kl", temperature=t))
    sampled.loss.backward()
    full.loss.backward()
    torch.testing.assert_close((p_s * sampled.value_N).sum(), full.value_N[0])
    torch.testing.assert_close(head_sampled.grad, head_full.grad)


def test_temperature_divides_both_sides_logits():
    hs, head, ht, head_t, weight, targets, reverse = make_inputs()
    for kind, t in itertools.product(("reverse_kl", "forward_kl", "jsd", "branched"), (0.5, 1.1, 3.0)):
        heads = [head.clone().requires_grad_() for _ in range(2)]
        scaled = chunked_divergence(hs, heads[0], ht, head_t, weight, targets, reverse, spec=DivergenceSpec(kind=kind,
                                                                                                            temperature=t))
        manual = chunked_divergence(hs / t, heads[1], ht / t, head_t, weight, targets, reverse,
                                    spec=DivergenceSpec(kind=kind))
        scaled.loss.backward()
        manual.loss.backward()
        torch.testing.assert_close(scaled.value_N, manual.value_N)
        torch.testing.assert_close(heads[0].grad, heads[1].grad)


def test_bf16_inputs_accumulate_in_float32():
    hs, head, ht, head_t, weight, targets, _ = make_inputs()
    exact = chunked_divergence(hs, head, ht, head_t, weight, targets, spec=DivergenceSpec(kind="reverse_kl"))
    low = chunked_divergence(hs.bfloat16().requires_grad_(), head.bfloat16(), ht.bfloat16(), head_t.bfloat16(),
                             weight.float(), targets, spec=DivergenceSpec(kind="reverse_kl"))
    assert low.loss.dtype == torch.float32
    torch.testing.assert_close(low.loss.double(), exact.loss, rtol=0.05, atol=0.05)


def test_no_positions_gives_zero_loss():
    hs, head, ht, head_t, weight, targets, _ = make_inputs()
    result = chunked_divergence(hs[:0].requires_grad_(), head, ht[:0], head_t, weight[:0], targets[:0])
    assert float(result.loss.detach()) == 0.0 and result.value_N.numel() == 0
