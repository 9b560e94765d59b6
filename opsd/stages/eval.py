"""`opsd eval`: accuracy, length, reflection statistics and serving cost of a policy on benchmark files.

For each benchmark file: render every problem with the chat template and the `prompt` section (an optional
instruction before or after the problem, e.g. the conciseness instruction of OPSDC; a system prompt; the
template's options such as {enable_thinking: false}; the older key `instruction` is prompt.instruction),
sample k = `sampling.n` responses per problem (and one greedy response with `greedy=true`), grade each with
its problem's verifier (the responses decoded with their thinking delimiters kept), and report, overall,
per difficulty level when the problems carry one (MATH-500's `level`) and per task when they carry one
(BIG-Bench Hard's `task`):

  mean@k     mean over problems of the fraction of its k samples that are correct, ± the standard
             error of that mean (sample std of the per-problem fractions / sqrt(P));
  pass@k     mean over problems of the unbiased estimate of "one of k samples is correct" from the
             n ≥ k samples drawn, 1 − C(n−c, k)/C(n, k) (Chen et al. 2021, eq. 1), with k the fewest
             samples any problem of the group has (= sampling.n when generating);
  maj@k      majority vote over the extracted answers, grouped by normalized string; responses
             without an answer do not vote; ties go to the answer seen first; correct when the
             first sample giving the voted answer is;
  lengths    mean / median response tokens over all samples and over the correct ones only;
  truncated  fraction of samples that hit max_new_tokens;
  markers    reflective markers ("wait", "hmm", ...) per 1,000 response tokens, the re-checking that
             OPSDC and "OPSD compresses what RLVR teaches" report shrinking;
  tok/s      generated tokens per second of decoding;
  restated   samples graded wrong for restating an expression of the problem (eval.json only);
  grading    the graders' events on the file (eval.json only): math answers timed out or crashing
             the worker, restatements refused, programs timed out, unsupported (a value that could
             not cross between program and tests as plain data) or failed by the sandbox itself;
  cost       batch-1 latency, throughput, peak memory, parameters and compute per solved problem
             (opsd/runtime/cost.py), in a second table.

`responses=FILE` scores responses made elsewhere instead, without loading a model: JSONL rows
{"id", "response", optional "truncated"}, several rows per id = several samples. Their tokens are
counted by the tokenizer of `model.name_or_path`, or by whitespace when it is left at builtin:tiny.
Writes `eval.json` (every number and the resolved config), `eval.md` (the printed table) and
`responses.jsonl`: every sample with its grade, in the rows `responses=FILE` reads (the greedy
responses are not in it), so an evaluation can be re-scored. Generation shows a progress bar over
each file's problems.

    opsd eval model.name_or_path=runs/tiny/checkpoints/step_000010 data=[configs/examples/arithmetic.jsonl]
    opsd eval [config.yaml] data=[../shared/data/math500_test.jsonl] responses=responses.jsonl
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import re
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from opsd.core.config import to_dict
from opsd.core.data import Fields, Problem, load_problems, read_rows
from opsd.core.errors import UserError, require
from opsd.core.models import BUILTIN_TINY, ModelConfig, frozen_dtype, load_model, load_tokenizer, model_config
from opsd.core.prompts import PromptConfig, render_prompt, response_texts, with_instruction
from opsd.generation import (
    Engine,
    SamplingConfig,
    check_engine_fits,
    check_sampling,
    make_engine,
    request_seed,
)
from opsd.runtime import distributed
from opsd.runtime.cost import (
    NOT_MEASURED,
    CostConfig,
    compute_per_solved,
    latency,
    parameter_count,
    peak_memory,
    throughput,
)
from opsd.runtime.folders import EVAL_OUTPUTS, foreign_checkpoint, kind_of, mark
from opsd.runtime.metrics import progress_bar
from opsd.runtime.runs import use_threads
from opsd.stages.budgets import force_budgets, forced_tokens
from opsd.verifiers import (
    ANSWER_FREE,
    Verdict,
    VerifierConfig,
    Verifiers,
    check_problems,
    check_verifier,
)
from opsd.verifiers.math import normalize_answer

REFLECTIVE_MARKERS = ("wait", "hmm", "let me check", "let me re-check", "double-check", "actually")
# evaluation's sampling defaults (k = n = 4 samples at temperature 0.6, top-p 0.95, 4,096 new tokens)
EVAL_SAMPLING = SamplingConfig(temperature=0.6, top_p=0.95, max_new_tokens=4096, n=4)


@dataclass(frozen=True)
class EvalRunConfig:
    """The run contract of an evaluation: the keys it shares with every other command's `run` section."""

    output_dir: str = "runs/eval"  # folder receiving eval.json, eval.md and responses.jsonl
    overwrite: bool = False  # replace an earlier evaluation's files in run.output_dir
    seed: int = 0  # seed of the sampling requests (each problem and sample draws from its own)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int | None = None  # torch CPU threads; null: torch's choice (one per core); 1-2 on a busy CPU


