"""`opsd demo`: the whole SFT → RLVR → OPSD pipeline on a synthetic reasoning world, on a laptop CPU.

The world (opsd/demo/toyworld.py): chains of one-digit additions and subtractions, difficulty = number of
operations (1–4). The model: a 0.8M-parameter Llama with a character-level tokenizer, trained from
scratch by `opsd sft` to think verbosely by default (restating, checking each step, detours,
self-corrections) and to answer concisely after "Be concise.". The shipped SFT checkpoint
(opsd/demo/assets/toyworld-sft) was made by `opsd demo --from-scratch`; the demo starts from it, then runs
RLVR (GRPO/DAPO) and OPSD (the concise teacher, correct-only gating, forward KL) and evaluates every
checkpoint on 200 held-out problems (50 per level), printing the stage table. Big → small: a student
with a quarter of the parameters, SFT'd on the same data (opsd/demo/assets/toyworld-sft-small, also made
by `--from-scratch`), is distilled on its own rollouts from the RLVR model as an external teacher
under the same concise instruction (row `small-opsd`, from `small-sft`, teacher `rlvr`); the ablation
adds the small student as its own concise teacher (`small-self`), which tells what the bigger teacher adds.

    opsd demo                 # shipped SFT → RLVR → OPSD, docs/demo.md: its measured time
    opsd demo --ablation      # + the papers' experiments from the same RLVR checkpoint (opsd_rows)
    opsd demo --quick         # two steps of every stage, a smoke run (tests use it)
    opsd demo --from-scratch  # re-run SFT from random weights first (docs/demo.md: its time)
    opsd demo --engine vllm   # RLVR and OPSD sample on vLLM (the small student: see `engine_overrides`)
"""

from __future__ import annotations

import json
import math
import statistics
from importlib import resources
from pathlib import Path

from opsd.core.errors import UserError
from opsd.core.models import ModelConfig
from opsd.core.tiny import save_tiny
from opsd.demo import toyworld
from opsd.generation import SamplingConfig, require_vllm
from opsd.runtime.folders import mark
from opsd.runtime.runs import RunConfig, prepare_run_dir
from opsd.stages.pipeline import (
    NamedModel,
    PipelineConfig,
    PipelineEvalConfig,
    StageSpec,
    run_pipeline,
)

ASSETS = Path(str(resources.files("opsd.demo") / "assets"))
SHIPPED_SFT = ASSETS / "toyworld-sft"
INSTRUCTION = "Be concise."
SHIPPED_SMALL_SFT = ASSETS / "toyworld-sft-small"
MODEL_SHAPE = dict(hidden_size=128, num_layers=4, intermediate_size=384, seed=0)  # 0.80M parameters
SMALL_SHAPE = dict(hidden_size=64, num_layers=4, intermediate_size=192, seed=0)  # 0.20M: the big → small student
SFT_ROWS, RLVR_PROBLEMS, OPSD_PROBLEMS = 100_000, 2_000, 2_000
REFERENCE_LR = 6.0e-6  # the ablation's reference-teacher rows (opsd_rows)


def write_world(data_dir: Path, quick: bool, from_scratch: bool) -> dict[str, Path]:
    """The held-out set and the training sets (disjoint from it by problem text), as JSONL files."""
    data_dir.mkdir(parents=True, exist_ok=True)
    held_out = toyworld.held_out(per_level=10 if quick else toyworld.HELD_OUT_PER_LEVEL)
    excluded = toyworld.held_out_texts()
    files = {
        "heldout": toyworld.write_jsonl(toyworld.problem_rows(held_out), data_dir / "heldout.jsonl"),
        "rlvr": toyworld.write_jsonl(toyworld.problem_rows(toyworld.problems(RLVR_PROBLEMS, 1, exclude=excluded)),
                                     data_dir / "rlvr.jsonl"),
        "opsd": toyworld.write_jsonl(toyworld.problem_rows(toyworld.problems(OPSD_PROBLEMS, 2, exclude=excluded)),
                                     data_dir / "opsd.jsonl"),
    }
    if from_scratch:
        rows = toyworld.sft_rows(SFT_ROWS, 0, exclude=excluded, instruction=INSTRUCTION)
        files["sft"] = toyworld.write_jsonl(rows, data_dir / "sft.jsonl")
    mark(data_dir, "listed", [path.name for path in files.values()])
    return files


