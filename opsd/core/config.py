"""Typed configs: frozen dataclasses filled from a YAML file plus `key=value` overrides.

Every command has one dataclass (sections are nested dataclasses). Unknown keys and values of the
wrong type are `UserError`s that name the key, so a typo never silently falls back to a default.
YAML is read with the safe loader only. A key typed as a mapping (`dict[str, X]`: prompt.chat_template_kwargs)
takes a YAML mapping of its own, given whole (`{enable_thinking: false}`) or key by key on the command line
(`prompt.chat_template_kwargs.enable_thinking=false`).

The one-line comment at the end of each field's line in the source is that key's documentation:
`describe` reads it (with the type and the command's default) for `opsd CMD --help`, so the help is
generated from the dataclasses and cannot drift from them. `dump_config` is `--print-config`'s YAML.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import json
import re
import shutil
import textwrap
import tokenize
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from opsd.core.errors import UserError

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
    "seed": "run.seed",  # opsd eval's, when it came to share the run section
    "threads": "run.threads",
    "run.tensorboard": "run.report_to (a list of trackers: [tensorboard], [] for none)",
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
    if origin is dict:  # a free-form mapping (prompt.chat_template_kwargs): string keys, values of its value type
        if not isinstance(value, dict):
            raise UserError(f"config key '{key}' must be a mapping, e.g. {{name: value}}, got {value!r}")
        key_hint, value_hint = get_args(hint) or (str, Any)
        return {_coerce(key_hint, k, f"{key} (a key)"): _coerce(value_hint, v, f"{key}.{k}") for k, v in value.items()}
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


# --- the command line's positional arguments ----------------------------------------------------

# `key=value` with a (dotted) key; a path like runs/lr=1e-5/c.yaml is not one
OVERRIDE = re.compile(r"[A-Za-z_][\w.]*=")


def split_arguments(arguments: list[str]) -> tuple[str | None, list[str]]:
    """(config file, overrides) of a command's `[CONFIG] [key=value ...]`: the first argument is the
    config file unless it reads as an override, so `opsd distill data.path=x.jsonl` starts from the
    command's defaults instead of looking for a file named `data.path=x.jsonl`."""
    if arguments and not OVERRIDE.match(arguments[0]):
        return arguments[0], list(arguments[1:])
    return None, list(arguments)


# --- documentation generated from the dataclasses ----------------------------------------------


@dataclasses.dataclass(frozen=True)
class KeyDoc:
    key: str  # dotted: optim.lr, teacher.model.name_or_path, stages[].name (an item of a list of sections)
    kind: str  # INT, FLOAT, BOOL, STR, {a,b}, [STR,...], X|null, section, ...
    default: str  # the command's default as written on the command line ("" for a section)
    comment: str  # the field's one-line comment in the source ("" when it has none)
    leaf: bool  # a key that takes a value (a plain section only groups keys)


def describe(cls: type, instance: Any = None, prefix: str = "") -> list[KeyDoc]:
    """Every key of the config dataclass `cls`, sections walked depth first, with the defaults of
    `instance` (the command's own default, e.g. rlvr's sampling.n=16; default: `cls()`). An optional
    section (`teacher.model`) and a list of sections (`stages`) are keys themselves, followed by the
    keys inside them (with the section class's defaults)."""
    instance = cls() if instance is None else instance
    hints, comments = typing.get_type_hints(cls), field_comments(cls)
    docs = []
    for f in dataclasses.fields(cls):
        key, hint, value, comment = f"{prefix}{f.name}", hints[f.name], getattr(instance, f.name), comments.get(f.name,
                                                                                                                "")
        section = _section_of(hint)
        if dataclasses.is_dataclass(hint):
            docs.append(KeyDoc(key, "section", "", comment, leaf=False))
            docs += describe(hint, value, f"{key}.")
        elif section is not None:
            docs.append(KeyDoc(key, _kind(hint), _flow(value), comment, leaf=True))
            inner = value if isinstance(value, section) else None
            docs += describe(section, inner, f"{key}[]." if get_origin(hint) in (tuple, list) else f"{key}.")
        else:
            docs.append(KeyDoc(key, _kind(hint), _flow(value), comment, leaf=True))
    return docs


