"""Typed configs: frozen dataclasses filled from a YAML file plus `key=value` overrides.

Every command has one dataclass (sections are nested dataclasses). Unknown keys and values of the
wrong type are `UserError`s that name the key, so a typo never silently falls back to a default.
YAML is read with the safe loader only.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from opsd.errors import UserError

T = TypeVar("T")


def load_config(cls: type[T], path: str | Path | None, overrides: list[str]) -> T:
    """Build `cls` from the YAML file at `path` (optional) and `a.b=value` overrides, in that order.

    Every key not given keeps the command's default, also inside a section: a section is built by
    replacing the given keys of the command's default instance of it (`opsd rlvr ...
    sampling.temperature=0.8` keeps rlvr's `sampling.n=16`), never rebuilt from the section class."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = read_yaml(Path(path))
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep or not key:
            raise UserError(f"override '{override}' is not of the form key=value")
        _set_dotted(raw, key.strip(), _parse_value(text))
    return build(cls, raw, prefix="")


def _parse_value(text: str) -> Any:
    """A YAML scalar (numbers, booleans, null, lists); text that is not valid YAML stays a string."""
    if not text.strip():
        return ""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"config file {path}{where} is not valid YAML: {getattr(err, 'problem', err)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of keys to values")
    return data


def to_dict(config: Any) -> dict[str, Any]:
    """The resolved config as plain data, for saving next to a run."""
    return dataclasses.asdict(config)


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"override '{key}': '{part}' is not a section")
        node = child
    node[leaf] = value


def build(cls: type[T], raw: Any, prefix: str, base: T | None = None) -> T:
    """Check `raw` against the dataclass `cls` field by field and return `base` (default: `cls()`)
    with the given fields replaced; nested sections start from `base`'s own instances."""
    where = prefix.rstrip(".") or "the config"
    if not isinstance(raw, dict):
        raise UserError(f"'{where}' must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(raw) - names)
    if unknown:
        key = f"{prefix}{unknown[0]}"
        if key in MOVED:
            raise UserError(f"config key '{key}' is now '{MOVED[key]}'")
        raise UserError(f"unknown config key '{key}' (known in {where}: {', '.join(sorted(names))})")
    base = cls() if base is None else base
    values = {name: _coerce(hints[name], raw[name], f"{prefix}{name}", getattr(base, name)) for name in raw}
    return dataclasses.replace(base, **values)


# keys renamed when the stages came to share one run config; their old spelling is refused with the new one
MOVED = {
    "run.grader_timeout_s": "verifier.timeout_s",
    "run.chunk_size": "optim.chunk_size",
    "loss.chunk_size": "optim.chunk_size",
    "run.sequences_per_step": "run.problems_per_step",
    "output_dir": "run.output_dir",
    "overwrite": "run.overwrite",
    "resume": "run.resume",
    "device": "run.device",
}


def _coerce(hint: Any, value: Any, key: str, default: Any = None) -> Any:
    """`value` checked against the type `hint`; a section (dataclass) starts from `default` when it
    is an instance of that section."""
    origin = get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, prefix=f"{key}.", base=default if isinstance(default, hint) else None)
    if origin is Literal:
        choices = get_args(hint)
        if value not in choices:
            raise UserError(f"config key '{key}' must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if origin in (Union, types.UnionType):
        options = get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, key, default)
            except UserError as err:
                errors.append(str(err))
        raise UserError(errors[0] if len(errors) == 1 else f"config key '{key}' has the wrong type: {value!r}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise UserError(f"config key '{key}' must be a list, got {value!r}")
        (item,) = get_args(hint)[:1] or (Any,)
        return tuple(_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value))
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-6 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise UserError(f"config key '{key}' must be {getattr(hint, '__name__', hint)}, got {value!r}")
