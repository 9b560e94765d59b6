"""A step's rollouts: `sampling.n` responses per problem through the generation engine, their texts
(for the verifiers: the thinking delimiters kept even where they are special tokens), and the samples.jsonl
fields every stage saves of them. Shared by `opsd distill` and `opsd rlvr`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from opsd.core.data import Problem
from opsd.core.prompts import response_text
from opsd.core.prompts import response_texts as decode_responses
from opsd.generation import Engine, SamplingConfig, request_seed


@dataclass(frozen=True)
class Rollout:
    problem_index: int  # index into the step's problems
    prompt_ids: list[int]  # the student's prompt
    response_ids: list[int]  # sampled tokens, ending with a stop token unless truncated
    sample_logprobs: torch.Tensor  # [len(response_ids)] float32, under the sampling distribution
    truncated: bool  # hit max_new_tokens without a stop token
    seed: int  # the request's seed (a memo about this rollout derives its own from it)


def collect_rollouts(engine: Engine, prompts: list[list[int]], sampling: SamplingConfig,
                     seeds: list[int]) -> list[Rollout]:
    """`sampling.n` rollouts per prompt, in prompt order; sample j of prompt i is seeded by (seeds[i], j)."""
    repeated = [(i, request_seed(seeds[i], j)) for i in range(len(prompts)) for j in range(sampling.n)]
    generations = engine.generate([prompts[i] for i, _ in repeated], sampling, [seed for _, seed in repeated])
    return [Rollout(i, prompts[i], g.response_ids, g.logprobs, g.truncated, seed)
            for (i, seed), g in zip(repeated, generations)]


def response_texts(tokenizer, rollouts: list[Rollout]) -> list[str]:
    """The responses as text, what the verifiers grade (special tokens skipped, the thinking delimiters
    kept: core/prompts.py `response_texts`)."""
    return decode_responses(tokenizer, [r.response_ids for r in rollouts])


def pick(count: int, wanted: int) -> list[int]:
    """`wanted` indices spread evenly over range(count) (all of them when count ≤ wanted)."""
    if count <= wanted:
        return list(range(count))
    return [i * count // wanted for i in range(wanted)]


def rollout_rows(tokenizer, rollouts: list[Rollout], problems: list[Problem], verdicts: list[Any],
                 picked: list[int]) -> list[dict[str, Any]]:
    """The samples.jsonl fields every stage saves of the rollouts at `picked` (verdicts: the verifiers'):
    problem id, prompt as rendered (chat template included), response, extracted and gold answer,
    grade, truncation, length in tokens."""
    rows = []
    for index in picked:
        rollout, verdict = rollouts[index], verdicts[index]
        problem = problems[rollout.problem_index]
        rows.append({
            "id": problem.id,
            "prompt": render(tokenizer, rollout.prompt_ids),
            "response": response_text(tokenizer, rollout.response_ids),
            "extracted": verdict.extracted,
            "answer": problem.answer,
            "correct": verdict.correct,
            "truncated": rollout.truncated,
            "response_tokens": len(rollout.response_ids),
        })
    return rows


def render(tokenizer, ids: list[int]) -> str:
    """Token ids as the model sees them, special tokens of the chat template included."""
    return tokenizer.decode(ids, skip_special_tokens=False)
