"""One on-policy self-distillation step, opsd against TRL's SDFTTrainer, on the same work.

Both sides get the same randomly initialised Qwen2-style model (hidden 512, 8 layers, vocabulary
32,768) saved as a folder, the same problems with a reference solution, the same teacher (the frozen
starting weights, seeing "{problem}\\n\\n{reference solution}" as its user turn), 2 problems × 4
samples per step at temperature 1, responses of exactly 512 tokens, full-vocabulary reverse KL
(TRL: distillation_mode="full_logits", distillation_alpha=1.0), AdamW, float32 on CPU. TRL is a
benchmark-only dependency:

    python -m venv .venv-bench
    .venv-bench/bin/pip install -c constraints-cpu.txt -e . trl==1.16.0
    .venv-bench/bin/python benchmarks/step_vs_trl.py

Equal response lengths: the tokenizer's end-of-sequence token has an id past the model's last output
row, so neither sampler can ever stop early (TRL's `min_new_tokens` would index that row). Each side
runs in its own process (peak resident memory from ru_maxrss, reported above the resident size once
the libraries are imported); the first step is a warm-up, and the two sides alternate for
`--rounds` rounds so that drift in a shared machine's speed falls on both. TRL logs no generation time, so its
`_generate` and `compute_loss` are wrapped with timers; opsd's come from its metrics.jsonl. What
differs and is kept: opsd also grades each response (math-verify), its loss is a token mean over
the step and TRL's a mean of per-sequence means (same work).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HIDDEN, LAYERS, HEADS, VOCAB = 512, 8, 8, 32_768
PROBLEMS_PER_STEP, SAMPLES, RESPONSE_TOKENS = 2, 4, 512
LR, SEED = 1e-6, 0


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()


def peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def build_inputs(workdir: Path) -> None:
    """The model folder (weights + tokenizer with a chat template) and the problems, shared by both."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    words = [f"w{i}" for i in range(VOCAB - 3)]
    vocab = {token: i for i, token in enumerate(["<pad>", "<|im_start|>", "<|im_end|>", *words, "<eos>"])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>",
                                        additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tokenizer.chat_template = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> "
                               "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
    torch.manual_seed(SEED)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=4 * HIDDEN, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=2048,
                         tie_word_embeddings=False, pad_token_id=0, eos_token_id=vocab["<eos>"], bos_token_id=None)
    Qwen2ForCausalLM(config).save_pretrained(workdir / "model")
    tokenizer.save_pretrained(workdir / "model")
    g = torch.Generator().manual_seed(SEED)
    text = lambda n: " ".join(f"w{int(i)}" for i in torch.randint(0, VOCAB - 3, (n,), generator=g))
    rows = [{"id": f"p{i}", "problem": text(40), "solution": text(120), "answer": "w1"} for i in range(64)]
    (workdir / "problems.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def run_ours(workdir: Path, steps: int, threads: int) -> dict:
    import torch

    from opsd.core.config import load_config
    from opsd.stages.distill import DistillConfig, run_distill

    torch.set_num_threads(threads)
    base = rss_bytes()
    overrides = [
        f"model.name_or_path={workdir / 'model'}", f"data.path={workdir / 'problems.jsonl'}", "data.shuffle=false",
        "teacher.context=template", 'teacher.template="{problem}\\n\\n{solution}"', "gating=all",
        f"sampling.n={SAMPLES}", f"sampling.max_new_tokens={RESPONSE_TOKENS}", "sampling.temperature=1.0",
        f"run.problems_per_step={PROBLEMS_PER_STEP}", f"run.steps={steps}", f"run.output_dir={workdir / 'ours'}",
        "run.overwrite=true", "run.report_to=[]", f"run.seed={SEED}", f"optim.lr={LR}", "optim.max_grad_norm=1.0",
        f"optim.micro_batch_size={PROBLEMS_PER_STEP * SAMPLES}", "optim.warmup_steps=0", "loss.kind=reverse_kl",
    ]
    run_dir = run_distill(load_config(DistillConfig, None, overrides))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {
        "step_s": [r["time/step_s"] for r in rows],
        "generate_s": [r["time/generate_s"] for r in rows],
        "response_tokens": [r["rollout/response_tokens_mean"] for r in rows],
        "base_bytes": base, "peak_bytes": peak_bytes(),
    }


def run_trl(workdir: Path, steps: int, threads: int) -> dict:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl.experimental.sdft import SDFTConfig, SDFTTrainer

    torch.set_num_threads(threads)
    base = rss_bytes()
    rows = [json.loads(line) for line in (workdir / "problems.jsonl").read_text().splitlines()]
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": r["problem"]}],
                                  "privileged_context": r["solution"]} for r in rows])
    args = SDFTConfig(
        output_dir=str(workdir / "trl"), distillation_mode="full_logits", distillation_alpha=1.0,
        teacher_model_kind="base", teacher_prompt_template="{prompt}\n\n{privileged_context}",
        num_generations=SAMPLES, per_device_train_batch_size=PROBLEMS_PER_STEP * SAMPLES,
        gradient_accumulation_steps=1, max_prompt_length=1024, max_completion_length=RESPONSE_TOKENS,
        temperature=1.0, top_p=1.0, top_k=0, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
        max_grad_norm=1.0, max_steps=steps, logging_steps=1, save_strategy="no", report_to="none",
        bf16=False, gradient_checkpointing=False, use_cpu=True, dataloader_num_workers=0, seed=SEED,
    )
    step_s, generate_s, lengths = [], [], []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.started = time.perf_counter()

        def on_step_end(self, *_, **__):
            step_s.append(time.perf_counter() - self.started)

    tokenizer = AutoTokenizer.from_pretrained(workdir / "model")
    trainer = SDFTTrainer(model=str(workdir / "model"), args=args, train_dataset=dataset, processing_class=tokenizer,
                          callbacks=[StepTimer()])
    generate = trainer._generate

    def timed_generate(*a, **k):
        started = time.perf_counter()
        out = generate(*a, **k)
        generate_s.append(time.perf_counter() - started)
        return out

    trainer._generate = timed_generate
    trainer.train()
    lengths = [r["completions/mean_length"] for r in trainer.state.log_history if "completions/mean_length" in r]
    return {"step_s": step_s, "generate_s": generate_s, "response_tokens": lengths,
            "base_bytes": base, "peak_bytes": peak_bytes()}


