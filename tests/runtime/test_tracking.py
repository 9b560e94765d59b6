"""`run.report_to`: each tracker gets every step's metrics (wandb and trackio in their offline modes,
in a child process so that their environment variables are read fresh), a resumed run continues the
same wandb run, and bad or missing trackers are refused before any folder is made."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from opsd.cli import main
from opsd.core.errors import UserError
from opsd.runtime.folders import TRACKIO_NAME, WANDB_ID, foreign_entry
from opsd.runtime.tracking import check_trackers

ROOT = Path(__file__).resolve().parents[2]


def sft_args(tmp_path: Path, out: Path, *extra: str) -> list[str]:
    rows = [json.loads(line) for line in (ROOT / "configs/examples/arithmetic.jsonl").read_text().splitlines()]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"problem": r["problem"], "response": r["solution"]}) + "\n" for r in rows))
    return ["sft", str(ROOT / "configs/sft-tiny.yaml"), f"data.path={pairs}", f"run.output_dir={out}",
            "run.problems_per_step=4", "optim.micro_batch_size=4", "run.threads=1", *extra]


def run_cli(args: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "opsd.cli", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env}, cwd=ROOT)


def metric_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_wandb_offline_gets_every_step_and_a_resumed_run_continues_it(tmp_path):
    pytest.importorskip("wandb")
    out = tmp_path / "run"
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_PROJECT": "opsd-test"}
    done = run_cli(sft_args(tmp_path, out, "run.steps=2", "run.report_to=wandb"), **env)
    assert done.returncode == 0, done.stderr[-2000:]
    run_id = (out / "wandb" / WANDB_ID).read_text().strip()
    first, = sorted((out / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    data = first.read_bytes()
    # the records hold our metric names and one history row per step
    for key in metric_rows(out)[0]:
        if key != "step":
            assert key.encode() in data, key
    assert data.count(b"loss/nll") >= 2
    assert foreign_entry(out) is None  # wandb's folder is part of the run (overwrite may replace it)
    mine = out / "wandb" / "mine.txt"
    mine.write_text("a user's file")
    assert foreign_entry(out) == mine  # but not what someone else put there
    mine.unlink()

    resumed = run_cli(sft_args(tmp_path, out, "run.steps=3", "run.report_to=[wandb]"), **env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (out / "wandb" / WANDB_ID).read_text().strip() == run_id
    assert len(sorted((out / "wandb").glob(f"offline-run-*-{run_id}"))) >= 1
    assert [r["step"] for r in metric_rows(out)] == [1, 2, 3]


def test_trackio_gets_every_step_in_its_local_database(tmp_path):
    pytest.importorskip("trackio")
    store, env = tmp_path / "trackio", {"TRACKIO_DIR": str(tmp_path / "trackio"), "TRACKIO_PROJECT": "opsd-test"}

    def rows(name: str) -> list[tuple]:
        with sqlite3.connect(store / "opsd-test.db") as db:
            return db.execute("SELECT step, metrics FROM metrics WHERE run_name = ? ORDER BY step", (name,)).fetchall()

    out = tmp_path / "pipeline-a" / "run"
    done = run_cli(sft_args(tmp_path, out, "run.steps=2", "run.report_to=[trackio, tensorboard]"), **env)
    assert done.returncode == 0, done.stderr[-2000:]
    name = (out / TRACKIO_NAME).read_text().strip()
    assert name.startswith("pipeline-a-run-") and [step for step, _ in rows(name)] == [1, 2]
    resumed = run_cli(sft_args(tmp_path, out, "run.steps=3", "run.report_to=trackio"), **env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [step for step, _ in rows(name)] == [1, 2, 3]  # the resumed run continues its trackio run
    for ours, (_, theirs) in zip(metric_rows(out), rows(name)):
        assert json.loads(theirs)["loss/nll"] == pytest.approx(ours["loss/nll"])
    # another run whose folders have the same names is a run of its own
    other = tmp_path / "elsewhere" / "pipeline-a" / "run"
    assert run_cli(sft_args(tmp_path, other, "run.steps=1", "run.report_to=trackio"), **env).returncode == 0
    assert (other / TRACKIO_NAME).read_text().strip() != name and [step for step, _ in rows(name)] == [1, 2, 3]


def test_wandb_online_without_a_login_is_refused_up_front(tmp_path):
    pytest.importorskip("wandb")
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    result = subprocess.run([sys.executable, "-m", "opsd.cli", *sft_args(tmp_path, out, "run.steps=1",
                                                                         "run.report_to=wandb")],
                            capture_output=True, text=True, timeout=300, cwd=ROOT, stdin=subprocess.DEVNULL,
                            env={**env, "HOME": str(tmp_path), "NETRC": str(tmp_path / "no-netrc")})
    assert result.returncode == 2 and "wandb, which has no login here" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_no_tracker_writes_no_tracker_files(tmp_path):
    out = tmp_path / "run"
    assert main(sft_args(tmp_path, out, "run.steps=1", "run.report_to=none")) == 0
    assert not (out / "tensorboard").exists() and not (out / "wandb").exists()


def test_bad_trackers_are_refused_before_any_folder(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert main(sft_args(tmp_path, out, "run.steps=1", "run.report_to=[mlflow]")) == 2
    assert "run.report_to: unknown tracker 'mlflow'" in capsys.readouterr().err and not out.exists()
    assert main(sft_args(tmp_path, out, "run.steps=1", "run.tensorboard=false")) == 2
    assert "'run.tensorboard' is now 'run.report_to" in capsys.readouterr().err and not out.exists()
    import opsd.runtime.tracking

    monkeypatch.setattr(opsd.runtime.tracking.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=re.escape("run.report_to lists wandb, which is not installed: pip install "
                                                  "'opsd[wandb]'")):
        check_trackers(("wandb",))
    check_trackers(("tensorboard",))  # listed by default: skipped where missing, never refused


def test_a_wandb_folder_without_our_run_id_is_foreign(tmp_path):
    out = tmp_path / "run"
    assert main(sft_args(tmp_path, out, "run.steps=1", "run.report_to=[]")) == 0
    (out / "wandb").mkdir()
    (out / "wandb" / "notes.txt").write_text("mine")
    assert foreign_entry(out) == out / "wandb"
