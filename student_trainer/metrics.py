"""Training metrics: one JSON line per step, the trackers of ``--report-to``, and a PNG.

``OUT/metrics.jsonl`` is the record of truth (plain text, one object per step, easy to load
with pandas); the trackers (:mod:`student_trainer.trackers`: TensorBoard in
``OUT/tensorboard/`` by default, W&B, MLflow) are for watching a run live; the PNG
(``OUT/training_curves.png``) is drawn from the JSONL at the end. Only rank 0 writes.

On resume the JSONL is cut back to the checkpoint's step and TensorBoard purges the steps
after it, so those curves of a resumed run have no duplicated stretch.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Mapping

from student_trainer.trackers import close_trackers, open_trackers

log = logging.getLogger(__name__)

JSONL_NAME = "metrics.jsonl"
PNG_NAME = "training_curves.png"

#: What the PNG shows, in order, when present in the log.
PLOTTED = ("loss", "kl", "beta_mean", "alpha_mean", "reward_token_mean", "lr", "grad_norm",
           "tokens_per_s", "preference_accuracy", "reward_margin")


class MetricsLogger:
    """Append-only metrics sink. ``enabled=False`` (ranks other than 0) makes every call a no-op.

    ``report_to`` names the trackers (:func:`student_trainer.trackers.parse_report_to`);
    ``config`` (plain values) is logged to them once, on a fresh run."""

    def __init__(self, out_dir: str | Path, *, enabled: bool = True, resume_step: int | None = None,
                 report_to: tuple[str, ...] = ("tensorboard",),
                 config: Mapping[str, Any] | None = None):
        self.out_dir = Path(out_dir)
        self.enabled = enabled
        self.jsonl_path = self.out_dir / JSONL_NAME
        self._trackers: list = []
        self._fh = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            truncate_jsonl(self.jsonl_path, resume_step)
        elif self.jsonl_path.exists():
            self.jsonl_path.unlink()  # a fresh run in a reused folder starts a fresh log
        self._fh = open(self.jsonl_path, "a", encoding="utf-8")
        try:
            self._trackers = open_trackers(report_to, self.out_dir, resume_step=resume_step,
                                           config=config)
        except BaseException:
            self.close()
            raise

    def log(self, step: int, values: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _plain(v) for k, v in values.items()}}
        self._fh.write(json.dumps(row, allow_nan=False, default=str) + "\n")
        self._fh.flush()
        if self._trackers:
            scalars = {f"train/{key}": float(value) for key, value in row.items()
                       if key != "step" and isinstance(value, (int, float))}
            for tracker in self._trackers:
                tracker.log(int(step), scalars)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        close_trackers(self._trackers)
        self._trackers = []


def _plain(value: Any) -> Any:
    """Numbers as JSON numbers; NaN/inf as null (JSON has neither)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            rows.append(json.loads(line))
    return rows


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep the rows with ``step <= last_step`` (a resumed run rewrites what came after)."""
    rows = [r for r in read_jsonl(path) if r.get("step", 0) <= last_step]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def plot_curves(jsonl_path: str | Path, png_path: str | Path, *, title: str = "") -> Path | None:
    """Draw every :data:`PLOTTED` metric found in the log against the step; None when empty."""
    rows = read_jsonl(jsonl_path)
    keys = [k for k in PLOTTED if any(isinstance(r.get(k), (int, float)) for r in rows)]
    if not rows or not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display: render to a file
    import matplotlib.pyplot as plt

    cols = min(3, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.0 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 50 else None)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    png_path = Path(png_path)
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
