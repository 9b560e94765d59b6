"""`opsd pipeline`: stages in order (SFT → RLVR → OPSD, or any list of them), each starting from an
earlier stage's final checkpoint, every checkpoint evaluated on the same held-out set, and a summary:
accuracy (mean@k ± standard error), maj@k, mean response tokens, serving cost, and against the stage
it started from: compression (1 − tokens / tokens of that stage), its ratio and O1-Pruner's AES. Stages hand work to
each other only through checkpoint folders. Every stage's config is loaded and checked before the first one runs.

Started again on its own folder (same config), a pipeline resumes: finished stages and evaluations
are kept, the stage it was in continues from its latest checkpoint. The pipeline's `run` section is
the run contract of every stage (opsd/runtime/runs.py): `run.output_dir` holds one folder per stage,
`run.device` and `run.report_to` are given to every stage and evaluation; steps, batch sizes,
checkpoint cadence and seeds are set per stage, in its config or overrides. Every checkpoint is
evaluated with its stage's own model options (dtype, attention, trust_remote_code) and the prompts of
`eval.prompt` (opsd eval's `prompt` section; a stage's own prompts are its config's). Each stage opens
with a header line on the terminal; its progress bar and its evaluation's carry the stage's name.

Under torchrun every process runs every stage (`run.parallel` and `run.fsdp_offload` reach every
stage) in one process group; every process evaluates its share of each benchmark's problems (on
eval.sampling's engine, vllm included), and rank 0 alone grades, writes the pipeline's folder and its
summary while the others wait for it (`distributed.barrier_long`, however long that takes).

    opsd pipeline configs/pipeline-tiny.yaml [--resume]
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from opsd.core.config import load_config, to_dict
from opsd.core.data import load_problems
from opsd.core.errors import UserError
from opsd.core.models import ModelConfig
from opsd.core.prompts import PromptConfig
from opsd.generation import SamplingConfig, check_sampling
from opsd.runtime import distributed
from opsd.runtime.cost import COST_FIELDS, CostConfig, accuracy_efficiency_score
from opsd.runtime.folders import MARKER, checkpoint_step, remove_own
from opsd.runtime.runs import (
    RunConfig,
    check_same_config,
    latest_checkpoint,
    prepare_run_dir,
    save_config,
    use_threads,
)
from opsd.runtime.tracking import check_trackers
from opsd.stages import COMMANDS, TRAINING
from opsd.stages.eval import (
    EVAL_SAMPLING,
    EvalConfig,
    EvalRunConfig,
    FileSampling,
    check_budgets,
    check_per_file,
    run_eval,
)
from opsd.verifiers import VerifierConfig, check_problems

Command = Literal[TRAINING]  # type: ignore[valid-type]


@dataclass(frozen=True)
class Sweep:
    key: str = ""  # a config key of the stage's command (optim.lr, run.steps, teacher.concise_instruction, ...)
    values: tuple[Any, ...] = ()  # one stage per value, named <stage>-<value> (<stage>-<n> when a value is no folder
    #   name)


@dataclass(frozen=True)
class StageSpec:
    name: str = ""  # row label and sub-folder name
    command: Command = "distill"  # sft | rlvr | distill
    config: str = ""  # YAML config of that command ("" = its defaults)
    overrides: tuple[str, ...] = ()  # key=value overrides of that config
    start: str = ""  # stage (or entry of `models`) whose checkpoint it starts from; "" = the previous stage (the
    #   first: `model`)
    teacher: str = ""  # distill: an earlier stage (or entry of `models`) whose checkpoint is the external teacher
    #   (teacher.model)
    sweep: Sweep | None = None  # run this stage once per value of one key, each from the same start (a stage after it
    #   starts from the last)


@dataclass(frozen=True)
class NamedModel:
    name: str = ""  # a name stages can start from (`start`) or distil from (`teacher`); its row label
    name_or_path: str = ""  # the checkpoint (a folder or a hub name), loaded with `model`'s other options


@dataclass(frozen=True)
class PipelineEvalConfig:
    data: tuple[str, ...] = ("configs/examples/arithmetic.jsonl",)  # held-out benchmark files
    limit: int = 0  # first N problems of each file (0: all)
    sampling: SamplingConfig = field(default_factory=lambda: EVAL_SAMPLING)  # k = sampling.n
    per_file: tuple[FileSampling, ...] = ()  # another n / max_new_tokens for some files (as opsd eval's per_file)
    instruction: str = ""  # the older spelling of prompt.instruction (text before each problem)
    prompt: PromptConfig = field(default_factory=PromptConfig)  # chat template options, system prompt, instruction
    verifier: VerifierConfig = field(default_factory=VerifierConfig)  # for rows that name no verifier
    seed: int = 0  # seed of the evaluations' sampling requests
    cost: CostConfig = field(default_factory=CostConfig)  # serving cost; cost.latency_problems timed at batch 1
    every: int = 0  # also evaluate every N-th step's checkpoint of each stage (curves); 0: the final one only
    budgets: tuple[int, ...] = ()  # thinking budgets (tokens): accuracy against budget per checkpoint (opsd eval's)


@dataclass(frozen=True)
class PipelineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)  # the starting checkpoint
    start_name: str = "start"  # row label of the starting checkpoint
    evaluate_start: bool = True  # evaluate the starting checkpoint (and each of `models`) too
    models: tuple[NamedModel, ...] = ()  # other starting points, e.g. a smaller student for a bigger stage's teacher
    stages: tuple[StageSpec, ...] = ()  # the stages in order (YAML file: a list of mappings)
    eval: PipelineEvalConfig = field(default_factory=PipelineEvalConfig)  # how every stage's checkpoints are evaluated
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/pipeline"))  # folder, resume, device


# run keys a pipeline leaves to its stages
PER_STAGE = ("steps", "problems_per_step", "save_every", "keep_last", "keep_weights", "seed",
             "max_empty_steps_in_a_row")


def check_run_section(run: RunConfig) -> None:
    check_trackers(run.report_to)
    default = RunConfig()
    for key in PER_STAGE:
        if getattr(run, key) != getattr(default, key):
            raise UserError(f"run.{key} is set per stage in a pipeline (in the stage's config or overrides), "
                            "not in the pipeline's run section")


STAGE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")  # a folder name; '@' marks eval.every's checkpoints
RESERVED_NAMES = frozenset({"eval", "report", "config.yaml", "summary.json", "summary.md", MARKER})
# keys a pipeline sets on its stages (a sweep over them would run the same stage N times)
SET_BY_PIPELINE = frozenset({"model.name_or_path", "run.output_dir"})
SET_BY_EVAL_EVERY = frozenset({"run.save_every", "run.keep_weights"})


def check_stage(command: Command, stage_config) -> None:
    """A stage's own checks (its command's check_options and its trackers), for one process."""
    check_trackers(stage_config.run.report_to)
    COMMANDS[command]().check(stage_config)


def plan(config: PipelineConfig, out: Path) -> list[tuple[StageSpec, str, Any]]:
    """(stage, start name, loaded stage config) for every stage, checked before anything runs."""
    if not config.stages:
        raise UserError("the pipeline lists no stages")
    if config.eval.every < 0:
        raise UserError("eval.every must be non-negative (0: only each stage's final checkpoint)")
    stages = expand_sweeps(config.stages, config.start_name, config.eval.every)
    names = [config.start_name]
    for what, item in [*(("model", m) for m in config.models), *(("stage", stage) for stage in stages)]:
        name = item.name
        if not STAGE_NAME.fullmatch(name) or name in RESERVED_NAMES:
            raise UserError(f"{what} name '{name}': use letters, digits, '.', '_' and '-' (not starting with '.' "
                            f"or '-'), and none of {', '.join(sorted(RESERVED_NAMES))} (the pipeline's own files)")
        if name in names:
            raise UserError(f"two pipeline stages or models are named '{name}'"
                            + (" (a sweep names its stages <stage>-<value>)" if item in stages and "-" in name else ""))
        if what == "model" and not item.name_or_path:
            raise UserError(f"pipeline model '{name}' names no checkpoint (name_or_path)")
        names.append(name)
    for stage in stages:  # the graph first, then each stage's config
        name, start = stage.name, stage.start
        earlier = names[:names.index(name)]
        if start not in earlier:
            raise UserError(f"stage '{name}' starts from '{start}', which is not an earlier stage or a model")
        if stage.teacher and stage.command != "distill":
            raise UserError(f"stage '{name}': only a distill stage has a teacher (it is an {stage.command} stage)")
        if stage.teacher and stage.teacher not in earlier:
            raise UserError(f"stage '{name}': its teacher '{stage.teacher}' is not an earlier stage or a model")
    planned = []
    for stage in stages:
        stage_config = stage_config_for(config, stage, out)
        try:  # the stage's own checks, before the first stage runs
            check_stage(stage.command, stage_config)
        except UserError as err:
            raise UserError(f"pipeline stage '{stage.name}': {err}") from None
        planned.append((stage, stage.start, stage_config))
    return planned


def stage_config_for(config: PipelineConfig, stage: StageSpec, out: Path):
    """A stage's config: its file and overrides, then what the pipeline sets on every stage (typed, not
    as text): run.device, run.parallel and run.fsdp_offload, which a stage may not change (one process
    group serves them all); run.report_to and run.threads unless the stage's overrides set them;
    eval.every's checkpoints; its folder. A teacher from an earlier stage is filled in once that stage
    has run (`run_pipeline`); until then `teacher.model` is the stage's own, with an empty path."""
    set_by_stage = {override.partition("=")[0].strip() for override in stage.overrides}
    stage_config = load_config(COMMANDS[stage.command]().config, stage.config or None, list(stage.overrides))
    run, given = stage_config.run, config.run
    for key in ("device", "parallel", "fsdp_offload", "collective_timeout_min"):
        if f"run.{key}" in set_by_stage and getattr(run, key) != getattr(given, key):
            raise UserError(f"pipeline stage '{stage.name}': run.{key} is the pipeline's (its run section), "
                            "the same for every stage; remove it from the stage's overrides")
    run = dataclasses.replace(run, device=given.device, parallel=given.parallel, fsdp_offload=given.fsdp_offload,
                              collective_timeout_min=given.collective_timeout_min, output_dir=str(out / stage.name))
    if given.report_to != RunConfig().report_to and "run.report_to" not in set_by_stage:
        run = dataclasses.replace(run, report_to=given.report_to)
    if given.threads is not None and "run.threads" not in set_by_stage:
        run = dataclasses.replace(run, threads=given.threads)
    if config.eval.every:  # the stage saves every N steps and keeps those checkpoints' weights for the curves
        run = dataclasses.replace(run, save_every=config.eval.every, keep_weights=True)
    stage_config = dataclasses.replace(stage_config, run=run)
    if stage.teacher:
        teacher_model = dataclasses.replace(stage_config.teacher.model or ModelConfig(), name_or_path="")
        stage_config = dataclasses.replace(stage_config, teacher=dataclasses.replace(stage_config.teacher,
                                                                                      model=teacher_model))
    return stage_config


