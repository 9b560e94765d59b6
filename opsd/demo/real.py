"""`opsd demo --real`: the papers' claims on a real pretrained chat model, SmolLM2-135M-Instruct, on a CPU.

The toy demo's model never learnt to read a reference solution; a pretrained chat model does. This
experiment asks the two questions of the papers on one (docs/real-model.md has the pre-registered
predictions and the outcomes):
- OPSDC (Sang et al.): does the model's own concise mode ("Be concise.") as the teacher compress its
  responses at kept accuracy?
- Kim & Lee: with the reference-solution teacher, does correct-only distillation compress at kept
  accuracy while incorrect-only costs accuracy?

Steps, in one folder (`--output-dir`, default runs/real):
1. data/: the word-problem world (opsd/demo/wordworld.py): 120 held-out problems, 2,000 OPSD problems
   and the warm-up's problems, disjoint by text.
2. warmup/: the instruct model gets few held-out problems graded right (7.5% of 60 in a first probe), mostly
   because its answers rarely end "The answer is N" and its arithmetic drifts. A warm-up teaches the format
   in its own words: it answers the warm-up problems with the reference solution in its prompt, as the
   reference teacher sees them (samples/); its graded-correct answers that end within the token budget
   become SFT pairs under the plain prompt (sft.jsonl), and one SFT stage trains on them (a pipeline with
   the instruct model's and the warmed-up model's evaluations). A first try asked it to "explain step by
   step" instead: 85% of its answers ran past 160 tokens and 17% were right, too few to learn from.
3. seed_N/: per seed, a pipeline from the warmed-up model: OPSD rows with the concise teacher
   (correct-only, all) and the reference teacher (correct-only, incorrect-only, all), each evaluated
   on the held-out set (accuracy, tokens, reflective markers, serving cost).
4. summary.md/json: every row across seeds (mean ± standard error and per seed), and report.html.

Started again on the same folder with the same settings, it continues where it stopped: finished
samples, stages and evaluations are kept and a stage in progress resumes from its latest checkpoint.
`--jobs N` runs N seeds at once in separate processes (`--threads` torch threads each).

    opsd demo --real                      # seeds 1, 2, 3 (the tuning seed 0 is not reported)
    opsd demo --real --seeds 1,2,3 --jobs 2
    opsd demo --real --quick              # two steps of everything on 16 problems: a smoke run (tests)
"""

from __future__ import annotations

import json
import multiprocessing
import re
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from opsd.core.config import to_dict
from opsd.core.errors import UserError
from opsd.core.models import BUILTIN_SMOLLM2, ModelConfig
from opsd.core.prompts import PromptConfig
from opsd.demo import wordworld
from opsd.demo.demo import ASSETS, across_seeds, across_seeds_table
from opsd.generation import SamplingConfig, require_vllm
from opsd.runtime.cost import CostConfig
from opsd.runtime.folders import kind_of, mark
from opsd.runtime.runs import RunConfig, prepare_run_dir, use_threads
from opsd.stages.eval import EvalConfig, EvalRunConfig, run_eval
from opsd.stages.pipeline import PipelineConfig, PipelineEvalConfig, StageSpec, run_pipeline

SYSTEM_PROMPT = "Solve the math word problem. End your reply with: The answer is N."
REFERENCE = ("{problem}\n\nHere is a reference solution to this problem:\n{solution}\n\n"
             "Having understood the reference solution, solve the problem in your own words.")
CONCISE = "Be concise."
SEEDS = (1, 2, 3)  # reported; seed 0 chose the settings (docs/real-model.md)
OPSD_PROBLEMS, WARMUP_PROBLEMS = 2_000, 240
# sampling of the warm-up's answers, the training rollouts and the evaluations: temperature 0.7 (at 1.0 the
# 135M model's answers are mostly noise: 1.3% graded right before the warm-up)
SAMPLING = dict(temperature=0.7, top_p=1.0, max_new_tokens=160)
ASSETS_REAL = ASSETS / "real"


