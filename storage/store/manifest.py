"""Commit records: per-shard checksum files and per-worker manifests.

A shard becomes visible in two steps, both atomic renames:

1. ``shards/<name>/checksums.json`` lists every file of the shard (relative path, size,
   sha256). It is written after all of the shard's data files.
2. ``manifest-w<IIII>.json`` (one per worker, so workers never race on one file) is replaced
   by a new version that adds the shard's entry, including the sha256 of its checksum file.

A reader sees only shards listed in a manifest, so a crash at any point leaves either the old
manifest (the half-written shard is invisible and is deleted when the worker restarts) or the
new one (the shard is complete and verifiable).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..fsio import atomic_write, fsync_dir
from .errors import StoreCorruptionError, StoreFormatError

MANIFEST_VERSION = 1
CHECKSUMS_FILE = "checksums.json"
_MANIFEST_RE = re.compile(r"^manifest-w(\d{4,})\.json$")
_SHARD_RE = re.compile(r"^w(\d{4,})-s(\d{6,})$")


def shard_name(worker: int, seq: int) -> str:
    return f"w{worker:04d}-s{seq:06d}"


def parse_shard_name(name: str) -> tuple[int, int] | None:
    m = _SHARD_RE.match(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def shard_relpath(name: str) -> str:
    return f"shards/{name}"


def manifest_path(store: Path, worker: int) -> Path:
    return Path(store) / f"manifest-w{worker:04d}.json"


@dataclass(frozen=True)
class ShardEntry:
    """A committed shard as its worker's manifest lists it."""

    name: str
    num_examples: int
    num_tokens: int          # response tokens (target positions)
    num_input_tokens: int    # prompt + response tokens
    checksums_sha256: str

    @property
    def relpath(self) -> str:
        return shard_relpath(self.name)


@dataclass
class WorkerManifest:
    worker_index: int
    finished: bool = False
    shards: list[ShardEntry] = field(default_factory=list)
    #: rows of this worker's share left out, by reason (``--skip-bad-rows``); written when the
    #: worker finishes
    skipped: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = {"manifest_version": MANIFEST_VERSION, "worker_index": self.worker_index,
               "finished": self.finished, "shards": [asdict(s) for s in self.shards]}
        if self.skipped:
            out["skipped"] = dict(self.skipped)
        return out

    @classmethod
    def from_json(cls, data: Any, *, where: str) -> "WorkerManifest":
        if not isinstance(data, dict):
            raise StoreCorruptionError(where, "manifest is not a JSON object")
        if data.get("manifest_version") != MANIFEST_VERSION:
            raise StoreFormatError(f"{where}: manifest_version {data.get('manifest_version')!r} "
                                   f"is not supported (this aligndistil reads {MANIFEST_VERSION})")
        try:
            shards = [ShardEntry(**s) for s in data["shards"]]
            skipped = {str(k): int(v) for k, v in dict(data.get("skipped") or {}).items()}
            return cls(int(data["worker_index"]), bool(data["finished"]), shards, skipped)
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreCorruptionError(where, f"malformed manifest ({exc})") from None


def read_manifest(store: Path, worker: int) -> WorkerManifest | None:
    """The worker's manifest, or None if it has committed nothing yet."""
    path = manifest_path(store, worker)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StoreCorruptionError(path.name, f"manifest is not valid JSON ({exc})") from None
    manifest = WorkerManifest.from_json(data, where=path.name)
    if manifest.worker_index != worker:
        raise StoreCorruptionError(path.name, f"manifest names worker {manifest.worker_index}")
    return manifest


def list_manifest_workers(store: Path) -> list[int]:
    out = []
    for entry in os.listdir(store):
        m = _MANIFEST_RE.match(entry)
        if m:
            out.append(int(m.group(1)))
    return sorted(out)


def write_manifest(store: Path, manifest: WorkerManifest, *, durable: bool = True) -> None:
    """Replace the worker's manifest atomically (temp file, fsync, rename, fsync dir)."""
    path = manifest_path(store, manifest.worker_index)
    atomic_write(path, json.dumps(manifest.to_json(), indent=1).encode(), durable=durable)


