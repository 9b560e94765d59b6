"""The documentation: the generated references hold every config key with its comment and every metric the
stages log; the site builds with warnings as errors; every `opsd ...` command line in a code block of the README
or a docs page names a real command, real options and real config keys; every example config under configs/
loads (`--print-config`); the built home page and a command page open in headless Chromium, not blank, with no
console error (skipped where MkDocs or Chromium is absent)."""

import functools
import http.server
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import opsd.cli
from opsd.cli import CONFIGURED, main
from opsd.core.config import describe

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
CHROME = shutil.which("chromium-headless-shell") or shutil.which("chromium") or shutil.which("chromium-browser")
HAS_MKDOCS = importlib.util.find_spec("mkdocs") is not None and importlib.util.find_spec("material") is not None


def hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- the config reference ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", list(CONFIGURED))
def test_every_config_key_has_a_comment(command):
    missing = [doc.key for doc in describe(opsd.cli.command(command)[0]) if not doc.comment]
    assert not missing, f"opsd {command}: config keys without a comment on their line in the source: {missing}"


def test_the_config_reference_lists_every_key_of_every_command():
    page = hooks().config_reference()
    for command in CONFIGURED:
        assert f"## `opsd {command}` {{#{command}}}" in page
        for doc in describe(opsd.cli.command(command)[0]):
            assert f"`{doc.key}`" in page, (command, doc.key)
    assert "| `sampling.n` | `INT` | `16` | samples per problem |" in page  # rlvr's own default


# --- the metrics reference ---------------------------------------------------------------------------------------


def logged_metrics(tmp_path) -> set[str]:
    """The names sft, rlvr and distill write to metrics.jsonl in one step each on the tiny model."""
    examples = ROOT / "configs" / "examples"
    runs = {
        "sft": [str(ROOT / "configs/sft-tiny.yaml"), f"data.path={examples / 'arithmetic-pairs.jsonl'}"],
        "rlvr": [str(ROOT / "configs/rlvr-tiny.yaml"), "grpo.kl_coef=0.1"],
        "distill": [str(ROOT / "configs/tiny.yaml"), "teacher.context=purified", "loss.kind=jsd"],
    }
    names = set()
    for command, args in runs.items():
        out = tmp_path / command
        assert main([command, *args, "run.steps=1", "run.problems_per_step=2", "run.report_to=[]",
                     f"run.output_dir={out}"]) == 0
        for line in (out / "metrics.jsonl").read_text().splitlines():
            names |= set(json.loads(line))
    return names


def test_the_metrics_table_describes_what_the_stages_log_and_nothing_else(tmp_path, monkeypatch):
    from opsd.runtime.metrics import METRICS

    monkeypatch.chdir(ROOT)
    logged = logged_metrics(tmp_path)
    undescribed = logged - set(METRICS)
    assert not undescribed, f"logged but not described in opsd/runtime/metrics.py METRICS: {undescribed}"
    source = "\n".join(path.read_text() for path in (ROOT / "opsd").rglob("*.py") if path.name != "metrics.py")
    stale = [name for name in set(METRICS) - logged if f'"{name}"' not in source]
    assert not stale, f"described in METRICS but written by no code: {stale}"
    page = hooks().metrics_reference()
    assert all(f"| `{name}` |" in page for name in METRICS)


# --- command lines in the README and the docs --------------------------------------------------------------------


def command_lines() -> list[tuple[str, str]]:
    """(file, command line) of every `opsd ...` or `... -m opsd.cli ...` line in a fenced code block."""
    found = []
    for path in [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]:
        text = path.read_text(encoding="utf-8")
        for block in re.findall(r"^ *```(?:bash|sh)?\n(.*?)^ *```", text, flags=re.S | re.M):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" #", 1)[0].strip()
                if line.startswith("opsd ") or " -m opsd.cli " in line:
                    found.append((str(path.relative_to(ROOT)), line))
    return found


LINES = command_lines()


def test_the_docs_hold_command_lines_to_check():
    files = {name for name, _ in LINES}
    assert "README.md" in files and "docs/getting-started.md" in files and len(LINES) > 20