def rows(quick: bool) -> list[tuple[str, tuple[str, ...]]]:
    """The OPSD rows (name, overrides of assets/real/opsd.yaml), each from the warmed-up model."""
    concise = ("teacher.context=concise", f"teacher.concise_instruction='{CONCISE}'")
    reference = ("teacher.context=reference", f"teacher.template='{REFERENCE}'")
    table = [("concise-correct-only", (*concise, "gating=correct_only")), ("concise-all", (*concise, "gating=all"))]
    table += [(f"ref-{gating.replace('_', '-')}", (*reference, f"gating={gating}"))
              for gating in ("correct_only", "incorrect_only", "all")]
    short = ("run.steps=2", "run.problems_per_step=4") if quick else ()
    return [(name, (*overrides, *short)) for name, overrides in table]


def write_world(data: Path, quick: bool) -> dict[str, Path]:
    data.mkdir(parents=True, exist_ok=True)
    held_out = wordworld.held_out()
    if quick:
        held_out = held_out[:8] + held_out[60:68]
    excluded = {row["problem"] for row in wordworld.held_out()}
    opsd_rows = wordworld.problems(OPSD_PROBLEMS, 1, excluded, "opsd")
    warm = wordworld.problems(16 if quick else WARMUP_PROBLEMS, 2, excluded | {r["problem"] for r in opsd_rows},
                              "warmup")
    asked = [{**row, "problem": REFERENCE.format(**row), "plain": row["problem"]} for row in warm]
    files = {"heldout": wordworld.write_jsonl(held_out, data / "heldout.jsonl"),
             "opsd": wordworld.write_jsonl(opsd_rows, data / "opsd.jsonl"),
             "warmup": wordworld.write_jsonl(asked, data / "warmup-asked.jsonl")}
    mark(data, "listed", [path.name for path in files.values()])
    return files


def eval_section(files: dict[str, Path], quick: bool) -> PipelineEvalConfig:
    sampling = SamplingConfig(**SAMPLING, n=1, batch_size=240)
    return PipelineEvalConfig(data=(str(files["heldout"]),), sampling=sampling,
                              prompt=PromptConfig(system_prompt=SYSTEM_PROMPT),
                              cost=CostConfig(latency_problems=1 if quick else 4))


WORKED = re.compile(r"\d+ ?[+-] ?\d+ ?= ?\d+")


def works_first(response: str) -> bool:
    """Whether a sum is worked out before the answer is stated: answers that open with "The answer is N"
    copied from the reference would teach the student to answer before computing (the first warm-up did)."""
    stated = response.lower().find("answer is")
    return bool(WORKED.search(response[: stated if stated >= 0 else len(response)]))


def warmup_samples(out: Path, files: dict[str, Path], quick: bool) -> Path:
    """The instruct model's answers to the warm-up problems with their reference solutions in the
    prompt; its graded-correct answers become sft.jsonl under the plain problem (returned)."""
    samples = out / "samples"
    sft = out / "sft.jsonl"
    if sft.is_file():
        return sft
    if not (samples / "responses.jsonl").is_file():
        config = EvalConfig(model=ModelConfig(name_or_path=BUILTIN_SMOLLM2), data=(str(files["warmup"]),),
                            sampling=SamplingConfig(**SAMPLING, n=2, batch_size=200),
                            prompt=PromptConfig(system_prompt=SYSTEM_PROMPT), cost=CostConfig(latency_problems=0),
                            run=EvalRunConfig(output_dir=str(samples), overwrite=True, device="cpu"))
        run_eval(config, name="warm-up samples")
    plain = {json.loads(line)["id"]: json.loads(line)["plain"] for line in files["warmup"].read_text().splitlines()}
    answers = map(json.loads, (samples / "responses.jsonl").read_text().splitlines())
    kept = [row for row in answers if row["correct"] and not row["truncated"] and works_first(row["response"])]
    if not kept:
        raise UserError(f"the warm-up kept no graded-correct answer ({samples / 'responses.jsonl'})")
    pairs = [{"problem": plain[row["id"]], "response": row["response"].strip()} for row in kept]
    partial = sft.with_suffix(".partial")
    wordworld.write_jsonl(pairs, partial)
    partial.rename(sft)
    return sft


