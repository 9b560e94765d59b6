"""Grading sees where thinking ends whatever the tokenizer: with Qwen3's tokenizer shape (core/tiny.py
`thinking_tokenizer`: <think> and </think> are added special tokens) the responses are decoded with the
delimiters kept and the other special tokens (EOS, padding) dropped, so the grader reads only the text after
the last </think> (verifiers/answer.py). The old decode (`skip_special_tokens=True`) is shown losing them:
it hands the grader the thinking, which then credits an answer the model only considered."""

from __future__ import annotations

import contextlib

import pytest
import torch

from opsd.core.config import load_config
from opsd.core.data import Problem
from opsd.core.prompts import response_text
from opsd.core.tiny import char_tokenizer, thinking_tokenizer
from opsd.generation import Generation
from opsd.generation.rollouts import Rollout, response_texts, rollout_rows
from opsd.stages.eval import EvalConfig, generate
from opsd.teacher.memo import write_memos
from opsd.verifiers import Verifiers

PROBLEM = Problem("p1", "What is 7+5?", "12")


def ids(tokenizer, *pieces: str) -> list[int]:
    return [i for piece in pieces for i in tokenizer(piece, add_special_tokens=False)["input_ids"]]


def rollout(response_ids: list[int], truncated: bool = False) -> Rollout:
    return Rollout(0, [], response_ids, torch.zeros(len(response_ids)), truncated, 0)


@pytest.fixture(scope="module")
def tok():
    return thinking_tokenizer()


def test_the_delimiters_are_single_special_ids(tok):
    close = tok.convert_tokens_to_ids("</think>")
    assert ids(tok, "</think>") == [close] and close in tok.all_special_ids
    assert tok.decode([close], skip_special_tokens=True) == ""  # what the old decode made of it


def test_the_answer_after_the_special_close_is_graded_and_the_thinking_is_not(tok):
    eos, pad = tok.eos_token_id, tok.pad_token_id
    answered = ids(tok, "<think>", "Maybe 13? No: 7+5=12.", "</think>", "\n\nAnswer: 12") + [eos, pad]
    considered = ids(tok, "<think>", "So 7+5=12.\nAnswer: 12", "</think>", "\n\nI could not finish.") + [eos]
    cut = ids(tok, "<think>", "First guess.\nAnswer: 12\nLet me check that")  # truncated inside the thinking
    assert tok.convert_tokens_to_ids("</think>") in answered
    rollouts = [rollout(answered), rollout(considered), rollout(cut, truncated=True)]
    texts = response_texts(tok, rollouts)
    assert texts[0] == "<think>Maybe 13? No: 7+5=12.</think>\n\nAnswer: 12"  # EOS and padding dropped
    with Verifiers() as verifiers:
        verdicts = verifiers.verify(texts, [PROBLEM] * 3)
        assert [(v.correct, v.extracted) for v in verdicts] == [(True, "12"), (False, None), (False, None)]
        # the old decode lost the delimiters: the thinking's "Answer: 12" was graded as the model's answer
        old = tok.batch_decode([r.response_ids for r in rollouts], skip_special_tokens=True)
        assert all("</think>" not in t for t in old)
        assert [v.correct for v in verifiers.verify(old, [PROBLEM] * 3)] == [True, True, True]


def test_every_decode_before_grading_keeps_the_delimiters(tok):
    response = ids(tok, "<think>", "hm", "</think>", "Answer: 12") + [tok.eos_token_id]
    expected = "<think>hm</think>Answer: 12"
    assert response_text(tok, response) == expected
    row, = rollout_rows(tok, [rollout(response)], [PROBLEM], [type("V", (), {"extracted": "12", "correct": True})],
                        [0])
    assert row["response"] == expected  # samples.jsonl


class FixedEngine:
    """Answers every request with the same ids (an engine's methods that these calls use)."""

    def __init__(self, response_ids: list[int]):
        self.response_ids = response_ids
        self.prompts: list[list[int]] = []

    def ready(self) -> None:
        pass

    def decoding(self):
        return contextlib.nullcontext()

    def generate(self, prompts, config, seeds):
        self.prompts += prompts
        return [Generation(self.response_ids, torch.zeros(len(self.response_ids)), False) for _ in prompts]


def test_opsd_eval_decodes_its_samples_and_greedy_responses_with_the_delimiters(tok):
    engine = FixedEngine(ids(tok, "<think>", "hm", "</think>", "Answer: 12") + [tok.eos_token_id])
    config = load_config(EvalConfig, None, ["sampling.n=2", "greedy=true", "cost.latency_problems=0"])
    texts_P_K, _, _, greedy_P, _, _, _ = generate(engine, tok, [PROBLEM], config, "file")
    assert texts_P_K == [["<think>hm</think>Answer: 12"] * 2] and greedy_P == ["<think>hm</think>Answer: 12"]


def test_a_memo_loses_its_thinking_block_when_the_delimiters_are_special_tokens(tok):
    engine = FixedEngine(ids(tok, "<think>", "let me think", "</think>", "\n\nCarry the one.") + [tok.eos_token_id])
    attempt = rollout(ids(tok, "<think>", "7+5", "</think>", "Answer: 12"))
    memos = write_memos(engine, tok, [attempt], [True], [PROBLEM], "Write a memo.", max_tokens=8)
    assert memos == ["Carry the one."]
    # the memo chat shows the attempt as Qwen3's template shows a past turn: without its thinking
    assert "<|im_start|>assistant\nAnswer: 12<|im_end|>" in tok.decode(engine.prompts[0])


def test_a_tokenizer_without_special_delimiters_decodes_as_before():
    tok = char_tokenizer()
    response = ids(tok, "<think>hm</think>Answer: 12") + [tok.eos_token_id, tok.pad_token_id]
    assert response_text(tok, response) == tok.decode(response, skip_special_tokens=True)
