"""On-policy rollouts: batched sampling with a KV cache, and packing sequences for teacher/student forwards.

`sample` is our own small decode loop (left-padded prefill, then one token per step) rather than
`model.generate`, so that it returns exactly what distillation needs: response ids ending with EOS,
the truncation flag, and the log-probability of each sampled token under the distribution it was
drawn from (after temperature, top-k and top-p).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from opsd.data import Problem
from opsd.errors import require
from opsd.faults import crash_point
from opsd.grading import Grader
from opsd.models import causal_lm


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus sampling mass
    top_k: int = 0  # 0 = no top-k filter
    max_new_tokens: int = 256  # response budget; longer responses are truncated
    n: int = 1  # samples per problem
    batch_size: int = 64  # sequences decoded together


def check_sampling(config: SamplingConfig, prefix: str) -> None:
    require(
        (f"{prefix}.temperature", config.temperature >= 0, "non-negative (0 = greedy)"),
        (f"{prefix}.top_p", 0.0 < config.top_p <= 1.0, "in (0, 1]"),
        (f"{prefix}.top_k", config.top_k >= 0, "non-negative (0 = off)"),
        (f"{prefix}.max_new_tokens", config.max_new_tokens >= 1, "at least 1"),
        (f"{prefix}.n", config.n >= 1, "at least 1"),
        (f"{prefix}.batch_size", config.batch_size >= 1, "at least 1"),
    )


@dataclass(frozen=True)
class Rollout:
    problem_index: int  # index into the step's problems
    prompt_ids: list[int]  # the student's prompt
    response_ids: list[int]  # sampled tokens, ending with EOS unless truncated
    sample_logprobs: torch.Tensor  # [len(response_ids)] float32, under the sampling distribution
    truncated: bool  # hit max_new_tokens without EOS


@torch.no_grad()
def sample(
    model: nn.Module,
    prompts: list[list[int]],
    config: SamplingConfig,
    eos_ids: list[int],
    pad_id: int,
    generator: torch.Generator | None = None,
) -> list[tuple[list[int], torch.Tensor, bool]]:
    """(response ids, sample log-probs, truncated) for each prompt, decoded `config.batch_size` at a time."""
    results = []
    for start in range(0, len(prompts), config.batch_size):
        results += _sample_batch(model, prompts[start : start + config.batch_size], config, eos_ids, pad_id, generator)
    return results


def _sample_batch(model, prompts, config, eos_ids, pad_id, generator):
    device = next(model.parameters()).device
    batch, width = len(prompts), max(len(p) for p in prompts)
    ids_B_L = torch.full((batch, width), pad_id, dtype=torch.long, device=device)
    mask_B_L = torch.zeros((batch, width), dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        ids_B_L[row, width - len(prompt) :] = torch.tensor(prompt, device=device)
        mask_B_L[row, width - len(prompt) :] = 1
    positions_B_L = (mask_B_L.cumsum(-1) - 1).clamp(min=0)
    eos_E = torch.tensor(eos_ids, device=device)

    out = model(input_ids=ids_B_L, attention_mask=mask_B_L, position_ids=positions_B_L, use_cache=True, logits_to_keep=1)
    cache, logits_A_V = out.past_key_values, out.logits[:, -1]
    next_position_A = positions_B_L[:, -1] + 1
    # A = the rows still decoding; `active_A` maps them to rows of the batch
    active_A = torch.arange(batch, device=device)
    tokens_B_T = torch.full((batch, config.max_new_tokens), pad_id, dtype=torch.long, device=device)
    logprobs_B_T = torch.zeros((batch, config.max_new_tokens), dtype=torch.float32, device=device)
    lengths_B = torch.full((batch,), config.max_new_tokens, dtype=torch.long, device=device)
    for step in range(config.max_new_tokens):
        token_A, logprob_A = sample_token(logits_A_V, config, generator)
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
            past_key_values=cache, use_cache=True,
        )
        cache, logits_A_V = out.past_key_values, out.logits[:, -1]
        next_position_A = next_position_A + 1

    tokens_B_T, logprobs_B_T, lengths = tokens_B_T.cpu(), logprobs_B_T.cpu(), lengths_B.tolist()
    ended = torch.isin(tokens_B_T, eos_E.cpu()).any(-1).tolist()
    return [(tokens_B_T[row, : lengths[row]].tolist(), logprobs_B_T[row, : lengths[row]], not ended[row])
            for row in range(batch)]


def sample_token(
    logits_B_V: torch.Tensor, config: SamplingConfig, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row and its log-probability under the filtered, temperature-scaled distribution."""
    if config.temperature == 0:
        token_B = logits_B_V.argmax(-1)
        return token_B, torch.zeros_like(token_B, dtype=torch.float32)
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
    logprobs_B_V = torch.log_softmax(logits_B_V, dim=-1)
    token_B = torch.multinomial(logprobs_B_V.exp(), 1, generator=generator).squeeze(-1)
    return token_B, logprobs_B_V.gather(-1, token_B[:, None]).squeeze(-1)


