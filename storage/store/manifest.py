"""Commit records: per-shard checksum files and per-worker manifests.

A shard becomes visible in two steps, each one atomic write (a rename on a local disk, one PUT
on object storage; :mod:`.location`):

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
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import StoreCorruptionError, StoreFormatError
from .location import StoreLocation, open_location

MANIFEST_VERSION = 1
CHECKSUMS_FILE = "checksums.json"
_MANIFEST_RE = re.compile(r"^manifest-w(\d{4,})\.json$")
#: ``w<worker>-s<seq>``; on object storage ``-<writer token>`` follows, so two writers of one
#: worker (see :class:`.location.ObjectLease`) never write into the same shard's objects.
_SHARD_RE = re.compile(r"^w(\d{4,})-s(\d{6,})(?:-[0-9a-f]{8})?$")


def shard_name(worker: int, seq: int, writer: str | None = None) -> str:
    return f"w{worker:04d}-s{seq:06d}" + (f"-{writer}" if writer else "")


def parse_shard_name(name: str) -> tuple[int, int] | None:
    m = _SHARD_RE.match(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def shard_relpath(name: str) -> str:
    return f"shards/{name}"


def manifest_name(worker: int) -> str:
    return f"manifest-w{worker:04d}.json"


def manifest_path(store: Path, worker: int) -> Path:
    return Path(store) / manifest_name(worker)


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
    #: shard name -> its statistics (:mod:`.shardstats`); a key readers before it ignore
    shard_stats: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = {"manifest_version": MANIFEST_VERSION, "worker_index": self.worker_index,
               "finished": self.finished, "shards": [asdict(s) for s in self.shards]}
        if self.skipped:
            out["skipped"] = dict(self.skipped)
        if self.shard_stats:
            out["shard_stats"] = {s.name: self.shard_stats[s.name] for s in self.shards
                                  if s.name in self.shard_stats}
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
            stats = data.get("shard_stats") or {}
            if not isinstance(stats, dict) or not all(_stats_ok(v) for v in stats.values()):
                raise TypeError("shard_stats: not an object of per-shard statistics")
            return cls(int(data["worker_index"]), bool(data["finished"]), shards, skipped,
                       dict(stats))
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreCorruptionError(where, f"malformed manifest ({exc})") from None


def _stats_ok(stats: Any) -> bool:
    """The shape :mod:`.shardstats` writes (what the summary reads from it)."""
    if not isinstance(stats, dict):
        return False
    alpha, k, tail = stats.get("alpha"), stats.get("k"), stats.get("tail_mass")
    return (isinstance(alpha, dict) and isinstance(alpha.get("n"), int)
            and all(isinstance(alpha.get(f), (int, float)) or (alpha.get(f) is None
                                                              and alpha["n"] == 0)
                    for f in ("sum", "min", "max"))
            and isinstance(alpha.get("hist", []), list)
            and isinstance(k, dict) and all(isinstance(v, int) for v in k.values())
            and isinstance(tail, dict) and isinstance(tail.get("sum"), (int, float)))


def read_manifest(store: Path | StoreLocation, worker: int) -> WorkerManifest | None:
    """The worker's manifest, or None if it has committed nothing yet."""
    name = manifest_name(worker)
    try:
        text = open_location(store).read(name)
    except FileNotFoundError:
        return None
    return parse_manifest(text, worker)


def parse_manifest(text: bytes | str, worker: int) -> WorkerManifest:
    name = manifest_name(worker)
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StoreCorruptionError(name, f"manifest is not valid JSON ({exc})") from None
    manifest = WorkerManifest.from_json(data, where=name)
    if manifest.worker_index != worker:
        raise StoreCorruptionError(name, f"manifest names worker {manifest.worker_index}")
    return manifest


def list_manifest_workers(store: Path | StoreLocation) -> list[int]:
    out = []
    for entry in open_location(store).list_names(""):
        m = _MANIFEST_RE.match(entry)
        if m:
            out.append(int(m.group(1)))
    return sorted(out)


def manifest_bytes(manifest: WorkerManifest) -> bytes:
    return json.dumps(manifest.to_json(), indent=1).encode()


