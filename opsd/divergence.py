"""Per-token teacher–student divergences over the vocabulary (METHODS.md §1–§3), as pure functions.

Shapes: N response positions, V vocabulary entries, H hidden size, C positions in a chunk.
Everything here works on one block of positions; `chunked_divergence` runs it chunk by chunk from
final hidden states so that no float32 [N × V] logits tensor exists for the whole batch.

Conventions
- Logits of both sides are divided by `temperature` before the softmax (OPSD uses 1.1).
- reverse_kl = KL(pS‖pT), forward_kl = KL(pT‖pS).
- jsd(β) = β·KL(pT‖M) + (1−β)·KL(pS‖M) with M = β·pT + (1−β)·pS. Its endpoints are defined as in
  GKD/OPSD: β=0 is forward KL and β=1 is reverse KL (the mixture formula itself vanishes there).
- branched: reverse KL on positions of correct rollouts, forward KL on the others (Kim & Lee).
- clip_tau caps each (position, vocabulary entry) term at τ before the vocabulary sum (OPSD); a
  capped term carries no gradient.
- Estimators: `full` sums all V terms; `topk` keeps the teacher's k most likely entries plus one tail
  bucket holding the rest of each side's mass (an exact divergence of the coarser distribution);
  `sampled` uses only the rollout's own token: loss = −sg(log pT(y) − log pS(y))·log pS(y), whose
  gradient is the per-token REINFORCE gradient of the reverse KL; its reported value is
  log pS(y) − log pT(y).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Callable
from typing import Literal

import torch

DivergenceKind = Literal["reverse_kl", "forward_kl", "jsd", "branched"]
Estimator = Literal["full", "topk", "sampled"]


@dataclass(frozen=True)
class TokenDivergence:
    """Per-position results; only `loss_N` carries gradient."""

    loss_N: torch.Tensor  # differentiable surrogate whose gradient is the divergence's gradient
    value_N: torch.Tensor  # the divergence itself (detached), what metrics report
    entropy_N: torch.Tensor  # student entropy at each position (detached)
    clipped_N: torch.Tensor  # True where at least one vocabulary term was capped at clip_tau


def token_divergence(
    student_logits_N_V: torch.Tensor,
    teacher_logits_N_V: torch.Tensor,
    targets_N: torch.Tensor,
    reverse_N: torch.Tensor | None = None,
    *,
    kind: DivergenceKind = "reverse_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    clip_tau: float | None = None,
    estimator: Estimator = "full",
    top_k: int = 64,
) -> TokenDivergence:
    """Divergence between student and teacher at each of N positions.

    `targets_N` are the rollout's tokens at those positions (used by the sampled estimator);
    `reverse_N` says which positions use reverse KL when kind is "branched".
    """
    logp_s = torch.log_softmax(_at_least_fp32(student_logits_N_V) / temperature, dim=-1)
    logp_t = torch.log_softmax(_at_least_fp32(teacher_logits_N_V) / temperature, dim=-1).detach()
    entropy_N = -(logp_s.exp() * logp_s).sum(-1).detach()
    if estimator == "sampled":
        logp_s_y = logp_s.gather(-1, targets_N[:, None]).squeeze(-1)
        logp_t_y = logp_t.gather(-1, targets_N[:, None]).squeeze(-1)
        advantage_N = (logp_t_y - logp_s_y).detach()
        no_clip = torch.zeros_like(advantage_N, dtype=torch.bool)
        return TokenDivergence(-advantage_N * logp_s_y, -advantage_N, entropy_N, no_clip)
    if estimator == "topk":
        logp_s, logp_t = _topk_with_tail(logp_s, logp_t, top_k)

    if kind == "branched":
        if reverse_N is None:
            raise ValueError("kind='branched' needs reverse_N")
        reverse_terms = _kl_terms(logp_s, logp_t)
        forward_terms = _kl_terms(logp_t, logp_s)
        terms_N_V = torch.where(reverse_N[:, None], reverse_terms, forward_terms)
    else:
        terms_N_V = divergence_terms(logp_s, logp_t, kind, beta)

    if clip_tau is None:
        clipped_N = torch.zeros(terms_N_V.shape[0], dtype=torch.bool, device=terms_N_V.device)
    else:
        clipped_N = (terms_N_V > clip_tau).any(-1).detach()
        terms_N_V = terms_N_V.clamp(max=clip_tau)
    loss_N = terms_N_V.sum(-1)
    return TokenDivergence(loss_N, loss_N.detach(), entropy_N, clipped_N)


def _at_least_fp32(logits: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 logits are promoted so the softmax and the vocabulary sum accumulate in fp32."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def divergence_terms(
    logp_s: torch.Tensor, logp_t: torch.Tensor, kind: DivergenceKind, beta: float
) -> torch.Tensor:
    """The per-vocabulary-entry terms whose sum is the divergence (before any clip)."""
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        return _kl_terms(logp_s, logp_t)
    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
        return _kl_terms(logp_t, logp_s)
    if kind == "jsd":
        logp_m = torch.logaddexp(logp_t + math.log(beta), logp_s + math.log(1.0 - beta))
        return beta * _kl_terms(logp_t, logp_m) + (1.0 - beta) * _kl_terms(logp_s, logp_m)
    raise ValueError(f"unknown divergence kind {kind!r}")


def _kl_terms(logp_a: torch.Tensor, logp_b: torch.Tensor) -> torch.Tensor:
    """Terms a_v·(log a_v − log b_v) of KL(a‖b); exact zeros where a_v underflows to 0."""
    return torch.where(logp_a > -torch.inf, logp_a.exp() * (logp_a - logp_b), 0.0)


def _topk_with_tail(
    logp_s: torch.Tensor, logp_t: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sides restricted to the teacher's top-k entries plus one bucket for all the others."""
    index_N_K = logp_t.topk(min(k, logp_t.shape[-1] - 1), dim=-1).indices

    def restrict(logp: torch.Tensor) -> torch.Tensor:
        tail = logp.scatter(-1, index_N_K, -torch.inf).logsumexp(-1, keepdim=True)
        return torch.cat([logp.gather(-1, index_N_K), tail], dim=-1)

    return restrict(logp_s), restrict(logp_t)