@dataclass(frozen=True)
class FileSampling:
    """Another sample count or response budget for one benchmark file (AIME wants n=16–64, MATH-500 n=4)."""

    file: str = ""  # a file of `data`: its path as given, or its name without folder and extension
    n: int = 0  # samples per problem for this file (0: sampling.n)
    max_new_tokens: int = 0  # response budget for this file (0: sampling.max_new_tokens)


def file_sampling(sampling: SamplingConfig, per_file: Sequence[FileSampling], path: str) -> SamplingConfig:
    """`sampling` with the options `per_file` gives the benchmark file `path`."""
    for options in per_file:
        if options.file in (path, Path(path).stem):
            return replace(sampling, n=options.n or sampling.n,
                           max_new_tokens=options.max_new_tokens or sampling.max_new_tokens)
    return sampling


def check_per_file(per_file: Sequence[FileSampling], data: Sequence[str], option: str = "per_file") -> None:
    names = {name for path in data for name in (path, Path(path).stem)}
    for index, options in enumerate(per_file):
        require((f"{option}[{index}].file", options.file in names, f"one of the files of data (got {options.file!r})"),
                (f"{option}[{index}].n", options.n >= 0, "non-negative (0: sampling.n)"),
                (f"{option}[{index}].max_new_tokens", options.max_new_tokens >= 0,
                 "non-negative (0: sampling.max_new_tokens)"))


def check_budgets(budgets: Sequence[int], sampling: SamplingConfig, per_file: Sequence[FileSampling],
                  data: Sequence[str], option: str = "budgets") -> None:
    """Thinking budgets are cut from the sampled responses: positive, and within every file's response budget."""
    require((option, all(b >= 1 for b in budgets), "positive token counts"))
    for path in data:
        budget = file_sampling(sampling, per_file, path).max_new_tokens
        require((option, max(budgets, default=0) <= budget,
                 f"at most the response budget of {Path(path).stem} ({budget} new tokens): budgets are cut from "
                 "the sampled responses"))


TRUNCATION_WARNING = 0.05  # a benchmark whose responses hit the budget more often than this gets a warning
LATENCY_WARNING_MIN = 10  # batch-1 latency timing expected to take longer than this is announced


@dataclass(frozen=True)
class EvalConfig:
    model: ModelConfig = field(default_factory=ModelConfig)  # the policy: checkpoint folder, hub name, builtin:tiny
    data: tuple[str, ...] = ()  # benchmark files (JSONL/Parquet), e.g. [../shared/data/math500_test.jsonl]
    fields: Fields = field(default_factory=Fields)  # column names, the same for every file
    level_field: str = "level"  # extra column with a difficulty level; per-level rows when present
    task_field: str = "task"  # extra column naming a subtask (BIG-Bench Hard); per-task rows when present
    limit: int = 0  # the first N problems of each file; 0 = all
    sampling: SamplingConfig = field(default_factory=lambda: EVAL_SAMPLING)  # sampling.n = k samples per problem
    per_file: tuple[FileSampling, ...] = ()  # another n / max_new_tokens for some files, e.g. [{file: aime24_test,
    #   n: 16, max_new_tokens: 32768}]
    verifier: VerifierConfig = field(default_factory=VerifierConfig)  # for rows that name no verifier
    greedy: bool = False  # also decode one greedy response per problem (greedy accuracy)
    instruction: str = ""  # the older spelling of prompt.instruction (text put before each problem)
    prompt: PromptConfig = field(default_factory=PromptConfig)  # chat template options, system prompt, instruction
    reflective_markers: tuple[str, ...] = REFLECTIVE_MARKERS  # words/phrases counted case-insensitively
    responses: str | None = None  # JSONL of {id, response} rows to score instead of generating
    budgets: tuple[int, ...] = ()  # thinking budgets B in tokens: accuracy with the thinking cut at each B, the
    #   end of thinking and budget_cue appended and the answer decoded greedily (opsd/stages/budgets.py)
    budget_cue: str = "\n\nThe final answer is "  # what follows a cut response (after </think> where it thinks)
    budget_answer_tokens: int = 32  # the answer decoded after a cut response, at most
    cost: CostConfig = field(default_factory=CostConfig)  # serving cost: batch-1 latency (throughput, memory always)
    run: EvalRunConfig = field(default_factory=EvalRunConfig)  # folder, seed, device, threads


@dataclass(frozen=True)
class Scored:
    """One problem's graded samples (K may differ between problems in responses mode)."""

    level: str | None  # value of the level field, None when the problem has none
    answers_K: tuple[str | None, ...]  # extracted final answers (None: no answer found)
    correct_K: tuple[bool, ...]
    tokens_K: tuple[int, ...]  # response lengths in tokens
    truncated_K: tuple[bool, ...]
    markers_K: tuple[int, ...]  # reflective markers in each response
    greedy_correct: bool | None = None  # grade of the greedy response; None without greedy=true
    restated: int = 0  # samples refused for restating an expression of the problem (docs/verifiers.md)
    task: str | None = None  # value of the task field, None when the problem has none


