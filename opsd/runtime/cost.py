"""What a checkpoint costs to serve, measured by `opsd eval` on its own engine (issue: what compression buys).

    latency     seconds per problem decoded alone (batch 1, one sample), p50 and p95 over the first
                `cost.latency_problems` problems of each benchmark file;
    throughput  responses and generated tokens per second while the evaluation's own samples are
                decoded `sampling.batch_size` at a time (one response = one problem answered once);
    memory      peak while those samples are decoded: on CUDA torch's max allocated bytes (weights
                included); on CPU the process's peak resident set over the decoding (Linux: freed heap
                handed back and the kernel's peak reset first; elsewhere not measured) — weights,
                runtime and all;
    parameters  the policy's parameter count;
    compute per solved problem
                ≈ 2 × parameters × generated tokens per response / accuracy, the forward FLOPs of
                decoding spent per correct response (prompt tokens and attention left out).

The numbers are for comparing checkpoints measured the same way on the same machine; absolute
times mean something only on the hardware a model is served on.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

MIB = 2**20


@dataclass(frozen=True)
class CostConfig:
    latency_problems: int = 8  # problems per file decoded alone to time batch-1 latency; 0 = skip


# --- pure functions -----------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation between order statistics (numpy's default)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def compute_per_solved(parameters: int, tokens_per_response: float | None, accuracy: float | None) -> float | None:
    """Decoding FLOPs per correct response, 2·N·tokens / accuracy; None when nothing is solved."""
    if tokens_per_response is None or not accuracy:
        return None
    return 2.0 * parameters * tokens_per_response / accuracy


# O1-Pruner's weights (Luo et al. 2025, "O1-Pruner: Length-Harmonizing Fine-Tuning for O1-Like Reasoning
# Pruning", arXiv 2501.12570, section 5.1 "Evaluation Metric": alpha = 1, beta = 3, gamma = 5)
AES_WEIGHTS = (1.0, 3.0, 5.0)


def accuracy_efficiency_score(accuracy: float | None, tokens: float | None, base_accuracy: float | None,
                              base_tokens: float | None, weights: tuple[float, float,
                                                                        float] = AES_WEIGHTS) -> float | None:
    """O1-Pruner's accuracy-efficiency score of a model against a baseline:
    ΔL = (L_base − L) / L_base, ΔA = (A − A_base) / A_base, AES = α·ΔL + β·ΔA when ΔA ≥ 0, else
    α·ΔL − γ·|ΔA| (γ > β: a loss of accuracy costs more than a gain earns). 0 for the baseline itself;
    None without a baseline length and accuracy. As the paper defines it; its own table adds accuracy
    drops as if they were gains (every row with ΔA < 0 reproduces with +β·|ΔA|), so compare AES values
    with the paper's only where accuracy did not fall."""
    if None in (accuracy, tokens, base_accuracy, base_tokens) or not base_accuracy or not base_tokens:
        return None
    alpha, beta, gamma = weights
    length_gain = (base_tokens - tokens) / base_tokens
    accuracy_change = (accuracy - base_accuracy) / base_accuracy
    return alpha * length_gain + (beta * accuracy_change if accuracy_change >= 0 else gamma * accuracy_change)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- measurements -------------------------------------------------------------------------------


@dataclass
class PeakMemory:
    mib: float | None = None  # None: not measurable here
    measured_as: str = "not measured"


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[PeakMemory]:
    """Peak memory of the block: CUDA max allocated, or the CPU peak resident set (see the module doc)."""
    result = PeakMemory()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield result
        torch.cuda.synchronize(device)
        result.mib, result.measured_as = torch.cuda.max_memory_allocated(device) / MIB, "cuda max allocated"
        return
    _release_freed_memory()  # so that the peak starts from what is live, not from what earlier work left
    reset = _reset_rss_peak()
    yield result
    if reset and (peak := _rss_kib("VmHWM")) is not None:
        result.mib, result.measured_as = peak / 1024, "cpu peak rss"


def _release_freed_memory() -> None:
    """Collect garbage and hand freed heap back to the system (glibc's malloc_trim), so the resident set
    is what is alive; elsewhere only the collection."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_rss_peak() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux ≥ 4.0); False where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _rss_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def latency(engine, prompts: Sequence[list[int]], sampling, seeds: Sequence[int]) -> dict[str, float | int | None]:
    """Decode each prompt alone (batch 1, one sample, the evaluation's sampling otherwise) and time it;
    the engines return on the CPU, so device work is done when a call returns."""
    alone = replace(sampling, n=1, batch_size=1)
    if prompts:  # one untimed decode first: the first call of a process pays for warming up
        engine.generate([prompts[0]], alone, [seeds[0]])
    seconds, tokens = [], []
    for prompt, seed in zip(prompts, seeds):
        start = time.perf_counter()
        [generation] = engine.generate([prompt], alone, [seed])
        seconds.append(time.perf_counter() - start)
        tokens.append(len(generation.response_ids))
    return latency_summary(seconds, tokens)


def latency_summary(seconds: Sequence[float], tokens: Sequence[int]) -> dict[str, float | int | None]:
    """The batch-1 latency fields of eval.json from per-problem seconds and response tokens."""
    if not seconds:
        return {"latency_problems": 0, "latency_p50_s": None, "latency_p95_s": None, "latency_tokens_per_s": None}
    return {"latency_problems": len(seconds), "latency_p50_s": percentile(seconds, 50),
            "latency_p95_s": percentile(seconds, 95), "latency_tokens_per_s": sum(tokens) / sum(seconds)}


def throughput(responses: int, tokens: int, seconds: float, batch_size: int) -> dict[str, float | int | None]:
    ok = seconds > 0
    return {"throughput_batch_size": batch_size,
            "throughput_responses_per_s": responses / seconds if ok else None,
            "throughput_tokens_per_s": tokens / seconds if ok else None}


# what a pipeline's summary keeps of them
COST_FIELDS = ("parameters", "latency_p50_s", "latency_p95_s", "throughput_tokens_per_s", "peak_memory_mib",
               "compute_per_solved_flops")

# responses scored without decoding: nothing was timed
NOT_MEASURED = {**latency_summary([], []), **throughput(0, 0, 0.0, 0), "latency_problems": None,
                "throughput_batch_size": None,
                "peak_memory_mib": None, "peak_memory_measured_as": "not measured"}
