"""The GPU figures of opsd in one command (issue 16): one JSON and one markdown table in an output folder.

Parts, each in its own process under its own time limit (a part that runs long is killed and marked
"timed_out" with what it had recorded so far; a part that raises records its traceback; the others
run regardless), results written after every figure of a part and after every part:

  step        opsd's distillation step on a randomly initialised Qwen3-1.7B-shaped model (float32 master
              weights, bf16 autocast, 4 micro-batches of one 4096-token response; benchmarks/gpu_step.py):
              MFU = (2·P·T teacher + 6·P·T student FLOPs) / time of teacher + student + divergence, against
              a bf16 matmul peak measured here (and the datasheet's); the time split; peak GPU memory of
              the step against the same step with the naive full-logits divergence. As in `opsd distill`,
              the final hidden states and the head stay float32 under autocast, so the divergence's
              products over the vocabulary run in float32.
  divergence  opsd.objectives.divergence.chunked_divergence_to (what opsd/stages/distill.py calls) alone, reverse KL at
              V = 151,936, H = 2048 and 8192 positions, against the naive full-logits computation, each
              with bf16 and with float32 hidden states and heads: time, peak memory above the inputs,
              and loss and gradient errors against the naive float32 computation.
  generation  tokens/s of the hf engine's sampler (opsd/generation/hf.py `sample`) on the 1.7B shape:
              64 random prompts decoded to 128 tokens, then to 4096 (fewer, and said so, when the 128-token
              rate predicts that 4096 would not fit the part's time limit); then, where vLLM imports, the
              vllm engine on the same model, prompts and length (bf16), and its ratio to hf; where it does
              not, "not measured" with the reason.
  lora        20 steps of `opsd distill` (opsd.stages.distill.run_distill) with LoRA (rank 16) on a random
              Qwen3-0.6B-shaped model with bf16 base weights and bf16 autocast, saved to a temporary folder
              with opsd's local character tokenizer (nothing from a hub); then 10 steps and a resume to 20
              (run.steps=20, run.resume=true) in another folder, compared with the uninterrupted run:
              max |Δ| of the final adapters and merged weights (on CUDA bitwise equality is not expected),
              of the per-step divergences, and whether anything was non-finite. Its problems are graded
              by the exact_match verifier, so the run needs no math-verify (the GPU machine lacks it; the
              math verifier would only start its worker for an answer that is not a plain string match).

  load        the sharded load path (opsd/runtime/distributed.py `fill_from_rank0`, what every process of
              a run.parallel=fsdp run does) in a process group of one over NCCL, on a random float32
              Qwen3-0.6B: peak GPU memory against the whole model plus its largest tensor (not twice the
              model), the allocator's reserved memory after, and the weights against the file.

  handoff     the vLLM hand-off (opsd/generation/vllm.py) on the 1.7B shape with LoRA (rank 16), bf16: the
              peak memory of sending the weights as they stream (`plain_weights`, what the engine sends)
              against the merged model built whole; what releasing the trainer's cached blocks gives
              back; and where vLLM imports, the device's free memory with the engine awake, asleep
              (sampling.sleep_mode) and woken again after the trainer's cache was filled, and whether
              the woken engine decodes what it decoded before. GPU only: a plain `--cpu-smoke` leaves it
              out, `--cpu-smoke --only handoff` runs its code at toy sizes. Alone: `--only handoff`.

Default time limits sum to 500 s; the whole command stays under 9 minutes (`--only` splits it). `--cpu-smoke`
runs every other part at toy sizes on the CPU (under a minute); tests/test_benchmarks.py runs it. The script puts the
repository on sys.path itself, so it runs from a copy of the repository with nothing installed but
torch, transformers and peft.

    python benchmarks/gpu_suite.py --out runs/gpu-suite --commit $(git rev-parse --short HEAD)
    python benchmarks/gpu_suite.py --out /tmp/gpu-suite-smoke --cpu-smoke
    python benchmarks/gpu_suite.py --out runs/gpu-suite --only divergence --time-limit divergence=120
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the GPU machine runs the repository as it is: opsd is not installed there

PARTS = ("step", "divergence", "generation", "lora", "load", "handoff")
TIME_LIMITS_S = {"step": 70, "divergence": 40, "generation": 150, "lora": 120, "load": 45,
                 "handoff": 75}  # on the GPU; 500 s in all, so that the device's 10-minute command holds the start-up
GPU_ONLY = ("handoff",)  # left out of a plain --cpu-smoke run (it measures GPU memory); --only names it
SMOKE_TIME_LIMIT_S = 150  # per part, on a busy 2-core CPU

QWEN3_0_6B = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=128, vocab_size=151_936, tie_word_embeddings=True)
TOY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
           head_dim=16, vocab_size=512, tie_word_embeddings=True)

GPU_SIZES = {
    "step": dict(shape="qwen3_1_7b", micro_batches=4, per_micro=1, prompt_tokens=256, context_tokens=512,
                 response_tokens=4096, warmup=1, steps=2, matmul_n=8192, matmul_repeats=200),
    "divergence": dict(positions=8192, hidden=2048, vocab=151_936, chunk=256),
    "generation": dict(shape="qwen3_1_7b", batch=64, prompt_tokens=256, calibration_tokens=128, new_tokens=4096),
    "lora": dict(shape="qwen3_0_6b", dtype="bfloat16", steps=20, problems_per_step=4, samples=2, max_new_tokens=32,
                 lora_rank=16),
    "load": dict(shape="qwen3_0_6b"),
    "handoff": dict(shape="qwen3_1_7b", lora_rank=16, trainer_cache_gib=4.0, batch=8, prompt_tokens=64, new_tokens=32,
                    gpu_memory_utilization=0.3),
}
SMOKE_SIZES = {
    "step": dict(shape="toy", micro_batches=2, per_micro=1, prompt_tokens=16, context_tokens=16, response_tokens=48,
                 warmup=1, steps=1, matmul_n=256, matmul_repeats=4),
    "divergence": dict(positions=96, hidden=32, vocab=1000, chunk=32),
    "generation": dict(shape="toy", batch=4, prompt_tokens=8, calibration_tokens=4, new_tokens=16),
    "lora": dict(shape="toy", dtype="bfloat16", steps=4, problems_per_step=2, samples=2, max_new_tokens=8, lora_rank=4),
    "load": dict(shape="toy"),
    "handoff": dict(shape="toy", lora_rank=4, trainer_cache_gib=0.0, batch=2, prompt_tokens=8, new_tokens=4,
                    gpu_memory_utilization=0.3),
}


# ---- the parent: one process per part, each under its time limit ----


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder: gpu_suite.json, gpu_suite.md, logs/")
    parser.add_argument("--cpu-smoke", action="store_true", help="every part at toy sizes on the CPU")
    parser.add_argument("--only", nargs="+", choices=PARTS, help="run these parts only")
    parser.add_argument("--time-limit", action="append", default=[], metavar="PART=SECONDS",
                        help="another time limit for a part (repeatable)")
    parser.add_argument("--commit", default=None, help="the commit measured (default: git rev-parse, if any)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads with --cpu-smoke (on a busy CPU, more threads spin against other work)")
    parser.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)  # the child side
    parser.add_argument("--part-file", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.part:
        return run_part(args.part, args.cpu_smoke, Path(args.part_file), args.deadline, args.threads)
    limits = time_limits(args.time_limit, args.cpu_smoke)
    if not args.cpu_smoke and not cuda_available():
        print("gpu_suite: no CUDA device here; run with --cpu-smoke for the toy sizes on the CPU", file=sys.stderr)
        return 2
    listed = [p for p in PARTS if not (args.cpu_smoke and p in GPU_ONLY) or p in (args.only or [])]
    args.only = args.only or listed
    out = Path(args.out).resolve()  # the parts run from the repository root
    (out / "logs").mkdir(parents=True, exist_ok=True)
    suite = {"suite": "benchmarks/gpu_suite.py", "mode": "cpu-smoke" if args.cpu_smoke else "gpu",
             "date": datetime.datetime.now().isoformat(timespec="seconds"), "commit": args.commit or git_commit(),
             "command": " ".join(sys.argv), "environment": {}, "time_limits_s": limits,
             "sizes": SMOKE_SIZES if args.cpu_smoke else GPU_SIZES,
             "parts": {name: {"status": "pending" if name in args.only else "not run"} for name in listed}}
    write_outputs(out, suite)
    started = time.perf_counter()
    for name in (p for p in listed if p in args.only):
        suite["parts"][name] = run_child(name, args, out, limits[name])
        suite["environment"] = suite["environment"] or suite["parts"][name].pop("environment", {})
        suite["parts"][name].pop("environment", None)
        suite["total_s"] = round(time.perf_counter() - started, 1)
        write_outputs(out, suite)
        print(f"gpu_suite: {name}: {suite['parts'][name]['status']} ({suite['parts'][name]['seconds']} s)", flush=True)
    print(f"gpu_suite: wrote {out / 'gpu_suite.json'} and {out / 'gpu_suite.md'} in {suite['total_s']} s")
    return 0


def time_limits(overrides: list[str], smoke: bool) -> dict[str, float]:
    limits = {name: SMOKE_TIME_LIMIT_S if smoke else TIME_LIMITS_S[name] for name in PARTS}
    for override in overrides:
        name, _, seconds = override.partition("=")
        if name not in PARTS or not seconds.replace(".", "", 1).isdigit():
            raise SystemExit(f"gpu_suite: --time-limit {override!r} is not PART=SECONDS with PART one of "
                             f"{', '.join(PARTS)}")
        limits[name] = float(seconds)
    return limits


def run_child(name: str, args, out: Path, limit_s: float) -> dict:
    """The part's process, killed (with anything it started) at its time limit; its record."""
    part_file = out / "logs" / f"{name}.json"
    part_file.unlink(missing_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--out", str(out), "--part", name,
               "--part-file", str(part_file), "--deadline", str(time.time() + limit_s), "--threads", str(args.threads)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if args.cpu_smoke:
        command.append("--cpu-smoke")
        env["OMP_NUM_THREADS"] = str(args.threads)
    started = time.perf_counter()
    with open(out / "logs" / f"{name}.log", "w") as log:
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                 start_new_session=True)
        try:
            code = child.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            code = None
        finally:  # also on Ctrl-C
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGKILL)  # the part's own process group: it and whatever it started
                child.wait()
    record = json.loads(part_file.read_text()) if part_file.is_file() else {"results": {}}
    if code is None:
        status = "timed_out"
        record["error"] = f"killed at its time limit of {limit_s:.0f} s; the results are what it had recorded by then"
    elif record.get("error"):
        status = "failed"
    elif code != 0:
        status = "crashed"
        record["error"] = f"exit code {code} without a Python exception (see logs/{name}.log)"
    else:
        status = "ok"
    return {"status": status, "seconds": round(time.perf_counter() - started, 1), "time_limit_s": limit_s, **record}


