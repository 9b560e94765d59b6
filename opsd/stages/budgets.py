"""Accuracy at fixed thinking budgets (`opsd eval budgets=[...]`): budget forcing on the responses sampled.

Compression papers compare models at fixed thinking budgets. Sampling is autoregressive and each request
draws from its own seed, position by position, so the first B tokens of a response are what the same
request would have produced with a budget of B. For each budget B, each sample
  - whose thinking ended within B tokens (its `</think>`; for a model without a thinking block, the whole
    response, stop token included) is kept as it is;
  - is otherwise cut after B tokens, the end of thinking (`</think>`, where the response opened a thinking
    block) and `budget_cue` appended, and the answer decoded greedily after it (at most
    `budget_answer_tokens`, no thinking),
then graded like any response. Per budget: mean@k (± s.e.), the mean tokens a sample generated (the
thinking kept plus the answer; the cue is not the model's) and the share of samples cut: eval.json's
`budgets`, a table in eval.md, the pipeline's summary and report. Under torchrun each process forces the
budgets of its own problems.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from opsd.core.prompts import THINKING_DELIMITERS, response_texts
from opsd.runtime import distributed

THINK_OPEN, THINK_CLOSE = THINKING_DELIMITERS


@dataclass(frozen=True)
class Forced:
    """The samples of every budget, in sample order: graded text, tokens used, cut or not."""

    texts: list[str]
    tokens: list[int]
    cut: list[bool]


def thinking_end(tokenizer, ids: list[int]) -> int | None:
    """The number of tokens up to and including the response's `</think>`, or None without one."""
    close = tokenizer.convert_tokens_to_ids(THINK_CLOSE) if THINK_CLOSE in tokenizer.get_vocab() else None
    if close is not None and close in ids:
        return ids.index(close) + 1
    text = response_texts(tokenizer, [ids])[0]
    if THINK_CLOSE not in text:
        return None
    for end in range(1, len(ids) + 1):  # a tokenizer that spells </think> with several tokens
        if THINK_CLOSE in response_texts(tokenizer, [ids[:end]])[0]:
            return end
    return None


def forced_prefix(tokenizer, ids: list[int], budget: int, cue: str) -> list[int] | None:
    """The response cut after `budget` tokens with the end of thinking and `cue` appended, to decode the
    answer after; None when the response needs no cut (its thinking, or all of it, fits the budget)."""
    end = thinking_end(tokenizer, ids)
    if (end if end is not None else len(ids)) <= budget:
        return None
    kept = ids[:budget]
    opened = THINK_OPEN in response_texts(tokenizer, [kept])[0]
    close = f"\n{THINK_CLOSE}\n\n" if opened else ""
    return kept + tokenizer(close + cue, add_special_tokens=False)["input_ids"]


def forced_tokens(tokenizer, cue: str, answer_tokens: int) -> int:
    """What a cut response adds past its budget, at most: the end of thinking, `cue` and the answer."""
    return len(tokenizer(f"\n{THINK_CLOSE}\n\n{cue}", add_special_tokens=False)["input_ids"]) + answer_tokens


def force_budgets(engine, tokenizer, prompts: list[list[int]], ids: list[list[int]], k: int, mine: list[int],
                  budgets: tuple[int, ...], cue: str, answer_tokens: int, sampling) -> dict[int, Forced]:
    """Every budget's samples (all problems, k each, in order) from `ids` (every sample, problem by problem);
    this process decodes the answers of its problems (`mine`), inside `engine.decoding()`, and the answers
    are gathered from every process."""
    answer = replace(sampling, temperature=0.0, n=1, max_new_tokens=answer_tokens)
    requests, places = [], []
    for budget in budgets:
        for p in mine:
            for j in range(k):
                prefix = forced_prefix(tokenizer, ids[p * k + j], budget, cue)
                if prefix is not None:
                    requests.append(prompts[p] + prefix)
                    places.append((budget, p * k + j, len(prefix)))
    answers = []
    with engine.decoding():
        for first in range(0, len(requests), sampling.batch_size):
            part = requests[first : first + sampling.batch_size]
            answers += [g.response_ids for g in engine.generate(part, answer, [0] * len(part))]
    done = {}
    for share in distributed.gather_long([(place, request, reply) for place, request, reply in
                                          zip(places, requests, answers)]):
        for (budget, sample, prefix), request, reply in share:  # tokens used: the thinking kept and the answer
            done[budget, sample] = (request[len(request) - prefix:] + reply, budget + len(reply))
    forced = {}
    for budget in budgets:
        texts, tokens, cut = [], [], []
        for sample, response in enumerate(ids):
            if (budget, sample) in done:
                full, used = done[budget, sample]
                texts.append(response_texts(tokenizer, [full])[0])
                tokens.append(used)
                cut.append(True)
            else:
                texts.append(response_texts(tokenizer, [response])[0])
                tokens.append(len(response))
                cut.append(False)
        forced[budget] = Forced(texts, tokens, cut)
    return forced