# --- metrics: pure functions ------------------------------------------------------------------


def mean_at_k(correct_P_K: Sequence[Sequence[bool]]) -> tuple[float, float]:
    """(mean over problems of the fraction correct, its standard error); stderr is nan for P < 2."""
    fraction_P = [sum(c) / len(c) for c in correct_P_K]
    if len(fraction_P) < 2:
        return (fraction_P[0] if fraction_P else math.nan), math.nan
    return statistics.fmean(fraction_P), statistics.stdev(fraction_P) / math.sqrt(len(fraction_P))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of pass@k from n samples of which c are correct (Chen et al. 2021, eq. 1):
    1 − C(n−c, k)/C(n, k), as the product ∏_{i=n−c+1}^{n} (1 − k/i), which never forms a binomial."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0  # every k-subset holds a correct sample
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def mean_pass_at_k(correct_P_K: Sequence[Sequence[bool]]) -> tuple[float, int | None]:
    """(mean over problems of pass@k, k) with k the fewest samples of any problem; (nan, None) for none."""
    if not correct_P_K or not all(correct_P_K):
        return math.nan, None
    k = min(len(c) for c in correct_P_K)
    return statistics.fmean(pass_at_k(len(c), sum(c), k) for c in correct_P_K), k


def majority_correct(answers_K: Sequence[str | None], correct_K: Sequence[bool]) -> bool:
    """Whether the most frequent answer (ties: seen first) is correct; False when no sample has one."""
    first: dict[str, int] = {}
    votes: collections.Counter[str] = collections.Counter()
    for index, answer in enumerate(answers_K):
        if answer is not None:
            key = normalize_answer(answer)
            first.setdefault(key, index)
            votes[key] += 1
    if not votes:
        return False
    winner = max(votes, key=lambda key: (votes[key], -first[key]))
    return bool(correct_K[first[winner]])


def maj_at_k(answers_P_K: Sequence[Sequence[str | None]], correct_P_K: Sequence[Sequence[bool]]) -> float:
    votes_P = [majority_correct(a, c) for a, c in zip(answers_P_K, correct_P_K)]
    return sum(votes_P) / len(votes_P) if votes_P else math.nan


def mean_median(values: Sequence[float]) -> tuple[float, float]:
    return (sum(values) / len(values), float(statistics.median(values))) if values else (math.nan, math.nan)


def marker_pattern(markers: Sequence[str]) -> re.Pattern[str] | None:
    """Whole words/phrases, any case, any whitespace between words; `wait` not in `await`/`wait-list`."""
    phrases = sorted({m.strip().lower() for m in markers if m.strip()}, key=len, reverse=True)
    if not phrases:
        return None
    alternatives = "|".join(r"\s+".join(re.escape(word) for word in p.split()) for p in phrases)
    return re.compile(rf"(?<![\w-])(?:{alternatives})(?![\w-])", re.IGNORECASE)


def count_markers(text: str, pattern: re.Pattern[str] | None) -> int:
    return 0 if pattern is None else sum(1 for _ in pattern.finditer(text))


def per_thousand(count: int, tokens: int) -> float:
    """Markers per 1,000 response tokens, pooled over responses (long responses weigh more)."""
    return 1000.0 * count / tokens if tokens else math.nan


def summarize(scored: Sequence[Scored]) -> dict[str, Any]:
    """Accuracy, length, truncation and marker numbers of a group of problems (nan → None)."""
    mean, stderr = mean_at_k([s.correct_K for s in scored])
    tokens = [t for s in scored for t in s.tokens_K]
    correct_tokens = [t for s in scored for t, c in zip(s.tokens_K, s.correct_K) if c]
    greedy = [s.greedy_correct for s in scored if s.greedy_correct is not None]
    passed, k = mean_pass_at_k([s.correct_K for s in scored])
    row = {
        "problems": len(scored),
        "samples": len(tokens),
        "mean_at_k": mean,
        "mean_at_k_stderr": stderr,
        "pass_at_k": passed,
        "pass_k": k,
        "maj_at_k": maj_at_k([s.answers_K for s in scored], [s.correct_K for s in scored]),
        "greedy_accuracy": sum(greedy) / len(greedy) if greedy else math.nan,
        "response_tokens_mean": mean_median(tokens)[0],
        "response_tokens_median": mean_median(tokens)[1],
        "correct_response_tokens_mean": mean_median(correct_tokens)[0],
        "correct_response_tokens_median": mean_median(correct_tokens)[1],
        "truncation_rate": sum(t for s in scored for t in s.truncated_K) / len(tokens) if tokens else math.nan,
        "markers_per_1k_tokens": per_thousand(sum(m for s in scored for m in s.markers_K), sum(tokens)),
        "restated_answers": sum(s.restated for s in scored),
    }
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}


