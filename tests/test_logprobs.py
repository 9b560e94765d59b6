"""Chunked token log-probabilities against plain autograd through full logits."""

import pytest
import torch

from opsd.logprobs import chunked_token_logprobs


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
