"""Setting one key of a section keeps every other key at the command's default (also when a command's
default for a section differs from the section class's: rlvr's sampling.n=16, sft's optim.lr=1e-5,
eval's sampling), through overrides and through YAML files alike. Table-driven over every command and
every field of every section."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal, get_args, get_origin

import pytest
import yaml

from opsd.core.config import load_config
from opsd.core.errors import UserError
from opsd.stages.distill import DistillConfig
from opsd.stages.eval import EvalConfig
from opsd.stages.pipeline import PipelineConfig
from opsd.stages.rlvr import RLVRConfig
from opsd.stages.sft import SFTConfig

COMMANDS = {"distill": DistillConfig, "sft": SFTConfig, "rlvr": RLVRConfig, "eval": EvalConfig,
            "pipeline": PipelineConfig}


def leaves(instance: Any, cls: type, prefix: str = ""):
    """(dotted key, type hint, default value) of every leaf field, sections walked recursively."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(instance):
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            yield from leaves(value, type(value), f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", hints[f.name], value


def another_value(hint: Any, value: Any):
    """A valid value of type `hint` that differs from `value`; None when the type allows no other."""
    origin = get_origin(hint)
    if origin is Literal:
        return next((choice for choice in get_args(hint) if choice != value), None)
    if origin in (typing.Union, __import__("types").UnionType):
        options = [o for o in get_args(hint) if o is not type(None)]
        if any(dataclasses.is_dataclass(o) for o in options):
            return None  # an optional section (teacher.model): setting it is not "one key"
        return another_value(options[0], value if value is not None else (0 if options[0] in (int, float) else ""))
    if origin is tuple:
        (item,) = get_args(hint)[:1]
        if dataclasses.is_dataclass(item):
            return [{}]
        return [0.5, 0.5] if item is float else [7] if item is int else ["some.jsonl"]
    if origin is dict:
        return {**value, "enable_thinking": not value.get("enable_thinking", True)}
    if hint is bool:
        return not value
    if hint is int:
        return value + 1
    if hint is float:
        return value + 0.25
    if hint is str:
        return value + "x"
    raise AssertionError(f"no test value for {hint}")


def get(config: Any, key: str):
    for part in key.split("."):
        config = getattr(config, part)
    return config


CASES = [(command, key, another_value(hint, value))
         for command, cls in COMMANDS.items() for key, hint, value in leaves(cls(), cls)]
CASES = [case for case in CASES if case[2] is not None]


def test_the_table_covers_every_command_and_the_reported_defects():
    keys = {(command, key) for command, key, _ in CASES}
    assert ("rlvr", "sampling.temperature") in keys and ("sft", "optim.warmup_steps") in keys
    assert ("eval", "sampling.top_p") in keys and ("pipeline", "eval.sampling.n") in keys
    assert len(CASES) > 150


def flow(value) -> str:
    """`value` as written after `key=` (YAML flow style)."""
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


@pytest.mark.parametrize(("command", "key", "value"), CASES, ids=[f"{c}:{k}" for c, k, _ in CASES])
def test_setting_one_key_keeps_every_other_key_at_the_commands_default(command, key, value):
    cls = COMMANDS[command]
    default = cls()
    config = load_config(cls, None, [f"{key}={flow(value)}"])
    assert get(config, key) != get(default, key)
    for other, _, expected in leaves(default, cls):
        if other != key:
            assert get(config, other) == expected, f"{command} {key}={value!r} changed {other}"


@pytest.mark.parametrize(("command", "section", "key", "kept"), [
    ("rlvr", "sampling", "temperature: 0.8", {"sampling.n": 16}),
    ("sft", "optim", "warmup_steps: 10", {"optim.lr": 1e-5, "optim.micro_batch_size": 16}),
    ("eval", "sampling", "top_p: 0.9", {"sampling.n": 4, "sampling.temperature": 0.6, "sampling.max_new_tokens": 4096}),
    ("distill", "optim", "lr: 0.001", {"optim.chunk_size": 256}),
])
def test_a_yaml_section_starts_from_the_commands_default(tmp_path, command, section, key, kept):
    path = tmp_path / "config.yaml"
    path.write_text(f"{section}:\n  {key}\n")
    config = load_config(COMMANDS[command], path, [])
    for name, value in kept.items():
        assert get(config, name) == value


def test_a_moved_key_names_its_new_place():
    with pytest.raises(UserError, match="'run.grader_timeout_s' is now 'verifier.timeout_s'"):
        load_config(DistillConfig, None, ["run.grader_timeout_s=3"])
    with pytest.raises(UserError, match="'resume' is now 'run.resume'"):
        load_config(PipelineConfig, None, ["resume=true"])