def group_by_level(scored: Sequence[Scored]) -> list[tuple[str, list[Scored]]]:
    """Problems grouped by level, numeric levels in numeric order; [] when no problem has a level."""
    if all(s.level is None for s in scored):
        return []
    groups: dict[str, list[Scored]] = collections.defaultdict(list)
    for s in scored:
        groups["none" if s.level is None else s.level].append(s)
    return [(level, groups[level]) for level in sorted(groups, key=_level_order)]


def group_by_task(scored: Sequence[Scored]) -> list[tuple[str, list[Scored]]]:
    """Problems grouped by task, in name order; [] when no problem has a task."""
    if all(s.task is None for s in scored):
        return []
    groups: dict[str, list[Scored]] = collections.defaultdict(list)
    for s in scored:
        groups["none" if s.task is None else s.task].append(s)
    return sorted(groups.items())


def _level_order(level: str) -> tuple[int, float, str]:
    try:
        return (0, float(level), "") if math.isfinite(float(level)) else (1, 0.0, level)
    except ValueError:
        return (1, 0.0, level)


# --- the command ------------------------------------------------------------------------------


def check_options(config: EvalConfig) -> None:
    require(
        ("data", len(config.data) >= 1, "a list of at least one benchmark file, e.g. data=[math500.jsonl]"),
        ("limit", config.limit >= 0, "non-negative (0 = all problems)"),
        ("model.lora_rank", config.model.lora_rank == 0, "0: eval loads plain (merged) checkpoints"),
        ("greedy", not (config.greedy and config.responses), "false with responses (nothing is decoded)"),
        ("cost.latency_problems", config.cost.latency_problems >= 0, "non-negative (0 = no latency measurement)"),
    )
    check_sampling(config.sampling, "sampling", config.run.device)
    check_per_file(config.per_file, config.data)
    check_budgets(config.budgets, config.sampling, config.per_file, config.data)
    require(("budgets", not (config.budgets and config.responses), "empty when scoring given responses (the cut "
             "responses are decoded on)"),
            ("budget_answer_tokens", config.budget_answer_tokens >= 1, "at least 1"))
    check_verifier(config.verifier)
    prompt_options(config)


def prompt_options(config: EvalConfig) -> PromptConfig:
    """The `prompt` section, with the instruction of the older key `instruction` when that is set."""
    return with_instruction(config.prompt, config.instruction, "instruction")


