"""The distillation step on a GPU: model FLOPs utilisation, peak memory against the naive
divergence, and rollout generation speed, for a randomly initialised model of Qwen3-1.7B's shape.

The step is opsd's own: the frozen-base teacher (a weight snapshot swapped into the one network) runs
prompt ‖ response under inference mode, the student runs the same response after its own prompt with
autograd, and the full-vocabulary reverse KL is taken chunk by chunk from final hidden states
(opsd.objectives.divergence.chunked_divergence). The naive variant differs only in the divergence: full
[N × V] logits of both sides through plain autograd. Weights are float32 master copies, every
forward under bf16 autocast, as `opsd distill` runs on a GPU.

MFU counts 2·P·T FLOPs for the teacher forward and 6·P·T for the student forward and backward (P
parameters, T tokens of prompt ‖ response per side), over the time of the teacher and student
passes and the divergence (the optimizer step is timed apart), against the device's dense bf16 peak.
The functions here are also what benchmarks/gpu_suite.py runs (there against a measured matmul peak).

    python benchmarks/gpu_step.py               # CUDA: Qwen3-1.7B shape, 4 responses of 4096 tokens
    python benchmarks/gpu_step.py --small       # CPU: a small model; the GPU figures print "not measured"
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from opsd.core.models import Backbone, output_head  # noqa: E402
from opsd.core.packing import pack, response_hidden  # noqa: E402
from opsd.generation import SamplingConfig  # noqa: E402
from opsd.generation.hf import sample  # noqa: E402
from opsd.objectives.divergence import DivergenceSpec, chunked_divergence  # noqa: E402
from opsd.teacher.target import teacher_hidden  # noqa: E402
from opsd.teacher.weights import TeacherWeightsConfig, TeacherWeightsState  # noqa: E402

QWEN3_1_7B = dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=128, vocab_size=151_936, tie_word_embeddings=True)
SMALL = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64, vocab_size=32_768, tie_word_embeddings=True)
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, SXM


@dataclass(frozen=True)
class StepSizes:
    micro_batches: int = 4  # micro-batches per optimizer step
    per_micro: int = 1  # responses per micro-batch
    prompt_tokens: int = 256  # the student's prompt
    context_tokens: int = 512  # reference solution in the teacher prompt, before the prompt
    response_tokens: int = 4096  # every response
    warmup: int = 1  # steps run before the measured ones
    steps: int = 2  # measured steps (times are their means)
    gradient_checkpointing: bool = False


def build_model(shape: dict, device: torch.device) -> Qwen3ForCausalLM:
    """A randomly initialised Qwen3 of `shape`, float32, initialised directly on `device`."""
    torch.manual_seed(0)
    config = Qwen3Config(**shape, max_position_embeddings=32_768, attn_implementation="sdpa")
    with torch.device(device):  # a 1.7B model initialised on the CPU would take longer than its whole benchmark
        return Qwen3ForCausalLM(config)


def naive_reverse_kl(hidden_s, head, hidden_t, head_t, weight_N):
    logp_s = torch.log_softmax((hidden_s @ head.T).float(), -1)
    with torch.no_grad():
        logp_t = torch.log_softmax((hidden_t @ head_t.T).float(), -1)
    return ((logp_s.exp() * (logp_s - logp_t)).sum(-1) * weight_N).sum()


def distill_step(model, teacher, batches, divergence: str, device, gradient_checkpointing: bool) -> dict:
    """One optimizer step's teacher and student passes over the micro-batches; times and tokens.

    "divergence" is the time of the divergence's forward call. Ours takes its gradient there (its
    backward only hands it over); the naive one's backward runs inside the student's backward."""
    backbone = Backbone(model)
    head = output_head(model)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    times = {"teacher": 0.0, "student": 0.0, "divergence": 0.0}
    tokens = {"teacher": 0, "student": 0}
    responses_total = sum(len(r) for _, _, rs in batches for r in rs)
    if gradient_checkpointing:
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    for student_prompts, teacher_prompts, responses in batches:
        started = _now(device)
        packed_t = pack(teacher_prompts, responses, 0, device)
        with teacher.active(), autocast:
            hidden_t = teacher_hidden(model, packed_t)
        times["teacher"] += _now(device) - started
        started = _now(device)
        packed_s = pack(student_prompts, responses, 0, device)
        model.train()
        with autocast:
            hidden_s = response_hidden(backbone, packed_s)
        weight_N = torch.full_like(packed_s.targets_N, 1.0 / responses_total, dtype=torch.float32)
        forward_done = _now(device)
        if divergence == "ours":  # outside autocast, as opsd/stages/distill.py calls it
            loss = chunked_divergence(hidden_s, head, hidden_t, teacher.head(), weight_N, packed_s.targets_N,
                                      spec=DivergenceSpec(kind="reverse_kl")).loss
        else:
            with autocast:
                loss = naive_reverse_kl(hidden_s, head, hidden_t, teacher.head(), weight_N)
        divergence_done = _now(device)
        loss.backward()
        times["student"] += (forward_done - started) + (_now(device) - divergence_done)
        times["divergence"] += divergence_done - forward_done
        tokens["teacher"] += int(packed_t.attention_mask_B_L.sum())
        tokens["student"] += int(packed_s.attention_mask_B_L.sum())
        del hidden_t, hidden_s, loss
    (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
    return {"times": times, "tokens": tokens}


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def make_batches(vocab: int, micro_batches: int, per_micro: int, prompt_len: int, context_len: int,
                 response_len: int) -> list:
    g = torch.Generator().manual_seed(1)
    rand = lambda n: torch.randint(1, vocab, (n,), generator=g).tolist()
    batches = []
    for _ in range(micro_batches):
        prompts = [rand(prompt_len) for _ in range(per_micro)]
        batches.append((prompts, [rand(context_len) + p for p in prompts],
                        [rand(response_len) for _ in range(per_micro)]))
    return batches


def measure_step(shape: dict, sizes: StepSizes, device: torch.device, divergence: str) -> dict:
    """Mean times of `sizes.steps` optimizer steps after `sizes.warmup`, FLOPs by the 2·P·T + 6·P·T
    count, and the peak GPU memory (NaN on the CPU) of model, optimizer and step together."""
    model = build_model(shape, device)
    params = sum(p.numel() for p in model.parameters())
    teacher = TeacherWeightsState(model, TeacherWeightsConfig("frozen"), uses_lora=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=device.type == "cuda")
    batches = make_batches(model.config.vocab_size, sizes.micro_batches, sizes.per_micro, sizes.prompt_tokens,
                           sizes.context_tokens, sizes.response_tokens)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    results = []
    for _ in range(sizes.warmup + sizes.steps):
        result = distill_step(model, teacher, batches, divergence, device, sizes.gradient_checkpointing)
        started = _now(device)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        result["times"]["optimizer"] = _now(device) - started
        results.append(result)
    measured = results[sizes.warmup:]
    mean = lambda key: sum(r["times"][key] for r in measured) / len(measured)
    tokens = measured[0]["tokens"]
    flops = 2 * params * tokens["teacher"] + 6 * params * tokens["student"]
    out = {"params": params, "teacher_s": mean("teacher"), "student_s": mean("student"),
           "divergence_s": mean("divergence"), "optimizer_s": mean("optimizer"), "flops": flops,
           "teacher_tokens": tokens["teacher"], "student_tokens": tokens["student"],
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")}
    del model, teacher, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def generation_speed(model, device: torch.device, batch: int, prompt_tokens: int, new_tokens: int) -> dict:
    """Tokens/s of opsd's hf sampler decoding `batch` random prompts to exactly `new_tokens` tokens each
    (no stop token), under bf16 autocast on a GPU as in training."""
    g = torch.Generator().manual_seed(2)
    prompts = torch.randint(1, model.config.vocab_size, (batch, prompt_tokens), generator=g).tolist()
    config = SamplingConfig(temperature=1.0, max_new_tokens=new_tokens, batch_size=batch)
    seeds = list(range(len(prompts)))
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        sample(model, prompts[:2], SamplingConfig(max_new_tokens=8, batch_size=2), [], 0, seeds[:2])  # warm-up
        started = _now(device)
        results = sample(model, prompts, config, [], 0, seeds)  # no stop token: every row runs to the budget
        seconds = _now(device) - started
    tokens = sum(len(g.response_ids) for g in results)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def matmul_tflops(device: torch.device, n: int, repeats: int) -> float:
    """Measured dense bf16 throughput of an [n × n] @ [n × n] product repeated `repeats` times."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(2):  # warm-up: library initialisation and kernel choice
        a @ b
    started = _now(device)
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (_now(device) - started) / 1e12


