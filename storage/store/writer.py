"""``TargetStoreWriter``: one worker's append-only writer with crash-safe resume.

Records are buffered in memory and written as a shard once the buffer holds ``shard_tokens``
response tokens; a shard is committed (checksums, then the worker's manifest, see
:mod:`.manifest`) before the next one starts. Several workers write disjoint shards of one
store (``shards/w<worker>-s<seq>``), each committing to its own manifest.

One writer per worker, ever. On a local disk an exclusive ``flock`` on ``locks/w<worker>.lock``
is held for the writer's lifetime (the kernel drops it when the process dies, even by SIGKILL),
so a second live process for the same worker is refused instead of deleting its in-progress
shard. On object storage (``s3://...``) the writer stamps its owner token into its manifest and
every manifest write is conditional on the version of its own last one, so of two writers
the older is refused at its next commit (:class:`.location.ObjectLease`); its shards carry its
token in their names, so the two never write into one shard's objects. A writer that has lost
its worker writes nothing more: it checks ownership before writing a shard, removes the shard
whose commit was refused (its own, by its token), and its close writes neither shard nor
manifest.

Resume: opening a worker that already committed shards continues after its last committed
shard. Shard directories of this worker that no manifest lists are leftovers of a crash and
are deleted. The caller asks :meth:`TargetStoreWriter.committed_example_indices` which examples
are already stored and skips them; since shard boundaries depend only on the records from the
start of a shard, a resumed run produces the same store as an uninterrupted one.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Iterable

import numpy as np

from ..record import RecordError, TargetRecord
from .batch import TargetBatch
from .errors import StoreError, StoreLockedError
from .layout import get_layout
from .location import open_location
from .manifest import (CHECKSUMS_FILE, ShardEntry, WorkerManifest, checksums_blob,
                       manifest_bytes, manifest_name, parse_manifest, parse_shard_name,
                       read_manifest, sha256_bytes, shard_name, shard_relpath)
from .metadata import StoreMetadata, create_or_check
from .shardio import WriteHook, load_shard_arrays, write_shard
from .shardstats import alpha_range, shard_stats

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
        self.location = open_location(path)
        self.path = self.location.root if self.location.is_local else self.location.url
        self.layout = get_layout(metadata.layout)
        if not metadata.created_with:
            metadata = replace(metadata, created_with=_version())
        self.metadata = create_or_check(self.location, metadata)
        self.worker_index = worker_index
        self.shard_tokens = shard_tokens
        self.durable = durable
        self._hook = _hook
        self._lease = self.location.acquire(worker_index, manifest_name(worker_index))
        self._closed = False
        #: why this writer lost its worker to a newer writer (None while it holds it)
        self._lost: StoreLockedError | None = None
        #: on object storage, this writer's shards carry its token (see the module docstring)
        self._writer_tag = None if self.location.is_local else self._lease.token[:8]
        try:
            if self.location.is_local:
                self._manifest = (read_manifest(self.location, worker_index)
                                  or WorkerManifest(worker_index))
            else:  # the lease read the manifest; stamping it now takes the worker over
                initial = self._lease.initial
                self._manifest = (parse_manifest(initial, worker_index)
                                  if initial is not None else WorkerManifest(worker_index))
                self._as_owner(self._lease.commit, manifest_bytes(self._manifest))
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
                load_shard_arrays(self.location, entry,
                                  names={"example_index"})["example_index"][0]
                for entry in self._manifest.shards]
        if not self._committed_indices:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate(self._committed_indices)

    # ------------------------------------------------------------------ writing
    def write(self, record: TargetRecord) -> None:
        """Buffer one record (validated against the store's vocab size and k)."""
        self._check_open()
        record.validate(vocab_size=self.metadata.vocab_size)
        ragged = bool(self.metadata.tail_budget)  # a fixed-k packed store keeps k everywhere
        if record.top_k > self.metadata.top_k or (record.top_k != self.metadata.top_k
                                                   and not ragged):
            raise RecordError(f"topk_ids: record {record.example_index} has k = {record.top_k}, "
                              f"the store has top_k = {self.metadata.top_k}")
        if record.ragged and not ragged:
            raise RecordError(f"topk_count: record {record.example_index} keeps fewer than k ids "
                              f"at some positions; only a store with a tail budget (format "
                              f"version 3 or 4) holds such records")
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
        self._as_owner(self._lease.check)
        batch = TargetBatch.from_records(self._buffer)
        name = shard_name(self.worker_index, self._next_seq, self._writer_tag)
        relpath = shard_relpath(name)
        files = write_shard(self.location, relpath, batch, self.layout, self.metadata.vocab_size,
                            durable=self.durable, hook=self._hook,
                            ragged=self.metadata.format_version >= 3)
        blob = checksums_blob(files)
        self.location.write(f"{relpath}/{CHECKSUMS_FILE}", blob, durable=self.durable)
        checksum = sha256_bytes(blob)
        entry = ShardEntry(name=name, num_examples=len(batch), num_tokens=batch.num_tokens,
                           num_input_tokens=int(batch.seq_offsets[-1]),
                           checksums_sha256=checksum)
        meta = self.metadata
        self._manifest.shard_stats[name] = shard_stats(
            batch, alpha_bounds=alpha_range(meta.mode, meta.r, meta.eps, meta.tvd_norm),
            tail_budget=meta.tail_budget)
        self._manifest.shards.append(entry)
        self._manifest.finished = False
        try:
            self._as_owner(self._lease.commit, manifest_bytes(self._manifest),
                           durable=self.durable)
        except BaseException:
            self._manifest.shards.pop()
            self._manifest.shard_stats.pop(name, None)
            if self._lost is not None:  # taken over while writing: take the shard back
                self._remove_refused(relpath)
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
        """Commit the buffer; with ``finished`` also mark this worker complete in its manifest.

        A writer that lost its worker to a newer writer only lets go: it writes nothing."""
        if self._closed:
            return
        try:
            if self._lost is not None:
                return
            self.flush()
            if finished and not self._manifest.finished:
                self._manifest.finished = True
                self._as_owner(self._lease.commit, manifest_bytes(self._manifest),
                               durable=self.durable)
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
        if self._lost is not None:
            raise StoreLockedError(str(self._lost))

    def _as_owner(self, call, *args, **kwargs):
        """A call on the lease; a :class:`StoreLockedError` from it marks this writer as having
        lost its worker, for good."""
        try:
            return call(*args, **kwargs)
        except StoreLockedError as exc:
            self._lost = exc
            raise

    def _remove_refused(self, relpath: str) -> None:
        """Delete the shard whose commit was refused. It is this writer's own (its token is in
        the name), so no other writer's objects are touched; if the delete fails too, the
        worker's next writer to start discards it as a crash's leftover."""
        try:
            self.location.remove_tree(relpath)
        except (OSError, StoreError):
            pass

    def _release(self) -> None:
        if not self._closed:
            self._closed = True
            self._lease.release()

    def _discard_uncommitted(self) -> None:
        """Delete this worker's shards that no manifest lists (a crash's leftovers)."""
        committed = {s.name for s in self._manifest.shards}
        for entry in self.location.list_names("shards"):
            parsed = parse_shard_name(entry)
            if parsed and parsed[0] == self.worker_index and entry not in committed:
                self.location.remove_tree(shard_relpath(entry))
        if self.location.is_local:  # temp files of an interrupted atomic manifest write
            prefix = f".manifest-w{self.worker_index:04d}.json."
            for entry in os.listdir(self.location.root):
                if entry.startswith(prefix) and entry.endswith(".tmp"):
                    os.unlink(self.location.root / entry)


def _version() -> str:
    try:
        from importlib.metadata import version
        return f"aligndistil {version('aligndistil')}"
    except Exception:
        return "aligndistil"
