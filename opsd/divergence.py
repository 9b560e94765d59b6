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
    chunk_size: int = 512,
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
    chunk_size: int = 512,
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
    """Per chunk: logits → divergence → d(loss)/d(logits) by autograd on the [C × V] block only,
    then the two small matmuls that carry it to the hidden states and (accumulated in place) to the
    head. Nothing of size [V × H] is allocated per chunk."""

    @staticmethod
    def forward(ctx, hidden_s, head_s, weight_N, options):  # type: ignore[override]
        options = dict(options)
        teacher_logits = options.pop("teacher_logits")
        chunk_size = options.pop("chunk_size")
        targets_N = options.pop("targets_N")
        reverse_N = options.pop("reverse_N")
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        accumulate = torch.promote_types(head_s.dtype, torch.float32)
        grad_h = torch.zeros_like(hidden_s) if need_h else None
        grad_w = torch.zeros_like(head_s, dtype=accumulate) if need_w else None
        total = torch.zeros((), dtype=torch.promote_types(hidden_s.dtype, torch.float32), device=hidden_s.device)
        values, entropies, clipped = [], [], []
        for start in range(0, hidden_s.shape[0], chunk_size):
            part = slice(start, start + chunk_size)
            h = hidden_s[part]
            student_logits = (h @ head_s.T).requires_grad_(need_h or need_w)
            with torch.enable_grad():
                result = token_divergence(
                    student_logits, teacher_logits(part).detach(), targets_N[part],
                    None if reverse_N is None else reverse_N[part], **options,
                )
                chunk_loss = (result.loss_N * weight_N[part]).sum()
            values.append(result.value_N)
            entropies.append(result.entropy_N)
            clipped.append(result.clipped_N)
            total += chunk_loss.detach()
            if need_h or need_w:
                (grad_logits,) = torch.autograd.grad(chunk_loss, student_logits)
                del result, chunk_loss, student_logits  # free the chunk's buffers before the matmuls
                if need_h:
                    grad_h[part] = grad_logits @ head_s
                if need_w:
                    grad_w.addmm_(grad_logits.T.to(accumulate), h.to(accumulate))
        ctx.save_for_backward(grad_h, None if grad_w is None else grad_w.to(head_s.dtype))
        if not values:  # no response positions at all
            empty = hidden_s.new_zeros(0, dtype=total.dtype)
            values, entropies, clipped = [empty], [empty], [empty.bool()]
        outputs = (torch.cat(values), torch.cat(entropies), torch.cat(clipped))
        ctx.mark_non_differentiable(*outputs)
        return (total, *outputs)

    @staticmethod
    def backward(ctx, grad_loss, *_):  # type: ignore[override]
        grad_h, grad_w = ctx.saved_tensors
        # the saved gradients are used once: scale them in place rather than allocating copies
        scale = lambda g: None if g is None else g.mul_(grad_loss.to(g.dtype))  # noqa: E731
        return scale(grad_h), scale(grad_w), None, None
