"""Experiment trackers a run's metrics also go to (`run.report_to`): TensorBoard, Weights & Biases,
Trackio. None is needed: metrics.jsonl in the run folder is always written and is what opsd reads back.

- tensorboard: event files in RUN/tensorboard/ (skipped silently when tensorboard is not installed,
  since it is listed by default).
- wandb: a run in RUN/wandb/ named after the run folder, grouped by its parent folder (a pipeline's
  stages share a group), with the resolved config. wandb's own settings apply: `WANDB_MODE=offline`
  keeps it on this machine, `WANDB_PROJECT` names the project (default `opsd`). A resumed opsd run
  continues the same wandb run (its id is kept in RUN/wandb/opsd-run-id). Online without a login is
  refused before any work; a tracker that fails to start ends the command with one sentence.
- trackio: a run in trackio's local database (trackio's own folder, `TRACKIO_DIR` to move it), project
  `TRACKIO_PROJECT` or `opsd`, named `<parent>-<run folder>-<6 hex>` (kept in RUN/trackio-run-name, so
  that a resumed opsd run continues it and another run of the same folder names gets its own).

Only rank 0 opens trackers; the values are the step's metrics as written to metrics.jsonl.
"""

from __future__ import annotations

import importlib.util
import math
import netrc
import os
import sys
import uuid
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

from opsd.core.errors import UserError, first_line
from opsd.runtime.folders import TRACKIO_NAME, WANDB_ID

TRACKERS: tuple[str, ...] = ("tensorboard", "wandb", "trackio")


class Sink(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self, failed: bool) -> None: ...


def check_trackers(report_to: tuple[str, ...], option: str = "run.report_to") -> None:
    """Refuse, before any work, a tracker that is unknown or (wandb, trackio) not installed."""
    for name in report_to:
        if name not in TRACKERS:
            raise UserError(f"{option}: unknown tracker '{name}' (choose from {', '.join(TRACKERS)}; [] for none)")
        if name != "tensorboard" and importlib.util.find_spec(name) is None:
            raise UserError(f"{option} lists {name}, which is not installed: pip install 'opsd[{name}]', "
                            f"or leave it out of {option}")
        if name == "wandb" and not _wandb_can_start():
            raise UserError(f"{option} lists wandb, which has no login here: set WANDB_API_KEY, run `wandb login`, "
                            "or set WANDB_MODE=offline to keep the run on this machine")


def _wandb_can_start() -> bool:
    """False only when wandb would stop at its login: online mode, no key in the environment or in
    ~/.netrc for its host, and no terminal to ask on (wandb's own start is the final word)."""
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return True
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE") or sys.stdin.isatty():
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host or "") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def open_trackers(report_to: tuple[str, ...], run_dir: Path, config: dict[str, Any] | None) -> list[Sink]:
    openers = {"tensorboard": _TensorBoard.open, "wandb": _WandB, "trackio": _Trackio}
    sinks: list[Sink] = []
    try:
        for name in dict.fromkeys(report_to):
            sink = openers[name](run_dir, config or {})
            if sink is not None:
                sinks.append(sink)
    except BaseException:
        for sink in sinks:
            sink.close(failed=True)
        raise
    return sinks


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The finite numbers among a step's metrics (trackers take scalars only); a flag counts as 0/1."""
    return {k: int(v) if isinstance(v, bool) else v for k, v in metrics.items()
            if isinstance(v, (int, float)) and math.isfinite(v)}


def _started(name: str, start):
    """A tracker's run, or a UserError that says why it could not start (no login, no network, ...)."""
    try:
        return start()
    except Exception as err:  # the tracker's own errors, of its own types
        message = first_line(err)
        raise UserError(f"run.report_to: {name} could not start its run ({message})") from None


class _TensorBoard:
    def __init__(self, writer: Any):
        self.writer = writer

    @classmethod
    def open(cls, run_dir: Path, config: dict[str, Any]) -> _TensorBoard | None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # listed by default; skipped where tensorboard is not installed
            return None
        return cls(SummaryWriter(str(run_dir / "tensorboard")))

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def close(self, failed: bool) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, run_dir: Path, config: dict[str, Any]):
        import wandb

        folder = run_dir / "wandb"
        folder.mkdir(exist_ok=True)
        id_file = folder / WANDB_ID
        run_id = id_file.read_text(encoding="utf-8").strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id + "\n", encoding="utf-8")
        self.run = _started("wandb", lambda: wandb.init(
            project=os.environ.get("WANDB_PROJECT", "opsd"), name=run_dir.name, group=run_dir.resolve().parent.name,
            dir=str(run_dir), id=run_id, resume="allow", config=config))

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class _Trackio:
    def __init__(self, run_dir: Path, config: dict[str, Any]):
        import trackio

        parent = run_dir.resolve().parent.name
        name_file = run_dir / TRACKIO_NAME  # a run of its own, continued when this opsd run is resumed
        if name_file.is_file():
            name = name_file.read_text(encoding="utf-8").strip()
        else:
            name = f"{parent}-{run_dir.name}-{uuid.uuid4().hex[:6]}"
            name_file.write_text(name + "\n", encoding="utf-8")
        self.run = _started("trackio", lambda: trackio.init(project=os.environ.get("TRACKIO_PROJECT", "opsd"),
                                                            name=name,
                                                            group=parent, config=config, resume="allow"))

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self, failed: bool) -> None:
        self.run.finish()
