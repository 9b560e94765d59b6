"""`opsd eval`: the metric functions on hand-made cases, a tiny-model run end to end, scoring the
MATH-500 / GSM8K reference solutions as given responses, and re-scoring an evaluation's responses.jsonl."""

import json
import math
import statistics
from pathlib import Path

import pytest
import torch

from opsd.cli import main
from opsd.core.config import load_config
from opsd.core.errors import UserError
from opsd.core.models import ModelConfig, load_model
from opsd.stages.eval import (
    EvalConfig,
    Scored,
    count_markers,
    group_by_level,
    maj_at_k,
    majority_correct,
    marker_pattern,
    mean_at_k,
    per_thousand,
    run_eval,
    summarize,
)

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
ARITHMETIC = ROOT / "configs/examples/arithmetic.jsonl"
ROW_KEYS = {"problems", "samples", "mean_at_k", "mean_at_k_stderr", "pass_at_k", "pass_k", "maj_at_k",
            "greedy_accuracy",
            "response_tokens_mean", "response_tokens_median", "correct_response_tokens_mean",
            "correct_response_tokens_median", "truncation_rate", "markers_per_1k_tokens", "restated_answers"}
COST_KEYS = {"latency_problems", "latency_p50_s", "latency_p95_s", "latency_tokens_per_s", "throughput_batch_size",
             "throughput_responses_per_s", "throughput_tokens_per_s", "peak_memory_mib", "peak_memory_measured_as",
             "parameters", "compute_per_solved_flops"}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def scored(correct, tokens=None, level=None, answers=None, markers=None, greedy=None) -> Scored:
    k = len(correct)
    return Scored(level=level, answers_K=tuple(answers or ["x"] * k), correct_K=tuple(correct),
                  tokens_K=tuple(tokens or [10] * k), truncated_K=(False,) * k,
                  markers_K=tuple(markers or [0] * k), greedy_correct=greedy)


# --- metrics ----------------------------------------------------------------------------------


def test_mean_at_k_and_its_standard_error_match_naive_code():
    correct_P_K = [[True, True, False, False], [True, True, True, True], [False] * 4, [True, False, False, False]]
    mean, stderr = mean_at_k(correct_P_K)
    fractions = [0.5, 1.0, 0.0, 0.25]
    assert mean == pytest.approx(sum(fractions) / 4)
    assert stderr == pytest.approx(statistics.stdev(fractions) / 2)
    single = mean_at_k([[True, False]])
    assert single[0] == 0.5 and math.isnan(single[1])
    assert mean_at_k([[True], [True]]) == (1.0, 0.0)
    assert all(math.isnan(x) for x in mean_at_k([]))


def test_majority_vote_groups_normalized_answers_and_breaks_ties_by_first_occurrence():
    # "\dfrac{1}{2}" and "\frac{1}{2}" are one answer; it wins 2–1 and its first sample (index 0) is correct
    assert majority_correct(["\\dfrac{1}{2}", "3", "\\frac{1}{2}"], [True, False, False])
    # tie 1–1: "3" came first, so its sample decides
    assert not majority_correct(["3", "4"], [False, True])
    assert majority_correct(["4", "3"], [True, False])
    # 2–2 tie: "7" appears first (index 0) although "8" has a correct sample first
    assert not majority_correct(["7", "8", "8", "7"], [False, True, True, False])
    # responses without an answer do not vote
    assert majority_correct([None, None, "5"], [False, False, True])
    assert not majority_correct([None, None], [False, False])
    assert maj_at_k([["1", "1", "2"], ["3", None, "4"]], [[True, True, False], [False, False, True]]) == 0.5