def demo_config(out: Path, files: dict[str, Path], quick: bool, ablation: bool, from_scratch: bool,
                seed: int = 0, pipeline_dir: str = "pipeline", engine: str = "hf") -> PipelineConfig:
    """The demo's pipeline; `seed` is the `run.seed` of the RLVR and OPSD stages, `engine` their
    sampling.engine (the shipped SFT checkpoint, the data and the evaluation stay the same)."""
    short = ["run.steps=2"] if quick else []
    short.append(f"run.seed={seed}")
    big, small = engine_overrides(engine)
    stages = []
    if from_scratch:
        sft_overrides = (f"data.path={files['sft']}", *(["run.steps=20"] if quick else []))
        stages.append(StageSpec("sft", "sft", str(ASSETS / "demo" / "sft.yaml"), sft_overrides))
        stages.append(StageSpec("small-sft", "sft", str(ASSETS / "demo" / "sft.yaml"), sft_overrides,
                                start="init-small"))
    stages.append(StageSpec("rlvr", "rlvr", str(ASSETS / "demo" / "rlvr.yaml"),
                            (f"data.path={files['rlvr']}", *short, *big), start="sft" if from_scratch else ""))
    for name, overrides in opsd_rows(ablation):
        overrides = (f"data.path={files['opsd']}", *overrides, *short, *big)
        stages.append(StageSpec(name, "distill", str(ASSETS / "demo" / "opsd.yaml"), overrides, start="rlvr"))
    # big → small: the RLVR model teaches the small student on the student's rollouts, as `opsd` does;
    # the ablation's control: the small student as its own concise teacher (what the big teacher adds)
    small_overrides = (f"data.path={files['opsd']}", "gating=correct_only", *short, *small)
    stages.append(StageSpec("small-opsd", "distill", str(ASSETS / "demo" / "opsd.yaml"), small_overrides,
                            start="small-sft", teacher="rlvr"))
    if ablation:
        stages.append(StageSpec("small-self", "distill", str(ASSETS / "demo" / "opsd.yaml"), small_overrides,
                                start="small-sft"))
    small = NamedModel("init-small", str(out / "init-small")) if from_scratch else NamedModel("small-sft",
                                                                                              str(SHIPPED_SMALL_SFT))
    start = out / "init" if from_scratch else SHIPPED_SFT
    sampling = SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=400, n=1 if quick else 4, batch_size=800)
    return PipelineConfig(
        model=ModelConfig(name_or_path=str(start)),
        start_name="init" if from_scratch else "sft",
        evaluate_start=not from_scratch,
        models=(small,),
        stages=tuple(stages),
        # accuracy at fixed budgets too: RLVR against OPSD at 16–256 tokens, the papers' picture
        eval=PipelineEvalConfig(data=(str(files["heldout"]),), sampling=sampling, budgets=DEMO_BUDGETS),
        run=RunConfig(output_dir=str(out / pipeline_dir), device="cpu"),
    )


DEMO_BUDGETS = (16, 32, 64, 128, 256)  # thinking budgets of the demo's evaluations (opsd/stages/budgets.py)