def expand_sweeps(stages: tuple[StageSpec, ...], start_name: str, eval_every: int = 0) -> list[StageSpec]:
    """The stages with their names and starts filled in, a stage with a sweep replaced by one stage per
    value (its overrides plus `key=value`), each from the sweep's start."""
    expanded, previous = [], start_name
    for index, stage in enumerate(stages):
        stage = dataclasses.replace(stage, name=stage.name or f"{index + 1}-{stage.command}",
                                    start=stage.start or previous)
        if stage.sweep is None:
            expanded.append(stage)
        else:
            key, values = stage.sweep.key, stage.sweep.values
            if not key or not values:
                raise UserError(f"stage '{stage.name}': sweep needs a key and at least one value")
            if (key in SET_BY_PIPELINE or (key in SET_BY_EVAL_EVERY and eval_every)
                    or (key == "teacher.model.name_or_path" and stage.teacher)):
                raise UserError(f"stage '{stage.name}': sweep.key {key} is set by the pipeline itself "
                                "(start models are stages or `models`; eval.every sets the checkpoints)")
            if len({json.dumps(value, sort_keys=True) for value in values}) < len(values):
                raise UserError(f"stage '{stage.name}': sweep.values repeats a value")
            names = [f"{stage.name}-{value}" for value in values]
            if not all(STAGE_NAME.fullmatch(name) for name in names) or len(set(names)) < len(names):
                names = [f"{stage.name}-{number}" for number in range(1, len(values) + 1)]
            expanded += [dataclasses.replace(stage, name=name, sweep=None,
                                             overrides=(*stage.overrides, f"{key}={json.dumps(value)}"))
                         for name, value in zip(names, values)]
        previous = expanded[-1].name
    return expanded


