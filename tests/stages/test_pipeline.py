"""`opsd pipeline`: stages chained through checkpoints, each evaluated; mistakes caught before any stage runs."""

import json
from pathlib import Path

import pytest

from opsd.cli import main
from opsd.core.config import load_config
from opsd.core.prompts import PromptConfig
from opsd.stages import pipeline
from opsd.stages.pipeline import add_compression

ROOT = Path(__file__).resolve().parents[2]


def test_tiny_pipeline_writes_a_summary_with_every_field(tmp_path, capsys):
    out = tmp_path / "pipe"
    assert main(["pipeline", str(ROOT / "configs/pipeline-tiny.yaml"), f"run.output_dir={out}", "eval.limit=4"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [r["stage"] for r in summary["rows"]] == ["start", "sft", "rlvr", "opsd"]
    assert [r["start"] for r in summary["rows"]] == ["", "start", "sft", "rlvr"]
    for row in summary["rows"]:
        bench = row["benchmarks"][0]
        for key in ("mean_at_k", "mean_at_k_stderr", "maj_at_k", "response_tokens_mean", "compression",
                    "truncation_rate"):
            assert key in bench
        assert bench["parameters"] > 0 and bench["latency_p50_s"] > 0 and bench["throughput_tokens_per_s"] > 0
    # each stage started from the previous stage's final checkpoint
    config = (out / "rlvr" / "config.yaml").read_text()
    assert str(out / "sft" / "checkpoints" / "step_000020") in config
    assert summary["checkpoints"]["opsd"].endswith("step_000002")
    printed = capsys.readouterr().out
    assert "| opsd | rlvr |" in printed and "| latency p50 s |" in printed


def test_a_mistake_in_a_later_stage_stops_the_pipeline_before_it_starts(tmp_path, capsys):
    out = tmp_path / "pipe"
    code = main(["pipeline", str(ROOT / "configs/pipeline-tiny.yaml"), f"run.output_dir={out}",
                 "stages=[{command: sft, config: configs/sft-tiny.yaml, overrides: "
                 "[data.path=configs/examples/arithmetic-pairs.jsonl]},"
                 " {command: distill, overrides: [loss.kindd=1]}]"])
    assert code == 2 and "loss.kindd" in capsys.readouterr().err
    assert not out.exists()
    code = main(["pipeline", str(ROOT / "configs/pipeline-tiny.yaml"), f"run.output_dir={out}",
                 "stages=[{name: a, command: sft}, {name: b, command: rlvr, start: nowhere}]"])
    assert code == 2 and "'nowhere'" in capsys.readouterr().err


def test_compression_is_against_the_stage_it_started_from():
    rows = [{"stage": "rlvr", "start": "", "benchmarks": [{"response_tokens_mean": 200.0, "mean_at_k": 0.5}]},
            {"stage": "all", "start": "rlvr", "benchmarks": [{"response_tokens_mean": 50.0, "mean_at_k": 0.6}]},
            {"stage": "inc", "start": "rlvr", "benchmarks": [{"response_tokens_mean": 190.0, "mean_at_k": 0.4}]},
            {"stage": "more", "start": "all", "benchmarks": [{"response_tokens_mean": 50.0, "mean_at_k": 0.6}]}]
    add_compression(rows)
    benches = [r["benchmarks"][0] for r in rows]
    assert [b["compression"] for b in benches] == [None, 0.75, pytest.approx(0.05), 0.0]
    assert [b["compression_ratio"] for b in benches] == [None, 4.0, pytest.approx(200 / 190), 1.0]
    # AES by hand: 0.75 + 3 × 0.2 (accuracy up 20%); 0.05 − 5 × 0.2 (down 20%); the same as its start: 0
    assert [b["aes"] for b in benches] == [None, pytest.approx(1.35), pytest.approx(-0.95), 0.0]


def test_each_checkpoint_is_evaluated_with_its_stages_model_options(tmp_path):
    out = tmp_path / "pipe"
    code = main(["pipeline", str(ROOT / "configs/pipeline-tiny.yaml"), f"run.output_dir={out}", "eval.limit=2",
                 "evaluate_start=false", "stages=[{name: sft, command: sft, config: configs/sft-tiny.yaml, overrides: "
                 "[data.path=configs/examples/arithmetic-pairs.jsonl, run.steps=1, model.attn_implementation=eager, "
                 "model.lora_rank=4]}]"])
    assert code == 0
    model = json.loads((out / "eval" / "sft" / "eval.json").read_text())["config"]["model"]
    assert model["attn_implementation"] == "eager" and model["lora_rank"] == 0  # the merged checkpoint, its options
    assert model["name_or_path"].endswith("step_000001")


def test_the_pipeline_shares_the_stages_run_contract(tmp_path, capsys):
    out = tmp_path / "pipe"
    assert main(["pipeline", str(ROOT / "configs/pipeline-tiny.yaml"), f"run.output_dir={out}", "run.steps=5"]) == 2
    assert "run.steps is set per stage" in capsys.readouterr().err and not out.exists()
    assert main(["pipeline", str(ROOT / "configs/pipeline-tiny.yaml"), f"run.output_dir={out}", "--resume"]) == 2
    assert "run.resume" in capsys.readouterr().err and not out.exists()


def test_each_stage_opens_with_a_header_and_its_name_is_on_the_bars(tmp_path, capsys):
    out = tmp_path / "pipe"
    code = main(["pipeline", str(ROOT / "configs/pipeline-tiny.yaml"), f"run.output_dir={out}", "eval.limit=2",
                 "evaluate_start=false", "stages=[{name: warmup, command: sft, config: configs/sft-tiny.yaml, "
                                         "overrides: "
                 "[data.path=configs/examples/arithmetic-pairs.jsonl, run.steps=1]}, {name: compress, command: "
                 "distill, "
                 "config: configs/tiny.yaml, overrides: [run.steps=2, sampling.max_new_tokens=8, "
                 "run.problems_per_step=2]}]"])
    assert code == 0
    err = capsys.readouterr().err
    headers = [line for line in err.splitlines() if line.startswith("opsd pipeline: stage")]
    assert headers == [
        f"opsd pipeline: stage 1/2 'warmup': opsd sft, 1 step from 'start' (builtin:tiny) → {out / 'warmup'}",
        f"opsd pipeline: stage 2/2 'compress': opsd distill, 2 steps from 'warmup' "
        f"({out / 'warmup' / 'checkpoints' / 'step_000001'}) → {out / 'compress'}"]
    frames = err.replace("\n", "\r").split("\r")
    assert any(f.startswith("warmup:") and "1/1" in f for f in frames)
    assert any(f.startswith("compress:") and "2/2" in f for f in frames)
    assert any(f.startswith("eval compress · arithmetic") and "2/2" in f for f in frames)
    assert err.index(headers[1]) < err.index("compress:")


def test_eval_every_follows_accuracy_and_length_along_each_stage(tmp_path, capsys):
    out = tmp_path / "pipe"
    stages = ("stages=[{name: sft, command: sft, config: configs/sft-tiny.yaml, overrides: "
              "[data.path=configs/examples/arithmetic-pairs.jsonl, run.steps=6]}, {name: opsd, command: distill, "
              "config: configs/tiny.yaml, overrides: [run.steps=4, run.save_every=3]}]")
    assert main(["pipeline", str(ROOT / "configs/pipeline-tiny.yaml"), f"run.output_dir={out}", "eval.limit=4",
                 "eval.every=2", "eval.cost.latency_problems=0", stages]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [p["step"] for p in summary["curves"]["sft"]] == [0, 2, 4, 6]
    assert [p["step"] for p in summary["curves"]["opsd"]] == [0, 2, 4]  # eval.every wins over the stage's save_every
    assert summary["curves"]["opsd"][0] == summary["curves"]["sft"][-1] | {"step": 0}  # opsd starts where sft ended
    for stage, step in (("sft", 2), ("sft", 4), ("opsd", 2)):
        row = json.loads((out / "eval" / f"{stage}@{step}" / "row.json").read_text())
        point = next(p for p in summary["curves"][stage] if p["step"] == step)
        assert point["mean_at_k"] == row["benchmarks"][0]["mean_at_k"]
    assert [r["stage"] for r in summary["rows"]] == ["start", "sft", "opsd"]  # the summary rows are unchanged
    assert "| sft | 4 |" in capsys.readouterr().out
    from opsd.stages.report import write_report

    page = write_report(out).read_text()
    assert "Along training (eval.every)" in page
    assert page.count("<table>") == 2 and page.count("<th>step</th>") == 1  # the stage table and the curves table


def test_stage_names_and_eval_every_are_checked_before_anything_runs(tmp_path, capsys):
    out = tmp_path / "pipe"
    for stages, words in [("[{name: opsd@2, command: sft}]", ["'opsd@2'"]), ("[{name: a/b, command: sft}]", ["'a/b'"]),
                          ("[{name: report, command: sft}]", ["'report'"]), ("[{name: eval, command: sft}]",
                                                                             ["'eval'"])]:
        assert main(["pipeline", str(ROOT / "configs/pipeline-tiny.yaml"), f"run.output_dir={out}",
                     f"stages={stages}"]) == 2
        err = capsys.readouterr().err
        assert all(word in err for word in words) and "stage name" in err, err
    for stages in ("[{name: summary.json, command: sft}]", "[{name: config.yaml, command: sft}]"):
        assert main(["pipeline", str(ROOT / "configs/pipeline-tiny.yaml"), f"run.output_dir={out}",
                     f"stages={stages}"]) == 2
        assert "the pipeline's own files" in capsys.readouterr().err
    assert main(["pipeline", str(ROOT / "configs/pipeline-tiny.yaml"), f"run.output_dir={out}", "eval.every=-1"]) == 2
    assert "eval.every" in capsys.readouterr().err
    assert not out.exists()


def test_a_smaller_student_learns_from_an_earlier_stage_as_its_external_teacher(tmp_path, capsys):
    from opsd.core.tiny import save_tiny

    small = save_tiny(tmp_path / "small", hidden_size=32, num_layers=1)  # the same tokenizer as builtin:tiny
    out = tmp_path / "pipe"
    stages = ("stages=[{name: rlvr, command: rlvr, config: configs/rlvr-tiny.yaml, overrides: [run.steps=1]}, "
              "{name: student, command: distill, config: configs/tiny.yaml, start: small, teacher: rlvr, "
              "overrides: [run.steps=2, teacher.context=concise]}]")
    assert main(["pipeline", str(ROOT / "configs/pipeline-tiny.yaml"), f"run.output_dir={out}", "eval.limit=4",
                 "eval.cost.latency_problems=0", f"models=[{{name: small, name_or_path: {small}}}]", stages]) == 0
    summary = json.loads((out / "summary.json").read_text())
    rows = {r["stage"]: r for r in summary["rows"]}
    assert [r["stage"] for r in summary["rows"]] == ["start", "small", "rlvr", "student"]
    # a model is not "the previous stage"
    assert rows["student"]["start"] == "small" and rows["rlvr"]["start"] == "start"
    params = {name: row["benchmarks"][0]["parameters"] for name, row in rows.items()}
    assert params["student"] == params["small"] < params["rlvr"] // 4
    config = (out / "student" / "config.yaml").read_text()
    assert summary["checkpoints"]["rlvr"] in config and str(small) in config  # the teacher: rlvr's final checkpoint
    err = capsys.readouterr()
    assert f"teacher 'rlvr' ({summary['checkpoints']['rlvr']})" in err.err and "| params |" in err.out


def test_models_and_teachers_are_checked_before_anything_runs(tmp_path, capsys):
    out = tmp_path / "pipe"
    base = ["pipeline", str(ROOT / "configs/pipeline-tiny.yaml"), f"run.output_dir={out}"]
    for extra, words in [
        (["stages=[{name: a, command: sft, teacher: start}]"], ["only a distill stage has a teacher"]),
        (["stages=[{name: a, command: distill, teacher: b}, {name: b, command: sft}]"], ["teacher 'b' is not an "
                                                                                         "earlier"]),
        (["stages=[{name: a, command: distill, teacher: start, overrides: [teacher.weights.policy=ema]}]"],
         ["pipeline stage 'a'", "external teacher"]),  # the stage's own checks, before anything runs
        (["stages=[{name: a, command: distill}, {name: b, command: distill, overrides: ['run.report_to=[mlflow]']}]"],
         ["pipeline stage 'b'", "unknown tracker 'mlflow'"]),
        (["stages=[{name: a, command: distill, sweep: {key: model.name_or_path, values: [x, y]}}]"],
         ["set by the pipeline"]),
        (["stages=[{name: a, command: distill, sweep: {key: optim.lr, values: [0.1, 0.1]}}]"], ["repeats a value"]),
        (["models=[{name: m}]", "stages=[{name: a, command: sft}]"], ["model 'm' names no checkpoint"]),
        (["models=[{name: a, name_or_path: x}]", "stages=[{name: a, command: sft}]"], ["named 'a'"]),
    ]:
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert all(word in err for word in words), err
    assert not out.exists()


def test_a_sweep_runs_one_stage_per_value_from_the_same_start(tmp_path, capsys):
    out = tmp_path / "pipe"
    stages = ("stages=[{name: sft, command: sft, config: configs/sft-tiny.yaml, overrides: "
              "[data.path=configs/examples/arithmetic-pairs.jsonl, run.steps=2]}, {name: opsd, command: distill, "
              "config: configs/tiny.yaml, sweep: {key: run.steps, values: [1, 2]}}, "
              "{name: concise, command: distill, config: configs/tiny.yaml, start: sft, overrides: [run.steps=1], "
              "sweep: {key: teacher.concise_instruction, values: ['Be concise.', 'Be brief.']}}]")
    assert main(["pipeline", str(ROOT / "configs/pipeline-tiny.yaml"), f"run.output_dir={out}", "eval.limit=4",
                 "eval.cost.latency_problems=0", stages]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [(r["stage"], r["start"]) for r in summary["rows"]] == [
        ("start", ""), ("sft", "start"), ("opsd-1", "sft"), ("opsd-2", "sft"), ("concise-1", "sft"), ("concise-2",
                                                                                                      "sft")]
    assert summary["checkpoints"]["opsd-1"].endswith("step_000001")
    assert summary["checkpoints"]["opsd-2"].endswith("step_000002")
    import yaml

    instruction = [yaml.safe_load((out / f"concise-{n}" / "config.yaml").read_text())["teacher"]["concise_instruction"]
                   for n in (1, 2)]
    assert instruction == ["Be concise.", "Be brief."]  # values that are no folder names: numbered stages
    assert main(["pipeline", str(ROOT / "configs/pipeline-tiny.yaml"), f"run.output_dir={tmp_path / 'bad'}",
                 "stages=[{name: a, command: sft, sweep: {key: run.steps}}]"]) == 2
    assert "sweep needs a key and at least one value" in capsys.readouterr().err


def test_a_pipeline_of_the_previous_version_resumes(tmp_path):
    """Its config.yaml lacks the keys added since (models, a stage's teacher and sweep) and spells
    run.report_to as run.tensorboard: read through the config class, they compare as defaults."""
    import yaml

    out = tmp_path / "pipe"
    args = ["pipeline", str(ROOT / "configs/pipeline-tiny.yaml"), f"run.output_dir={out}", "eval.limit=4",
            "eval.cost.latency_problems=0", "stages=[{name: sft, command: sft, config: configs/sft-tiny.yaml, "
            "overrides: [data.path=configs/examples/arithmetic-pairs.jsonl, run.steps=2]}]"]
    assert main(args) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    del saved["models"]
    for stage in saved["stages"]:
        del stage["teacher"], stage["sweep"]
    saved["run"]["tensorboard"] = saved["run"].pop("report_to") == ["tensorboard"]
    (out / "config.yaml").write_text(yaml.safe_dump(saved))
    assert main(args) == 0
    assert main([*args, "run.report_to=none"]) == 0  # trackers may change on resume, as for a stage
    assert main([*args, "eval.limit=3"]) == 2  # any other difference is still refused


def test_the_pipelines_evaluations_get_its_prompt_section(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(pipeline, "run_eval", lambda config, name: seen.append(config))
    config = load_config(pipeline.PipelineConfig, None, ["eval.prompt.system_prompt=S",
                                                         "eval.prompt.chat_template_kwargs={enable_thinking: false}"])
    pipeline.evaluate(config, "start", "", config.model, tmp_path, 0.0)
    assert seen[0].prompt == PromptConfig(system_prompt="S", chat_template_kwargs={"enable_thinking": False})
