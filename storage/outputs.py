"""Where a command may write: never onto an input, never over another run's work.

Commands call these from their config's ``validate`` (before any work), so a refused output
costs nothing and touches nothing. Every refusal is a :class:`~storage.errors.ConfigError` that
names the folder and says the way out.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterable, Mapping

from storage.errors import ConfigError


def refuse_output_on_inputs(out: str | Path, inputs: Mapping[str, str | Path | None], *,
                            out_flag: str = "--out") -> None:
    """``out`` may not be an input, lie inside one, or contain one."""
    from storage.hub import is_hub_id

    o = Path(out).resolve()
    for flag, path in inputs.items():
        # a URL (object storage) or a Hub id names nothing on this disk
        if not path or "://" in str(path) or is_hub_id(path):
            continue
        i = Path(path).resolve()
        if o == i:
            raise ConfigError(f"{out_flag} {out} is also {flag}: an output never overwrites an "
                              f"input; choose another {out_flag}")
        if o.is_relative_to(i) and i.is_dir():
            raise ConfigError(f"{out_flag} {out} lies inside {flag} {path}: writing there would "
                              f"change an input; choose another {out_flag}")
        if i.is_relative_to(o):
            raise ConfigError(f"{out_flag} {out} contains {flag} {path}: writing there would "
                              f"mix the output with an input; choose another {out_flag}")


def refuse_used_folder(out: str | Path, *, own: Iterable[str] = (), out_flag: str = "--out",
                       resume: bool = False, overwrite: bool = False) -> None:
    """A folder a command fills must be new, empty, or hold only the command's own saved
    config (``own``); otherwise refuse, naming what is there and the ways out."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{out_flag} {out} is a file; give a folder (new or empty)")
    if overwrite or not path.is_dir():
        return
    own = set(own)
    # Under torchrun another rank may be writing the saved config right now: its temp file
    # (atomic_write's ".NAME.*.tmp") is ours too.
    others = sorted(e for e in os.listdir(path) if e not in own and not any(
        e.startswith(f".{name}.") and e.endswith(".tmp") for name in own))
    if others:
        shown = ", ".join(others[:4]) + (f" and {len(others) - 4} more" if len(others) > 4
                                         else "")
        ways = [f"a new {out_flag}"] + (["--resume to continue that run"] if resume else []) \
            + ["--overwrite to replace it"]
        raise ConfigError(f"{out_flag} {out} already holds another run's files ({shown}); use "
                          + ", or ".join(ways))


def refuse_folder_as_file(path: str | Path | None, flag: str) -> None:
    """An output file may not be a folder."""
    if path and Path(path).is_dir():
        raise ConfigError(f"{flag} {path} is a folder; give a file name")


def require_file(path: str | Path | None, flag: str) -> None:
    """An input file must exist and be a file (not a folder)."""
    if not path:
        return
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{flag} {path} is a folder; give a file")
    if not p.is_file():
        raise ConfigError(f"{flag} {path}: no such file")


def clear_folder(path: str | Path, *, keep: Iterable[str] = ()) -> None:
    """Empty ``path`` (``--overwrite``), keeping the entries named in ``keep``."""
    path = Path(path)
    if not path.is_dir():
        return
    keep = set(keep)
    for entry in path.iterdir():
        if entry.name in keep:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