def check_data(config: PipelineConfig, stages: list[tuple[StageSpec, str, Any]]) -> None:
    """Refuse, before the first stage runs, rows a stage or the evaluation cannot grade: a verifier
    opsd does not have, code rows without `allow_code_execution` (opsd/verifiers)."""
    for path in config.eval.data:
        problems = load_problems(path, require_answer=False, default_verifier=config.eval.verifier.default)
        check_problems(problems, path, config.eval.verifier, option="eval.verifier")
    for stage, _, stage_config in stages:
        verifier = getattr(stage_config, "verifier", None)  # sft grades nothing
        if verifier is None:
            continue
        data = stage_config.data
        try:
            check_problems(load_problems(data.path, data.fields, require_answer=False,
                                         default_verifier=verifier.default),
                           data.path, verifier)
        except UserError as err:
            raise UserError(f"pipeline stage '{stage.name}': {err}") from None


def run_pipeline(config: PipelineConfig, name: str = "pipeline", check_only: bool = False) -> Path | None:
    """Run (or resume) the pipeline; its folder (None on ranks other than 0 under torchrun).
    `check_only` (`--check`): every check that needs no weights, each stage's included (on the model
    its chain starts from: a stage's checkpoint has its start's architecture and tokenizer), then None."""
    if check_only:
        return check_pipeline(config, check_only)
    with distributed.one_group():  # under torchrun: one process group for all stages
        return _run_pipeline(config)


