"""Micro-batches by a token budget (`optim.micro_batch_tokens`) against naive cutting, and the flat layout's
attention kept inside each sequence with sdpa and eager: a sequence's hidden states are the padded
layout's, and nothing another sequence of the row holds reaches them."""

import random

import pytest
import torch
from transformers import LlamaForCausalLM

from opsd.core.models import Backbone
from opsd.core.packing import micro_batch_bounds, pack, response_hidden
from opsd.core.tiny import tiny_config

CPU = torch.device("cpu")


def naive_cut(lengths: list[int], budget: int) -> list[list[int]]:
    """Sequences in order into runs of at most `budget` positions; a longer one alone."""
    runs: list[list[int]] = []
    for index, length in enumerate(lengths):
        if runs and sum(lengths[i] for i in runs[-1]) + length <= budget:
            runs[-1].append(index)
        else:
            runs.append([index])
    return runs


def cut(lengths: list[int], size: int, budget: int) -> list[list[int]]:
    return [list(range(len(lengths)))[bound] for bound in micro_batch_bounds(lengths, size, budget)]


def test_a_budget_cuts_at_its_boundaries_and_a_longer_sequence_goes_alone():
    assert cut([3, 2, 5, 1], 8, 5) == [[0, 1], [2], [3]]  # 3 + 2 fills the budget exactly
    assert cut([3, 3, 5, 1], 8, 5) == [[0], [1], [2], [3]]  # one position over: cut
    assert cut([9, 1, 1, 12, 2], 8, 5) == [[0], [1, 2], [3], [4]]  # longer than the budget: alone, first or not
    assert cut([4, 4, 4, 4, 4], 2, 100) == [[0, 1, 2, 3, 4]]  # a budget overrides micro_batch_size
    assert cut([4, 4, 4, 4, 4], 2, 0) == [[0, 1], [2, 3], [4]]  # no budget: micro_batch_size sequences
    assert cut([], 2, 10) == [] and cut([], 2, 0) == []


def test_budgets_match_naive_cutting_and_keep_every_sequence_in_order():
    rng = random.Random(0)
    for _ in range(300):
        lengths = [rng.randint(1, 40) for _ in range(rng.randint(0, 30))]
        budget = rng.randint(1, 120)
        runs = cut(lengths, 3, budget)
        assert runs == naive_cut(lengths, budget)
        assert [i for run in runs for i in run] == list(range(len(lengths)))
        assert all(len(run) == 1 or sum(lengths[i] for i in run) <= budget for run in runs)


@pytest.fixture(params=["sdpa", "eager"])
def backbone(request):
    config = tiny_config(60, hidden_size=32, num_layers=2)
    config._attn_implementation = request.param
    torch.manual_seed(0)
    return Backbone(LlamaForCausalLM(config).eval())


def test_the_flat_layout_gives_the_padded_hidden_states(backbone):
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(4, 60, (n,), generator=g).tolist() for n in (5, 9, 1, 3)]
    responses = [torch.randint(4, 60, (n,), generator=g).tolist() for n in (7, 2, 1, 11)]
    with torch.no_grad():
        padded = response_hidden(backbone, pack(prompts, responses, 0, CPU))
        flat = response_hidden(backbone, pack(prompts, responses, 0, CPU, flat=True))
    torch.testing.assert_close(flat, padded, rtol=1e-5, atol=1e-5)


def test_in_the_flat_layout_no_sequence_sees_another(backbone):
    """Changing the first sequence's tokens (prompt and response) changes its hidden states and none of the
    others'; a sequence moved to another place of the row keeps its own."""
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(4, 60, (n,), generator=g).tolist() for n in (6, 4, 8)]
    responses = [torch.randint(4, 60, (n,), generator=g).tolist() for n in (5, 6, 3)]
    changed_prompts = [[7] * 6, *prompts[1:]]
    changed_responses = [[9] * 5, *responses[1:]]
    with torch.no_grad():
        before = response_hidden(backbone, pack(prompts, responses, 0, CPU, flat=True))
        after = response_hidden(backbone, pack(changed_prompts, changed_responses, 0, CPU, flat=True))
        moved = response_hidden(backbone, pack(prompts[::-1], responses[::-1], 0, CPU, flat=True))
    first = len(responses[0])
    assert (before[:first] - after[:first]).abs().max() > 1e-2
    torch.testing.assert_close(after[first:], before[first:], rtol=0, atol=1e-6)
    last = len(responses[2])
    torch.testing.assert_close(moved[:last], before[-last:], rtol=1e-5, atol=1e-6)