def measure(side: str, workdir: Path, args) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20), "OMP_NUM_THREADS": str(args.threads)}
    command = [sys.executable, __file__, "--child", side, "--workdir", str(workdir), "--steps", str(args.steps),
               "--threads", str(args.threads)]
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        sys.exit(f"the {side} run failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def summary(runs: list[dict]) -> dict:
    """Means over the measured steps of every round (each run's first step is a warm-up)."""
    r = {key: [x for run in runs for x in run[key][1:]] for key in ("step_s", "generate_s", "response_tokens")}
    r["peak_bytes"] = max(run["peak_bytes"] for run in runs)
    r["base_bytes"] = min(run["base_bytes"] for run in runs)
    mean = lambda xs: sum(xs) / len(xs)
    step, generate = mean(r["step_s"]), mean(r["generate_s"])
    return {"step": step, "generate": generate, "train": step - generate, "tokens": mean(r["response_tokens"]),
            "peak_mib": r["peak_bytes"] / 2**20, "work_mib": (r["peak_bytes"] - r["base_bytes"]) / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per side, the first a warm-up")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="ours, TRL, ours, TRL, ...")
    parser.add_argument("--child", choices=["ours", "trl"])
    parser.add_argument("--workdir")
    args = parser.parse_args()
    if args.child:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        run = run_ours if args.child == "ours" else run_trl
        print(json.dumps(run(Path(args.workdir), args.steps, args.threads)))
        return
    if importlib.util.find_spec("trl") is None:
        sys.exit("TRL is not installed in this environment; see the command at the top of this script")
    workdir = Path(tempfile.mkdtemp(prefix="opsd-vs-trl-"))
    build_inputs(workdir)
    print(f"model hidden {HIDDEN}, {LAYERS} layers, vocabulary {VOCAB}; {PROBLEMS_PER_STEP} problems x {SAMPLES} "
          f"samples x {RESPONSE_TOKENS} tokens per step; float32 CPU, {args.threads} threads; "
          f"means over {args.rounds} rounds x {args.steps - 1} steps after a warm-up")
    rounds = [(measure("ours", workdir, args), measure("trl", workdir, args)) for _ in range(args.rounds)]
    for index, (a, b) in enumerate(rounds, 1):
        print(f"round {index}: step time TRL / opsd = {summary([b])['step'] / summary([a])['step']:.2f}")
    ours, theirs = summary([a for a, _ in rounds]), summary([b for _, b in rounds])
    print(f"{'':<6} {'step s':>7} {'generate s':>10} {'train s':>8} {'tokens':>7} {'peak MiB':>9} {'work MiB':>9}")
    for label, r in (("opsd", ours), ("TRL", theirs)):
        print(f"{label:<6} {r['step']:>7.2f} {r['generate']:>10.2f} {r['train']:>8.2f} {r['tokens']:>7.0f} "
              f"{r['peak_mib']:>9.0f} {r['work_mib']:>9.0f}")
    print("RESULT " + " ".join([
        f"speedup_step={theirs['step'] / ours['step']:.2f}",
        f"speedup_generate={theirs['generate'] / ours['generate']:.2f}",
        f"speedup_train={theirs['train'] / ours['train']:.2f}",
        f"mem_ratio_work={ours['work_mib'] / theirs['work_mib']:.3f}",
        f"mem_ratio_peak={ours['peak_mib'] / theirs['peak_mib']:.3f}",
    ]))


if __name__ == "__main__":
    main()
