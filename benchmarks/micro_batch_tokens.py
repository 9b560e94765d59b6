"""Padded micro-batches against token-budget ones (`optim.micro_batch_tokens`), side by side in one run on CPU.

The same sequences (prompt ‖ response) go through the policy's forward and backward twice: cut into
`micro_batch_size` sequences padded to the longest (what distill and rlvr did), and cut by a token budget,
back to back in one row with position ids restarting at each sequence (opsd.core.packing.pack(flat=True);
transformers keeps attention inside each sequence with a block-diagonal mask for sdpa and eager, and
flash-attention's varlen kernel on a GPU). Per layout it prints

  tokens    positions run through the layers, padding included
  GFLOPs    counted: 6 FLOPs per weight of a layer's matrices per token (forward and backward), plus
            12·heads·head_dim per query-key pair attended, dense (sdpa/eager: every pair of a padded row,
            or of a flat row, the block mask's zeros included) and varlen (flash-attention: l(l+1)/2 per
            sequence of l positions, whatever the layout). The vocabulary projection is left out: it
            runs on the response positions alone in both layouts, the same work
  seconds   measured: one step's forward and backward over all its micro-batches, best of --repeats,
            sdpa, float32, one thread
  saved MiB measured: the largest micro-batch's tensors autograd saves for the backward (the
            activation memory; unique storages)
  |Δgrad|   the largest difference of a parameter's gradient from the padded layout's, relative to the
            largest gradient: the two layouts compute the same step, within float error

On a CPU part of the time saved comes from smaller micro-batches alone (working sets that stay in cache:
padded micro-batches of 8 instead of 32 are faster too), and a budget far above the longest sequence costs
time with sdpa (its dense block mask: the second budget's rows); the counted FLOPs are what carries to a GPU.

Cases: (a) the demo (its SFT model; prompts and responses as long as the toy world's: the verbose thinking
of the RLVR stage, 16 × 8 rollouts, and OPSD half-way from verbose to concise, 64 rollouts; the demo's
micro_batch_size of 32); (b) Qwen3-1.7B's layer shape (hidden 2048, 16 heads, 8 KV heads, head dim 128,
intermediate 6144) with --layers layers and a vocabulary of 4096, lengths uniform over 500–16,000 scaled
by --scale, micro_batch_size 8 (the default); (c) the same at full size and full length, counted only.

    python benchmarks/micro_batch_tokens.py            # a few minutes on one core
    python benchmarks/micro_batch_tokens.py --quick    # seconds: the smoke test's sizes
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig, Qwen3Config, Qwen3ForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from opsd.core.models import Backbone  # noqa: E402
from opsd.core.packing import micro_batch_bounds, pack, response_hidden  # noqa: E402
from opsd.core.prompts import render_prompt  # noqa: E402
from opsd.core.tiny import char_tokenizer  # noqa: E402
from opsd.demo import toyworld  # noqa: E402

DEMO_MODEL = ROOT / "opsd/demo/assets/toyworld-sft"
QWEN3_1_7B_LAYER = dict(hidden_size=2048, intermediate_size=6144, num_attention_heads=16, num_key_value_heads=8,
                        head_dim=128, tie_word_embeddings=True)
QUICK_LAYER = dict(hidden_size=512, intermediate_size=1536, num_attention_heads=4, num_key_value_heads=2)  # smoke test
CPU = torch.device("cpu")


@dataclass(frozen=True)
class Case:
    name: str
    key: str  # its name in the RESULT line
    prompts: list[int]  # positions of each sequence's prompt
    responses: list[int]  # and of its response
    micro_batch_size: int  # the padded layout's
    budgets: tuple[int, ...]  # the token budgets compared with it


def demo_cases(quick: bool) -> list[Case]:
    """The demo's lengths: its prompts, and responses as long as the toy world's verbose thinking (RLVR,
    16 problems × 8 samples) or, half-way through OPSD, half of them concise (64 problems × 1)."""
    rng, tokenizer = random.Random(0), char_tokenizer(toyworld.ALPHABET)
    count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1  # + EOS
    problems = [toyworld.make_problem(rng, rng.choice(toyworld.LEVELS)) for _ in range(128)]
    prompts = [len(render_prompt(tokenizer, toyworld.to_problem(p).problem)) for p in problems]
    verbose = [min(400, count(toyworld.verbose_solution(p, rng))) for p in problems]  # sampling.max_new_tokens
    concise = [count(toyworld.concise_solution(p)) for p in problems]
    mixed = [v if i % 2 else c for i, (v, c) in enumerate(zip(verbose, concise))]
    rlvr, opsd = (16, 8) if quick else (128, 64)
    return [Case("demo-rlvr", "demo_rlvr", prompts[:rlvr], verbose[:rlvr], 32, (512, 1024)),
            Case("demo-opsd", "demo_opsd", prompts[:opsd], mixed[:opsd], 32, (512, 1024))]


def qwen_case(quick: bool, scale: float) -> Case:
    """Lengths uniform over 500–16,000 (a 16k run), times `scale`; prompts of 256 times `scale`."""
    rng = random.Random(1)
    sequences = 8 if quick else 16
    responses = [round(rng.uniform(500, 16_000 - 256) * scale) for _ in range(sequences)]
    name = "qwen3-1.7B-layer" + (" (quarter width)" if quick else "")
    return Case(name, "qwen3_layer", [max(1, round(256 * scale))] * sequences, responses, 8,
                (round(16_000 * scale), round(32_000 * scale)))


def matrix_weights(config: PretrainedConfig) -> int:
    """Weights of one layer's matrices (attention projections and the gated MLP)."""
    hidden, head_dim = config.hidden_size, config.head_dim
    attention = hidden * head_dim * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
    return attention + 3 * hidden * config.intermediate_size