def write_outputs(out: Path, suite: dict) -> None:
    """gpu_suite.json and gpu_suite.md, each replaced whole (a reader never sees half a file)."""
    for name, text in (("gpu_suite.json", json.dumps(suite, indent=2) + "\n"), ("gpu_suite.md", markdown(suite))):
        tmp = out / (name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out / name)


def markdown(suite: dict) -> str:
    env = suite["environment"]
    lines = [f"# opsd GPU suite ({suite['mode']})", "",
             f"Date {suite['date']}; commit `{suite['commit']}`; device {env.get('device', '?')}; "
             f"torch {env.get('torch', '?')}, transformers {env.get('transformers', '?')}, "
             f"peft {env.get('peft', '?')}; "
             f"{suite.get('total_s', 0)} s in all.", "",
             "| part | status | figure | value |", "|---|---|---|---|"]
    for name, part in suite["parts"].items():
        results = {k: v for k, v in part.get("results", {}).items() if not isinstance(v, (dict, list))}
        status = f"{part['status']} ({part['seconds']} s)" if "seconds" in part else part["status"]
        if not results:
            lines.append(f"| {name} | {status} | – | – |")
        for i, (key, value) in enumerate(results.items()):
            lines.append(f"| {name if i == 0 else ''} | {status if i == 0 else ''} | {key} | {cell(value)} |")
    errors = [(name, part["error"]) for name, part in suite["parts"].items() if part.get("error")]
    if errors:
        lines += ["", "## Errors", ""]
        for name, error in errors:
            lines += [f"**{name}**:", "", "```", error.rstrip(), "```", ""]
    return "\n".join(lines).rstrip() + "\n"