def warmup_config(out: Path, files: dict[str, Path], sft: Path, quick: bool) -> PipelineConfig:
    overrides = (f"data.path={sft}", *(("run.steps=2",) if quick else ()))
    return PipelineConfig(
        model=ModelConfig(name_or_path=BUILTIN_SMOLLM2), start_name="instruct",
        stages=(StageSpec("warmup", "sft", str(ASSETS_REAL / "sft.yaml"), overrides),),
        eval=eval_section(files, quick), run=RunConfig(output_dir=str(out / "pipeline"), device="cpu"))


def seed_config(out: Path, files: dict[str, Path], warm: Path, seed: int, quick: bool, engine: str) -> PipelineConfig:
    stages = tuple(StageSpec(name, "distill", str(ASSETS_REAL / "opsd.yaml"),
                             (f"data.path={files['opsd']}", f"run.seed={seed}", f"sampling.engine={engine}",
                              *overrides), start="warmup")
                   for name, overrides in rows(quick))
    return PipelineConfig(model=ModelConfig(name_or_path=str(warm)), start_name="warmup", stages=stages,
                          eval=eval_section(files, quick),
                          run=RunConfig(output_dir=str(out / f"seed_{seed}"), device="cpu"))


def _seed_job(config: PipelineConfig, threads: int) -> None:
    use_threads(threads, "--threads")
    run_pipeline(config)


def run_real(output_dir: str = "runs/real", quick: bool = False, seeds: tuple[int, ...] = SEEDS, jobs: int = 1,
             threads: int = 1, engine: str = "hf") -> Path:
    """Run (or continue) the experiment in `output_dir`; its folder."""
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError("--seeds must list different seeds, e.g. --seeds 1,2,3")
    if jobs < 1:
        raise UserError("--jobs must be at least 1")
    if engine == "vllm":
        require_vllm("--engine vllm")
    out = Path(output_dir)
    settings = {"quick": quick, "engine": engine}
    if (out / "real.json").is_file() and kind_of(out) == "demo":
        if json.loads((out / "real.json").read_text()) != settings:
            raise UserError(f"{out} holds a real-model experiment with other settings "
                            f"({(out / 'real.json').read_text().strip()}); choose another --output-dir")
        print(f"opsd demo --real: continuing {out}")
    else:
        out = prepare_run_dir(out, overwrite=False, kind="demo", option="--output-dir")
        (out / "real.json").write_text(json.dumps(settings) + "\n")
    files = write_world(out / "data", quick)
    warm_dir = out / "warmup"
    warm_dir.mkdir(exist_ok=True)
    sft = warmup_samples(warm_dir, files, quick)
    warm_pipeline = run_pipeline(warmup_config(warm_dir, files, sft, quick))
    warm = Path(json.loads((warm_pipeline / "summary.json").read_text())["checkpoints"]["warmup"])
    configs = [seed_config(out, files, warm, seed, quick, engine) for seed in seeds]
    if jobs == 1:
        for config in configs:
            run_pipeline(config)
    else:
        # worker processes that may start their own (the verifiers' workers): not a daemonic Pool's
        with ProcessPoolExecutor(min(jobs, len(configs)), mp_context=multiprocessing.get_context("spawn")) as pool:
            for done in [pool.submit(_seed_job, config, threads) for config in configs]:
                done.result()
    start_rows = json.loads((warm_pipeline / "summary.json").read_text())["rows"]
    per_seed = [json.loads((out / f"seed_{seed}" / "summary.json").read_text())["rows"] for seed in seeds]
    table = across_seeds(per_seed)
    summary = {"seeds": list(seeds), "start_rows": start_rows, "rows": table,
               "settings": {**settings, "configs": [to_dict(c) for c in configs[:1]]}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    start_table = (warm_pipeline / "summary.md").read_text()
    (out / "summary.md").write_text(start_table + "\n" + across_seeds_table(table, seeds, "the OPSD rows"))
    return out