def write_manifest(store: Path | StoreLocation, manifest: WorkerManifest, *,
                   durable: bool = True) -> None:
    """Replace the worker's manifest atomically (outside a writer: tests and repairs)."""
    open_location(store).write(manifest_name(manifest.worker_index), manifest_bytes(manifest),
                               durable=durable)


# ---------------------------------------------------------------------- checksums
def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def list_shard_files(store: Path | StoreLocation, relpath: str) -> list[str]:
    """Relative posix paths of the shard's files, excluding the checksum file itself."""
    return [rel for rel in open_location(store).list_files(relpath) if rel != CHECKSUMS_FILE]


def checksums_blob(files: dict[str, bytes]) -> bytes:
    """The ``checksums.json`` of a shard's files (name -> size and sha256)."""
    listing = {rel: {"size": len(data), "sha256": sha256_bytes(data)}
               for rel, data in sorted(files.items())}
    return json.dumps({"files": listing}, indent=1, sort_keys=True).encode()


def write_checksums(store: Path | StoreLocation, relpath: str, *, durable: bool = True) -> str:
    """Hash every file of a written shard into its ``checksums.json``; return that file's
    sha256 (the writer hashes the bytes it wrote instead; this is for repairs and tests)."""
    location = open_location(store)
    files = {rel: location.read(f"{relpath}/{rel}")
             for rel in list_shard_files(location, relpath)}
    blob = checksums_blob(files)
    location.write(f"{relpath}/{CHECKSUMS_FILE}", blob, durable=durable)
    return sha256_bytes(blob)


def _read_all(location: StoreLocation, relpath: str, rels: list[str]) -> dict[str, bytes | None]:
    """The shard's files ``rels`` (None for a missing one): in parallel on object storage."""
    paths = [f"{relpath}/{rel}" for rel in rels]
    if hasattr(location, "read_many"):
        got = location.read_many(paths)
        return {rel: got[path] for rel, path in zip(rels, paths)}
    out: dict[str, bytes | None] = {}
    for rel, path in zip(rels, paths):
        try:
            out[rel] = location.read(path)
        except FileNotFoundError:
            out[rel] = None
    return out


def read_shard_files(store: Path | StoreLocation, entry: ShardEntry, *, verify: bool = True,
                     names: set[str] | None = None) -> dict[str, bytes]:
    """The shard's files as ``{relative path: bytes}``, checked against its checksums.

    ``names`` restricts the result to files under those top-level names (arrays) plus the
    group's ``zarr.json``. Raises :class:`StoreCorruptionError` naming the shard on a missing,
    truncated, extended or altered file, or a missing/altered checksum file.
    """
    location = open_location(store)
    listing = _read_checksums(location, entry, verify=verify)
    wanted = [rel for rel in listing if names is None or rel == "zarr.json"
              or rel.split("/", 1)[0] in names]
    out: dict[str, bytes] = {}
    for rel, data in _read_all(location, entry.relpath, wanted).items():
        if data is None:
            raise StoreCorruptionError(entry.relpath, f"file {rel} is missing")
        if verify:
            _check_file(entry, rel, data, listing[rel])
        out[rel] = data
    return out


def verify_shard(store: Path | StoreLocation, entry: ShardEntry) -> list[str]:
    """Every problem found in one committed shard (empty when it is intact)."""
    location = open_location(store)
    present = location.list_files(entry.relpath)
    if not present:
        return ["shard directory is missing"]
    try:
        listing = _read_checksums(location, entry, verify=True)
    except StoreCorruptionError as exc:
        return [str(exc).split(": ", 1)[1]]
    problems = []
    for rel, data in _read_all(location, entry.relpath, list(listing)).items():
        if data is None:
            problems.append(f"file {rel} is missing")
            continue
        try:
            _check_file(entry, rel, data, listing[rel])
        except StoreCorruptionError as exc:
            problems.append(str(exc).split(": ", 1)[1])
    for rel in present:
        if rel != CHECKSUMS_FILE and rel not in listing:
            problems.append(f"file {rel} is not in the shard's checksums")
    return problems


def _read_checksums(location: StoreLocation, entry: ShardEntry, *,
                    verify: bool) -> dict[str, Any]:
    try:
        blob = location.read(f"{entry.relpath}/{CHECKSUMS_FILE}")
    except FileNotFoundError:
        if not location.list_files(entry.relpath):
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
