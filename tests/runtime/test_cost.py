"""Serving cost (opsd/runtime/cost.py): the pure functions against hand-computed values, and measurements
that move the right way when the setting is made deliberately more expensive (ratios, no timings)."""

import json

import numpy as np
import pytest
import torch

from opsd.core.config import load_config
from opsd.runtime.cost import (
    accuracy_efficiency_score,
    compute_per_solved,
    latency_summary,
    peak_memory,
    percentile,
    throughput,
)
from opsd.stages.eval import EvalConfig, run_eval
from tests.stages.test_eval import ARITHMETIC


@pytest.mark.parametrize("values", [[3.0], [1.0, 2.0], [5.0, 1.0, 4.0, 2.0, 3.0], [0.1, 0.7, 0.2, 9.0, 0.3, 0.3, 1.1]])
@pytest.mark.parametrize("q", [0, 50, 95, 100])
def test_percentile_is_numpys_linear_interpolation(values, q):
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_cost_fields_by_hand():
    assert compute_per_solved(1_000_000, 30.0, 0.75) == 2 * 1_000_000 * 30 / 0.75 == 8.0e7
    assert compute_per_solved(1_000_000, 30.0, 0.0) is None and compute_per_solved(10, None, 0.5) is None
    assert latency_summary([1.0, 3.0, 2.0], [10, 30, 20]) == {
        "latency_problems": 3, "latency_p50_s": 2.0, "latency_p95_s": pytest.approx(2.9), "latency_tokens_per_s": 10.0}
    assert throughput(responses=8, tokens=400, seconds=2.0, batch_size=4) == {
        "throughput_batch_size": 4, "throughput_responses_per_s": 4.0, "throughput_tokens_per_s": 200.0}


def test_peak_memory_sees_a_large_allocation():
    with peak_memory(torch.device("cpu")) as small:
        torch.ones(1024).sum()
    with peak_memory(torch.device("cpu")) as large:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del block
    assert small.measured_as == large.measured_as == "cpu peak rss"
    assert large.mib >= 60 and large.mib > small.mib + 50


def evaluate(tmp_path, name, *overrides):
    config = load_config(EvalConfig, None, [f"data=[{ARITHMETIC}]", "limit=6", "sampling.n=2", "run.device=cpu",
                                            "run.threads=1", "cost.latency_problems=6",
                                            f"run.output_dir={tmp_path / name}",
                                            *overrides])
    return json.loads((run_eval(config) / "eval.json").read_text())["benchmarks"][0]


def test_longer_responses_measure_slower(tmp_path):
    """builtin:tiny's random weights rarely emit EOS, so responses run to the budget: 8 × the tokens
    must cost clearly more time per problem at batch 1 and more compute per solved problem."""
    short = evaluate(tmp_path, "short", "sampling.max_new_tokens=8")
    long = evaluate(tmp_path, "long", "sampling.max_new_tokens=64")
    assert long["response_tokens_mean"] > 4 * short["response_tokens_mean"]
    assert long["latency_p50_s"] > 2 * short["latency_p50_s"]
    assert short["parameters"] == long["parameters"] > 0


def test_latency_can_be_skipped(tmp_path):
    row = evaluate(tmp_path, "none", "sampling.max_new_tokens=4", "cost.latency_problems=0")
    assert row["latency_problems"] == 0 and row["latency_p50_s"] is None
    assert row["throughput_tokens_per_s"] > 0


def test_accuracy_efficiency_score_is_o1_pruners():
    # O1-Pruner's Table 2, Marco-o1-7B on MATH: baseline 73.8% at 1156 tokens, O1-Pruner 77.5% at 657 → 0.58
    assert accuracy_efficiency_score(77.5, 657, 73.8, 1156) == pytest.approx(0.582, abs=5e-4)
    # accuracy in fractions or percent: the same score (both changes are relative)
    assert accuracy_efficiency_score(0.775, 657, 0.738, 1156) == pytest.approx(accuracy_efficiency_score(77.5, 657,
                                                                                                         73.8, 1156))
    # a drop costs γ = 5 per relative point, as section 5.1 defines it: 0.1566 − 5 × 0.0841 (the paper's
    # table prints 0.41 here, the drop added with β = 3: a slip of the table, not of the definition)
    assert accuracy_efficiency_score(81.7, 447, 89.2, 530) == pytest.approx(83 / 530 - 5 * 7.5 / 89.2)
    assert accuracy_efficiency_score(81.7, 447, 89.2, 530) < 0
    assert accuracy_efficiency_score(0.5, 100, 0.5, 100) == 0.0
    assert accuracy_efficiency_score(0.5, 100, 0.0, 100) is None and accuracy_efficiency_score(0.5, 100, 0.5,
                                                                                               None) is None