def cell(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def git_commit() -> str:
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return done.stdout.strip() if done.returncode == 0 else "unknown (no git checkout; pass --commit)"


# ---- the child: one part, its figures recorded as they come ----


class Record:
    """A part's results, written to its file after every figure (the parent reads it even after a kill)."""

    def __init__(self, path: Path):
        self.path = path
        self.data = {"results": {}, "error": None, "environment": {}}

    def __setitem__(self, key: str, value) -> None:
        self.update({key: value})

    def update(self, values: dict) -> None:
        self.data["results"].update({k: plain(v) for k, v in values.items()})
        self.flush()

    def flush(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=2), encoding="utf-8")
        tmp.replace(self.path)


def plain(value):
    """JSON has no NaN: a figure that does not exist (memory on the CPU) is null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def run_part(name: str, smoke: bool, part_file: Path, deadline: float, threads: int) -> int:
    record = Record(part_file)
    try:
        import torch

        if smoke:
            torch.set_num_threads(threads)
        device = torch.device("cpu" if smoke else "cuda")
        record.data["environment"] = environment(device)
        record.flush()
        sizes = (SMOKE_SIZES if smoke else GPU_SIZES)[name]
        PART_FUNCTIONS[name](sizes, record, device, deadline)
    except BaseException:  # noqa: B036 — whatever it is, the parent must learn of it from the file
        record.data["error"] = "".join(traceback.format_exc().splitlines(keepends=True)[-25:])[-4000:]
        record.flush()
        return 1
    return 0


def environment(device) -> dict:
    import torch
    import transformers

    try:
        import peft

        peft_version = peft.__version__
    except ImportError:
        peft_version = "not installed"
    cpu = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
            "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
            "peft": peft_version, "python": platform.python_version()}


def shape_of(name: str) -> dict:
    from benchmarks.gpu_step import QWEN3_1_7B

    return {"qwen3_1_7b": QWEN3_1_7B, "qwen3_0_6b": QWEN3_0_6B, "toy": TOY}[name]


def part_step(sizes: dict, record: Record, device, deadline: float) -> None:
    """MFU, time split and peak memory of opsd's step, and the same step with the naive divergence."""
    import dataclasses

    from benchmarks.gpu_step import StepSizes, matmul_tflops, measure_step, peak_tflops

    matmul = matmul_tflops(device, sizes["matmul_n"], sizes["matmul_repeats"])
    record.update({"matmul_bf16_tflops": matmul, "datasheet_bf16_tflops": peak_tflops(device)})
    step = StepSizes(**{f.name: sizes[f.name] for f in dataclasses.fields(StepSizes) if f.name in sizes})
    shape = shape_of(sizes["shape"])
    ours = measure_step(shape, step, device, "ours")
    train_s = ours["teacher_s"] + ours["student_s"] + ours["divergence_s"]
    achieved = ours["flops"] / train_s / 1e12
    datasheet = peak_tflops(device)
    record.update({"params": ours["params"], "teacher_tokens": ours["teacher_tokens"],
                   "student_tokens": ours["student_tokens"], "flops_per_step": float(ours["flops"]),
                   "teacher_s": ours["teacher_s"], "student_s": ours["student_s"],
                   "divergence_s": ours["divergence_s"], "optimizer_s": ours["optimizer_s"], "train_s": train_s,
                   "achieved_tflops": achieved, "mfu_vs_measured_matmul": achieved / matmul,
                   "mfu_vs_datasheet": achieved / datasheet if datasheet else None, "peak_gib_ours": ours["peak_gib"]})
    naive = measure_step(shape, step, device, "naive")
    naive_train_s = naive["teacher_s"] + naive["student_s"] + naive["divergence_s"]
    record.update({"naive_train_s": naive_train_s, "naive_divergence_forward_s": naive["divergence_s"],
                   "peak_gib_naive": naive["peak_gib"],
                   "peak_ratio_ours_to_naive": ours["peak_gib"] / naive["peak_gib"],
                   "time_ratio_ours_to_naive": train_s / naive_train_s})