@pytest.mark.parametrize("where,line", LINES, ids=[f"{name}:{i}" for i, (name, _) in enumerate(LINES)])
def test_every_command_line_in_the_docs_parses(where, line, monkeypatch, capsys):
    """The subcommand, its flags and (for a command with a config) the config file and keys: `--print-config`
    loads the config and stops. Placeholders (CONFIG) stand for the tiny example; files a reader brings
    (train.jsonl, a model) are not opened."""
    monkeypatch.chdir(ROOT)
    args = shlex.split(line)
    args = args[args.index("opsd.cli") + 1:] if "opsd.cli" in args else args[1:]
    args = ["configs/tiny.yaml" if arg == "CONFIG" else arg for arg in args]
    monkeypatch.setattr(opsd.cli, "_demo", lambda parsed: 0)
    monkeypatch.setattr("opsd.stages.report.write_report", lambda folder: folder)
    if args[0] in CONFIGURED and "--help" not in args:
        args = [*args, "--print-config"]
    try:
        code = main(args)
    except SystemExit as exit_:  # --help
        code = exit_.code
    assert code == 0, f"{where}: {line}\n{capsys.readouterr().err}"


# --- every example config loads ----------------------------------------------------------------------------------

CONFIG_COMMAND = {"tiny": "distill", "sft-tiny": "sft", "rlvr-tiny": "rlvr", "pipeline-tiny": "pipeline",
                  "rlvr_dapo": "rlvr", "eval_math": "eval"}


@pytest.mark.parametrize("path", sorted((ROOT / "configs").rglob("*.yaml")), ids=lambda p: p.stem)
def test_every_example_config_prints_as_its_command_reads_it(path, capsys):
    command = CONFIG_COMMAND.get(path.stem, "distill")
    assert main([command, str(path), "--print-config"]) == 0, capsys.readouterr().err
    assert "run:" in capsys.readouterr().out


@pytest.mark.parametrize("command", list(CONFIGURED))
def test_help_of_every_command(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0 and "config keys" in capsys.readouterr().out


# --- the site ----------------------------------------------------------------------------------------------------


@functools.cache
def built_site(folder: str) -> Path:
    site = Path(folder) / "site"
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return site


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    if not HAS_MKDOCS:
        pytest.skip("MkDocs is not installed (pip install -e '.[docs]')")
    return built_site(str(tmp_path_factory.mktemp("docs")))


def test_the_site_builds_strict_with_the_generated_references(site):
    assert (site / "index.html").is_file() and (site / "commands" / "distill.html").is_file()
    config = (site / "reference" / "config.html").read_text()
    assert "teacher.concise_instruction" in config and "stages[].command" in config
    assert "rollout/logprob_gap" in (site / "reference" / "metrics.html").read_text()


def test_a_broken_link_fails_the_strict_build(tmp_path):
    if not HAS_MKDOCS:
        pytest.skip("MkDocs is not installed")
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text("# Home\n\n[a page that is not there](missing.md)\n")
    (tmp_path / "mkdocs.yml").write_text("site_name: t\nstrict: true\n")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0 and "missing.md" in done.stderr


def dark_share(png) -> float:
    """Share of a screenshot's pixels that are not near white: text, headers, tables."""
    import matplotlib.image

    rgb = matplotlib.image.imread(png)[..., :3]
    return float((rgb.min(axis=-1) < 0.8).mean())


@pytest.mark.skipif(CHROME is None, reason="no headless Chromium (Debian: chromium-headless-shell)")
def test_the_home_page_and_a_command_page_open_in_headless_chromium(site, tmp_path):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    (site / "blank.html").write_text("<!doctype html><html><body></body></html>")

    def open_page(page):
        shot = tmp_path / f"{page.replace('/', '_')}.png"
        done = subprocess.run([CHROME, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                               "--v=0", "--window-size=1280,1600", "--virtual-time-budget=5000", f"--screenshot={shot}",
                               f"http://127.0.0.1:{server.server_port}/{page}"],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        return shot, [line for line in done.stderr.splitlines() if ":CONSOLE" in line]

    try:
        for page in ("index.html", "commands/distill.html"):
            shot, console = open_page(page)
            assert console == [], (page, console)
            assert dark_share(shot) > 0.02, page
        assert dark_share(open_page("blank.html")[0]) < 0.001  # the check above can fail
    finally:
        server.shutdown()
