"""Chunked token log-probabilities against plain autograd through full logits."""

import pytest
import torch

from opsd.objectives.logprobs import chunked_token_logprobs


@pytest.mark.parametrize("temperature,chunk", [(1.0, 4), (0.7, 5), (1.3, 1000)])
def test_values_and_gradients_match_full_logits(temperature, chunk):
    g = torch.Generator().manual_seed(0)
    n, h, v = 11, 6, 29
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    head = torch.randn(v, h, generator=g, dtype=torch.float64)
    targets = torch.randint(0, v, (n,), generator=g)
    weights = torch.randn(n, generator=g, dtype=torch.float64)
    h1, w1 = hidden.clone().requires_grad_(), head.clone().requires_grad_()
    expected = torch.log_softmax(h1 @ w1.T / temperature, -1).gather(-1, targets[:, None]).squeeze(-1)
    (expected * weights).sum().backward()
    h2, w2 = hidden.clone().requires_grad_(), head.clone().requires_grad_()
    got = chunked_token_logprobs(h2, w2, targets, temperature, chunk)
    (got * weights).sum().backward()
    torch.testing.assert_close(got, expected.detach())
    torch.testing.assert_close(h2.grad, h1.grad)
    torch.testing.assert_close(w2.grad, w1.grad)


def test_frozen_head_and_empty_input():
    hidden = torch.randn(3, 4, requires_grad=True)
    head = torch.randn(7, 4)
    chunked_token_logprobs(hidden, head, torch.tensor([1, 2, 3]), chunk_size=2).sum().backward()
    assert hidden.grad is not None and head.grad is None
    assert chunked_token_logprobs(hidden[:0], head, torch.tensor([], dtype=torch.long)).numel() == 0


def test_the_log_prob_gap_is_float_error_for_the_engines_own_weights_and_large_for_others():
    """logprob_gap against the hf engine's own sampled log-probs (top-k and top-p on): ~0 with the
    weights that sampled, large with moved weights (what a stale vLLM engine would show)."""
    from opsd.core.models import Backbone
    from opsd.core.packing import pack, response_hidden
    from opsd.core.tiny import build_tiny
    from opsd.generation import SamplingConfig, make_engine
    from opsd.objectives.logprobs import logprob_gap

    model, tokenizer = build_tiny(seed=3)
    model.eval()
    sampling = SamplingConfig(temperature=0.7, top_k=20, top_p=0.9, max_new_tokens=24)
    prompts = [tokenizer("What is 1 + 2?")["input_ids"], tokenizer("Say hi")["input_ids"]]
    generations = make_engine(model, tokenizer, sampling).generate(prompts, sampling, [5, 6])
    packed = pack(prompts, [g.response_ids for g in generations], tokenizer.pad_token_id, torch.device("cpu"))

    def gap():
        with torch.no_grad():
            hidden = response_hidden(Backbone(model), packed)
        total, outside = logprob_gap(hidden, model.lm_head.weight, packed.targets_N, [g.logprobs for g in generations],
                                     sampling, chunk_size=7)
        return total / (packed.targets_N.numel() - outside), outside

    in_sync, outside = gap()
    assert in_sync < 1e-5 and outside == 0
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    moved, outside = gap()
    assert 1e-2 < moved < float("inf") and 0 < outside < packed.targets_N.numel()  # stale: both show it
    greedy = SamplingConfig(temperature=0)
    assert logprob_gap(torch.zeros(3, 4), torch.zeros(5, 4), torch.zeros(3, dtype=torch.long), [torch.zeros(3)],
                       greedy) == (0.0, 0)


def test_the_log_prob_gap_from_given_log_probs_equals_the_one_it_computes_without_filters():
    """rlvr passes its old log-probs (at the sampling temperature): without top-k/top-p they are the
    processed ones, so the gap from them equals the gap computed from the hidden states."""
    from opsd.generation import SamplingConfig
    from opsd.objectives.logprobs import logprob_gap

    g = torch.Generator().manual_seed(0)
    hidden, head = torch.randn(10, 8, generator=g), torch.randn(30, 8, generator=g)
    targets, engine = torch.randint(0, 30, (10,), generator=g), [-torch.rand(4, generator=g), -torch.rand(6,
                                                                                                          generator=g)]
    sampling = SamplingConfig(temperature=0.7)
    trainer = chunked_token_logprobs(hidden, head, targets, 0.7, chunk_size=3)
    computed, outside = logprob_gap(hidden, head, targets, engine, sampling, chunk_size=3)
    given, _ = logprob_gap(hidden, head, targets, engine, sampling, chunk_size=3, trainer_N=trainer)
    assert outside == 0 and computed > 0.1 and abs(given - computed) < 1e-5
    filtered = SamplingConfig(temperature=0.7, top_k=5)  # with a filter the given ones are not used
    assert logprob_gap(hidden, head, targets, engine, filtered, trainer_N=trainer) == \
        logprob_gap(hidden, head, targets, engine, filtered)