@dataclass(frozen=True)
class ChunkedDivergence:
    loss: torch.Tensor  # Σ token_weight_N · loss_N, differentiable w.r.t. student hidden and head
    value_N: torch.Tensor
    entropy_N: torch.Tensor
    clipped_N: torch.Tensor


def chunked_divergence(
    student_hidden_N_H: torch.Tensor,
    student_head_V_H: torch.Tensor,
    teacher_hidden_N_H: torch.Tensor,
    teacher_head_V_H: torch.Tensor,
    token_weight_N: torch.Tensor,
    targets_N: torch.Tensor,
    reverse_N: torch.Tensor | None = None,
    *,
    chunk_size: int = 256,
    **divergence_options,
) -> ChunkedDivergence:
    """Σ_n w_n·D_n from final hidden states, never holding more than C × V logits per side.

    The gradient of each chunk is taken during the forward pass (with the logits of that chunk
    only) and stored for the backward pass, which just scales it: O(N·H + V·H) extra memory and
    no recomputation. The teacher tensors never receive gradient.
    """
    hidden_t, head_t = teacher_hidden_N_H.detach(), teacher_head_V_H.detach()
    return chunked_divergence_to(
        student_hidden_N_H, student_head_V_H, lambda part: hidden_t[part] @ head_t.T, token_weight_N, targets_N,
        reverse_N, chunk_size=chunk_size, **divergence_options,
    )