def check_pipeline(config: PipelineConfig, checks=True) -> None:
    check_run_section(config.run)
    check_sampling(config.eval.sampling, "eval.sampling", config.run.device)
    check_per_file(config.eval.per_file, config.eval.data, "eval.per_file")
    check_budgets(config.eval.budgets, config.eval.sampling, config.eval.per_file, config.eval.data, "eval.budgets")
    stages = plan(config, Path(config.run.output_dir))
    for path in config.eval.data:
        if not Path(path).is_file():
            raise UserError(f"evaluation file {path} does not exist")
    check_data(config, stages)
    roots = {config.start_name: config.model.name_or_path, **{m.name: m.name_or_path for m in config.models}}
    for stage, start, stage_config in stages:
        roots[stage.name] = roots[start]
        stage_config = _with_model(stage_config, roots[start])
        if stage.teacher:
            teacher = dataclasses.replace(stage_config.teacher.model, name_or_path=roots[stage.teacher])
            stage_config = dataclasses.replace(stage_config, teacher=dataclasses.replace(stage_config.teacher,
                                                                                          model=teacher))
        try:
            if getattr(checks, "show_plan", False):
                print(f"opsd pipeline: stage '{stage.name}':")
            COMMANDS[stage.command]().run(stage_config, name=stage.name, check_only=checks)
        except UserError as err:
            raise UserError(f"pipeline stage '{stage.name}': {err}") from None


