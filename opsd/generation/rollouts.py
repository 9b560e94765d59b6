"""A step's rollouts: `sampling.n` responses per problem through the generation engine, then graded
through the verifiers. Shared by `opsd distill` and `opsd rlvr`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opsd.core.data import Problem
from opsd.generation import Engine, SamplingConfig, request_seed
from opsd.verifiers import Verdict, Verifiers


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


def grade_rollouts(rollouts: list[Rollout], problems: list[Problem], tokenizer, verifiers: Verifiers) -> list[Verdict]:
    """The verdict of each rollout on its problem (each with the verifier its problem asks for)."""
    texts = tokenizer.batch_decode([r.response_ids for r in rollouts], skip_special_tokens=True)
    return verifiers.verify(texts, [problems[r.problem_index] for r in rollouts])
