"""A Hugging Face hub cache laid out by hand, offline, in the library's own layout.

``<cache>/<type>s--<owner>--<name>/`` holds ``blobs/<sha256>`` (the files' bytes),
``snapshots/<commit>/<path>`` (relative symlinks to the blobs) and ``refs/<branch>`` (the
commit a branch points to): what ``hf download`` leaves. ``huggingface_hub.scan_cache_dir``
reading it back is the check that it is the library's layout.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def put_in_hub_cache(cache: Path, repo_id: str, files: dict[str, bytes | Path], *,
                     commit: str, repo_type: str = "model", ref: str | None = "main") -> Path:
    """Add one snapshot (``commit``) of ``repo_id`` to ``cache``; ``ref`` (a branch) then points
    to it. ``files`` maps a path in the repository to bytes or to a file to copy. Returns the
    snapshot folder."""
    repo = Path(cache) / f"{repo_type}s--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    for rel, content in files.items():
        data = Path(content).read_bytes() if isinstance(content, Path) else content
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            blob.write_bytes(data)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if ref is not None:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


def folder_files(folder: Path) -> dict[str, Path]:
    """Every file of a folder by its relative path (a saved model, for :func:`put_in_hub_cache`)."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): p for p in sorted(folder.rglob("*")) if p.is_file()}