def _run_pipeline(config: PipelineConfig) -> Path | None:
    device = distributed.device(config.run.device)

    def wait_for_rank0() -> None:  # under torchrun: the others wait while rank 0 works alone
        distributed.setup(device, cpu_collectives=config.run.fsdp_offload,
                          timeout_min=config.run.collective_timeout_min)
        distributed.barrier_long()

    out = Path(config.run.output_dir)
    check_run_section(config.run)
    check_sampling(config.eval.sampling, "eval.sampling", config.run.device)
    check_per_file(config.eval.per_file, config.eval.data, "eval.per_file")
    check_budgets(config.eval.budgets, config.eval.sampling, config.eval.per_file, config.eval.data, "eval.budgets")
    use_threads(config.run.threads)
    stages = plan(config, out)
    for path in config.eval.data:
        if not Path(path).is_file():
            raise UserError(f"evaluation file {path} does not exist")
    check_data(config, stages)
    writer = distributed.rank() == 0  # under torchrun: the pipeline's folder and evaluations are rank 0's
    if writer:
        if (out / "config.yaml").is_file() and not config.run.overwrite:
            check_same_config(out, to_dict(config), ("run.overwrite", "run.resume", "run.threads", "run.report_to",
                                                     "run.tensorboard"), PipelineConfig)
        elif config.run.resume:
            raise UserError(f"run.resume: {out} holds no pipeline to resume")
        else:
            out = prepare_run_dir(out, config.run.overwrite, kind="pipeline")
        save_config(out, to_dict(config))
    wait_for_rank0()  # the folder is checked and ready (or replaced) before any process reads a stage's
    checkpoints = {config.start_name: config.model.name_or_path, **{m.name: m.name_or_path for m in config.models}}
    curves: dict[str, list[dict]] = {}
    rows = []
    if config.evaluate_start:
        for name, path in checkpoints.items():
            rows.append(evaluate(config, name, "", dataclasses.replace(config.model, name_or_path=path), out, 0.0))
    wait_for_rank0()
    for number, (stage, start, stage_config) in enumerate(stages, 1):
        run = COMMANDS[stage.command]().run
        stage_config = _with_model(stage_config, checkpoints[start])
        if stage.teacher:
            teacher = dataclasses.replace(stage_config.teacher.model, name_or_path=checkpoints[stage.teacher])
            stage_config = dataclasses.replace(stage_config, teacher=dataclasses.replace(stage_config.teacher,
                                                                                         model=teacher))
        if writer:
            print(stage_header(number, len(stages), stage, stage_config), file=sys.stderr)
        started = time.perf_counter()
        run(stage_config, name=stage.name)
        run_dir = Path(stage_config.run.output_dir)  # complete on every process: a stage ends with a barrier
        checkpoints[stage.name] = str(final_checkpoint(run_dir))
        # the stage's own model options (dtype, attention, remote code), its merged checkpoint
        model = dataclasses.replace(stage_config.model, name_or_path=checkpoints[stage.name], lora_rank=0)
        rows.append(evaluate(config, stage.name, start, model, out, time.perf_counter() - started))
        if config.eval.every:
            curves[stage.name] = curve(config, stage.name, model, run_dir, out, rows, start)
        wait_for_rank0()
    if not writer:
        return None
    rows = add_compression(rows)
    summary = {"rows": rows, "checkpoints": checkpoints, **({"curves": curves} if config.eval.every else {})}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(summary_table(rows) + (curves_table(curves) if config.eval.every else ""))
    return out


def curve(config: PipelineConfig, stage: str, model: ModelConfig, run_dir: Path, out: Path, rows: list[dict],
          start: str) -> list[dict]:
    """Accuracy and length along a stage: its start (step 0, when evaluated), every kept checkpoint
    (eval/<stage>@<step>/) and the final one, first benchmark file. Under torchrun every process takes
    part in the evaluations and rank 0 alone has the points (the others get [])."""
    writer = distributed.rank() == 0
    points = [{"step": 0, **_point(row)} for row in rows if writer and row["stage"] == start]
    final = checkpoint_step(Path(model.name_or_path))
    for folder in sorted((run_dir / "checkpoints").iterdir()):
        step = checkpoint_step(folder)
        if step is None or step == final:
            continue
        row = evaluate(config, f"{stage}@{step}", start, dataclasses.replace(model, name_or_path=str(folder)), out, 0.0)
        if writer:
            points.append({"step": step, **_point(row)})
    if not writer:
        return []
    points.append({"step": final, **_point(rows[-1])})
    return sorted(points, key=lambda point: point["step"])


