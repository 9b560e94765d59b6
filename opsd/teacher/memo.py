"""The reflection-memo teacher (Kim & Lee, METHODS.md §3): after its attempt the model is told the
correct answer (or that it was right) and writes a short memo to itself; the memo, its thinking
block stripped, goes into the teacher's prompt for that rollout — never into the student's.

Memos are written by the student's current weights, for all kept rollouts of a step in one batched
call of the generation engine, right after grading and gating (so no memo is written for a rollout
that is not distilled). Each memo's seed derives from its rollout's. The memo chat is rendered with the
run's `prompt` section like every other prompt: its system prompt and template options, and the first
user turn (the problem) as the student saw it, instruction included.
"""

from __future__ import annotations

import re

from opsd.core.data import Problem
from opsd.core.prompts import PLAIN, PromptConfig, render_chat, response_text, response_texts, user_turn
from opsd.generation import Engine, SamplingConfig, request_seed

MEMO_INSTRUCTION = (
    "Write a short memo to yourself for the next time you see this problem: what to do, what to avoid. "
    "Do not restate the whole solution."
)
MEMO_TEMPLATE = "{problem}\n\nA memo you wrote to yourself after an earlier attempt at this problem:\n{memo}"
_THINKING = re.compile(r"<think>.*?(</think>|$)", re.DOTALL)


def strip_thinking(text: str) -> str:
    """The memo without any <think>…</think> block (an unterminated one is dropped to the end)."""
    return _THINKING.sub("", text).strip()


def feedback(correct: bool, answer: str | None) -> str:
    if correct:
        return "Your answer was correct."
    return f"Your answer was not correct. The correct final answer is {answer}."


def memo_prompt(tokenizer, problem: Problem, response_text: str, correct: bool, instruction: str,
                prompt: PromptConfig = PLAIN) -> list[int]:
    """The chat that asks for the memo: the problem, the model's own attempt, feedback, the request."""
    messages = [
        {"role": "user", "content": user_turn(problem.problem, prompt)},
        {"role": "assistant", "content": response_text},
        {"role": "user", "content": f"{feedback(correct, problem.answer)} {instruction}"},
    ]
    return render_chat(tokenizer, messages, prompt)


def memo_positions(tokenizer, problems: list[Problem], instruction: str, response_tokens: int, memo_tokens: int,
                   prompt: PromptConfig = PLAIN) -> int:
    """The most positions a memo call can need: the longest memo prompt (a response of `response_tokens`,
    the longer feedback of an incorrect attempt) plus the memo's own budget."""
    longest = max(len(memo_prompt(tokenizer, p, "", False, instruction, prompt)) for p in problems)
    return longest + response_tokens + memo_tokens


def write_memos(engine: Engine, tokenizer, rollouts: list, correct: list[bool], problems: list[Problem],
                instruction: str, max_tokens: int, temperature: float = 1.0, prompt: PromptConfig = PLAIN) -> list[str]:
    """One memo per rollout (generation.rollouts.Rollout), sampled at `temperature`, decoded (the thinking
    delimiters kept, so that the thinking is stripped even where they are special tokens), thinking stripped."""
    if not rollouts:
        return []
    texts = response_texts(tokenizer, [r.response_ids for r in rollouts])
    prompts = [memo_prompt(tokenizer, problems[r.problem_index], text, c, instruction, prompt)
               for r, text, c in zip(rollouts, texts, correct)]
    config = SamplingConfig(temperature=temperature, max_new_tokens=max_tokens, batch_size=len(prompts))
    generations = engine.generate(prompts, config, [request_seed(r.seed, "memo") for r in rollouts])
    return [strip_thinking(response_text(tokenizer, g.response_ids)) for g in generations]


def memo_teacher_message(problem: Problem, memo: str) -> str:
    return MEMO_TEMPLATE.format_map({"problem": problem.problem, "memo": memo})