def chunked_divergence_to(
    student_hidden_N_H: torch.Tensor,
    student_head_V_H: torch.Tensor,
    teacher_logits: Callable[[slice], torch.Tensor],
    token_weight_N: torch.Tensor,
    targets_N: torch.Tensor,
    reverse_N: torch.Tensor | None = None,
    *,
    chunk_size: int = 256,
    **divergence_options,
) -> ChunkedDivergence:
    """The same, toward any teacher whose [C × V] logits (or log-probabilities) for a slice of
    positions `teacher_logits(part)` computes on demand, e.g. the purified target of opsd/purified.py."""
    options = dict(divergence_options, chunk_size=chunk_size, targets_N=targets_N, reverse_N=reverse_N,
                   teacher_logits=teacher_logits)
    loss, value_N, entropy_N, clipped_N = _FusedChunkedDivergence.apply(
        student_hidden_N_H, student_head_V_H, token_weight_N.detach(), options)
    return ChunkedDivergence(loss, value_N, entropy_N, clipped_N)


class _FusedChunkedDivergence(torch.autograd.Function):
    """Per chunk: logits → divergence → d(loss)/d(logits) on the [C × V] block only, then the two
    matmuls that carry it to the hidden states and (accumulated in place) to the head. Nothing of
    size [V × H] is allocated per chunk.

    The full-vocabulary estimator takes the gradient analytically (`_divergence_and_gradient`),
    writing it over the chunk's student logits a few rows at a time, so a chunk costs two [C × V]
    buffers; the top-k and sampled estimators take it by autograd on the chunk."""

    @staticmethod
    def forward(ctx, hidden_s, head_s, weight_N, options):  # type: ignore[override]
        options = dict(options)
        teacher_logits = options.pop("teacher_logits")
        chunk_size = options.pop("chunk_size")
        targets_N = options.pop("targets_N")
        reverse_N = options.pop("reverse_N")
        if options.get("kind") == "branched" and reverse_N is None:
            raise ValueError("kind='branched' needs reverse_N")
        analytic = options.get("estimator", "full") == "full"
        analytic_options = {k: v for k, v in options.items() if k not in ("estimator", "top_k")}
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        accumulate = torch.promote_types(head_s.dtype, torch.float32)
        grad_h = torch.zeros_like(hidden_s) if need_h else None
        grad_w = torch.zeros_like(head_s, dtype=accumulate) if need_w else None
        total = torch.zeros((), dtype=torch.promote_types(hidden_s.dtype, torch.float32), device=hidden_s.device)
        values, entropies, clipped = [], [], []
        for start in range(0, hidden_s.shape[0], chunk_size):
            part = slice(start, start + chunk_size)
            h = hidden_s[part]
            reverse_C = None if reverse_N is None else reverse_N[part]
            if analytic:
                grad_logits = h @ head_s.T  # becomes the gradient in place
                value_C, entropy_C, clipped_C = _divergence_and_gradient(
                    grad_logits, teacher_logits(part), weight_N[part], reverse_C, **analytic_options)
                chunk_loss = (value_C * weight_N[part]).sum()
            else:
                grad_logits, chunk_loss, (value_C, entropy_C, clipped_C) = _autograd_chunk(
                    h @ head_s.T, teacher_logits(part), weight_N[part], targets_N[part], reverse_C, options)
            values.append(value_C)
            entropies.append(entropy_C)
            clipped.append(clipped_C)
            total += chunk_loss
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
        scale = lambda g: None if g is None else g.mul_(grad_loss.to(g.dtype))  # noqa: E731
        return scale(grad_h), scale(grad_w), None, None


def _autograd_chunk(student_logits, teacher_logits, weight_C, targets_C, reverse_C, options):
    """d(Σ w·D)/d(logits) of one chunk by autograd through `token_divergence` (any estimator)."""
    student_logits.requires_grad_(True)
    with torch.enable_grad():
        result = token_divergence(student_logits, teacher_logits.detach(), targets_C, reverse_C, **options)
        chunk_loss = (result.loss_N * weight_C).sum()
        (grad_logits,) = torch.autograd.grad(chunk_loss, student_logits)
    return grad_logits, chunk_loss.detach(), (result.value_N, result.entropy_N, result.clipped_N)


