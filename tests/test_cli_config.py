"""Options a user can find without reading the source: `--help` lists every config key (type,
default, the field's comment) of every command, walked here over the dataclasses themselves so that a
new field without a comment, or missing from the help, fails; `--print-config` prints YAML that loads
back to the same config and runs nothing; a `key=value` first argument is an override, not a file;
`run.threads` (eval: `threads`) reaches torch."""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import typing
from pathlib import Path
from typing import get_args, get_origin

import pytest
import torch
import yaml

from opsd.cli import main
from opsd.core.config import load_config, split_arguments
from opsd.core.errors import UserError
from opsd.runtime import runs
from opsd.runtime.folders import mark
from opsd.runtime.runs import check_same_config, save_config, use_threads
from opsd.stages.distill import DistillConfig
from opsd.stages.eval import EvalConfig
from opsd.stages.pipeline import PipelineConfig, plan
from opsd.stages.rlvr import RLVRConfig
from opsd.stages.sft import SFTConfig

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {"distill": DistillConfig, "sft": SFTConfig, "rlvr": RLVRConfig, "eval": EvalConfig,
            "pipeline": PipelineConfig}
# a config file and overrides per command, so the round trip meets sections, lists, null and text with line breaks
GIVEN = {
    "distill": [str(ROOT / "configs/tiny.yaml"), "loss.clip_tau=0.05", "optim.betas=[0.8,0.95]",
                "teacher.model.name_or_path=builtin:tiny", "teacher.device=cpu"],
    "sft": [str(ROOT / "configs/sft-tiny.yaml"), "data.path=pairs.jsonl", "optim.lr=1e-5"],
    "rlvr": [str(ROOT / "configs/rlvr-tiny.yaml"), "sampling.n=3", "run.threads=2"],
    "eval": ["data=[a.jsonl,b.jsonl]", "responses=r.jsonl", "reflective_markers=[wait]", "run.threads=1"],
    "pipeline": [str(ROOT / "configs/pipeline-tiny.yaml"), "eval.limit=4", "run.threads=1"],
}


def documented_fields(cls: type, prefix: str = ""):
    """(dotted key, field comment in the source, is a plain section) of every field, walked into
    sections, optional sections (`teacher.model.*`) and lists of sections (`stages[].*`)."""
    hints = typing.get_type_hints(cls)
    source = inspect.getsource(cls)
    for f in dataclasses.fields(cls):
        key, hint = f"{prefix}{f.name}", hints[f.name]
        line = re.search(rf"^\s+{f.name}:.*$", source, re.M).group(0)
        comment = line.split("  # ", 1)[1].strip() if "  # " in line else ""
        yield key, comment, dataclasses.is_dataclass(hint)
        inner = [arg for arg in (hint, *get_args(hint)) if dataclasses.is_dataclass(arg)]
        if inner:
            yield from documented_fields(inner[0], f"{key}[]." if get_origin(hint) is tuple else f"{key}.")