def _section_of(hint: Any) -> type | None:
    """The section class inside `X | None` or `tuple[X, ...]`, when X is a dataclass."""
    inner = [arg for arg in get_args(hint) if arg is not type(None) and arg is not Ellipsis]
    if get_origin(hint) in (Union, types.UnionType, tuple,
                            list) and len(inner) == 1 and dataclasses.is_dataclass(inner[0]):
        return inner[0]
    return None


@functools.cache
def field_comments(cls: type) -> dict[str, str]:
    """The comment at the end of each field's line(s) in the source of the dataclass `cls`
    ({} when the source cannot be read)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments = {token.start[0]: token.string.lstrip("#").strip()
                for token in tokenize.generate_tokens(io.StringIO(source).readline) if token.type == tokenize.COMMENT}
    lines = source.splitlines()
    found = {}
    for statement in ast.parse(source).body[0].body:  # type: ignore[attr-defined]
        if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
            last = statement.end_lineno or statement.lineno
            own = [line for line in range(statement.lineno, last + 1) if line in comments][-1:]
            while own and own[-1] < len(lines) and lines[own[-1]].lstrip().startswith("#"):
                own.append(own[-1] + 1)  # a comment continued on the lines below the field
            found[statement.target.id] = " ".join(comments[line] for line in own)
    return found


def _kind(hint: Any) -> str:
    origin, args = get_origin(hint), get_args(hint)
    if origin is Literal:
        return "{" + ",".join(map(str, args)) + "}"
    if origin in (Union, types.UnionType):
        return "|".join("null" if arg is type(None) else _kind(arg) for arg in args)
    if origin in (tuple, list):
        return f"[{_kind(args[0]) if args else 'VALUE'},...]"
    if origin is dict:
        return "{KEY: VALUE,...}"
    if dataclasses.is_dataclass(hint):
        return "section"
    return {bool: "BOOL", int: "INT", float: "FLOAT", str: "STR"}.get(hint, "VALUE")


def _flow(value: Any) -> str:
    """`value` as one would write it after `key=` (YAML flow style; line breaks as \\n)."""
    if isinstance(value, str) and not value.isprintable():
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a double-quoted YAML scalar
    text = yaml.safe_dump(_plain(value), default_flow_style=True, width=float("inf"), allow_unicode=True).strip()
    return text.removesuffix("...").strip()


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return _plain(dataclasses.asdict(value))  # type: ignore[arg-type]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return [_plain(item) for item in value]
    return value


def keys_help(cls: type, width: int | None = None) -> str:
    """The config keys of a command for its `--help`: key=TYPE, comment and default, argparse's layout."""
    width = width or max(60, shutil.get_terminal_size().columns - 2)
    lines = textwrap.wrap("config keys (key=value after CONFIG, or nested sections in the CONFIG file; "
                          "--print-config shows them all resolved):", width)
    for doc in describe(cls):
        head = f"  {doc.key}={doc.kind}" if doc.leaf else f"  {doc.key}.*"
        text = " ".join(part for part in (doc.comment, f"(default: {_short(doc.default)})" if doc.leaf else "") if part)
        text = text or "(section)"
        body = textwrap.wrap(text, width - 24, break_long_words=False, break_on_hyphens=False) or [""]
        if len(head) <= 22:
            lines.append(f"{head:<24}{body[0]}".rstrip())
            body = body[1:]
        else:
            lines.append(head)
        lines += [" " * 24 + line for line in body]
    return "\n".join(lines)


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def dump_config(config: Any) -> str:
    """The resolved config as YAML that `load_config` reads back to the same config."""
    return yaml.safe_dump(_plain(config), sort_keys=False, allow_unicode=True, width=float("inf"))