def part_divergence(sizes: dict, record: Record, device, deadline: float) -> None:
    """Ours and naive, bf16 and float32, against the naive float32 computation of the same inputs."""
    import torch

    n, hidden, vocab = sizes["positions"], sizes["hidden"], sizes["vocab"]
    record.update({"positions": n, "vocab": vocab, "hidden": hidden, "kind": "reverse_kl"})
    g = torch.Generator(device=device).manual_seed(0)
    randn = lambda *shape: torch.randn(*shape, device=device, generator=g)
    hidden_s = randn(n, hidden)
    head = randn(vocab, hidden) * (2.0 / hidden**0.5)  # logits of standard deviation about 2
    hidden_t = hidden_s + 0.3 * randn(n, hidden)
    reference = None
    for impl, dtype in (("naive", torch.float32), ("ours", torch.float32), ("ours", torch.bfloat16),
                        ("naive", torch.bfloat16)):
        label = f"{impl}_{'fp32' if dtype == torch.float32 else 'bf16'}"
        result = divergence_run(impl, hidden_s.to(dtype), head.to(dtype), hidden_t.to(dtype), sizes["chunk"], device)
        reference = reference or result
        record.update({f"{label}_s": result["seconds"], f"{label}_peak_gib": result["peak_gib"],
                       **({} if result is reference else errors_against(label, result, reference))})
        del result
    results = record.data["results"]
    if device.type == "cuda":
        record["bf16_peak_ratio_ours_to_naive"] = results["ours_bf16_peak_gib"] / results["naive_bf16_peak_gib"]
    record["bf16_time_ratio_ours_to_naive"] = results["ours_bf16_s"] / results["naive_bf16_s"]