def engine_overrides(engine: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """sampling.engine overrides of the stages training the demo's model and of those training the
    small student. The demo runs on the CPU, where vLLM's backend has no attention kernel for the
    small student's 16-dimensional heads: the small student keeps the hf engine."""
    return (("sampling.engine=vllm",), ()) if engine == "vllm" else ((), ())


def opsd_rows(ablation: bool) -> list[tuple[str, tuple[str, ...]]]:
    """The OPSD stages (name, overrides of opsd.yaml), each from the RLVR checkpoint. The demo: the
    concise teacher, correct-only. The ablation adds the papers' experiments:
    - Kim & Lee's gatings (all, incorrect-only) under the same concise teacher, one of their contexts;
    - Kim & Lee's gatings under the reference teacher (problem + reference solution), at REFERENCE_LR,
      a learning rate 33 times lower than the demo's: on seed 0, 2e-4 and 2e-5 drove held-out accuracy
      to 5-20% within 30 steps (the gatings tried), 2e-6 changed nothing measurable, 6e-6 moved the
      model without destroying it (docs/experiments.md);
    - Purified OPSD (Shen et al.): the PMI target against the plain reference teacher, both with gating
      all and the generalised JSD (β 0.5) of configs/presets/purified_opsd.yaml, at the demo's rate."""
    rows = [("opsd", ("gating=correct_only",))]
    if not ablation:
        return rows
    rows += [("opsd-all", ("gating=all",)), ("opsd-incorrect-only", ("gating=incorrect_only",))]
    reference = ("teacher.context=reference", f"optim.lr={REFERENCE_LR}")
    rows += [(f"ref-{gating.replace('_', '-')}", (*reference, f"gating={gating}"))
             for gating in ("correct_only", "incorrect_only", "all")]
    jsd = ("gating=all", "loss.kind=jsd", "loss.beta=0.5")
    rows += [("ref-all-jsd", ("teacher.context=reference", *jsd)), ("purified", ("teacher.context=purified", *jsd))]
    return rows


def run_demo(output_dir: str = "runs/demo", quick: bool = False, ablation: bool = False,
             from_scratch: bool = False, seeds: tuple[int, ...] = (0,), engine: str = "hf") -> Path:
    """Run the demo into `output_dir`, which is replaced only when it is an earlier demo's folder
    holding nothing but what opsd wrote (otherwise refused before anything is written). With one
    seed: one pipeline in `output_dir`/pipeline, whose folder is returned. With several: one pipeline
    per seed in `output_dir`/seed_N and the across-seed summary in `output_dir`, which is returned."""
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError("--seeds must list different seeds, e.g. --seeds 1,2,3")
    if from_scratch and len(seeds) > 1:
        raise UserError("--from-scratch rebuilds the shipped SFT checkpoint once; run it without --seeds")
    if engine == "vllm":
        require_vllm("--engine vllm")
    out = prepare_run_dir(output_dir, overwrite=True, kind="demo", deleting_for="opsd demo --output-dir")
    files = write_world(out / "data", quick, from_scratch)
    if from_scratch:
        for name, shape in (("init", MODEL_SHAPE), ("init-small", SMALL_SHAPE)):
            init = save_tiny(out / name, alphabet=toyworld.ALPHABET, **shape)
            mark(Path(init), "listed", [path.name for path in Path(init).iterdir()])
    if len(seeds) == 1:
        return run_pipeline(demo_config(out, files, quick, ablation, from_scratch, seeds[0], engine=engine))
    for seed in seeds:
        run_pipeline(demo_config(out, files, quick, ablation, from_scratch, seed, f"seed_{seed}", engine))
    rows = across_seeds([json.loads((out / f"seed_{seed}" / "summary.json").read_text())["rows"] for seed in seeds])
    (out / "summary.json").write_text(json.dumps({"seeds": list(seeds), "rows": rows}, indent=2) + "\n")
    (out / "summary.md").write_text(across_seeds_table(rows, seeds))
    return out


def across_seeds(runs: list[list[dict]]) -> list[dict]:
    """Per stage (and benchmark): mean ± standard error across seeds of accuracy, tokens and
    compression, the mean within-run standard error, and the range of accuracies."""
    rows = []
    for stage_rows in zip(*runs):
        first = stage_rows[0]
        for index, bench in enumerate(first["benchmarks"]):
            runs_b = [row["benchmarks"][index] for row in stage_rows]
            rows.append({"stage": first["stage"], "start": first["start"], "benchmark": bench["name"],
                         **{key: _mean_se([b[key] for b in runs_b])
                            for key in ("mean_at_k", "response_tokens_mean", "compression", "markers_per_1k_tokens")},
                         "within_run_stderr": statistics.fmean(b["mean_at_k_stderr"] or 0.0 for b in runs_b),
                         "mean_at_k_per_seed": [b["mean_at_k"] for b in runs_b],
                         "response_tokens_per_seed": [b["response_tokens_mean"] for b in runs_b]})
    return rows


def _mean_se(values: list[float | None]) -> dict[str, float | None]:
    if any(v is None for v in values):
        return {"mean": None, "stderr": None}
    stderr = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None
    return {"mean": statistics.fmean(values), "stderr": stderr}


def across_seeds_table(rows: list[dict], seeds: tuple[int, ...], seeded: str = "RLVR and OPSD") -> str:
    lines = ["| stage | from | benchmark | mean@k across seeds ± s.e. | within-run s.e. | per seed | mean tokens ± "
             "s.e. "
             "| compression ± s.e. | markers /1k tokens ± s.e. |", "|---|---|---|---|---|---|---|---|---|"]
    pct = lambda c, scale=100, unit="", digits=1: "–" if c["mean"] is None else (
        f"{scale * c['mean']:.{digits}f}"
        + ("" if c["stderr"] is None else f" ± {scale * c['stderr']:.{digits}f}") + unit)
    for row in rows:
        per_seed = " / ".join(f"{100 * v:.1f}" for v in row["mean_at_k_per_seed"])
        lines.append(f"| {row['stage']} | {row['start'] or '–'} | {row['benchmark']} | {pct(row['mean_at_k'])} | "
                     f"{100 * row['within_run_stderr']:.1f} | {per_seed} | {pct(row['response_tokens_mean'], 1)} | "
                     f"{pct(row['compression'], unit='%')} | {pct(row['markers_per_1k_tokens'], 1, digits=2)} |")
    return "\n".join(lines) + (f"\n\nAccuracy in %, over seeds {', '.join(map(str, seeds))} (run.seed of {seeded}); "
                               "± the standard error across seeds; within-run s.e. is the mean over seeds of each "
                               "evaluation's own standard error.\n")
