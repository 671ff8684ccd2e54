"""Experiment trackers: TensorBoard, Weights & Biases, MLflow (``--report-to``).

``metrics.jsonl`` is always written (:mod:`student_trainer.metrics`); a tracker receives the same
scalars under ``train/<name>`` at the same steps, and the run's resolved config once, when the
run starts. Each library is configured as its own tools are, by its usual environment variables:

- W&B: ``WANDB_PROJECT`` (default ``aligndistil``), ``WANDB_ENTITY``, ``WANDB_MODE``
  (``offline`` writes the run under ``OUT/wandb/`` for ``wandb sync`` later), ``WANDB_DIR``;
- MLflow: ``MLFLOW_TRACKING_URI``, ``MLFLOW_EXPERIMENT_NAME`` (default ``aligndistil``).

A resumed run continues the same W&B and MLflow run: their ids are kept in
``OUT/trackers.json``. Neither service can take back what was logged after the checkpoint, so
their curves may show the resumed stretch twice; TensorBoard purges it, and ``metrics.jsonl`` is
cut back to the checkpoint.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Any, Mapping

from storage.errors import ConfigError, UserError

log = logging.getLogger(__name__)

TRACKERS = ("tensorboard", "wandb", "mlflow")
#: The pip extra (and the module) that each tracker needs.
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
IDS_NAME = "trackers.json"
TENSORBOARD_DIR = "tensorboard"
DEFAULT_PROJECT = "aligndistil"


class TrackerError(UserError, RuntimeError):
    """A tracker that cannot start (bad URI, no credentials, ...); names the tracker."""


def parse_report_to(value: str, flag: str = "--report-to") -> tuple[str, ...]:
    """``"tensorboard,wandb"`` -> ``("tensorboard", "wandb")``; ``"none"`` -> ``()``.

    Refuses an unknown name, and a tracker whose package is not installed, before any work."""
    names = [n.strip().lower() for n in str(value).split(",") if n.strip()]
    if not names:
        raise ConfigError(f"{flag}: expected a comma-separated list of {', '.join(TRACKERS)}, "
                          f"or none; got {value!r}")
    if names == ["none"]:
        return ()
    unknown = [n for n in names if n not in TRACKERS]
    if unknown or "none" in names:
        bad = ", ".join(repr(n) for n in (unknown or ["none"]))
        raise ConfigError(f"{flag}: {bad} is not a tracker (choose from {', '.join(TRACKERS)}, "
                          f"or none alone)")
    for name in names:
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise ConfigError(f"{flag} {name}: the {PACKAGES[name]} package is not installed "
                              f"(pip install 'aligndistil[{name}]')")
    return tuple(dict.fromkeys(names))


class TensorBoardTracker:
    run_id = None  # nothing to continue: a resumed run purges the steps after the checkpoint

    def __init__(self, out_dir: Path, *, resume_step: int | None, config: Mapping | None):
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(str(out_dir / TENSORBOARD_DIR),
                                     purge_step=None if resume_step is None else resume_step + 1)
        if config is not None:
            text = "\n".join(f"    {k}: {v!r}" for k, v in config.items())  # markdown code block
            self._writer.add_text("config", text, 0)

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        for key, value in scalars.items():
            self._writer.add_scalar(key, value, step)

    def close(self) -> None:
        self._writer.close()


class WandbTracker:
    def __init__(self, out_dir: Path, *, run_id: str | None, config: Mapping | None):
        import os

        import wandb

        try:
            self._run = wandb.init(
                project=os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT,
                name=out_dir.resolve().name, dir=os.environ.get("WANDB_DIR") or str(out_dir),
                id=run_id, resume="allow" if run_id else None,
                config=dict(config) if config is not None else None)
        except Exception as exc:  # wandb raises its own types for login/network/config errors
            raise TrackerError(f"--report-to wandb: could not start a W&B run "
                               f"({type(exc).__name__}: {exc}); set WANDB_API_KEY, or "
                               f"WANDB_MODE=offline to log to {out_dir}/wandb") from exc
        self.run_id = self._run.id

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        self._run.log(dict(scalars), step=step)

    def close(self) -> None:
        self._run.finish()


class MlflowTracker:
    def __init__(self, out_dir: Path, *, run_id: str | None, config: Mapping | None):
        import os

        import mlflow

        self._mlflow = mlflow
        try:
            if run_id is None:
                mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_PROJECT)
            self._run = mlflow.start_run(run_id=run_id,
                                         run_name=None if run_id else out_dir.resolve().name)
            if config is not None:
                mlflow.log_params({k: _param(v) for k, v in config.items()})
        except Exception as exc:  # MlflowException, or the store's own errors
            raise TrackerError(f"--report-to mlflow: could not start an MLflow run at "
                               f"{mlflow.get_tracking_uri()!r} ({type(exc).__name__}: {exc}); "
                               f"set MLFLOW_TRACKING_URI") from exc
        self.run_id = self._run.info.run_id

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        self._mlflow.log_metrics(dict(scalars), step=step)

    def close(self) -> None:
        self._mlflow.end_run()


def _param(value: Any) -> str:
    """MLflow params are strings of at most 6000 characters."""
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."


def open_trackers(names: tuple[str, ...], out_dir: str | Path, *, resume_step: int | None,
                  config: Mapping[str, Any] | None) -> list:
    """Start each named tracker; ``config`` is logged on a fresh run (``resume_step`` None).

    The W&B and MLflow run ids go to ``OUT/trackers.json``, which a resumed run reads to continue
    the same runs."""
    out_dir = Path(out_dir)
    ids_path = out_dir / IDS_NAME
    ids = {}
    if resume_step is not None and ids_path.is_file():
        ids = json.loads(ids_path.read_text(encoding="utf-8"))
    fresh_config = config if resume_step is None else None
    opened: list = []
    try:
        for name in names:
            if name == "tensorboard":
                opened.append(TensorBoardTracker(out_dir, resume_step=resume_step,
                                                 config=fresh_config))
            else:
                cls = WandbTracker if name == "wandb" else MlflowTracker
                tracker = cls(out_dir, run_id=ids.get(name), config=fresh_config)
                ids[name] = tracker.run_id
                opened.append(tracker)
    except BaseException:
        close_trackers(opened)
        raise
    if any(n != "tensorboard" for n in names):
        ids_path.write_text(json.dumps(ids, indent=1) + "\n", encoding="utf-8")
    log.info("metrics: %s", ", ".join(("metrics.jsonl", *names)))
    return opened


def close_trackers(trackers: list) -> None:
    for tracker in trackers:
        try:
            tracker.close()
        except Exception as exc:  # a tracker failing to flush must not hide the run's result
            log.warning("closing %s failed: %s", type(tracker).__name__, exc)
