"""Checkpoints: a Hugging Face model folder plus the trainer's state, written atomically.

A checkpoint folder ``OUT/checkpoint-00000042/`` holds what ``from_pretrained`` reads
(``config.json``, ``model.safetensors``, the tokenizer files) and ``trainer_state.pt``: the
step, the data position, the optimizer and scheduler states and every rank's RNG states
(python, numpy, torch CPU and CUDA). The end of a run writes the same into ``OUT/final/``.

Why the care:

- **Atomic.** Everything is written into a hidden temporary folder beside the target, then
  renamed into place with ``os.replace``. A run killed mid-write leaves a stray temporary folder
  (ignored, cleaned next time) and the previous checkpoint intact, never a half-written one.
  Pruning renames a folder away before deleting it, so no ``checkpoint-N`` is ever partial.
- **Safe to load.** ``trainer_state.pt`` is loaded with ``torch.load(weights_only=True)``, which
  unpickles tensors and plain containers only (no code runs). So RNG states are stored as
  tensors and plain numbers, not as the tuples of arbitrary objects the RNG APIs return.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from storage.errors import UserError
from storage.fsio import fsync_dir, fsync_tree

STATE_FILE = "trainer_state.pt"
FORMAT_VERSION = 1
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
_TMP_PREFIX = ".tmp-"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used; the message names the folder and what is wrong."""


# ---------------------------------------------------------------------------- RNG states
def capture_rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain types (loadable with weights_only)."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": {"version": int(py_version),
                   "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss": py_gauss},
        "numpy": {"name": str(np_name), "keys": torch.from_numpy(np_keys.astype(np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss),
                  "cached_gaussian": float(np_gauss)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------- save
def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:08d}"


def save_checkpoint(dest: str | Path, *, model, tokenizer, state: dict[str, Any]) -> Path:
    """Write ``model`` (HF ``save_pretrained``, safetensors), ``tokenizer`` and ``state`` into
    ``dest`` atomically. ``state`` must hold tensors and plain types only."""
    tmp = begin_checkpoint(dest, tag=str(os.getpid()))
    model.save_pretrained(tmp, safe_serialization=True)
    return finish_checkpoint(tmp, dest, tokenizer=tokenizer, state=state)


def begin_checkpoint(dest: str | Path, *, tag: str) -> Path:
    """A fresh temporary folder beside ``dest`` to write a checkpoint into (several ranks agree
    on it through ``tag``)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f"{_TMP_PREFIX}{dest.name}-{tag}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def finish_checkpoint(tmp: Path, dest: str | Path, *, tokenizer, state: dict[str, Any]) -> Path:
    """Add the tokenizer and trainer state to ``tmp``, make it durable, rename it to ``dest``."""
    dest = Path(dest)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    torch.save({"format_version": FORMAT_VERSION, **state}, tmp / STATE_FILE)
    for folder in [tmp, *(p for p in tmp.rglob("*") if p.is_dir())]:
        fsync_tree(folder)
    if dest.exists():
        # A folder cannot be renamed onto a non-empty one: move the old one aside first.
        old = dest.parent / f"{_TMP_PREFIX}{dest.name}-old-{os.getpid()}"
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)
    fsync_dir(dest.parent)  # make the rename itself durable
    return dest


def prune_checkpoints(out_dir: str | Path, keep: int | None) -> list[Path]:
    """Delete all but the ``keep`` newest ``checkpoint-N`` folders (``final`` is never touched);
    also clears temporary folders left by a killed write. Returns what was removed."""
    out_dir = Path(out_dir)
    removed = []
    for tmp in out_dir.glob(f"{_TMP_PREFIX}*"):
        if tmp.is_dir():  # called between saves: no write is in progress
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    if keep is None or keep <= 0:
        return removed
    for path in list_checkpoints(out_dir)[:-keep]:
        # Rename first, so a kill during the deletion leaves a temporary folder (cleared next
        # time), never a checkpoint-N folder with some of its files gone.
        doomed = path.parent / f"{_TMP_PREFIX}{path.name}-pruned-{os.getpid()}"
        try:
            os.replace(path, doomed)
        except OSError:  # e.g. a leftover of that name that could not be removed
            doomed = path
        shutil.rmtree(doomed, ignore_errors=True)
        removed.append(path)
    return removed


# ---------------------------------------------------------------------------- find, load
def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete ``checkpoint-N`` folders (holding a trainer state), oldest first."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = []
    for path in out_dir.iterdir():
        m = _CHECKPOINT_RE.match(path.name)
        if m and (path / STATE_FILE).is_file():
            found.append((int(m.group(1)), path))
    return [p for _, p in sorted(found)]


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The checkpoint with the highest step among ``checkpoint-N`` and ``final``."""
    candidates = [(read_step(p), p) for p in list_checkpoints(out_dir)]
    final = Path(out_dir) / "final"
    if (final / STATE_FILE).is_file():
        candidates.append((read_step(final), final))
    if not candidates:
        return None
    return max(candidates, key=lambda c: c[0])[1]


def resolve_resume(resume: str | None, out: Path) -> Path | None:
    """The checkpoint ``--resume`` names: ``latest`` (a bare ``--resume``) is the newest in
    ``out`` (None, with a warning, when there is none yet); else the given folder, checked."""
    if not resume:
        return None
    if resume == "latest":
        found = latest_checkpoint(out)
        if found is None:
            import logging

            logging.getLogger(__name__).warning(
                "--resume: no checkpoint in %s yet; starting from --model", out)
        return found
    path = Path(resume)
    load_state(path)  # fails loudly on a folder that is not a checkpoint
    return path


def read_step(path: Path) -> int:
    return int(load_state(path)["step"])


def load_state(path: str | Path) -> dict[str, Any]:
    """The trainer state of a checkpoint folder, loaded with ``weights_only=True``."""
    file = Path(path) / STATE_FILE
    if not file.is_file():
        raise CheckpointError(f"{path}: no {STATE_FILE}; not a trainer checkpoint (a plain "
                              f"model folder can be passed as --model instead)")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{file}: cannot be read ({type(exc).__name__}: {exc})") from None
    version = state.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{file}: format_version {version}, this trainer reads "
                              f"{FORMAT_VERSION}")
    return state