def divergence_run(impl: str, hidden_s, head, hidden_t, chunk: int, device) -> dict:
    """Forward and backward of one implementation (after a warm-up on one chunk): time, peak memory
    above the inputs, loss and gradients in float32."""
    import torch

    from benchmarks.gpu_step import _now, naive_reverse_kl
    from opsd.objectives.divergence import DivergenceSpec, chunked_divergence_to

    def loss_and_grads(count: int):
        hs, w = hidden_s[:count].detach().requires_grad_(), head.detach().requires_grad_()
        ht, head_t = hidden_t[:count], head.detach()
        weight_N = torch.full((count,), 1.0 / count, device=device)
        if impl == "ours":
            targets_N = torch.zeros(count, dtype=torch.long, device=device)
            loss = chunked_divergence_to(hs, w, lambda part: ht[part] @ head_t.T, weight_N, targets_N,
                                         spec=DivergenceSpec(chunk_size=chunk, kind="reverse_kl")).loss
        else:
            loss = naive_reverse_kl(hs, w, ht, head_t, weight_N)
        loss.backward()
        return loss.detach(), hs.grad, w.grad

    loss_and_grads(chunk)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    started = _now(device)
    loss, grad_h, grad_w = loss_and_grads(hidden_s.shape[0])
    seconds = _now(device) - started
    peak = (torch.cuda.max_memory_allocated() - before) / 2**30 if device.type == "cuda" else float("nan")
    return {"seconds": seconds, "peak_gib": peak, "loss": loss.float(), "grad_h": grad_h.float(),
            "grad_w": grad_w.float()}


def errors_against(label: str, result: dict, reference: dict) -> dict:
    """Relative errors: |Δloss|/|loss| and max|Δgrad|/max|grad| (bf16 errors scale with the values)."""
    rel = lambda a, b: float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))
    return {f"{label}_loss_rel_err": rel(result["loss"], reference["loss"]),
            f"{label}_grad_hidden_rel_err": rel(result["grad_h"], reference["grad_h"]),
            f"{label}_grad_head_rel_err": rel(result["grad_w"], reference["grad_w"])}