def _point(row: dict) -> dict:
    bench = row["benchmarks"][0]
    return {key: bench[key] for key in ("mean_at_k", "mean_at_k_stderr", "response_tokens_mean")}


def curves_table(curves: dict[str, list[dict]]) -> str:
    lines = ["", "| stage | step | mean@k ± s.e. | mean tokens |", "|---|---|---|---|"]
    for stage, points in curves.items():
        lines += [f"| {stage} | {p['step']} | {100 * p['mean_at_k']:.1f} ± {100 * (p['mean_at_k_stderr'] or 0):.1f} | "
                  f"{p['response_tokens_mean']:.1f} |" for p in points]
    return "\n".join(lines) + "\n\nAlong each stage (eval.every): step 0 is the checkpoint it started from.\n"


def stage_header(number: int, stages: int, stage: StageSpec, stage_config) -> str:
    """The line that opens a stage: which, what it runs, from which checkpoint, into which folder."""
    steps = stage_config.run.steps
    return (f"opsd pipeline: stage {number}/{stages} '{stage.name}': opsd {stage.command}, "
            f"{steps} step{'s' if steps != 1 else ''} from '{stage.start}' ({stage_config.model.name_or_path})"
            + (f", teacher '{stage.teacher}' ({stage_config.teacher.model.name_or_path})" if stage.teacher else "")
            + f" → {stage_config.run.output_dir}")


def _with_model(stage_config, name_or_path: str):
    return dataclasses.replace(stage_config, model=dataclasses.replace(stage_config.model, name_or_path=name_or_path))


def final_checkpoint(run_dir: Path) -> Path:
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise RuntimeError(f"{run_dir} holds no checkpoint")
    return checkpoint


def evaluate(config: PipelineConfig, stage: str, start: str, model: ModelConfig, out: Path, train_s: float) -> dict:
    """Evaluate one checkpoint; one summary row per benchmark file (kept in row.json: a resumed
    pipeline does not evaluate a checkpoint twice)."""
    eval_dir = out / "eval" / stage
    done = json.loads((eval_dir / "row.json").read_text()) if (eval_dir / "row.json").is_file() else None
    if distributed.from_rank0(done is not None):  # under torchrun every process evaluates its share
        return done or {}
    if distributed.rank() == 0:
        remove_own(eval_dir, "resuming the pipeline (an unfinished evaluation is redone)")
    started = time.perf_counter()
    run = EvalRunConfig(output_dir=str(eval_dir), seed=config.eval.seed, device=config.run.device)
    written = run_eval(EvalConfig(model=model, data=config.eval.data, limit=config.eval.limit,
                                  sampling=config.eval.sampling, per_file=config.eval.per_file,
                                  budgets=config.eval.budgets,
                                  instruction=config.eval.instruction, prompt=config.eval.prompt,
                                  verifier=config.eval.verifier, cost=config.eval.cost, run=run), name=f"eval {stage}")
    if written is None:  # not rank 0
        return {}
    report = json.loads((eval_dir / "eval.json").read_text())
    benchmarks = [{key: b[key] for key in ("name", "problems", "mean_at_k", "mean_at_k_stderr", "maj_at_k",
                                           "response_tokens_mean", "correct_response_tokens_mean",
                                           "truncation_rate", "markers_per_1k_tokens")}
                  | {key: b.get(key) for key in COST_FIELDS} | {"levels": b["levels"], "budgets": b.get("budgets", [])}
                  for b in report["benchmarks"]]
    row = {"stage": stage, "start": start, "train_s": train_s, "eval_s": time.perf_counter() - started,
           "k": report["k"], "benchmarks": benchmarks}
    (eval_dir / "row.json").write_text(json.dumps(row, indent=2) + "\n")
    return row