def test_lengths_over_all_and_correct_samples_truncation_and_greedy():
    rows = [Scored(None, ("1", "2"), (True, False), (10, 30), (False, True), (0, 0), True),
            Scored(None, ("1", "1", "1"), (True, True, False), (20, 40, 100), (False, False, True), (0, 0, 0), False)]
    row = summarize(rows)
    assert row["problems"] == 2 and row["samples"] == 5
    assert row["response_tokens_mean"] == 40 and row["response_tokens_median"] == 30
    assert row["correct_response_tokens_mean"] == pytest.approx(70 / 3) and row["correct_response_tokens_median"] == 20
    assert row["truncation_rate"] == pytest.approx(2 / 5)
    assert row["greedy_accuracy"] == 0.5
    assert row["mean_at_k"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert set(row) == ROW_KEYS
    nothing_correct = summarize([scored([False, False])])
    assert nothing_correct["correct_response_tokens_mean"] is None and nothing_correct["greedy_accuracy"] is None


def test_markers_are_whole_words_or_phrases_in_any_case():
    pattern = marker_pattern(("wait", "hmm", "let me check", "let me re-check", "double-check", "actually"))
    text = ("Wait, that is wrong. Hmm... Let me  check: await the waiter. Let me re-check. "
            "Actually, let me double-check. hmmm. WAIT! wait-list")
    # Wait, Hmm, Let me  check, Let me re-check, Actually, double-check, WAIT — not await/waiter/hmmm/wait-list
    assert count_markers(text, pattern) == 7
    assert count_markers(text, marker_pattern(())) == 0
    assert per_thousand(3, 1500) == 2.0 and math.isnan(per_thousand(0, 0))
    # density pools markers and tokens over all responses
    row = summarize([scored([True], tokens=[1000], markers=[4]), scored([False], tokens=[3000], markers=[0])])
    assert row["markers_per_1k_tokens"] == 1.0


def test_problems_group_by_level_in_numeric_order():
    rows = [scored([True], level="10"), scored([False], level="2"), scored([True, False], level="2"), scored([True])]
    groups = group_by_level(rows)
    assert [level for level, _ in groups] == ["2", "10", "none"]
    assert [len(g) for _, g in groups] == [2, 1, 1]
    assert summarize(groups[0][1])["mean_at_k"] == pytest.approx(0.25)
    assert group_by_level([scored([True]), scored([False])]) == []


# --- end to end -------------------------------------------------------------------------------


def test_eval_on_the_tiny_model_writes_every_number(tmp_path, capsys):
    data = write_jsonl(tmp_path / "levels.jsonl", [
        {**json.loads(line), "level": 1 + i % 2} for i, line in enumerate(ARITHMETIC.read_text().splitlines()[:4])])
    out = tmp_path / "eval"
    code = main(["eval", "model.name_or_path=builtin:tiny", f"data=[{ARITHMETIC},{data}]", "limit=4",
                 "sampling.n=2", "sampling.max_new_tokens=8", "greedy=true", "run.device=cpu", f"run.output_dir={out}",
                 "instruction=Be concise."])
    assert code == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "eval.json").read_text())
    table = (out / "eval.md").read_text()
    assert table in printed and f"eval folder: {out}" in printed
    assert report["mode"] == "generate" and report["k"] == 2
    assert report["config"]["sampling"] == {"engine": "hf", "temperature": 0.6, "top_p": 0.95, "top_k": 0,
                                            "max_new_tokens": 8,
                                            "n": 2, "batch_size": 64, "gpu_memory_utilization": 0.3,
                                            "kv_cache_gib": 0.0, "max_model_len": 0, "sleep_mode": False,
                                            "enforce_eager": False, "max_num_batched_tokens": 0,
                                            "tensor_parallel_size": 1}
    assert report["config"]["instruction"] == "Be concise."
    first, second = report["benchmarks"]
    for row in (first, second):
        assert set(row) == ROW_KEYS | COST_KEYS | {"file", "name", "k", "max_new_tokens", "generate_tokens_per_s",
                                                   "grading", "budgets", "levels", "tasks"}
        assert row["grading"] == {"timeouts": 0, "crashes": 0, "restated": 0, "code_timeouts": 0, "sandbox_errors": 0,
                                  "code_unsupported": 0}
        assert row["problems"] == 4 and row["samples"] == 8
        assert 0 <= row["mean_at_k"] <= 1 and row["greedy_accuracy"] is not None
        assert 1 <= row["response_tokens_mean"] <= 8 and 0 <= row["truncation_rate"] <= 1
        assert row["generate_tokens_per_s"] > 0
        assert row["latency_problems"] == 4 and 0 < row["latency_p50_s"] <= row["latency_p95_s"]
        assert row["throughput_batch_size"] == 64 and row["throughput_responses_per_s"] > 0
        assert row["throughput_tokens_per_s"] > 0 and row["latency_tokens_per_s"] > 0
        assert row["peak_memory_measured_as"] == "cpu peak rss" and row["peak_memory_mib"] > 0
        assert row["parameters"] == sum(p.numel() for p in load_model(ModelConfig(), torch.device("cpu")).parameters())
        if row["mean_at_k"]:
            assert row["compute_per_solved_flops"] == pytest.approx(
                2 * row["parameters"] * row["response_tokens_mean"] / row["mean_at_k"])
    assert "| parameters | latency p50 / p95 s (batch 1) |" in table
    assert first["levels"] == [] and [lv["level"] for lv in second["levels"]] == ["1", "2"]
    assert all(set(lv) == ROW_KEYS | {"level"} for lv in second["levels"])
    assert "| arithmetic |" in table and "| levels · level 2 |" in table
    responses = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    assert len(responses) == 2 * 4 * 2  # every sample of both files; the greedy responses are not samples
    # a second run into the same folder is refused unless overwrite=true
    assert main(["eval", f"data=[{ARITHMETIC}]", f"run.output_dir={out}"]) == 2
    assert "run.overwrite=true" in capsys.readouterr().err


