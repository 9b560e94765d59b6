"""Per-token teacher–student divergences over the vocabulary (METHODS.md §1–§3), as pure functions.

Shapes: N response positions, V vocabulary entries, H hidden size, C positions in a chunk, B = k + 1
buckets of the top-k estimator.

Each formula has one home, a pure function on log-probabilities:
- `divergence_terms`: the terms t_v of reverse KL, forward KL, JSD(β) and the branched loss, one per
  vocabulary entry (or bucket), summing to the divergence, with their slopes ∂t_v/∂log pS_v;
- `clip_terms`: OPSD's pointwise clip at τ;
- `topk_with_tail`: the top-k estimator's restriction of both distributions to k + 1 buckets;
- `sampled_terms`: the sampled-token estimator.
`chunked_divergence` (from hidden states and a linear teacher) and `chunked_divergence_to` (toward any
teacher's logits) run them chunk by chunk from the student's final hidden states. The gradient of the
student logits comes from the slopes by the softmax chain rule, with no autograd graph over the
vocabulary, so that no float32 [N × V] tensor exists for the whole batch. The naive autograd reference
that all of this is tested against lives in tests/objectives/test_divergence.py.

Conventions
- Logits of both sides are divided by `temperature` before the softmax (OPSD uses 1.1).
- reverse_kl = KL(pS‖pT), forward_kl = KL(pT‖pS).
- jsd(β) = β·KL(pT‖M) + (1−β)·KL(pS‖M) with M = β·pT + (1−β)·pS. Its endpoints are defined as in
  GKD/OPSD: β=0 is forward KL and β=1 is reverse KL (the mixture formula itself vanishes there).
- branched: reverse KL on positions of correct rollouts, forward KL on the others (Kim & Lee).
- clip_tau caps each (position, vocabulary entry) term at τ before the vocabulary sum (OPSD); a
  capped term carries no gradient.
- Estimators: `full` sums all V terms; `topk` keeps the teacher's k most likely entries plus one tail
  bucket holding the rest of each side's mass (an exact divergence of the coarser distribution; no
  gradient flows through the choice of entries); `sampled` uses only the rollout's own token y:
  loss = −sg(log pT(y) − log pS(y))·log pS(y), whose gradient is the per-token REINFORCE gradient of
  the reverse KL; its reported value is log pS(y) − log pT(y). It estimates the reverse KL whatever
  `kind` is, and no clip applies to it (the distill config refuses other kinds and a clip with it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

import torch

DivergenceKind = Literal["reverse_kl", "forward_kl", "jsd", "branched"]
Estimator = Literal["full", "topk", "sampled"]

ROWS_PER_BLOCK = {"cpu": 8, "cuda": 128}  # rows whose [rows × V] temporaries live at once


# ---- the formulas: finite log-probabilities in (see `_finite_log_softmax`), terms and slopes out ----


def divergence_terms(
    logp_s_N_V: torch.Tensor,
    logp_t_N_V: torch.Tensor,
    kind: DivergenceKind,
    beta: float,
    reverse_N: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(terms_N_V, slopes_N_V): the terms t_v whose sum over the last dimension is the divergence,
    and ∂t_v/∂log pS_v (each t_v depends on the student only through its own log pS_v).

    The last dimension is the vocabulary or the top-k buckets. `reverse_N` (kind "branched") is True
    where a position takes reverse KL; the others take forward KL. Log-probabilities must be finite so
    that 0·log 0 comes out as 0.
    """
    if kind == "branched":
        if reverse_N is None:
            raise ValueError("kind='branched' needs reverse_N")
        reverse = divergence_terms(logp_s_N_V, logp_t_N_V, "reverse_kl", beta)
        forward = divergence_terms(logp_s_N_V, logp_t_N_V, "forward_kl", beta)
        use_reverse = reverse_N[..., None]
        return torch.where(use_reverse, reverse[0], forward[0]), torch.where(use_reverse, reverse[1], forward[1])
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        p_s = logp_s_N_V.exp()
        terms = p_s * (logp_s_N_V - logp_t_N_V)
        return terms, terms + p_s  # ∂/∂log pS of pS·log(pS/pT) = pS·log(pS/pT) + pS
    p_t = logp_t_N_V.exp()
    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
        return p_t * (logp_t_N_V - logp_s_N_V), -p_t
    if kind == "jsd":
        logp_m = torch.logaddexp(logp_t_N_V + math.log(beta), logp_s_N_V + math.log(1.0 - beta))
        student_side = (1.0 - beta) * logp_s_N_V.exp() * (logp_s_N_V - logp_m)
        # ∂/∂log pS of β·pT·log(pT/M) + (1−β)·pS·log(pS/M) collapses to (1−β)·pS·log(pS/M)
        return beta * p_t * (logp_t_N_V - logp_m) + student_side, student_side
    raise ValueError(f"unknown divergence kind {kind!r}")


