"""Log-probabilities of given tokens from final hidden states, in chunks of positions.

log p(y_n) = (h_n·w_{y_n})/T − logsumexp_v (h_n·w_v)/T for each of N positions, without ever holding
logits for more than `chunk_size` positions: the forward keeps nothing of size V, the backward
recomputes each chunk's logits and applies d log p(y)/d logits = (onehot(y) − softmax)/T. This is the
building block of SFT (cross-entropy = −log p) and of the RLVR policy gradient.
"""

from __future__ import annotations

from typing import Protocol

import torch


class SamplingFilter(Protocol):
    """What shapes the distribution a token is drawn from (generation.SamplingConfig has these)."""

    temperature: float
    top_k: int
    top_p: float


def chunked_token_logprobs(
    hidden_N_H: torch.Tensor,
    head_V_H: torch.Tensor,
    targets_N: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = 512,
) -> torch.Tensor:
    """[N] log-probabilities (float32 or wider), differentiable w.r.t. the hidden states and the head."""
    return _ChunkedTokenLogprobs.apply(hidden_N_H, head_V_H, targets_N, temperature, chunk_size)


def _chunk_logits(hidden_C_H: torch.Tensor, head_V_H: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = hidden_C_H @ head_V_H.T
    return logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature


class _ChunkedTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, head, targets, temperature, chunk_size):  # type: ignore[override]
        pieces = []
        for start in range(0, hidden.shape[0], chunk_size):
            logits = _chunk_logits(hidden[start : start + chunk_size], head, temperature)
            chosen = logits.gather(-1, targets[start : start + chunk_size, None]).squeeze(-1)
            pieces.append(chosen - logits.logsumexp(-1))
        ctx.save_for_backward(hidden, head, targets)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        if not pieces:
            return hidden.new_zeros(0, dtype=torch.promote_types(hidden.dtype, torch.float32))
        return torch.cat(pieces)

    @staticmethod
    def backward(ctx, grad_N):  # type: ignore[override]
        hidden, head, targets = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros_like(head, dtype=torch.promote_types(head.dtype, torch.float32)) if need_w else None
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            part = slice(start, start + ctx.chunk_size)
            logits = _chunk_logits(hidden[part], head, ctx.temperature)
            # d/dlogits of g·log p(y) = g·(onehot(y) − softmax(logits)), then the 1/T of the scaling
            grad_logits = torch.softmax(logits, -1).mul_(-grad_N[part, None].to(logits.dtype))
            grad_logits.scatter_add_(-1, targets[part, None], grad_N[part, None].to(logits.dtype))
            grad_logits.div_(ctx.temperature)
            if need_h:
                grad_h[part] = (grad_logits @ head.to(grad_logits.dtype)).to(hidden.dtype)
            if need_w:
                grad_w.addmm_(grad_logits.T, hidden[part].to(grad_w.dtype))
        return grad_h, None if grad_w is None else grad_w.to(head.dtype), None, None, None


def filtered_log_softmax(logits_B_V: torch.Tensor, config: SamplingFilter) -> torch.Tensor:
    """[B × V] float32 log-probabilities of the distribution a token is drawn from: logits divided by
    the temperature, then top-k, then top-p over what is left (entries outside: −inf). The sampled
    token's log-probability that the engines return is read from this."""
    logits_B_V = logits_B_V.float() / config.temperature
    if config.top_k > 0:
        kth_B_1 = logits_B_V.topk(min(config.top_k, logits_B_V.shape[-1]), dim=-1).values[:, -1:]
        logits_B_V = logits_B_V.masked_fill(logits_B_V < kth_B_1, -torch.inf)
    if config.top_p < 1.0:
        sorted_B_V, order_B_V = logits_B_V.sort(dim=-1, descending=True)
        probs_B_V = sorted_B_V.softmax(-1)
        drop_sorted_B_V = probs_B_V.cumsum(-1) - probs_B_V >= config.top_p  # mass before it already enough
        drop_B_V = torch.zeros_like(drop_sorted_B_V).scatter(-1, order_B_V, drop_sorted_B_V)
        logits_B_V = logits_B_V.masked_fill(drop_B_V, -torch.inf)
    return torch.log_softmax(logits_B_V, dim=-1)


@torch.no_grad()
def logprob_gap(hidden_N_H: torch.Tensor, head_V_H: torch.Tensor, targets_N: torch.Tensor,
                engine_logprobs: list[torch.Tensor], sampling: SamplingFilter, chunk_size: int = 512,
                trainer_N: torch.Tensor | None = None) -> tuple[float, int]:
    """(Σ |log p_engine(y_n) − log p_trainer(y_n)|, outside): the trainer's log-probability under the
    same processed distribution the engine drew from (temperature, top-k, top-p), from the trainer's
    hidden states; `engine_logprobs` are the rollouts' own, in the order their tokens were packed.
    `outside` counts the sampled tokens the trainer's top-k/top-p leaves out (log-probability −inf,
    left out of the sum): 0 and a sum near float error while the engine's weights are the trainer's;
    a stale engine shows in both (`rollout/logprob_gap` and `rollout/logprob_gap_outside`). (0, 0)
    for greedy sampling: nothing to compare. `trainer_N`: the trainer's log-probabilities at the
    sampling temperature when the caller has them (rlvr's old log-probs); without top-k and top-p
    they are the processed ones, and no product over the vocabulary is computed again."""
    if sampling.temperature == 0 or hidden_N_H.shape[0] == 0:
        return 0.0, 0
    engine_N = torch.cat(engine_logprobs).to(hidden_N_H.device)
    if trainer_N is not None and sampling.top_k == 0 and sampling.top_p >= 1.0:
        return float((trainer_N.detach() - engine_N).abs().sum()), 0
    total = torch.zeros((), dtype=torch.float64, device=hidden_N_H.device)
    outside = torch.zeros((), dtype=torch.long, device=hidden_N_H.device)
    for start in range(0, hidden_N_H.shape[0], chunk_size):  # sums stay on the device: one sync at the end
        part = slice(start, start + chunk_size)
        logits = hidden_N_H[part].detach().to(head_V_H.dtype) @ head_V_H.detach().T
        trainer = filtered_log_softmax(logits, sampling).gather(-1, targets_N[part, None]).squeeze(-1)
        inside = torch.isfinite(trainer)
        total += torch.where(inside, trainer - engine_N[part], 0.0).abs().sum()
        outside += (~inside).sum()
    return float(total), int(outside)


def gap_tally(tally, gap_sum: float, outside: int, tokens: int, sampled: bool) -> None:
    """rollout/logprob_gap (the mean over the tokens both sides can draw) and rollout/logprob_gap_outside
    (the share of tokens the trainer's filter leaves out), NaN when greedy or nothing was compared: this
    process's part of the step, into a `runtime.metrics.Tally` that reduces it over the processes."""
    if sampled:
        tally.mean("rollout/logprob_gap", gap_sum, tokens - outside)
        tally.mean("rollout/logprob_gap_outside", outside, tokens)
    else:
        tally.same("rollout/logprob_gap", float("nan"))
        tally.same("rollout/logprob_gap_outside", float("nan"))