def test_eval_reads_a_config_file_then_overrides(tmp_path):
    config = tmp_path / "eval.yaml"
    config.write_text(f"data: [{ARITHMETIC}]\nlimit: 3\nsampling:\n  n: 5\n", encoding="utf-8")
    loaded = load_config(EvalConfig, config, ["sampling.max_new_tokens=16"])
    assert loaded.data == (str(ARITHMETIC),) and loaded.limit == 3
    assert (loaded.sampling.n, loaded.sampling.max_new_tokens, loaded.sampling.temperature) == (5, 16, 0.6)


# --- responses mode ---------------------------------------------------------------------------


def benchmark_rows(name: str) -> list[dict]:
    path = DATA / name
    if not path.exists():
        pytest.skip(f"{path} not present")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def references() -> list[dict]:
    """MATH-500 solutions (they end in \\boxed{}) and GSM8K solutions with their `#### answer` line."""
    math500, gsm8k = benchmark_rows("math500_test.jsonl"), benchmark_rows("gsm8k_test.jsonl")
    return ([{"id": r["id"], "response": r["solution"]} for r in math500]
            + [{"id": r["id"], "response": r["solution"] + "\n#### " + r["answer"]} for r in gsm8k])


def score_responses(tmp_path, rows, *overrides, name="eval"):
    responses = write_jsonl(tmp_path / f"{name}.jsonl", rows)
    config = load_config(EvalConfig, None, [
        f"data=[{DATA / 'math500_test.jsonl'},{DATA / 'gsm8k_test.jsonl'}]", f"responses={responses}",
        f"run.output_dir={tmp_path / name}", *overrides])
    return json.loads((run_eval(config) / "eval.json").read_text())


def test_reference_solutions_score_correct_and_rotated_ones_do_not(tmp_path):
    rows = references()
    report = score_responses(tmp_path, rows + rows[:3], name="references")  # 3 problems get a 2nd sample
    math500, gsm8k = report["benchmarks"]
    assert report["mode"] == "responses" and report["response_tokens_counted_by"] == "whitespace split"
    # measured: all 500 MATH-500 and all 1319 GSM8K references are graded correct
    assert (math500["problems"], math500["samples"], gsm8k["problems"]) == (500, 503, 1319)
    assert math500["mean_at_k"] == 1.0 and math500["maj_at_k"] == 1.0 and gsm8k["mean_at_k"] == 1.0
    assert [lv["level"] for lv in math500["levels"]] == ["1", "2", "3", "4", "5"]
    assert sum(lv["problems"] for lv in math500["levels"]) == 500
    assert gsm8k["levels"] == [] and gsm8k["generate_tokens_per_s"] is None
    assert math500["response_tokens_mean"] > gsm8k["response_tokens_mean"] > 20

    # each response paired with the next row's problem; measured: 3 of 500 and 4 of 500 still match
    # (coincident answers such as `5` vs `x=5`); limit=500 keeps math-verify's work small
    rotated = [{"id": r["id"], "response": n["response"]} for r, n in zip(rows, rows[1:] + rows[:1])]
    report = score_responses(tmp_path, rotated, "limit=500", name="rotated")
    assert all(b["problems"] == 500 and b["mean_at_k"] < 0.05 for b in report["benchmarks"])


