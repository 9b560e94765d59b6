"""Log-probabilities of given tokens from final hidden states, in chunks of positions.

log p(y_n) = (h_n·w_{y_n})/T − logsumexp_v (h_n·w_v)/T for each of N positions, without ever holding
logits for more than `chunk_size` positions: the forward keeps nothing of size V, the backward
recomputes each chunk's logits and applies d log p(y)/d logits = (onehot(y) − softmax)/T. This is the
building block of SFT (cross-entropy = −log p) and of the RLVR policy gradient.
"""

from __future__ import annotations

import torch


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
