"""The `hf` engine: our batched KV-cache sampler over the transformers forward, on the training
process's own module (no copy of the weights, so nothing to send after an optimizer step).

It is our own small decode loop (left-padded prefill, then one token per step; finished rows leave
the batch and its KV cache) rather than `model.generate`, so that it returns exactly what
distillation needs: response ids ending with a stop token, the truncation flag, and the
log-probability of each sampled token under the distribution it was drawn from (after temperature,
top-k and top-p). Randomness is per request: request i draws its t-th token by inverting the
filtered distribution's CDF at u[i, t], a uniform drawn up front from a generator seeded with
`seeds[i]` alone — so its sample does not depend on the other rows of the batch.
"""

from __future__ import annotations

import contextlib

import torch
import transformers
from packaging.version import Version
from torch import nn

from opsd.core.models import causal_lm
from opsd.generation import Generation, SamplingConfig, stop_ids
from opsd.objectives.logprobs import filtered_log_softmax
from opsd.runtime.faults import crash_point

# transformers 5.24 renamed the KV cache's argument and output field `past_key_values` to `cache` (the
# old name warns there); the sampler speaks whichever name the installed release knows.
CACHE = "cache" if Version(transformers.__version__) >= Version("5.24") else "past_key_values"


class HFEngine:
    def __init__(self, model: nn.Module, tokenizer, gather=None):
        self.model = model
        self.eos_ids = stop_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id
        self.gather = gather  # makes the trainer's weights whole (FSDP) for a block of decoding

    def decoding(self):
        """The trainer's module, whole for the block (FSDP gathers it; otherwise nothing to do)."""
        return self.gather() if self.gather is not None else contextlib.nullcontext()

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig, seeds: list[int]) -> list[Generation]:
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        policy = causal_lm(self.model)
        results = []
        for start in range(0, len(prompts), sampling.batch_size):
            part = slice(start, start + sampling.batch_size)
            results += sample(policy, prompts[part], sampling, self.eos_ids, self.pad_id, seeds[part])
        return results

    def ready(self) -> None:
        """Nothing to do: this engine decodes with the trainer's live module."""

    def idle(self) -> None:
        """Nothing to free."""

    def update_weights(self) -> None:
        """Nothing to do: this engine decodes with the trainer's live module."""

    def close(self) -> None:
        """Nothing to release."""

    def __enter__(self) -> HFEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def uniforms(seeds: list[int], steps: int) -> torch.Tensor:
    """[B × T] float64 uniforms in [0, 1); row b depends on seeds[b] only."""
    rows = [torch.rand(steps, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) for seed in seeds]
    return torch.stack(rows)


@torch.no_grad()
def sample(model: nn.Module, prompts: list[list[int]], config: SamplingConfig, eos_ids: list[int], pad_id: int,
           seeds: list[int]) -> list[Generation]:
    """One batch: left-padded prefill, then one token per step until every row has stopped."""
    device = next(model.parameters()).device
    batch, width = len(prompts), max(len(p) for p in prompts)
    ids_B_L = torch.full((batch, width), pad_id, dtype=torch.long, device=device)
    mask_B_L = torch.zeros((batch, width), dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        ids_B_L[row, width - len(prompt) :] = torch.tensor(prompt, device=device)
        mask_B_L[row, width - len(prompt) :] = 1
    positions_B_L = (mask_B_L.cumsum(-1) - 1).clamp(min=0)
    eos_E = torch.tensor(eos_ids, device=device)
    uniform_B_T = uniforms(seeds, config.max_new_tokens).to(device) if config.temperature > 0 else None

    out = model(input_ids=ids_B_L, attention_mask=mask_B_L, position_ids=positions_B_L, use_cache=True,
                logits_to_keep=1)
    cache, logits_A_V = getattr(out, CACHE), out.logits[:, -1]
    next_position_A = positions_B_L[:, -1] + 1
    # A = the rows still decoding; `active_A` maps them to rows of the batch
    active_A = torch.arange(batch, device=device)
    tokens_B_T = torch.full((batch, config.max_new_tokens), pad_id, dtype=torch.long, device=device)
    logprobs_B_T = torch.zeros((batch, config.max_new_tokens), dtype=torch.float32, device=device)
    lengths_B = torch.full((batch,), config.max_new_tokens, dtype=torch.long, device=device)
    for step in range(config.max_new_tokens):
        uniform_A = None if uniform_B_T is None else uniform_B_T[active_A, step]
        token_A, logprob_A = sample_token(logits_A_V, config, uniform_A)
        tokens_B_T[active_A, step] = token_A
        logprobs_B_T[active_A, step] = logprob_A.float()
        ended_A = torch.isin(token_A, eos_E)
        lengths_B[active_A[ended_A]] = step + 1
        if step + 1 == config.max_new_tokens or bool(ended_A.all()):
            break
        crash_point("decode")
        if bool(ended_A.any()):
            # drop finished rows from the batch (and their KV cache) so later steps do less work
            keep_A = (~ended_A).nonzero().squeeze(-1)
            cache.reorder_cache(keep_A)
            active_A, token_A, mask_B_L, next_position_A = (
                active_A[keep_A], token_A[keep_A], mask_B_L[keep_A], next_position_A[keep_A])
        mask_B_L = torch.cat([mask_B_L, torch.ones_like(mask_B_L[:, :1])], dim=-1)
        out = model(
            input_ids=token_A[:, None], attention_mask=mask_B_L, position_ids=next_position_A[:, None],
            use_cache=True, **{CACHE: cache},
        )
        cache, logits_A_V = getattr(out, CACHE), out.logits[:, -1]
        next_position_A = next_position_A + 1

    tokens_B_T, logprobs_B_T, lengths = tokens_B_T.cpu(), logprobs_B_T.cpu(), lengths_B.tolist()
    ended = torch.isin(tokens_B_T, eos_E.cpu()).any(-1).tolist()
    return [Generation(tokens_B_T[row, : lengths[row]].tolist(), logprobs_B_T[row, : lengths[row]], not ended[row])
            for row in range(batch)]


def sample_token(logits_B_V: torch.Tensor, config: SamplingConfig,
                 uniform_B: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row and its log-probability under the filtered, temperature-scaled distribution:
    the first token whose cumulative probability exceeds uniform_B (inverse CDF, in float64)."""
    if config.temperature == 0:
        token_B = logits_B_V.argmax(-1)
        return token_B, torch.zeros_like(token_B, dtype=torch.float32)
    logprobs_B_V = filtered_log_softmax(logits_B_V, config)
    cdf_B_V = logprobs_B_V.exp().double().cumsum(-1)
    if not bool(torch.isfinite(cdf_B_V[:, -1]).all()):  # multinomial raised here; say what happened instead
        raise FloatingPointError("the model's next-token logits are not finite: the weights have diverged")
    # u·total < total, so the token found has positive probability (zero-probability entries add no step)
    point_B_1 = uniform_B.to(cdf_B_V.dtype)[:, None] * (1.0 - 1e-12) * cdf_B_V[:, -1:]
    token_B = torch.searchsorted(cdf_B_V, point_B_1, right=True).squeeze(-1).clamp(max=cdf_B_V.shape[-1] - 1)
    return token_B, logprobs_B_V.gather(-1, token_B[:, None]).squeeze(-1)