ROWS_PER_BLOCK = {"cpu": 8, "cuda": 128}  # rows whose [rows × V] temporaries live at once


def _divergence_and_gradient(
    logits_C_V: torch.Tensor,
    teacher_logits_C_V: torch.Tensor,
    weight_C: torch.Tensor,
    reverse_C: torch.Tensor | None,
    *,
    kind: DivergenceKind = "reverse_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    clip_tau: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The full-vocabulary divergence of each row, with d(Σ w·D)/d(logits) written over `logits_C_V`.

    Works a few rows at a time (fp32 temporaries of [rows × V]); returns value, entropy and clipped
    per row. Each divergence term t_v depends on the student only through its own log pS_v, so with
    slope_v = m_v·∂t_v/∂log pS_v (m_v = 0 where the clip caps t_v) the softmax chain rule gives
    ∂D/∂logits_v = (slope_v − pS_v·Σ_u slope_u)/T.
    """
    rows = ROWS_PER_BLOCK.get(logits_C_V.device.type, 32)
    values, entropies, clipped = [], [], []
    for start in range(0, logits_C_V.shape[0], rows):
        block = slice(start, start + rows)
        logp_s = _finite_log_softmax(logits_C_V[block], temperature)
        logp_t = _finite_log_softmax(teacher_logits_C_V[block], temperature)
        p_s = logp_s.exp()
        entropies.append(-(p_s * logp_s).sum(-1))
        reverse_R = None if reverse_C is None else reverse_C[block, None]
        terms, slopes = _terms_and_slopes(logp_s, p_s, logp_t, kind, beta, reverse_R)
        if clip_tau is None:
            clipped.append(torch.zeros(terms.shape[0], dtype=torch.bool, device=terms.device))
        else:
            capped = terms > clip_tau
            clipped.append(capped.any(-1))
            terms, slopes = terms.clamp(max=clip_tau), slopes.masked_fill(capped, 0.0)
        values.append(terms.sum(-1))
        grad = slopes.sub_(p_s * slopes.sum(-1, keepdim=True)).mul_(weight_C[block, None] / temperature)
        logits_C_V[block] = grad
    return torch.cat(values), torch.cat(entropies), torch.cat(clipped)


def _finite_log_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """fp32 log-softmax with −inf (masked entries) raised to the lowest finite float, so that
    0·log 0 terms come out as 0 instead of nan."""
    logp = torch.log_softmax(_at_least_fp32(logits) / temperature, dim=-1)
    return logp.clamp_(min=torch.finfo(logp.dtype).min)


def _terms_and_slopes(logp_s, p_s, logp_t, kind: DivergenceKind, beta: float, reverse_R):
    """Per-entry terms t_v of the divergence (summing to it) and ∂t_v/∂log pS_v."""
    if kind == "branched":
        reverse = _terms_and_slopes(logp_s, p_s, logp_t, "reverse_kl", beta, None)
        forward = _terms_and_slopes(logp_s, p_s, logp_t, "forward_kl", beta, None)
        return tuple(torch.where(reverse_R, r, f) for r, f in zip(reverse, forward))
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        log_ratio = logp_s - logp_t
        return p_s * log_ratio, p_s * (log_ratio + 1.0)
    p_t = logp_t.exp()
    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
        return p_t * (logp_t - logp_s), -p_t
    if kind == "jsd":
        logp_m = torch.logaddexp(logp_t + math.log(beta), logp_s + math.log(1.0 - beta))
        student_side = (1.0 - beta) * p_s * (logp_s - logp_m)
        # ∂/∂log pS of β·pT·log(pT/M) + (1−β)·pS·log(pS/M) collapses to (1−β)·pS·log(pS/M)
        return beta * p_t * (logp_t - logp_m) + student_side, student_side
    raise ValueError(f"unknown divergence kind {kind!r}")