def counted(config: PretrainedConfig, lengths: list[int], bounds: list[slice], flat: bool) -> dict[str, float]:
    """Tokens run through the layers and GFLOPs of a forward and backward, dense and varlen attention."""
    tokens = dense_pairs = 0
    for bound in bounds:
        part = lengths[bound]
        width = sum(part) if flat else len(part) * max(part)
        tokens += width
        dense_pairs += width * width if flat else len(part) * max(part) ** 2
    varlen_pairs = sum(length * (length + 1) // 2 for length in lengths)
    per_pair = 12 * config.num_attention_heads * config.head_dim * config.num_hidden_layers
    linear = 6 * matrix_weights(config) * config.num_hidden_layers * tokens
    return {"tokens": tokens, "gflops_dense": (linear + per_pair * dense_pairs) / 1e9,
            "gflops_varlen": (linear + per_pair * varlen_pairs) / 1e9}


def step(backbone: Backbone, prompts: list[list[int]], responses: list[list[int]], bounds: list[slice], flat: bool,
         saved: list[int] | None = None) -> None:
    """Forward and backward over every micro-batch, gradients accumulated (a token mean over the step);
    `saved`: each micro-batch's bytes saved for the backward."""
    total = sum(len(r) for r in responses)
    for bound in bounds:
        storages: dict[int, int] = {}

        def keep(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
            return tensor

        hooks = torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t) if saved is not None else None
        with hooks or torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            packed = pack(prompts[bound], responses[bound], 0, CPU, flat=flat)
            hidden_N_H = response_hidden(backbone, packed)
            loss = hidden_N_H.pow(2).sum() / total
        loss.backward()
        if saved is not None:
            saved.append(sum(storages.values()))


def measure(model: torch.nn.Module, case: Case, repeats: int) -> list[dict]:
    """Each layout of `case` (padded, then each budget): counts, seconds, saved bytes and gradients."""
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    prompts = [torch.randint(4, vocab, (n,), generator=g).tolist() for n in case.prompts]
    responses = [torch.randint(4, vocab, (n,), generator=g).tolist() for n in case.responses]
    lengths = [p + r for p, r in zip(case.prompts, case.responses)]
    backbone, params = Backbone(model), [p for p in model.parameters()]
    layouts = [("padded", micro_batch_bounds(lengths, case.micro_batch_size), False)]
    layouts += [(f"tokens@{b}", micro_batch_bounds(lengths, case.micro_batch_size, b), True) for b in case.budgets]
    seconds: dict[str, list[float]] = {label: [] for label, _, _ in layouts}
    grads: dict[str, list[torch.Tensor]] = {}
    for _ in range(repeats):  # the layouts in turn, so that a change of the machine's load hits them alike
        for label, bounds, flat in layouts:
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            step(backbone, prompts, responses, bounds, flat)
            seconds[label].append(time.perf_counter() - start)
            grads[label] = [p.grad.clone() for p in params]
    rows = []
    for label, bounds, flat in layouts:
        model.zero_grad(set_to_none=True)
        saved: list[int] = []
        step(backbone, prompts, responses, bounds, flat, saved)
        rows.append({"label": label, "micro_batches": len(bounds), "seconds": min(seconds[label]),
                     "saved_mib": max(saved) / 2**20, "grads": grads[label],
                     **counted(model.config, lengths, bounds, flat)})
    reference = rows[0]["grads"]
    scale = max(float(g.abs().max()) for g in reference)
    for row in rows:
        row["grad_diff"] = max(float((a - b).abs().max()) for a, b in zip(row.pop("grads"), reference)) / scale
    return rows


def qwen_model(layers: int, quick: bool) -> Qwen3ForCausalLM:
    """Qwen3-1.7B's layer shape, `layers` of them, a vocabulary of 4096 (--quick: a quarter as wide)."""
    torch.manual_seed(0)
    shape = {**QWEN3_1_7B_LAYER, **(QUICK_LAYER if quick else {})}
    return Qwen3ForCausalLM(Qwen3Config(**shape, num_hidden_layers=layers, vocab_size=4096,
                                        max_position_embeddings=40_960, attn_implementation="sdpa"))


def full_size_counts(sequences: int) -> tuple[list[str], dict[str, float]]:
    """(c): Qwen3-1.7B whole (28 layers) at lengths uniform over 500–16,000, counted only: the lines to
    print, and the ratios at a budget of 16,384."""
    config = Qwen3Config(**QWEN3_1_7B_LAYER, num_hidden_layers=28, vocab_size=151_936)
    rng = random.Random(1)
    lengths = [256 + round(rng.uniform(500, 16_000 - 256)) for _ in range(sequences)]
    padded = counted(config, lengths, micro_batch_bounds(lengths, 8), False)
    lines, ratios = [], {}
    for budget in (16_384, 32_768):
        flat = counted(config, lengths, micro_batch_bounds(lengths, 8, budget), True)
        ratios = ratios or {key: flat[key] / padded[key] for key in ("tokens", "gflops_dense", "gflops_varlen")}
        pflops = lambda row, kind: f"{row[f'gflops_{kind}'] / 1e6:.2f}"
        lines.append(f"qwen3-1.7B-full {sequences} sequences, micro_batch_size 8 vs tokens@{budget}: tokens "
                     f"{flat['tokens'] / padded['tokens']:.3f} ({padded['tokens']} → {flat['tokens']}), PFLOPs dense "
                     f"{flat['gflops_dense'] / padded['gflops_dense']:.3f} ({pflops(padded, 'dense')} → "
                     f"{pflops(flat, 'dense')}), varlen {flat['gflops_varlen'] / padded['gflops_varlen']:.3f} "
                     f"({pflops(padded, 'varlen')} → {pflops(flat, 'varlen')})")
    return lines, ratios


def report(case: Case, rows: list[dict]) -> None:
    lengths = [p + r for p, r in zip(case.prompts, case.responses)]
    print(f"\n{case.name}: {len(lengths)} sequences of {min(lengths)}–{max(lengths)} positions (mean "
          f"{sum(lengths) / len(lengths):.0f}), micro_batch_size {case.micro_batch_size}")
    print(f"{'layout':<14} {'micro-b.':>8} {'tokens':>8} {'GFLOPs dense':>12} {'GFLOPs varlen':>13} {'seconds':>8} "
          f"{'saved MiB':>9} {'|Δgrad|':>8}")
    for row in rows:
        print(f"{row['label']:<14} {row['micro_batches']:>8} {row['tokens']:>8} {row['gflops_dense']:>12.2f} "
              f"{row['gflops_varlen']:>13.2f} {row['seconds']:>8.2f} {row['saved_mib']:>9.1f} {row['grad_diff']:>8.1e}")
    base = rows[0]
    for row in rows[1:]:
        ratio = lambda key: f"{row[key] / base[key]:.3f}"
        print(f"{case.name} {row['label']} / padded: tokens {ratio('tokens')}, GFLOPs dense {ratio('gflops_dense')}, "
              f"varlen {ratio('gflops_varlen')}, time {ratio('seconds')}, saved memory {ratio('saved_mib')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the smoke test's sizes: seconds")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per layout (the best is kept)")
    parser.add_argument("--layers", type=int, default=1, help="layers of the Qwen3-1.7B-shaped model")
    parser.add_argument("--scale", type=float, default=1 / 64, help="lengths of the 16k run, times this")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeats = 1 if args.quick else args.repeats
    demo = AutoModelForCausalLM.from_pretrained(DEMO_MODEL, attn_implementation="sdpa")
    print(f"CPU, {args.threads} thread(s), float32, sdpa; torch {torch.__version__}")
    results = {}
    qwen = qwen_case(args.quick, args.scale / 4 if args.quick else args.scale)
    for case, model in [*((case, demo) for case in demo_cases(args.quick)),
                        (qwen, qwen_model(args.layers, args.quick))]:
        results[case.key] = measure(model, case, repeats)
        report(case, results[case.key])
    print()
    lines, full = full_size_counts(64)
    print("\n".join(lines))
    first = lambda key, what: results[key][1][what] / results[key][0][what]  # the first budget against padded
    print("RESULT " + " ".join([
        *(f"{key}_{what}_ratio={first(key, what):.3f}"
          for key in results for what in ("tokens", "gflops_dense", "seconds", "saved_mib")),
        *(f"qwen3_full_{what}_ratio={full[what]:.3f}" for what in full),
        f"max_grad_rel_diff={max(row['grad_diff'] for rows in results.values() for row in rows):.1e}",
    ]))


if __name__ == "__main__":
    main()
