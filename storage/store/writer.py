"""``TargetStoreWriter``: one worker's append-only writer with crash-safe resume.

Records are buffered in memory and written as a shard once the buffer holds ``shard_tokens``
response tokens; a shard is committed (checksums, then the worker's manifest, see
:mod:`.manifest`) before the next one starts. Several workers write disjoint shards of one
store (``shards/w<worker>-s<seq>``), each committing to its own manifest.

One writer per worker, ever: an exclusive ``flock`` on ``locks/w<worker>.lock`` is held for the
writer's lifetime (the kernel drops it when the process dies, even by SIGKILL), so a second
live process for the same worker is refused instead of deleting its in-progress shard.

Resume: opening a worker that already committed shards continues after its last committed
shard. Shard directories of this worker that no manifest lists are leftovers of a crash and
are deleted. The caller asks :meth:`TargetStoreWriter.committed_example_indices` which examples
are already stored and skips them; since shard boundaries depend only on the records from the
start of a shard, a resumed run produces the same store as an uninterrupted one.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Iterable

import numpy as np

from ..record import RecordError, TargetRecord
from .batch import TargetBatch
from .errors import StoreLockedError
from .layout import get_layout
from .manifest import (ShardEntry, WorkerManifest, fsync_dir, parse_shard_name, read_manifest,
                       shard_name, write_checksums, write_manifest)
from .metadata import StoreMetadata, create_or_check
from .shardio import WriteHook, load_shard_arrays, write_shard

DEFAULT_SHARD_TOKENS = 65536


class TargetStoreWriter:
    """Append records for one worker of a store; see the module docstring.

    ``metadata`` must equal what the store records if it already exists
    (:class:`~.errors.StoreMetadataMismatchError` otherwise). Use as a context manager, or call
    :meth:`close` (commits the last partial shard and marks the worker finished).
    """

    def __init__(self, path: str | os.PathLike, metadata: StoreMetadata, *,
                 worker_index: int = 0, shard_tokens: int = DEFAULT_SHARD_TOKENS,
                 durable: bool = True, _hook: WriteHook | None = None):
        if not 0 <= worker_index < metadata.num_workers:
            raise ValueError(f"worker_index {worker_index} outside [0, num_workers = "
                             f"{metadata.num_workers})")
        if shard_tokens < 1:
            raise ValueError("shard_tokens must be >= 1")
        self.path = Path(path)
        self.layout = get_layout(metadata.layout)
        if not metadata.created_with:
            metadata = replace(metadata, created_with=_version())
        self.metadata = create_or_check(self.path, metadata)
        self.worker_index = worker_index
        self.shard_tokens = shard_tokens
        self.durable = durable
        self._hook = _hook
        self._lock_fd = _acquire_lock(self.path, worker_index)
        self._closed = False
        try:
            self._manifest = (read_manifest(self.path, worker_index)
                              or WorkerManifest(worker_index))
            self._discard_uncommitted()
        except BaseException:
            self._release()
            raise
        seqs = [parse_shard_name(s.name)[1] for s in self._manifest.shards]
        self._next_seq = max(seqs) + 1 if seqs else 0
        self._buffer: list[TargetRecord] = []
        self._buffer_tokens = 0
        self._committed_indices: list[np.ndarray] | None = None

    # ------------------------------------------------------------------ resume
    @property
    def num_committed(self) -> int:
        """Examples this worker has committed (its next example position)."""
        return sum(s.num_examples for s in self._manifest.shards)

    def committed_example_indices(self) -> np.ndarray:
        """``example_index`` of every record this worker committed, in write order (int64).

        Buffered, not yet committed records are not included: after a crash they are lost and
        must be recomputed.
        """
        if self._committed_indices is None:
            self._committed_indices = [
                load_shard_arrays(self.path, entry, names={"example_index"})["example_index"][0]
                for entry in self._manifest.shards]
        if not self._committed_indices:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate(self._committed_indices)

    # ------------------------------------------------------------------ writing
    def write(self, record: TargetRecord) -> None:
        """Buffer one record (validated against the store's vocab size and k)."""
        self._check_open()
        record.validate(vocab_size=self.metadata.vocab_size)
        if record.top_k != self.metadata.top_k:
            raise RecordError(f"topk_ids: record {record.example_index} has k = {record.top_k}, "
                              f"the store has top_k = {self.metadata.top_k}")
        self._buffer.append(record)
        self._buffer_tokens += record.response_len
        if self._buffer_tokens >= self.shard_tokens:
            self.flush()

    def write_many(self, records: Iterable[TargetRecord]) -> None:
        for record in records:
            self.write(record)

    def flush(self) -> ShardEntry | None:
        """Commit the buffered records as one shard (nothing to do when the buffer is empty)."""
        self._check_open()
        if not self._buffer:
            return None
        batch = TargetBatch.from_records(self._buffer)
        name = shard_name(self.worker_index, self._next_seq)
        shard_dir = self.path / "shards" / name
        write_shard(shard_dir, batch, self.layout, self.metadata.vocab_size, hook=self._hook)
        checksum = write_checksums(shard_dir, durable=self.durable)
        if self.durable:
            fsync_dir(shard_dir.parent)
        entry = ShardEntry(name=name, num_examples=len(batch), num_tokens=batch.num_tokens,
                           num_input_tokens=int(batch.seq_offsets[-1]),
                           checksums_sha256=checksum)
        self._manifest.shards.append(entry)
        self._manifest.finished = False
        try:
            write_manifest(self.path, self._manifest, durable=self.durable)
        except BaseException:
            self._manifest.shards.pop()
            raise
        if self._committed_indices is not None:
            self._committed_indices.append(batch.example_index.copy())
        self._next_seq += 1
        self._buffer.clear()
        self._buffer_tokens = 0
        return entry

    def record_skipped(self, counts: dict[str, int]) -> None:
        """Rows of this worker's share that were left out, by reason; saved in its manifest
        when the worker finishes (shown by ``inspect``)."""
        self._manifest.skipped = {k: int(v) for k, v in counts.items() if v}

    def close(self, *, finished: bool = True) -> None:
        """Commit the buffer; with ``finished`` also mark this worker complete in its manifest."""
        if self._closed:
            return
        try:
            self.flush()
            if finished and not self._manifest.finished:
                self._manifest.finished = True
                write_manifest(self.path, self._manifest, durable=self.durable)
        finally:
            self._release()

    def __enter__(self) -> "TargetStoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # keep what is complete, but don't claim the worker is finished
            try:
                self.close(finished=False)
            except Exception:
                self._release()

    # ------------------------------------------------------------------ internals
    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("writer is closed")

    def _release(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self._lock_fd)

    def _discard_uncommitted(self) -> None:
        committed = {s.name for s in self._manifest.shards}
        shards_dir = self.path / "shards"
        for entry in os.listdir(shards_dir):
            parsed = parse_shard_name(entry)
            if parsed and parsed[0] == self.worker_index and entry not in committed:
                shutil.rmtree(shards_dir / entry)
        prefix = f".manifest-w{self.worker_index:04d}.json."
        for entry in os.listdir(self.path):
            if entry.startswith(prefix) and entry.endswith(".tmp"):
                os.unlink(self.path / entry)


def _acquire_lock(store: Path, worker: int) -> int:
    locks = store / "locks"
    locks.mkdir(exist_ok=True)
    path = locks / f"w{worker:04d}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StoreLockedError(f"{store}: worker {worker} is being written by another live "
                               f"process (pid {holder}); one writer per worker") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _version() -> str:
    try:
        from importlib.metadata import version
        return f"aligndistil {version('aligndistil')}"
    except Exception:
        return "aligndistil"
