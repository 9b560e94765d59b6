"""MkDocs hook: the pages generated from the code at build time, so that they cannot drift from it.

- reference/config.md: every config key of every command — type, the command's own default and the field's
  one-line comment — from the same walk over the config dataclasses that `opsd CMD --help` prints
  (`opsd.core.config.describe`);
- reference/metrics.md: every metric of metrics.jsonl, from the table in `opsd/runtime/metrics.py`.

mkdocs.yml names this file under `hooks:`; tests/test_docs.py imports it to check the same pages.
"""

from __future__ import annotations

COMMANDS = ("sft", "rlvr", "distill", "eval", "pipeline")


def _cell(text: str) -> str:
    """Text for a Markdown table cell: pipes escaped, line breaks as spaces."""
    return " ".join(text.split()).replace("|", "\\|")


def _code(text: str) -> str:
    """A table cell's code span (backticks inside the value get a wider fence)."""
    if not text:
        return ""
    fence = "``" if "`" in text else "`"
    return f"{fence}{_cell(text)}{fence}"


def config_reference() -> str:
    from opsd.cli import CONFIGURED, command
    from opsd.core.config import describe

    lines = ["# Config reference", "",
             "Generated from the config dataclasses when the site is built, by the same code that prints "
             "`opsd CMD --help`: every key, its type, the command's own default and the comment on its line in the "
             "source. A key is set in the YAML file (nested sections) or on the command line as `key=value` "
             "(see [Configs](../commands/index.md#configs)). Types: `INT`, `FLOAT`, `BOOL`, `STR`, `{a,b}` one "
             "of the listed values, `[X,...]` a list, `X|null` optional, `section` a group of keys.", ""]
    lines += [f"- [`opsd {name}`](#{name})" for name in COMMANDS]
    for name in COMMANDS:
        cls = command(name)[0]
        lines += ["", f"## `opsd {name}` {{#{name}}}", "",
                  f"{CONFIGURED[name][0].capitalize()}; the config class is `{cls.__module__}.{cls.__name__}`.", "",
                  "| key | type | default | what it is |", "|---|---|---|---|"]
        for doc in describe(cls):
            key = f"**`{doc.key}`**" if not doc.leaf else _code(doc.key)
            lines.append(f"| {key} | {_code(doc.kind)} | {_code(doc.default) if doc.leaf else ''} | "
                         f"{_cell(doc.comment)} |")
    return "\n".join(lines) + "\n"


def metrics_reference() -> str:
    from opsd.runtime.metrics import METRICS

    lines = ["# Metrics reference", "",
             "Generated from the table `METRICS` in `opsd/runtime/metrics.py` when the site is built. Each training "
             "stage writes one JSON line per step to `RUN/metrics.jsonl` (a value that is not finite is written as "
             "`null`) and gives the same numbers to the trackers of `run.report_to`. Under torchrun every number "
             "describes the whole step: counts summed over the processes, means weighted by what they average over, "
             "maxima over all, times the slowest process's ([Running at scale](../scale.md)). The progress bar "
             "shows a few of them (distill: `div`, `acc`, `len`; rlvr: `reward`, `acc`, `len`; sft: `nll`).", "",
             "| metric | logged by | what it is |", "|---|---|---|"]
    lines += [f"| `{name}` | {commands} | {_cell(text)} |" for name, (commands, text) in METRICS.items()]
    return "\n".join(lines) + "\n"


PAGES = {"reference/config.md": config_reference, "reference/metrics.md": metrics_reference}


def on_files(files, config):
    from mkdocs.structure.files import File

    for uri, make in PAGES.items():
        files.append(File.generated(config, uri, content=make()))
    return files