def peak_tflops(device: torch.device) -> float | None:
    """The datasheet's dense bf16 peak of known devices (None elsewhere)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", action="store_true", help="small model (the default without a GPU)")
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--per-micro", type=int, default=1, help="responses per micro-batch")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--context-tokens", type=int, default=512, help="reference solution in the teacher prompt")
    parser.add_argument("--response-tokens", type=int, default=4096)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--gen-batch", type=int, default=64)
    parser.add_argument("--gen-tokens", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
        args.small = True
        args.response_tokens, args.micro_batches, args.gen_batch, args.gen_tokens = 512, 2, 8, 64
        args.context_tokens, args.prompt_tokens, args.steps = 128, 64, 1
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {name}; model {'small' if args.small else 'Qwen3-1.7B shape'}, random weights; "
          f"{args.micro_batches} micro-batches x {args.per_micro} responses of {args.response_tokens} tokens")

    shape = SMALL if args.small else QWEN3_1_7B
    sizes = StepSizes(args.micro_batches, args.per_micro, args.prompt_tokens, args.context_tokens, args.response_tokens,
                      args.warmup, args.steps, args.gradient_checkpointing)
    ours, naive = measure_step(shape, sizes, device, "ours"), measure_step(shape, sizes, device, "naive")
    generate_tps = generation_speed(build_model(shape, device).eval(), device, args.gen_batch, args.prompt_tokens,
                                    args.gen_tokens)["tokens_per_s"]
    peak = peak_tflops(device)
    train_s = ours["teacher_s"] + ours["student_s"] + ours["divergence_s"]
    print(f"parameters {ours['params'] / 1e9:.3f} B; FLOPs per step {ours['flops'] / 1e12:.1f} T")
    for label, r in (("ours", ours), ("naive", naive)):
        print(f"{label:<6} teacher {r['teacher_s']:.2f} s  student {r['student_s']:.2f} s  "
              f"divergence {r['divergence_s']:.2f} s  optimizer {r['optimizer_s']:.2f} s  "
              f"peak GPU memory {r['peak_gib']:.1f} GiB")
    achieved = ours["flops"] / train_s / 1e12
    mfu = f"{achieved / peak:.3f}" if peak else "not_measured"
    print(f"achieved {achieved:.2f} TFLOP/s; MFU {mfu}; generation {generate_tps:.0f} tokens/s")
    if device.type == "cuda":
        figures = [f"mfu={mfu}", f"peak_gib_ours={ours['peak_gib']:.1f}", f"peak_gib_naive={naive['peak_gib']:.1f}",
                   f"peak_ratio={ours['peak_gib'] / naive['peak_gib']:.3f}",
                   f"generate_tokens_per_s={generate_tps:.0f}"]
    else:  # the code ran, at a small size; none of the GPU figures exists
        figures = ["mfu=not_measured", "peak_gib_ours=not_measured", "peak_gib_naive=not_measured",
                   "generate_tokens_per_s=not_measured", f"cpu_small_train_s={train_s:.2f}",
                   f"cpu_small_generate_tokens_per_s={generate_tps:.0f}"]
    print("RESULT " + " ".join([f"device={name.replace(' ', '_')}", *figures]))

if __name__ == "__main__":
    main()