def help_of(command: str, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def flat(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize("command", COMMANDS)
def test_help_lists_every_field_with_its_comment(command, capsys):
    text = flat(help_of(command, capsys))
    for key, comment, section in documented_fields(COMMANDS[command]):
        if section:
            assert f"{key}.*" in text, (command, key)
        else:
            assert comment, f"{command}: config field {key} has no comment in the source (the help's documentation)"
            assert f" {key}=" in text, (command, key)
        assert flat(comment) in text, (command, key, comment)


def test_help_shows_types_and_the_commands_own_defaults(capsys):
    rlvr = help_of("rlvr", capsys)
    assert re.search(r"sampling\.n=INT\s+samples per problem \(default: 16\)", rlvr)
    assert "run.threads=INT|null" in rlvr and "optim.lr=FLOAT" in rlvr
    distill = flat(help_of("distill", capsys))
    assert "teacher.context={reference,answer,concise,template,memo,purified}" in distill
    assert "teacher.model=section|null" in distill and "teacher.model.name_or_path=STR" in distill
    assert "optim.betas=[FLOAT,...]" in distill and "(default: [0.9, 0.999])" in distill
    assert "stages[].command={sft,rlvr,distill}" in flat(help_of("pipeline", capsys))


@pytest.mark.parametrize("command", COMMANDS)
def test_print_config_loads_back_to_the_same_config(command, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main([command, "--print-config", *GIVEN[command]]) == 0
    printed = capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []  # nothing ran, nothing was written
    path, overrides = split_arguments(GIVEN[command])
    expected = load_config(COMMANDS[command], path, overrides)
    (tmp_path / "printed.yaml").write_text(printed, encoding="utf-8")
    assert load_config(COMMANDS[command], tmp_path / "printed.yaml", []) == expected
    assert main([command, "--print-config"]) == 0  # the defaults too
    (tmp_path / "defaults.yaml").write_text(capsys.readouterr().out, encoding="utf-8")
    assert load_config(COMMANDS[command], tmp_path / "defaults.yaml", []) == COMMANDS[command]()


def test_print_config_shows_resume_and_options_after_flags(capsys):
    assert main(["distill", str(ROOT / "configs/tiny.yaml"), "--print-config", "--resume", "run.steps=3"]) == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["run"]["resume"] is True and config["run"]["steps"] == 3
    assert config["model"]["name_or_path"] == "builtin:tiny"


def test_a_key_value_first_argument_is_an_override_not_a_file(tmp_path, capsys):
    assert main(["distill", "--print-config", "data.path=mine.jsonl", "run.steps=2"]) == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["data"]["path"] == "mine.jsonl" and config["run"]["steps"] == 2
    assert config["optim"]["chunk_size"] == DistillConfig().optim.chunk_size  # distill's own defaults
    out = tmp_path / "run"
    assert main(["sft", f"data.path={tmp_path / 'none.jsonl'}", f"run.output_dir={out}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "none.jsonl does not exist" in err and "config file" not in err and not out.exists()


def test_split_arguments():
    assert split_arguments([]) == (None, [])
    assert split_arguments(["c.yaml", "a=1"]) == ("c.yaml", ["a=1"])
    assert split_arguments(["data.path=x.jsonl", "b=2"]) == (None, ["data.path=x.jsonl", "b=2"])
    assert split_arguments(["runs/lr=1e-5/config.yaml"]) == ("runs/lr=1e-5/config.yaml", [])  # a path, not a key
    assert split_arguments(["justakey"]) == ("justakey", [])  # refused as a missing config file


def test_a_config_path_holding_an_equals_sign_is_read(tmp_path, capsys):
    folder = tmp_path / "lr=1e-5"
    folder.mkdir()
    (folder / "c.yaml").write_text("run:\n  steps: 7\n")
    assert main(["sft", "--print-config", str(folder / "c.yaml")]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["run"]["steps"] == 7


# --- run.threads -----------------------------------------------------------------------------


def test_use_threads_sets_torch_and_none_leaves_it(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    use_threads(None)
    use_threads(3)
    assert calls == [3]
    with pytest.raises(UserError, match="run.threads must be at least 1"):
        use_threads(0)
    with pytest.raises(UserError, match="^threads must be"):
        use_threads(-1, "threads")


def test_run_threads_reaches_torch_in_a_training_command_and_eval(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    assert main(["distill", str(ROOT / "configs/tiny.yaml"), "run.threads=1", "run.steps=1", "run.problems_per_step=2",
                 "sampling.max_new_tokens=4", "run.report_to=[]", f"run.output_dir={tmp_path / 'run'}"]) == 0
    assert calls == [1]
    responses = tmp_path / "r.jsonl"
    responses.write_text(json.dumps({"id": "arith_000", "response": "The answer is 54."}) + "\n")
    scoring = [f"data=[{ROOT / 'configs/examples/arithmetic.jsonl'}]", "limit=1", f"responses={responses}"]
    assert main(["eval", *scoring, "run.threads=2", f"run.output_dir={tmp_path / 'eval'}"]) == 0
    assert calls == [1, 2]
    capsys.readouterr()
    assert main(["eval", *scoring, "run.threads=0", f"run.output_dir={tmp_path / 'eval0'}"]) == 2
    assert "threads must be at least 1" in capsys.readouterr().err and calls == [1, 2]


def test_a_pipelines_threads_go_to_every_stage_and_may_change_on_resume(tmp_path):
    config = load_config(PipelineConfig, ROOT / "configs/pipeline-tiny.yaml", ["run.threads=2"])
    assert [stage_config.run.threads for _, _, stage_config in plan(config, tmp_path)] == [2, 2, 2]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    mark(run_dir, "run")
    saved = dataclasses.asdict(DistillConfig())
    save_config(run_dir, saved)
    changed = dataclasses.asdict(load_config(DistillConfig, None, ["run.threads=1"]))
    check_same_config(run_dir, changed, runs.CHANGEABLE_ON_RESUME)  # a speed knob, not another run


def test_demo_threads_go_through_the_same_function(tmp_path, monkeypatch, capsys):
    def stop(*args):
        raise UserError("stopped before running")

    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    monkeypatch.setattr("opsd.demo.demo.run_demo", stop)
    assert main(["demo", "--threads", "3", "--output-dir", str(tmp_path / "demo")]) == 2
    assert calls == [3] and "stopped before running" in capsys.readouterr().err
    assert main(["demo", "--threads", "0", "--output-dir", str(tmp_path / "demo")]) == 2
    assert "--threads must be at least 1" in capsys.readouterr().err and calls == [3]