def part_generation(sizes: dict, record: Record, device, deadline: float) -> None:
    """hf engine tokens/s at a short and at the long length; vLLM's reason for not being measured."""
    import torch

    from benchmarks.gpu_step import build_model, generation_speed

    status = vllm_status()
    record["vllm_tokens_per_s"] = status or "pending: measured after the hf engine"
    model = build_model(shape_of(sizes["shape"]), device).eval()
    batch, prompt, short = sizes["batch"], sizes["prompt_tokens"], sizes["calibration_tokens"]
    first = generation_speed(model, device, batch, prompt, short)
    record.update({"batch": batch, "prompt_tokens": prompt, f"hf_tokens_per_s_at_{short}": first["tokens_per_s"]})
    # decode steps slow down as the KV cache grows: allow 1.2× the short run's time per token, and a margin
    left_s = deadline - time.time() - 10
    tokens = sizes["new_tokens"]
    while tokens > short and first["seconds"] / short * tokens * 1.2 > left_s:
        tokens //= 2
    if tokens < sizes["new_tokens"]:
        record["note"] = (f"{sizes['new_tokens']} tokens would not fit the time limit at the {short}-token rate; "
                          f"measured at {tokens}")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    long = generation_speed(model, device, batch, prompt, tokens)
    record.update({"long_new_tokens": tokens, f"hf_tokens_per_s_at_{tokens}": long["tokens_per_s"],
                   "long_seconds": long["seconds"],
                   "long_peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None})
    if status is None:  # vLLM imports: the same model, prompt size, batch and length on the vllm engine
        from benchmarks.generation import (
            random_prompts,
            stopless_tokenizer,
            tokens_per_s,
        )
        from opsd.generation import SamplingConfig, make_engine

        options = SamplingConfig(engine="vllm", batch_size=batch, max_model_len=prompt + tokens + 16)
        dtype = torch.bfloat16 if device.type == "cuda" else None
        with make_engine(model, stopless_tokenizer(), options, device=device, dtype=dtype) as engine:
            rate, _ = tokens_per_s(engine, random_prompts(batch, prompt, model.config.vocab_size), tokens, batch)
        record.update({"vllm_tokens_per_s": rate, "vllm_over_hf": rate / long["tokens_per_s"]})


def vllm_status() -> str | None:
    """None where vLLM imports (then it is measured); otherwise why it is not measured."""
    try:
        import vllm  # noqa: F401
    except Exception as err:  # ImportError, or a broken install raising anything at import
        first_line = str(err).splitlines()[0] if str(err) else ""
        return f"not measured: vllm not importable ({type(err).__name__}: {first_line})"
    return None


def part_lora(sizes: dict, record: Record, device, deadline: float) -> None:
    """A LoRA OPSD run of N steps, and one of N/2 steps resumed to N, on the same random model."""
    import importlib.util

    work = Path(tempfile.mkdtemp(prefix="opsd-gpu-suite-"))
    try:
        model_dir = save_random_model(work / "model", shape_of(sizes["shape"]), sizes["dtype"], device)
        problems = work / "problems.jsonl"
        write_problems(problems)
        steps = sizes["steps"]
        base = lora_overrides(sizes, model_dir, problems, device)
        started = time.perf_counter()
        run_distill_with(base + [f"run.output_dir={work / 'full'}", f"run.steps={steps}"])
        record.update({"steps": steps, "full_run_s": time.perf_counter() - started, **run_summary(work / "full")})
        run_distill_with(base + [f"run.output_dir={work / 'resumed'}", f"run.steps={steps // 2}"])
        run_distill_with(base + [f"run.output_dir={work / 'resumed'}", f"run.steps={steps}", "run.resume=true"])
        record.update(compare_runs(work / "full", work / "resumed", model_dir, steps // 2))
        record.update({"verifier": "exact_match", "math_verify_imported": "math_verify" in sys.modules,
                       "math_verify_installed": importlib.util.find_spec("math_verify") is not None})
    finally:
        shutil.rmtree(work, ignore_errors=True)


def part_load(sizes: dict, record: Record, device, deadline: float) -> None:
    """The sharded load path (distributed.fill_from_rank0) on this device, in a process group of one
    (NCCL on a GPU): the policy built empty, sharded and filled from a whole copy in CPU memory. Its peak
    device memory should be the float32 model (one process's shard is all of it) plus one whole tensor
    (the one being sent), not twice the model; the weights must be the file's."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from opsd.core.models import Backbone, ModelConfig
    from opsd.runtime.distributed import decoder_layers, fill_from_rank0, full
    from opsd.runtime.training import OptimConfig, load_policy

    work = Path(tempfile.mkdtemp(prefix="opsd-gpu-suite-"))
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29_500 + os.getpid() % 1000)})
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    try:
        config = ModelConfig(name_or_path=str(save_random_model(work / "model", shape_of(sizes["shape"]), "float32",
                                                                 torch.device("cpu"))))
        source = Backbone(load_policy(config, OptimConfig(), torch.device("cpu")))
        whole = sum(p.numel() * 4 for p in source.parameters())
        largest = max(p.numel() * 4 for p in source.parameters())
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        started = time.perf_counter()
        backbone = Backbone(load_policy(config, OptimConfig(), device, empty=True))
        mesh = init_device_mesh(device.type, (1,))
        for layer in decoder_layers(backbone):
            fully_shard(layer, mesh=mesh)
        fully_shard(backbone, mesh=mesh)
        fill_from_rank0(backbone, source, device)
        seconds = time.perf_counter() - started
        gib = 2.0**30
        peak = (torch.cuda.max_memory_allocated(device) - before) if device.type == "cuda" else float("nan")
        reserved = torch.cuda.memory_reserved(device) if device.type == "cuda" else float("nan")
        theirs = source.state_dict()
        equal = all(torch.equal(full(value).cpu(), theirs[key]) for key, value in backbone.state_dict().items())
        record.update({"params": whole // 4, "whole_float32_gib": whole / gib, "largest_tensor_gib": largest / gib,
                       "peak_gib": peak / gib, "reserved_gib": reserved / gib,
                       "peak_over_whole_plus_largest": peak / (whole + largest), "load_s": seconds,
                       "weights_equal_file": equal})
    finally:
        dist.destroy_process_group()
        shutil.rmtree(work, ignore_errors=True)


def part_handoff(sizes: dict, record: Record, device, deadline: float) -> None:
    """The vLLM hand-off's memory (opsd/generation/vllm.py): sending the weights as they stream against
    building them whole; the trainer's cached blocks released; where vLLM imports, sleep and wake."""
    import torch

    from benchmarks.gpu_step import build_model
    from opsd.core.models import ModelConfig, add_lora, causal_lm, merged_weights
    from opsd.generation.vllm import plain_weights, release_cached_blocks

    cuda, gib = device.type == "cuda", 2.0**30
    model = build_model(shape_of(sizes["shape"]), device).to(torch.bfloat16)
    model = add_lora(model, ModelConfig(lora_rank=sizes["lora_rank"])).eval()
    plain = [p for name, p in causal_lm(model).named_parameters() if "lora_" not in name]

    def peak_above(work) -> float:  # GiB allocated at the peak of `work` above what was allocated before it
        if not cuda:
            work()
            return float("nan")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        work()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / gib

    with torch.no_grad():
        streamed = peak_above(lambda: [None for _ in plain_weights(model, torch.bfloat16)])
        named = dict(causal_lm(model).named_parameters(remove_duplicate=False))
        whole = peak_above(lambda: merged_weights(model, named))
    record.update({"model_bf16_gib": sum(p.numel() * 2 for p in plain) / gib,
                   "largest_tensor_gib": max(p.numel() * 2 for p in plain) / gib,
                   "send_streamed_peak_gib": streamed, "send_merged_whole_peak_gib": whole})
    record.update(handoff_release(sizes["trainer_cache_gib"], device, release_cached_blocks))
    status = vllm_status()
    if status is not None or not cuda:
        record["sleep_wake"] = status or "not measured: vLLM's sleep mode needs a GPU"
        return
    record.update(handoff_sleep_wake(model, sizes, device))


def handoff_release(cache_gib: float, device, release) -> dict:
    """A trainer's transient (`cache_gib` allocated and freed: PyTorch keeps it cached) and what
    `release` (vllm.release_cached_blocks) gives back to the device."""
    import torch

    if device.type != "cuda":
        release(device)
        return {"trainer_cache_released_gib": None}
    gib = 2.0**30
    block = torch.empty(int(cache_gib * gib), dtype=torch.uint8, device=device)
    del block
    reserved, free = torch.cuda.memory_reserved() / gib, torch.cuda.mem_get_info()[0] / gib
    release(device)
    return {"trainer_cache_reserved_before_gib": reserved, "trainer_cache_reserved_after_gib":
            torch.cuda.memory_reserved() / gib, "device_free_before_release_gib": free,
            "device_free_after_release_gib": torch.cuda.mem_get_info()[0] / gib}


def handoff_sleep_wake(model, sizes: dict, device) -> dict:
    """sampling.sleep_mode on a real engine: the device's free memory awake, asleep, and woken after the
    trainer filled its cache with all but half of what the sleep gave back (vLLM's wake-up then fits only
    if the engine releases that cache first); the woken engine's greedy tokens against the first ones."""
    import torch

    from benchmarks.generation import random_prompts, stopless_tokenizer
    from opsd.generation import SamplingConfig, make_engine

    gib = 2.0**30
    free = lambda: torch.cuda.mem_get_info()[0] / gib
    prompts = random_prompts(sizes["batch"], sizes["prompt_tokens"], model.config.vocab_size)
    greedy = SamplingConfig(temperature=0, max_new_tokens=sizes["new_tokens"])
    options = SamplingConfig(engine="vllm", sleep_mode=True, enforce_eager=True, batch_size=sizes["batch"],
                             max_model_len=sizes["prompt_tokens"] + sizes["new_tokens"] + 16,
                             gpu_memory_utilization=sizes["gpu_memory_utilization"])
    seeds = list(range(len(prompts)))
    with make_engine(model, stopless_tokenizer(), options, device=device, dtype=torch.bfloat16) as engine:
        first = [g.response_ids for g in engine.generate(prompts, greedy, seeds)]
        awake = free()
        started = time.perf_counter()
        engine.idle()
        asleep, sleep_s = free(), time.perf_counter() - started
        cache = max(asleep - (asleep - awake) / 2, 0.0)  # the trainer's transient, left in PyTorch's cache
        block = torch.empty(int(cache * gib), dtype=torch.uint8, device=device)
        del block
        before_wake = free()
        engine.update_weights()
        started = time.perf_counter()
        try:
            engine.ready()
            woke = "ok"
        except Exception as err:  # an out-of-memory here is the finding
            woke = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        wake_s = time.perf_counter() - started
        woken = free()
        again = [g.response_ids for g in engine.generate(prompts, greedy, seeds)] if woke == "ok" else None
    return {"device_free_awake_gib": awake, "device_free_asleep_gib": asleep, "sleep_gave_back_gib": asleep - awake,
            "trainer_cache_filled_gib": cache, "device_free_before_wake_gib": before_wake,
            "wake_after_trainer_cache": woke, "device_free_woken_gib": woken, "sleep_s": sleep_s,
            "wake_and_send_s": wake_s, "woken_tokens_equal_first": again == first}


def save_random_model(folder: Path, shape: dict, dtype: str, device) -> Path:
    """A random Qwen3 of `shape` in `dtype` with opsd's character tokenizer (ids past it decode to nothing)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from opsd.core.tiny import char_tokenizer

    tokenizer = char_tokenizer()
    config = Qwen3Config(**shape, max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3ForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_problems(path: Path) -> None:
    rows = [{"id": f"add-{a}-{b}", "problem": f"What is {a} + {b}?", "answer": str(a + b),
             "solution": f"{a} + {b} = {a + b}. The answer is {a + b}."}
            for a, b in ((17, 25), (3, 9), (40, 2), (11, 11), (8, 7), (23, 19), (5, 60), (14, 28))]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def lora_overrides(sizes: dict, model_dir: Path, problems: Path, device) -> list[str]:
    import torch

    threads = [f"run.threads={torch.get_num_threads()}"] if device.type == "cpu" else []  # as run_part set them
    return [f"model.name_or_path={model_dir}", f"model.dtype={sizes['dtype']}", f"model.lora_rank={sizes['lora_rank']}",
            f"data.path={problems}", "verifier.default=exact_match",
            f"sampling.max_new_tokens={sizes['max_new_tokens']}", f"sampling.n={sizes['samples']}",
            f"run.problems_per_step={sizes['problems_per_step']}",
            f"run.device={device.type}", "run.report_to=[]", "run.seed=0", "optim.lr=1e-4", "optim.bf16=true",
            "samples_per_step=2", *threads]


def run_distill_with(overrides: list[str]) -> None:
    from opsd.core.config import load_config
    from opsd.stages.distill import DistillConfig, run_distill

    run_distill(load_config(DistillConfig, None, overrides))


def run_summary(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = rows[1:] or rows  # the first step pays for warm-up
    finite = lambda key: all(r.get(key) is not None and math.isfinite(r[key]) for r in rows)
    return {"steps_done": len(rows), "divergence_first": rows[0]["loss/divergence"],
            "divergence_last": rows[-1]["loss/divergence"], "divergence_all_finite": finite("loss/divergence"),
            "grad_norm_all_finite": finite("optim/grad_norm"), "skipped_steps": rows[-1]["optim/skipped_steps"],
            "step_s_mean": sum(r["time/step_s"] for r in timed) / len(timed),
            "generate_tokens_per_s_mean": sum(r["throughput/generate_tokens_per_s"] for r in timed) / len(timed)}


def compare_runs(full: Path, resumed: Path, model_dir: Path, resumed_at: int) -> dict:
    """max |Δ| between the uninterrupted and the resumed run: adapters, merged weights, divergences
    of the steps after the resume; and how far training moved the weights, for scale."""
    import torch
    from safetensors.torch import load_file

    from opsd.runtime.runs import TRAINING_STATE, latest_checkpoint

    a, b = latest_checkpoint(full), latest_checkpoint(resumed)
    adapters = [torch.load(c / TRAINING_STATE, weights_only=True)["adapters"] for c in (a, b)]
    merged = [load_file(str(c / "model.safetensors")) for c in (a, b)]
    start = load_file(str(model_dir / "model.safetensors"))
    max_diff = lambda x, y: max(float((x[k].float() - y[k].float()).abs().max()) for k in x if k in y)
    rows = [[json.loads(line) for line in (r / "metrics.jsonl").read_text().splitlines()] for r in (full, resumed)]
    after = [(x["loss/divergence"], y["loss/divergence"]) for x, y in zip(*rows) if x["step"] > resumed_at]
    return {"resume_adapters_max_abs_diff": max_diff(*adapters),
            "resume_adapters_bitwise_equal": all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0]),
            "resume_merged_weights_max_abs_diff": max_diff(*merged),
            "resume_divergence_max_abs_diff": max(abs(x - y) for x, y in after),
            "resumed_steps_done": len(rows[1]),
            "trained_weight_change_max": max_diff(merged[0], start)}


PART_FUNCTIONS = {"step": part_step, "divergence": part_divergence, "generation": part_generation, "lora": part_lora,
                  "load": part_load, "handoff": part_handoff}

if __name__ == "__main__":
    sys.exit(main())
