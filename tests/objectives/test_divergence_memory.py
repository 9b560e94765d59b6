"""No [positions × vocabulary] tensor for the whole batch ever exists: every tensor that any op
creates is recorded (a TorchDispatchMode sees them all, forward and backward) and those whose last
dimension is the vocabulary are measured."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from opsd.cli import main
from opsd.core.tiny import char_tokenizer
from opsd.objectives.divergence import DivergenceSpec, chunked_divergence


class VocabRows(TorchDispatchMode):
    """Largest number of rows of any tensor created with last dimension `vocab`."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.max_rows = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:  # views (e.g. head.T) allocate nothing
            return out
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor) and tensor.dim() and tensor.shape[-1] == self.vocab:
                self.max_rows = max(self.max_rows, tensor.numel() // self.vocab)
        return out


@pytest.mark.parametrize("estimator", ["full", "topk", "sampled"])
def test_chunked_divergence_holds_one_chunk_of_logits(estimator):
    n, h, v, chunk = 96, 16, 1009, 8
    hs = torch.randn(n, h, requires_grad=True)
    head = torch.randn(v, h, requires_grad=True)
    ht, head_t = torch.randn(n, h), torch.randn(v, h)
    with VocabRows(v) as fused:
        result = chunked_divergence(hs, head, ht, head_t, torch.ones(n) / n, torch.randint(0, v, (n,)),
                                    spec=DivergenceSpec(chunk_size=chunk, kind="jsd", estimator=estimator))
        result.loss.backward()
    # the head and its gradient are [V × H]; logits and softmaxes are [chunk × V]
    assert fused.max_rows <= max(chunk, h), fused.max_rows
    with VocabRows(v) as naive:
        logits = hs @ head.T
        (torch.log_softmax(logits, -1).exp() * logits).sum().backward()
    assert naive.max_rows == n  # the probe does see a full-batch tensor when one exists


def test_a_whole_training_step_never_materialises_batch_logits(tmp_path):
    vocab = len(char_tokenizer())
    with VocabRows(vocab) as probe:
        code = main(["distill", "configs/tiny.yaml", f"run.output_dir={tmp_path / 'run'}", "run.steps=1",
                     "run.problems_per_step=4", "sampling.n=2", "sampling.batch_size=4", "sampling.max_new_tokens=24",
                     "optim.micro_batch_size=8", "optim.chunk_size=5", "run.report_to=[]"])
    assert code == 0
    # 8 rollouts × up to 24 tokens are distilled in one micro-batch; only 5 positions (or the 4
    # sequences being decoded) ever have logits at once
    assert probe.max_rows <= 5, probe.max_rows