@dataclass(frozen=True)
class Packed:
    """Sequences prompt ‖ response laid out for one forward pass, and where their response tokens sit.

    Padded layout: row b holds prompts[b] + responses[b], right-padded, with an attention mask.
    Flat (padding-free) layout: one row holding every sequence back to back, position ids restarting
    at 0 for each, no attention mask (transformers then keeps attention inside each sequence).
    Either way the hidden state at flat position `predict_index_N[n]` predicts `targets_N[n]`, the
    n-th response token of the batch in sequence order. Two `Packed` built from the same responses and
    different prompts have the same N and the same targets: that is the teacher/student alignment.
    """

    input_ids_B_L: torch.Tensor
    attention_mask_B_L: torch.Tensor | None
    position_ids_B_L: torch.Tensor | None
    predict_index_N: torch.Tensor
    targets_N: torch.Tensor
    row_N: torch.Tensor  # which sequence each response token belongs to


def pack(prompts: list[list[int]], responses: list[list[int]], pad_id: int, device: torch.device,
         flat: bool = False) -> Packed:
    sequences = [p + r for p, r in zip(prompts, responses)]
    if flat:
        starts = [0]
        for sequence in sequences[:-1]:
            starts.append(starts[-1] + len(sequence))
        ids_B_L = torch.tensor([[t for s in sequences for t in s]], dtype=torch.long)
        positions_B_L = torch.cat([torch.arange(len(s)) for s in sequences])[None]
        mask_B_L = None
    else:
        width = max(len(s) for s in sequences)
        starts = [row * width for row in range(len(sequences))]
        ids_B_L = torch.full((len(sequences), width), pad_id, dtype=torch.long)
        mask_B_L = torch.zeros_like(ids_B_L)
        for row, sequence in enumerate(sequences):
            ids_B_L[row, : len(sequence)] = torch.tensor(sequence)
            mask_B_L[row, : len(sequence)] = 1
        positions_B_L = None
    predict, targets, rows = [], [], []
    for row, (start, prompt, response) in enumerate(zip(starts, prompts, responses)):
        first = start + len(prompt) - 1  # the last prompt position predicts the first response token
        predict.append(torch.arange(first, first + len(response)))
        targets += response
        rows += [row] * len(response)
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return Packed(to(ids_B_L), to(mask_B_L), to(positions_B_L), torch.cat(predict).to(device),
                  torch.tensor(targets, dtype=torch.long, device=device), torch.tensor(rows, dtype=torch.long, device=device))


def response_hidden(backbone: nn.Module, packed: Packed) -> torch.Tensor:
    """The [N × H] final hidden states that predict the response tokens, padding-free."""
    hidden_B_L_H = backbone(packed.input_ids_B_L, packed.attention_mask_B_L, packed.position_ids_B_L)
    return hidden_B_L_H.reshape(-1, hidden_B_L_H.shape[-1]).index_select(0, packed.predict_index_N)


def collect_rollouts(model: nn.Module, prompts: list[list[int]], sampling: SamplingConfig, tokenizer,
                     generator: torch.Generator | None) -> list[Rollout]:
    """`sampling.n` rollouts per prompt, in prompt order, from the model under any PEFT/DDP wrapper."""
    repeated = [i for i in range(len(prompts)) for _ in range(sampling.n)]
    policy = causal_lm(model)
    samples = sample(policy, [prompts[i] for i in repeated], sampling, stop_ids(policy, tokenizer),
                     tokenizer.pad_token_id, generator)
    return [
        Rollout(problem_index=i, prompt_ids=prompts[i], response_ids=ids, sample_logprobs=logprobs, truncated=truncated)
        for i, (ids, logprobs, truncated) in zip(repeated, samples)
    ]


def stop_ids(model: nn.Module, tokenizer) -> list[int]:
    """Tokens that end a response: the tokenizer's EOS and the model's generation-config EOS (int or list)."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    configured = configured if isinstance(configured, (list, tuple)) else [configured]
    return sorted({tokenizer.eos_token_id, *configured} - {None})


def has_answers(problems: list[Problem]) -> bool:
    return all(p.answer for p in problems)


def grade_rollouts(rollouts: list[Rollout], problems: list[Problem], tokenizer, grader: Grader) -> list[bool]:
    """Correctness of each rollout against its problem's gold answer (all False when answers are missing)."""
    if not has_answers(problems) or not rollouts:
        return [False] * len(rollouts)
    texts = tokenizer.batch_decode([r.response_ids for r in rollouts], skip_special_tokens=True)
    return grader.grade(texts, [problems[r.problem_index].answer for r in rollouts])