# ---------------------------------------------------------------------- checksums
def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def list_shard_files(shard_dir: Path) -> list[str]:
    """Relative posix paths of the shard's files, excluding the checksum file itself."""
    out = []
    for root, _dirs, files in os.walk(shard_dir):
        for f in files:
            rel = os.path.relpath(os.path.join(root, f), shard_dir).replace(os.sep, "/")
            if rel != CHECKSUMS_FILE:
                out.append(rel)
    return sorted(out)


def write_checksums(shard_dir: Path, *, durable: bool = True) -> str:
    """Hash every file of the shard into ``checksums.json``; return that file's sha256."""
    files = {}
    for rel in list_shard_files(shard_dir):
        path = shard_dir / rel
        data = path.read_bytes()
        if durable:
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
        files[rel] = {"size": len(data), "sha256": sha256_bytes(data)}
    if durable:
        for root, dirs, _files in os.walk(shard_dir):
            for d in dirs:
                fsync_dir(Path(root) / d)
    blob = json.dumps({"files": files}, indent=1, sort_keys=True).encode()
    atomic_write(shard_dir / CHECKSUMS_FILE, blob, durable=durable)
    return sha256_bytes(blob)


def read_shard_files(store: Path, entry: ShardEntry, *, verify: bool = True,
                     names: set[str] | None = None) -> dict[str, bytes]:
    """The shard's files as ``{relative path: bytes}``, checked against its checksums.

    ``names`` restricts the result to files under those top-level names (arrays) plus the
    group's ``zarr.json``. Raises :class:`StoreCorruptionError` naming the shard on a missing,
    truncated, extended or altered file, or a missing/altered checksum file.
    """
    shard_dir = Path(store) / entry.relpath
    listing = _read_checksums(shard_dir, entry, verify=verify)
    out: dict[str, bytes] = {}
    for rel, info in listing.items():
        if names is not None and rel != "zarr.json" and rel.split("/", 1)[0] not in names:
            continue
        try:
            data = (shard_dir / rel).read_bytes()
        except FileNotFoundError:
            raise StoreCorruptionError(entry.relpath, f"file {rel} is missing") from None
        if verify:
            _check_file(entry, rel, data, info)
        out[rel] = data
    return out


def verify_shard(store: Path, entry: ShardEntry) -> list[str]:
    """Every problem found in one committed shard (empty when it is intact)."""
    shard_dir = Path(store) / entry.relpath
    if not shard_dir.is_dir():
        return ["shard directory is missing"]
    try:
        listing = _read_checksums(shard_dir, entry, verify=True)
    except StoreCorruptionError as exc:
        return [str(exc).split(": ", 1)[1]]
    problems = []
    for rel, info in listing.items():
        try:
            data = (shard_dir / rel).read_bytes()
        except FileNotFoundError:
            problems.append(f"file {rel} is missing")
            continue
        try:
            _check_file(entry, rel, data, info)
        except StoreCorruptionError as exc:
            problems.append(str(exc).split(": ", 1)[1])
    for rel in list_shard_files(shard_dir):
        if rel not in listing:
            problems.append(f"file {rel} is not in the shard's checksums")
    return problems


def _read_checksums(shard_dir: Path, entry: ShardEntry, *, verify: bool) -> dict[str, Any]:
    path = shard_dir / CHECKSUMS_FILE
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        if not shard_dir.is_dir():
            raise StoreCorruptionError(entry.relpath, "shard directory is missing") from None
        raise StoreCorruptionError(entry.relpath, f"{CHECKSUMS_FILE} is missing") from None
    if verify and sha256_bytes(blob) != entry.checksums_sha256:
        raise StoreCorruptionError(entry.relpath, f"{CHECKSUMS_FILE} does not match the "
                                                  f"manifest's checksum")
    try:
        return json.loads(blob)["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise StoreCorruptionError(entry.relpath, f"{CHECKSUMS_FILE} is unreadable ({exc})") \
            from None


def _check_file(entry: ShardEntry, rel: str, data: bytes, info: dict[str, Any]) -> None:
    if len(data) != info["size"]:
        kind = "truncated" if len(data) < info["size"] else "longer than recorded"
        raise StoreCorruptionError(entry.relpath, f"file {rel} is {kind} ({len(data)} bytes, "
                                                  f"expected {info['size']})")
    if sha256_bytes(data) != info["sha256"]:
        raise StoreCorruptionError(entry.relpath, f"file {rel} fails its sha256 checksum")