def test_responses_are_counted_with_the_named_tokenizer(tmp_path):
    from opsd.core.tiny import save_tiny

    model = save_tiny(tmp_path / "tiny")  # character-level: one token per character
    responses = write_jsonl(tmp_path / "r.jsonl", [{"id": "arith_000", "response": "26 + 28 = 54.\nAnswer: 54"},
                                                   {"id": "arith_000", "response": "hmm, wait: 55", "truncated": True}])
    config = load_config(EvalConfig, None, [f"data=[{ARITHMETIC}]", "limit=1", f"responses={responses}",
                                            f"model.name_or_path={model}", f"run.output_dir={tmp_path / 'out'}"])
    report = json.loads((run_eval(config) / "eval.json").read_text())
    row = report["benchmarks"][0]
    assert report["response_tokens_counted_by"] == f"tokenizer of {model}"
    assert row["response_tokens_mean"] == (24 + 13) / 2 and row["correct_response_tokens_mean"] == 24
    assert row["mean_at_k"] == 0.5 and row["truncation_rate"] == 0.5
    assert row["markers_per_1k_tokens"] == pytest.approx(1000 * 2 / 37)
    assert all(row[key] is None for key in COST_KEYS - {"peak_memory_measured_as"})  # nothing decoded, nothing timed