def run_eval(config: EvalConfig, name: str = "eval", check_only: bool = False) -> Path | None:
    """Evaluate and write eval.json / eval.md / responses.jsonl; return the output folder. User
    mistakes are found (data, responses, model) before the folder is touched. `name` labels the
    progress bars (a pipeline: the stage evaluated); `check_only` (`--check`): every check that needs
    no weights (the model's config.json for its context), then return None."""
    check_options(config)
    use_threads(config.run.threads)
    benchmarks = [(path, load_problems(path, config.fields, default_verifier=config.verifier.default,
                                          answer_free=ANSWER_FREE))
                  for path in config.data]
    for path, problems in benchmarks:
        check_problems(problems, path, config.verifier)
    selected = [problems[: config.limit or None] for _, problems in benchmarks]
    responses = read_responses(Path(config.responses), benchmarks, selected) if config.responses else None
    counts_with_tokenizer = responses is None or config.model.name_or_path != BUILTIN_TINY
    tokenizer = load_tokenizer(config.model) if counts_with_tokenizer else None
    device = distributed.device(config.run.device)
    if responses is None:
        longest = max((len(eval_prompt(tokenizer, p, prompt_options(config))) for problems in selected
                       for p in problems), default=0)
        budget = max(file_sampling(config.sampling, config.per_file, path).max_new_tokens for path in config.data)
        budget += forced_tokens(tokenizer, config.budget_cue, config.budget_answer_tokens) if config.budgets else 0
        positions = longest + budget
        what = f"the longest prompt ({longest} tokens) plus the largest response budget ({budget} new tokens)"
        check_engine_fits(config.sampling, "sampling", positions, what)
    if check_only:
        model_config(config.model)  # the model folder holds a config transformers reads
        return None
    # under torchrun every process generates its share of each file's problems and rank 0 grades and writes
    writer = distributed.setup(device) == 0 if responses is None else distributed.rank() == 0
    # a frozen model: in the compute dtype (bf16 on GPU), in which the engine computes anyway
    model = load_model(frozen_dtype(config.model, device), device).eval() if responses is None else None
    engine = contextlib.nullcontext()
    if model is not None:  # before the output folder: vLLM refuses a model it cannot serve here
        compute = torch.bfloat16 if device.type == "cuda" else None
        engine = make_engine(model, tokenizer, config.sampling, device, compute, positions=positions)
    if responses is not None and not writer:
        return None  # scoring given responses is rank 0's alone
    out = _output_folder(Path(config.run.output_dir), config.run.overwrite, writer)

    torch.manual_seed(config.run.seed)
    pattern = marker_pattern(config.reflective_markers)
    rows, graded = [], []
    with engine, Verifiers(config.verifier) if writer else contextlib.nullcontext() as verifiers:
        for index, ((path, _), problems) in enumerate(zip(benchmarks, selected)):
            sampling = file_sampling(config.sampling, config.per_file, path)
            if writer:
                print(f"opsd eval: {path}: {len(problems)} problems", file=sys.stderr)
            forced = {}
            if responses is None:
                texts_P_K, tokens_P_K, truncated_P_K, greedy_P, tokens_per_s, cost, forced = generate(
                    engine, tokenizer, problems, replace(config, sampling=sampling), Path(path).stem, name, device)
                if not writer:
                    continue
            else:
                texts_P_K = [[text for text, _ in responses[index][p.id]] for p in problems]
                truncated_P_K = [[cut for _, cut in responses[index][p.id]] for p in problems]
                tokens_P_K = [count_tokens(texts, tokenizer) for texts in texts_P_K]
                greedy_P, tokens_per_s, cost = None, None, NOT_MEASURED
            before = verifiers.counters()
            scored = score(problems, texts_P_K, tokens_P_K, truncated_P_K, greedy_P, verifiers, pattern,
                           config.level_field, config.task_field)
            grading = {key: value - before[key] for key, value in verifiers.counters().items()}
            graded += response_rows(path, problems, texts_P_K, scored)
            levels = [{"level": level, **summarize(group)} for level, group in group_by_level(scored)]
            tasks = [{"task": task, **summarize(group)} for task, group in group_by_task(scored)]
            summary = summarize(scored)
            if responses is None and summary["truncation_rate"] > TRUNCATION_WARNING:
                print(f"opsd eval: warning: {path}: {summary['truncation_rate']:.0%} of the responses reached the "
                      f"budget of {sampling.max_new_tokens} new tokens, and count as unanswered where cut; a thinking "
                      "model needs more (sampling.max_new_tokens, or per_file)", file=sys.stderr)
            parameters = parameter_count(model) if model is not None else None
            solved = compute_per_solved(parameters, summary["response_tokens_mean"], summary["mean_at_k"]) \
                if parameters else None
            budgets = []
            for budget, samples in forced.items():  # budget forcing (opsd/stages/budgets.py)
                per = lambda flat, k=sampling.n: [flat[i * k : (i + 1) * k] for i in range(len(problems))]
                at_budget = summarize(score(problems, per(samples.texts), per(samples.tokens), per(samples.cut),
                                            None, verifiers, pattern, config.level_field, config.task_field))
                budgets.append({"budget": budget, "mean_at_k": at_budget["mean_at_k"],
                                "mean_at_k_stderr": at_budget["mean_at_k_stderr"],
                                "response_tokens_mean": at_budget["response_tokens_mean"],
                                "cut_rate": at_budget["truncation_rate"]})
            rows.append({"file": path, "name": Path(path).stem, "k": None if responses else sampling.n,
                         "max_new_tokens": None if responses else sampling.max_new_tokens, **summary,
                         "generate_tokens_per_s": tokens_per_s, **cost, "parameters": parameters,
                         "compute_per_solved_flops": solved, "grading": grading, "budgets": budgets,
                         "levels": levels, "tasks": tasks})
    counted = f"tokenizer of {config.model.name_or_path}" if tokenizer is not None else "whitespace split"
    report = {"mode": "generate" if responses is None else "responses", "response_tokens_counted_by": counted,
              "k": None if responses else config.sampling.n, "benchmarks": rows, "config": to_dict(config)}
    table = markdown_table(rows, report["mode"], counted)
    if writer:
        _write_atomic(out / "responses.jsonl", "".join(json.dumps(row) + "\n" for row in graded))
        _write_atomic(out / "eval.json", json.dumps(report, indent=2) + "\n")
        _write_atomic(out / "eval.md", table)
    distributed.teardown()  # under torchrun: every process waits for rank 0's files (a pipeline keeps its group)
    return out if writer else None


def _output_folder(out: Path, overwrite: bool, writer: bool) -> Path:
    """`prepare_output_dir` on rank 0; under torchrun its verdict reaches every process, so that a refused
    folder stops them all with its sentence."""
    refused = None
    if writer:
        try:
            out = prepare_output_dir(out, overwrite)
        except UserError as err:
            refused = str(err)
    refused = distributed.from_rank0(refused)
    if refused:
        raise UserError(refused)
    return out