def clip_terms(
    terms_N_V: torch.Tensor, slopes_N_V: torch.Tensor, tau: float | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(terms, slopes, clipped_N) after OPSD's pointwise clip: each term capped at τ before the sum.
    A capped term is constant in the student, so its slope becomes 0; clipped_N is True where a
    position had at least one capped term. τ = None leaves everything as it is."""
    if tau is None:
        return terms_N_V, slopes_N_V, torch.zeros(terms_N_V.shape[:-1], dtype=torch.bool, device=terms_N_V.device)
    capped = terms_N_V > tau
    return terms_N_V.clamp(max=tau), slopes_N_V.masked_fill(capped, 0.0), capped.any(-1)


def topk_with_tail(
    logp_s_N_V: torch.Tensor, logp_t_N_V: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logq_s_N_B, logq_t_N_B, index_N_K): both sides restricted to the teacher's k most likely
    entries (`index_N_K`, in that order) plus a last bucket holding all the others' mass."""
    index_N_K = logp_t_N_V.topk(min(k, logp_t_N_V.shape[-1] - 1), dim=-1).indices

    def restrict(logp_N_V: torch.Tensor) -> torch.Tensor:
        tail_N_1 = logp_N_V.scatter(-1, index_N_K, -torch.inf).logsumexp(-1, keepdim=True)
        return torch.cat([logp_N_V.gather(-1, index_N_K), tail_N_1], dim=-1)

    return restrict(logp_s_N_V), restrict(logp_t_N_V), index_N_K


def sampled_terms(logp_s_y_N: torch.Tensor, logp_t_y_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss_N, slope_N) of the sampled-token estimator at the rollout's own tokens y, with advantage
    A = sg(log pT(y) − log pS(y)): loss −A·log pS(y) and its slope ∂/∂log pS(y) = −A.
    −A = log pS(y) − log pT(y) is also the reported value: over y ~ pS its mean is KL(pS‖pT), and
    the mean of the loss's gradient is the gradient of KL(pS‖pT)."""
    minus_advantage_N = logp_s_y_N - logp_t_y_N
    return minus_advantage_N * logp_s_y_N, minus_advantage_N


# ---- the chunked loss from hidden states ----


@dataclass(frozen=True)
class ChunkedDivergence:
    loss: torch.Tensor  # Σ_n w_n·loss_n (the divergence, or the sampled surrogate), differentiable in the student
    value_N: torch.Tensor  # the divergence (or its sampled estimate) at each position
    entropy_N: torch.Tensor  # student entropy at each position
    clipped_N: torch.Tensor  # True where at least one term was capped at clip_tau


@dataclass(frozen=True)
class DivergenceSpec:
    """Which divergence, and how it is estimated and chunked."""

    kind: DivergenceKind = "reverse_kl"
    beta: float = 0.5  # JSD's mixture weight
    temperature: float = 1.0  # logit temperature of both sides
    clip_tau: float | None = None  # cap on each (position, vocabulary) term (OPSD's pointwise clip)
    estimator: Estimator = "full"
    top_k: int = 64  # entries kept by the topk estimator
    chunk_size: int = 256  # positions per chunk: no more than chunk_size × V logits per side at once


def chunked_divergence(
    student_hidden_N_H: torch.Tensor,
    student_head_V_H: torch.Tensor,
    teacher_hidden_N_H: torch.Tensor,
    teacher_head_V_H: torch.Tensor,
    token_weight_N: torch.Tensor,
    targets_N: torch.Tensor,
    reverse_N: torch.Tensor | None = None,
    spec: DivergenceSpec = DivergenceSpec(),
) -> ChunkedDivergence:
    """Σ_n w_n·D_n toward a teacher given by its hidden states and head (which get no gradient)."""
    hidden_t, head_t = teacher_hidden_N_H.detach(), teacher_head_V_H.detach()
    return chunked_divergence_to(student_hidden_N_H, student_head_V_H, lambda part: hidden_t[part] @ head_t.T,
                                 token_weight_N, targets_N, reverse_N, spec)


def chunked_divergence_to(
    student_hidden_N_H: torch.Tensor,
    student_head_V_H: torch.Tensor,
    teacher_logits: Callable[[slice], torch.Tensor],
    token_weight_N: torch.Tensor,
    targets_N: torch.Tensor,
    reverse_N: torch.Tensor | None = None,
    spec: DivergenceSpec = DivergenceSpec(),
) -> ChunkedDivergence:
    """Σ_n w_n·D_n from the student's final hidden states, never holding more than C × V logits per
    side, toward any teacher whose [C × V] logits (or log-probabilities) for a slice of positions
    `teacher_logits(part)` computes on demand, e.g. the purified target of opsd/objectives/purified.py.

    `targets_N` are the rollout's tokens (used by the sampled estimator); `reverse_N` says which
    positions take reverse KL when kind is "branched". The gradient of each chunk is taken during
    the forward pass and stored for the backward pass, which just scales it: O(N·H + V·H) extra
    memory and no recomputation. The teacher never receives gradient.
    """
    _check(spec, reverse_N)
    loss, value_N, entropy_N, clipped_N = _FusedChunkedDivergence.apply(
        student_hidden_N_H, student_head_V_H, token_weight_N.detach(), teacher_logits, targets_N, reverse_N,
        spec.chunk_size, spec)
    return ChunkedDivergence(loss, value_N, entropy_N, clipped_N)


def _check(options: DivergenceSpec, reverse_N: torch.Tensor | None) -> None:
    """Option combinations that have no meaning are refused here, in one sentence each."""
    if options.kind not in get_args(DivergenceKind):
        raise ValueError(f"unknown divergence kind {options.kind!r}")
    if options.estimator not in get_args(Estimator):
        raise ValueError(f"unknown estimator {options.estimator!r}")
    if options.kind == "branched" and reverse_N is None:
        raise ValueError("kind='branched' needs reverse_N")
    if options.kind == "jsd" and not 0.0 <= options.beta <= 1.0:
        raise ValueError(f"jsd needs 0 <= beta <= 1, got {options.beta}")
    if options.estimator == "topk" and options.top_k < 1:
        raise ValueError(f"estimator='topk' needs top_k >= 1, got {options.top_k}")


class _FusedChunkedDivergence(torch.autograd.Function):
    """Per chunk: logits → divergence → d(loss)/d(logits) on the [C × V] block only (written over the
    chunk's logits by `_divergence_and_gradient`, so a chunk costs two [C × V] buffers, its logits and
    the teacher's), then the two matmuls that carry it to the hidden states and (accumulated in place)
    to the head. Nothing of size [V × H] is allocated per chunk."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, hidden_s, head_s, weight_N, teacher_logits, targets_N, reverse_N, chunk_size, options
    ):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        accumulate = torch.promote_types(head_s.dtype, torch.float32)
        grad_h = torch.zeros_like(hidden_s) if need_h else None
        grad_w = torch.zeros_like(head_s, dtype=accumulate) if need_w else None
        total = torch.zeros((), dtype=torch.promote_types(hidden_s.dtype, torch.float32), device=hidden_s.device)
        values, entropies, clipped = [], [], []
        for start in range(0, hidden_s.shape[0], chunk_size):
            part = slice(start, start + chunk_size)
            h = hidden_s[part]
            grad_logits = h @ head_s.T  # becomes the gradient in place
            loss_C, value_C, entropy_C, clipped_C = _divergence_and_gradient(
                grad_logits, teacher_logits(part), weight_N[part], targets_N[part],
                None if reverse_N is None else reverse_N[part], options)
            total += (loss_C * weight_N[part]).sum()
            values.append(value_C)
            entropies.append(entropy_C)
            clipped.append(clipped_C)
            if need_h:
                grad_h[part] = grad_logits @ head_s
            if need_w:
                grad_w.addmm_(grad_logits.T.to(accumulate), h.to(accumulate))
            del grad_logits  # free the chunk's logits before the next chunk allocates its own
        # kept as plain attributes (they are neither inputs nor outputs) so that backward can hand
        # over the only reference and autograd stores them as .grad without copying
        ctx.grads = (grad_h, None if grad_w is None else grad_w.to(head_s.dtype))
        if not values:  # no response positions at all
            empty = hidden_s.new_zeros(0, dtype=total.dtype)
            values, entropies, clipped = [empty], [empty], [empty.bool()]
        outputs = (torch.cat(values), torch.cat(entropies), torch.cat(clipped))
        ctx.mark_non_differentiable(*outputs)
        return (total, *outputs)

    @staticmethod
    def backward(ctx, grad_loss, *_):  # type: ignore[override]
        grad_h, grad_w = ctx.grads
        del ctx.grads
        # the gradients are used once: scale them in place rather than allocating copies
        scale = lambda g: None if g is None else g.mul_(grad_loss.to(g.dtype))
        return scale(grad_h), scale(grad_w), None, None, None, None, None, None


def _divergence_and_gradient(
    logits_C_V: torch.Tensor,
    teacher_logits_C_V: torch.Tensor,
    weight_C: torch.Tensor,
    targets_C: torch.Tensor,
    reverse_C: torch.Tensor | None,
    options: DivergenceSpec,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss, value, entropy and clipped per row, with d(Σ w·loss)/d(logits) written over `logits_C_V`.

    Works a few rows at a time (fp32 temporaries of [rows × V]). `_estimate` gives the slopes of the
    loss in each log pS_v; as log pS = log_softmax(logits/T), the chain rule gives
    ∂loss/∂logits_v = (slope_v − pS_v·Σ_u slope_u)/T.
    """
    rows = ROWS_PER_BLOCK.get(logits_C_V.device.type, 32)
    losses, values, entropies, clipped = [], [], [], []
    for start in range(0, logits_C_V.shape[0], rows):
        block = slice(start, start + rows)
        logp_s = _finite_log_softmax(logits_C_V[block], options.temperature)
        logp_t = _finite_log_softmax(teacher_logits_C_V[block], options.temperature)
        p_s = logp_s.exp()
        entropies.append(-(p_s * logp_s).sum(-1))
        reverse_R = None if reverse_C is None else reverse_C[block]
        loss_R, value_R, slopes, clipped_R = _estimate(logp_s, logp_t, targets_C[block], reverse_R, options)
        losses.append(loss_R)
        values.append(value_R)
        clipped.append(clipped_R)
        grad = slopes.sub_(p_s * slopes.sum(-1, keepdim=True)).mul_(weight_C[block, None] / options.temperature)
        logits_C_V[block] = grad
    return torch.cat(losses), torch.cat(values), torch.cat(entropies), torch.cat(clipped)


def _estimate(
    logp_s_R_V: torch.Tensor,
    logp_t_R_V: torch.Tensor,
    targets_R: torch.Tensor,
    reverse_R: torch.Tensor | None,
    options: DivergenceSpec,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss_R, value_R, slopes_R_V, clipped_R) of a block of rows under the chosen estimator: slopes
    are ∂loss/∂log pS_v over the whole vocabulary; loss and value differ only for `sampled`."""
    if options.estimator == "sampled":
        y_R_1 = targets_R[:, None]
        at_y = lambda logp_R_V: logp_R_V.gather(-1, y_R_1).squeeze(-1)
        loss_R, slope_R = sampled_terms(at_y(logp_s_R_V), at_y(logp_t_R_V))
        slopes_R_V = torch.zeros_like(logp_s_R_V).scatter_(-1, y_R_1, slope_R[:, None])
        return loss_R, slope_R, slopes_R_V, torch.zeros_like(loss_R, dtype=torch.bool)
    if options.estimator == "topk":
        logq_s_R_B, logq_t_R_B, index_R_K = topk_with_tail(logp_s_R_V, logp_t_R_V, options.top_k)
        terms, slopes_R_B = divergence_terms(logq_s_R_B, logq_t_R_B, options.kind, options.beta, reverse_R)
        terms, slopes_R_B, clipped_R = clip_terms(terms, slopes_R_B, options.clip_tau)
        slopes_R_V = _bucket_slopes_to_vocabulary(slopes_R_B, logp_s_R_V, logq_s_R_B, index_R_K)
    else:
        terms, slopes_R_V = divergence_terms(logp_s_R_V, logp_t_R_V, options.kind, options.beta, reverse_R)
        terms, slopes_R_V, clipped_R = clip_terms(terms, slopes_R_V, options.clip_tau)
    value_R = terms.sum(-1)
    return value_R, value_R, slopes_R_V, clipped_R


def _bucket_slopes_to_vocabulary(
    slopes_R_B: torch.Tensor, logp_s_R_V: torch.Tensor, logq_s_R_B: torch.Tensor, index_R_K: torch.Tensor
) -> torch.Tensor:
    """Slopes in the top-k buckets carried back to the vocabulary's log pS: a kept entry is its own
    bucket; a tail entry v enters only through log qS_tail = log Σ_tail pS, whose derivative in
    log pS_v is pS_v/qS_tail."""
    tail_share_R_V = (logp_s_R_V - logq_s_R_B[:, -1:]).exp_()  # kept entries are overwritten below
    return tail_share_R_V.mul_(slopes_R_B[:, -1:]).scatter_(-1, index_R_K, slopes_R_B[:, :-1])


def _at_least_fp32(logits: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 logits are promoted so the softmax and the vocabulary sum accumulate in fp32."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _finite_log_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """fp32 log-softmax with −inf (masked entries) raised to the lowest finite float, so that
    0·log 0 terms come out as 0 instead of nan."""
    logp = torch.log_softmax(_at_least_fp32(logits) / temperature, dim=-1)
    return logp.clamp_(min=torch.finfo(logp.dtype).min)