def test_user_mistakes_name_the_file_and_line(tmp_path, capsys):
    good = {"id": "arith_000", "response": "Answer: 54"}
    cases = [
        ("missing responses file", tmp_path / "nope.jsonl", ["nope.jsonl", "does not exist"]),
        ("unknown id", write_jsonl(tmp_path / "unknown.jsonl", [good, {"id": "zzz", "response": "1"}]),
         ["unknown.jsonl line 2", "'zzz'", "none of the benchmark files"]),
        ("malformed line", tmp_path / "bad.jsonl", ["bad.jsonl line 2", "not valid JSON"]),
        ("no response text", write_jsonl(tmp_path / "notext.jsonl", [good, {"id": "arith_001"}]),
         ["notext.jsonl line 2", "'response'"]),
        ("missing id", write_jsonl(tmp_path / "missing.jsonl", [good]),
         ["missing.jsonl", "no response for problem 'arith_001'", "arithmetic.jsonl"]),
    ]
    (tmp_path / "bad.jsonl").write_text(json.dumps(good) + "\n{oops\n", encoding="utf-8")
    for name, responses, words in cases:
        out = tmp_path / f"out-{name.replace(' ', '-')}"
        with pytest.raises(UserError) as caught:
            run_eval(load_config(EvalConfig, None, [f"data=[{ARITHMETIC}]", "limit=2", f"responses={responses}",
                                                    f"run.output_dir={out}"]))
        for word in words:
            assert word in str(caught.value), (name, word, str(caught.value))
        assert not out.exists(), name
    for overrides, words in [(["data=[]"], ["data"]), ([f"data=[{ARITHMETIC}]", "greedy=true", "responses=x.jsonl"],
                                                       ["greedy"]), ([f"data={ARITHMETIC}"], ["data", "list"])]:
        assert main(["eval", *overrides, f"run.output_dir={tmp_path / 'never'}"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("opsd: error: ") and "\n" not in err and all(w in err for w in words), err
    assert not (tmp_path / "never").exists()


ACCURACY = ("problems", "samples", "mean_at_k", "mean_at_k_stderr", "maj_at_k", "truncation_rate", "restated_answers")


def test_responses_file_rescores_to_the_same_accuracy_table(tmp_path, capsys):
    """eval → responses.jsonl → eval --responses: the same grades and accuracy, overall and per level, on
    the demo's SFT model (it solves some of its world's problems, not all). Lengths are counted again
    from the text (the stop token is not in it), so only the accuracy columns are compared."""
    from opsd.demo import toyworld
    from opsd.demo.demo import SHIPPED_SFT

    data = toyworld.write_jsonl(toyworld.problem_rows(toyworld.held_out(2)), tmp_path / "heldout.jsonl")
    common = [f"model.name_or_path={SHIPPED_SFT}", f"data=[{data}]", "run.device=cpu"]
    assert main(["eval", *common, "sampling.n=3", "sampling.temperature=1.0", "sampling.max_new_tokens=60",
                 "instruction=Be concise.", f"run.output_dir={tmp_path / 'generated'}"]) == 0
    saved = [json.loads(line) for line in (tmp_path / "generated" / "responses.jsonl").read_text().splitlines()]
    assert len(saved) == 8 * 3 and {"id", "response", "truncated", "correct", "extracted"} <= set(saved[0])
    assert 0 < sum(r["correct"] for r in saved) < len(saved)
    assert main(["eval", *common, "--responses", str(tmp_path / "generated" / "responses.jsonl"),
                 f"run.output_dir={tmp_path / 'rescored'}"]) == 0
    capsys.readouterr()
    first, again = (json.loads((tmp_path / name / "eval.json").read_text())["benchmarks"][0]
                    for name in ("generated", "rescored"))
    assert {k: first[k] for k in ACCURACY} == {k: again[k] for k in ACCURACY}
    levels = lambda report: [{k: level[k] for k in ACCURACY} for level in report["levels"]]
    assert levels(first) == levels(again)
    rescored = [json.loads(line) for line in (tmp_path / "rescored" / "responses.jsonl").read_text().splitlines()]
    keep = lambda rows: [(r["id"], r["response"], r["truncated"], r["correct"], r["extracted"]) for r in rows]
    assert keep(rescored) == keep(saved)


def test_responses_flag_is_accepted_anywhere():
    from opsd.cli import _responses_flag

    assert _responses_flag(["eval", "--responses", "r.jsonl", "data=[a]"]) == ["eval", "responses=r.jsonl", "data=[a]"]
    assert _responses_flag(["eval", "data=[a]", "--responses", "r.jsonl"]) == ["eval", "data=[a]", "responses=r.jsonl"]
    assert _responses_flag(["distill", "c.yaml"]) == ["distill", "c.yaml"]


TIMED = {"generate_tokens_per_s", "latency_p50_s", "latency_p95_s", "latency_tokens_per_s",
         "throughput_responses_per_s", "throughput_tokens_per_s", "peak_memory_mib"}


def test_two_processes_split_the_problems_and_write_what_one_process_writes(tmp_path):
    """Under torchrun each process decodes its share of the problems (every second one here) and rank 0
    grades and writes: responses.jsonl and every number of eval.json but the timings are one process's,
    greedy responses included."""
    import os
    import subprocess
    import sys

    args = ["-m", "opsd.cli", "eval", f"data=[{ARITHMETIC}]", "sampling.n=3", "sampling.max_new_tokens=12",
            "greedy=true", "run.threads=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    for processes, out in ((1, "one"), (2, "two")):
        launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] if processes > 1 else []
        done = subprocess.run([sys.executable, *launcher, *args, f"run.output_dir={tmp_path / out}"], env=env,
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.count("eval folder:") == 1  # rank 0 alone reports
    assert (tmp_path / "one/responses.jsonl").read_text() == (tmp_path / "two/responses.jsonl").read_text()
    one, two = (json.loads((tmp_path / out / "eval.json").read_text())["benchmarks"][0] for out in ("one", "two"))
    assert {k: v for k, v in one.items() if k not in TIMED} == {k: v for k, v in two.items() if k not in TIMED}
    assert one["problems"] > 2 and one["greedy_accuracy"] is not None


def test_a_file_can_have_its_own_sample_count_and_budget_and_a_cut_benchmark_is_warned_about(tmp_path, capsys):
    """per_file: AIME-like files get more samples and another budget than the rest; a benchmark whose responses
    mostly reach the budget says so on stderr (the tiny model rambles past 3 tokens)."""
    copy = tmp_path / "aime.jsonl"
    copy.write_text(ARITHMETIC.read_text())
    args = ["eval", f"data=[{ARITHMETIC},{copy}]", "sampling.n=2", "sampling.max_new_tokens=3", "limit=3",
            "per_file=[{file: aime, n: 5, max_new_tokens: 6}]", f"run.output_dir={tmp_path / 'out'}", "run.threads=1"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert f"opsd eval: warning: {ARITHMETIC}: 100% of the responses reached the budget of 3 new tokens" in err
    plain, aime = json.loads((tmp_path / "out/eval.json").read_text())["benchmarks"]
    assert (plain["k"], plain["max_new_tokens"], plain["samples"]) == (2, 3, 6)
    assert (aime["k"], aime["max_new_tokens"], aime["samples"]) == (5, 6, 15)
    assert main([*args[:-2], "per_file=[{file: nothere, n: 5}]", f"run.output_dir={tmp_path / 'x'}"]) == 2
    assert "per_file[0].file must be one of the files of data (got 'nothere')" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