def generate(engine: Engine, tokenizer, problems: list[Problem], config: EvalConfig, file: str, name: str = "eval",
             device: torch.device = torch.device("cpu")):
    """(texts_P_K, tokens_P_K, truncated_P_K, greedy texts or None, generated tokens per second, the
    cost fields of opsd/runtime/cost.py, each budget's samples (`budgets`; opsd/stages/budgets.py)).
    Sample j of a problem is seeded by (seed, file, its place in the file, id, j): the same whatever else
    is evaluated, and the latency decodes draw from seeds of their own. A progress bar `name · file`
    counts the problems done."""
    prompts = [eval_prompt(tokenizer, p, prompt_options(config)) for p in problems]
    k = config.sampling.n
    seeds = [[request_seed(config.run.seed, file, position, p.id, j) for j in range(k)]
             for position, p in enumerate(problems)]
    writer = distributed.rank() == 0
    mine = distributed.shard(list(range(len(problems))), distributed.rank(), distributed.world_size())
    engine.ready()  # vllm: the weights in before the clock starts
    # each engine call inside a `decoding` block: the processes of a tensor-parallel vLLM group decode together
    # (their numbers of calls may differ); collectives between processes outside them
    with peak_memory(device) as memory, progress_bar(f"{name} · {file}", len(mine), "problem",
                                                     disable=not writer) as bar, engine.decoding():
        ids, truncated, seconds = decode(engine, [prompts[p] for p in mine for _ in range(k)], config.sampling,
                                         [seed for p in mine for seed in seeds[p]], bar, k)
    ids, truncated, seconds, peak = _from_every_process(mine, ids, truncated, seconds, memory.mib, len(problems), k)
    forced = force_budgets(engine, tokenizer, prompts, ids, k, mine, config.budgets, config.budget_cue,
                           config.budget_answer_tokens, config.sampling) if config.budgets else {}
    texts = response_texts(tokenizer, ids)  # the thinking delimiters kept for the graders, special or not
    generated = sum(len(i) for i in ids)
    timed = prompts[: config.cost.latency_problems] if writer else []  # rank 0's alone, one request at a time
    if timed and ids and seconds > 0:  # at a thinking model's lengths this can take longer than the evaluation
        at_once = min(config.sampling.batch_size, len(ids) // max(distributed.world_size(), 1) or 1)
        minutes = len(timed) * (generated / len(ids)) / (generated / seconds / at_once) / 60
        if minutes > LATENCY_WARNING_MIN:
            print(f"opsd eval: {file}: timing batch-1 latency (cost.latency_problems={len(timed)}) decodes that many "
                  f"problems one at a time, about {minutes:.0f} min at these lengths; cost.latency_problems=0 skips "
                  "it", file=sys.stderr)
    with engine.decoding():
        timing = latency(engine, timed, config.sampling, [request_seed(config.run.seed, file, "latency", i)
                                                          for i in range(len(timed))])
    cost = {**timing,
            **throughput(len(ids), generated, seconds, config.sampling.batch_size),
            "peak_memory_mib": peak, "peak_memory_measured_as": memory.measured_as}
    greedy_texts = None
    if config.greedy:
        greedy = replace(config.sampling, temperature=0.0, n=1)
        with progress_bar(f"{name} · {file} · greedy", len(mine), "problem", disable=not writer) as bar, \
                engine.decoding():
            greedy_ids, _, greedy_seconds = decode(engine, [prompts[p] for p in mine], greedy, [0] * len(mine), bar, 1)
        greedy_ids, _, greedy_seconds, _ = _from_every_process(mine, greedy_ids, [False] * len(mine), greedy_seconds,
                                                               None, len(problems), 1)
        greedy_texts = response_texts(tokenizer, greedy_ids)
        generated, seconds = generated + sum(len(i) for i in greedy_ids), seconds + greedy_seconds
    per_problem = lambda flat: [flat[i * k : (i + 1) * k] for i in range(len(problems))]
    return (per_problem(texts), per_problem([len(i) for i in ids]), per_problem(truncated), greedy_texts,
            generated / seconds if seconds > 0 else None, cost, forced)


def _from_every_process(mine: list[int], ids: list[list[int]], truncated: list[bool], seconds: float,
                        peak_mib: float | None, problems: int, k: int):
    """The whole file's responses in problem order from every process's share (`mine`: this process's
    problems, k responses each), the longest process's seconds and the largest peak memory. As they are in
    one process."""
    ids_P = [None] * problems
    truncated_P = [None] * problems
    shares = distributed.gather_long((mine, ids, truncated, seconds, peak_mib))
    for places, their_ids, their_truncated, _, _ in shares:
        for n, p in enumerate(places):
            ids_P[p], truncated_P[p] = their_ids[n * k : (n + 1) * k], their_truncated[n * k : (n + 1) * k]
    peaks = [share[4] for share in shares if share[4] is not None]
    return ([i for part in ids_P for i in part], [t for part in truncated_P for t in part],
            max(share[3] for share in shares), max(peaks) if peaks else peak_mib)


def eval_prompt(tokenizer, problem: Problem, prompt: PromptConfig) -> list[int]:
    """The chat prompt of a problem: its system prompt, template options and instruction (`prompt_options`)."""
    return render_prompt(tokenizer, problem.problem, prompt)


def decode(engine: Engine, prompts: list[list[int]], sampling: SamplingConfig, seeds: list[int], bar,
           per_problem: int) -> tuple[list[list[int]], list[bool], float]:
    """Response ids (ending with EOS unless truncated), truncation flags and seconds. The requests go
    to the engine `sampling.batch_size` at a time (the hf engine's own batches: the same samples as one
    call), and `bar` advances by the problems whose `per_problem` requests are all done."""
    start = time.perf_counter()  # generations come back on the CPU, so GPU work is done when it returns
    generations = []
    for first in range(0, len(prompts), sampling.batch_size):
        part = slice(first, first + sampling.batch_size)
        generations += engine.generate(prompts[part], sampling, seeds[part])
        bar.update(len(generations) // per_problem - bar.n)
    return [g.response_ids for g in generations], [g.truncated for g in generations], time.perf_counter() - start


def score(problems: list[Problem], texts_P_K: list[list[str]], tokens_P_K: list[list[int]],
          truncated_P_K: list[list[bool]], greedy_P: list[str] | None, verifiers: Verifiers,
          pattern: re.Pattern[str] | None, level_field: str, task_field: str = "task") -> list[Scored]:
    """Grade every response (one verifier call per file) and count its markers."""
    texts = [t for texts in texts_P_K for t in texts]
    verdicts: Iterator[Verdict] = iter(verifiers.verify(texts, [p for p, texts in zip(problems,
                                                                                      texts_P_K) for _ in texts]))
    greedy_correct = [v.correct for v in verifiers.verify(greedy_P, problems)] if greedy_P else [None] * len(problems)
    scored = []
    for problem, texts, tokens, truncated, greedy in zip(
            problems, texts_P_K, tokens_P_K, truncated_P_K, greedy_correct):
        level, task = problem.extra.get(level_field), problem.extra.get(task_field)
        verdicts_K = [next(verdicts) for _ in texts]
        scored.append(Scored(
            level=None if level is None else str(level),
            answers_K=tuple(v.extracted for v in verdicts_K),
            correct_K=tuple(v.correct for v in verdicts_K),
            tokens_K=tuple(tokens),
            truncated_K=tuple(truncated),
            markers_K=tuple(count_markers(t, pattern) for t in texts),
            greedy_correct=greedy,
            restated=sum(v.restated for v in verdicts_K),
            task=None if task is None else str(task),
        ))
    return scored


def response_rows(file: str, problems: list[Problem], texts_P_K: list[list[str]],
                  scored: list[Scored]) -> list[dict[str, Any]]:
    """responses.jsonl rows, one per sample: the fields `responses=FILE` reads (id, response,
    truncated), then its grade, extracted answer, length, place among its problem's samples and file."""
    return [{"id": problem.id, "response": text, "truncated": s.truncated_K[j], "correct": s.correct_K[j],
             "extracted": s.answers_K[j], "response_tokens": s.tokens_K[j], "sample": j, "file": file}
            for problem, texts, s in zip(problems, texts_P_K, scored) for j, text in enumerate(texts)]


def count_tokens(texts: list[str], tokenizer) -> list[int]:
    if tokenizer is None:
        return [len(t.split()) for t in texts]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def read_responses(path: Path, benchmarks: list[tuple[str, list[Problem]]],
                   selected: list[list[Problem]]) -> list[dict[str, list[tuple[str, bool]]]]:
    """For each benchmark file, {problem id: [(response, truncated), ...]} over its selected problems.
    Rows for problems past `limit` are skipped; an id in no benchmark file is an error, and so is a
    selected problem without a response."""
    if not path.is_file():
        raise UserError(f"responses file {path} does not exist")
    owner: dict[str, int] = {}  # problem id -> index of its benchmark file
    for index, (file, problems) in enumerate(benchmarks):
        for problem in problems:
            if owner.setdefault(problem.id, index) != index:
                raise UserError(f"problem id '{problem.id}' is in {file} and in another benchmark file; "
                                "responses cannot tell them apart")
    wanted = [{p.id for p in problems} for problems in selected]
    found: list[dict[str, list[tuple[str, bool]]]] = [collections.defaultdict(list) for _ in benchmarks]
    for where, row in read_rows(path):  # JSONL or Parquet; a malformed line is an error naming it
        row_id, text, truncated = row.get("id"), row.get("response"), row.get("truncated", False)
        if row_id is None:
            raise UserError(f"{where} has no 'id'")
        row_id = str(row_id)
        if not isinstance(text, str):
            raise UserError(f"{where} has no 'response' text")
        if not isinstance(truncated, bool):
            raise UserError(f"{where} has a 'truncated' that is not true/false")
        if row_id not in owner:
            raise UserError(f"{where} has the id '{row_id}', which is in none of the benchmark files")
        if row_id in wanted[owner[row_id]]:
            found[owner[row_id]][row_id].append((text, truncated))
    for (file, _), problems, responses in zip(benchmarks, selected, found):
        for problem in problems:
            if problem.id not in responses:
                raise UserError(f"{path} has no response for problem '{problem.id}' of {file}")
    return found


def markdown_table(rows: list[dict[str, Any]], mode: str, counted: str) -> str:
    lines = ["| benchmark | problems | samples | mean@k ± se | pass@k | maj@k | greedy | tokens mean / median "
             "| correct tokens mean / median | truncated | markers /1k tokens | tok/s |", "|---" * 12 + "|"]
    for row in rows:
        lines.append(_table_line(row["name"], row))
        lines += [_table_line(f"{row['name']} · level {level['level']}", level) for level in row["levels"]]
        lines += [_table_line(f"{row['name']} · {task['task']}", task) for task in row.get("tasks", [])]
    return ("\n".join(lines) + f"\n\n{mode}; response tokens counted by the {counted}.\n" + cost_table(rows)
            + budget_table(rows))


def budget_table(rows: list[dict[str, Any]]) -> str:
    """Accuracy against the thinking budget (`budgets`), one line per file and budget; "" without budgets."""
    lines = [f"| {row['name']} | {b['budget']} | {100 * b['mean_at_k']:.1f} ± {100 * b['mean_at_k_stderr']:.1f} | "
             f"{b['response_tokens_mean']:.1f} | {b['cut_rate']:.3f} |" for row in rows for b in row.get("budgets", [])]
    if not lines:
        return ""
    return ("\n| benchmark | thinking budget | mean@k ± se (%) | tokens mean | cut |\n|---|---|---|---|---|\n"
            + "\n".join(lines) + "\n\nCut: the share of samples whose thinking passed the budget, cut there with "
            "the answer decoded after `budget_cue`.\n")


def cost_table(rows: list[dict[str, Any]]) -> str:
    """The serving cost of each file's evaluation (opsd/runtime/cost.py); empty when nothing was decoded."""
    if all(row.get("parameters") is None for row in rows):
        return ""
    lines = ["", "| benchmark | parameters | latency p50 / p95 s (batch 1) | tok/s (batch 1) | responses/s | tok/s "
             "| batch | peak memory MiB | GFLOPs per solved |", "|---" * 9 + "|"]
    for row in rows:
        cell = lambda key, spec=".3g": "–" if row.get(key) is None else format(row[key], spec)
        solved = "–" if row.get("compute_per_solved_flops") is None else f"{row['compute_per_solved_flops'] / 1e9:.3g}"
        lines.append(f"| {row['name']} | {cell('parameters', ',d')} | {cell('latency_p50_s')} / "
                     f"{cell('latency_p95_s')} "
                     f"| {cell('latency_tokens_per_s', '.1f')} | {cell('throughput_responses_per_s')} "
                     f"| {cell('throughput_tokens_per_s', '.1f')} | {cell('throughput_batch_size', 'd')} "
                     f"| {cell('peak_memory_mib', '.1f')} ({row.get('peak_memory_measured_as')}) | {solved} |")
    return "\n".join(lines) + ("\n\nLatency: each of the first problems decoded alone; responses/s and tok/s: the "
                               "samples above, decoded `batch` at a time; GFLOPs per solved: 2 × parameters × "
                               "mean response tokens / mean@k.\n")


def _table_line(name: str, row: dict[str, Any]) -> str:
    def cell(key: str, spec: str = ".3f") -> str:
        return "–" if row.get(key) is None else format(row[key], spec)

    cells = [name, cell("problems", "d"), cell("samples", "d"), f"{cell('mean_at_k')} ± {cell('mean_at_k_stderr')}",
             cell("pass_at_k") + ("" if row.get("pass_k") is None else f" (k={row['pass_k']})"),
             cell("maj_at_k"), cell("greedy_accuracy"),
             f"{cell('response_tokens_mean', '.1f')} / {cell('response_tokens_median', '.1f')}",
             f"{cell('correct_response_tokens_mean', '.1f')} / {cell('correct_response_tokens_median', '.1f')}",
             cell("truncation_rate"), cell("markers_per_1k_tokens", ".2f"), cell("generate_tokens_per_s", ".1f")]
    return "| " + " | ".join(cells) + " |"


def prepare_output_dir(out: Path, overwrite: bool) -> Path:
    """Create `out`, marked as an evaluation folder when opsd creates it, finds it empty or finds an
    opsd checkpoint there. Only eval.json, eval.md and responses.jsonl are ever written in it, and
    they are replaced (`overwrite=true`) only in a folder marked as an evaluation folder by opsd."""
    if out.exists() and not out.is_dir():
        raise UserError(f"run.output_dir {out} is a file")
    ours = kind_of(out) == "eval"
    existing = [name for name in EVAL_OUTPUTS if (out / name).exists()]
    if existing:
        if not overwrite:
            raise UserError(f"{out / existing[0]} already exists; choose another run.output_dir or set "
                            "run.overwrite=true")
        if not ours:
            raise UserError(f"overwrite=true: {out} is not an evaluation folder opsd created (no opsd_folder.json of "
                            f"kind eval), so its {existing[0]} is not replaced; choose another run.output_dir")
    try:
        out.mkdir(parents=True, exist_ok=True)
        if ours or not any(out.iterdir()) or (kind_of(out) is None and foreign_checkpoint(out) is None):
            mark(out, "eval")
        else:
            _write_atomic(out / ".write-test", "")
            (out / ".write-test").unlink()
    except OSError as err:
        raise UserError(f"run.output_dir {out} cannot be written ({err.strerror})") from None
    return out


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