def add_compression(rows: list[dict]) -> list[dict]:
    """Against the stage each one started from, per benchmark: compression = 1 − mean response tokens /
    those of that stage, compression_ratio = its tokens / ours, and O1-Pruner's accuracy-efficiency
    score `aes` (mean@k and mean tokens; opsd/runtime/cost.py)."""
    by_stage = {row["stage"]: row for row in rows}
    for row in rows:
        origin = by_stage.get(row["start"])
        for index, bench in enumerate(row["benchmarks"]):
            base = origin["benchmarks"][index] if origin else {}
            before, tokens = base.get("response_tokens_mean"), bench["response_tokens_mean"]
            bench["compression"] = 1.0 - tokens / before if before else None
            bench["compression_ratio"] = before / tokens if before and tokens else None
            bench["aes"] = accuracy_efficiency_score(bench["mean_at_k"], tokens, base.get("mean_at_k"), before)
    return rows


def budgets_table(rows: list[dict]) -> str:
    """Accuracy against the thinking budget (eval.budgets), one line per stage and benchmark; "" without."""
    lines = [f"| {row['stage']} | {b['name']} | "
             + " | ".join(f"{100 * point['mean_at_k']:.1f}" for point in b["budgets"]) + " |"
             for row in rows for b in row["benchmarks"] if b.get("budgets")]
    if not lines:
        return ""
    budgets = [point["budget"] for row in rows for b in row["benchmarks"] for point in b.get("budgets", [])]
    budgets = list(dict.fromkeys(budgets))
    return ("\n\n| stage | benchmark | " + " | ".join(f"mean@k at {budget} tokens" for budget in budgets) + " |\n"
            + "|---" * (2 + len(budgets)) + "|\n" + "\n".join(lines)
            + "\n\nAccuracy (%) with the thinking cut at each budget and the answer decoded after it (eval.budgets).")


def summary_table(rows: list[dict]) -> str:
    lines = ["| stage | from | benchmark | params | mean@k ± s.e. | maj@k | mean tokens | tokens (correct) | "
             "compression "
             "| ratio | AES | truncated | markers /1k tokens | latency p50 s | tok/s | peak MiB | GFLOPs / solved |",
             "|---" * 17 + "|"]
    pct = lambda v: "–" if v is None else f"{100 * v:.1f}%"
    num = lambda v, digits=1: "–" if v is None else f"{v:.{digits}f}"
    ratio = lambda v: "–" if v is None else f"{v:.2f}×"
    for row in rows:
        for b in row["benchmarks"]:
            accuracy = f"{100 * b['mean_at_k']:.1f} ± {100 * (b['mean_at_k_stderr'] or 0):.1f}"
            flops = b.get("compute_per_solved_flops")
            params = b.get("parameters")
            lines.append(f"| {row['stage']} | {row['start'] or '–'} | {b['name']} | "
                         f"{'–' if params is None else f'{params / 1e6:.2f}M'} | {accuracy} | {pct(b['maj_at_k'])} | "
                         f"{num(b['response_tokens_mean'])} | {num(b['correct_response_tokens_mean'])} | "
                         f"{pct(b['compression'])} | {ratio(b.get('compression_ratio'))} | {num(b.get('aes'), 2)} | "
                         f"{pct(b['truncation_rate'])} | {num(b['markers_per_1k_tokens'], 2)} | "
                         f"{num(b.get('latency_p50_s'), 3)} | {num(b.get('throughput_tokens_per_s'), 0)} | "
                         f"{num(b.get('peak_memory_mib'))} | {'–' if flops is None else f'{flops / 1e9:.3g}'} |")
    k = rows[0]["k"] if rows else None
    return "\n".join(lines) + budgets_table(rows) + (
        f"\n\nAccuracy in %, mean@{k} over k={k} samples per problem ± its standard error; "
                               "compression: 1 − mean tokens / those of the stage it started from, ratio: theirs / "
                               "ours; "
                               "AES: O1-Pruner's accuracy-efficiency score against that stage (length gain + 3 × "
                               "relative "
                               "accuracy gain, or − 5 × relative accuracy loss; Luo et al. 2025, arXiv 2501.12570); "
                               "markers: reflective words (wait, hmm, ...) per 1,000 response tokens; latency: one "
                               "problem decoded alone; tok/s and peak memory: while the evaluation's samples are "
                               "decoded; GFLOPs / solved: 2 × parameters × mean tokens / mean@k (eval.md has the "
                               "rest).\n")
