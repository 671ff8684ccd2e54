"""``TargetStore``: the reader — random access, epoch streaming, rank partitioning, prefetch.

Opening reads the metadata and the workers' manifests once; the store is then a fixed snapshot
of the committed shards (shards committed later are seen by opening again). Example positions
``0..len-1`` run over shards in (worker, sequence) order.

Epoch order (:meth:`TargetStore.epoch_plan`): with ``shuffle``, the shard order is a permutation
seeded by ``(seed, epoch)`` and each shard's examples are permuted by ``(seed, epoch, shard)``;
the resulting global sequence is cut into ``world_size`` contiguous, near-equal ranges (sizes
differ by at most one), and rank ``r`` takes range ``r``. Every rank reads only about
``1/world_size`` of the shards, and every example appears exactly once per epoch over all ranks.

A shard is read whole (one zarr read per array, all its chunks at once), its bytes checked
against the shard's checksums, then decoded; the streaming iterators do this in a background
thread ``prefetch`` shards ahead. The object pickles to its path, options and manifest
snapshot only (no threads, caches or file handles), so it can be handed to DataLoader
workers started with ``spawn``.
"""

from __future__ import annotations

import os
import queue
import threading
from collections import OrderedDict
from typing import Any, Iterator

import numpy as np

from ..record import TargetRecord
from .batch import TargetBatch
from .manifest import ShardEntry, WorkerManifest, list_manifest_workers, parse_shard_name, \
    read_manifest
from .metadata import StoreMetadata, read_metadata
from .location import open_location
from .shardio import load_shard, load_shard_arrays


class TargetStore:
    """Read a target store; see the module docstring.

    ``verify=False`` skips the per-shard checksum pass (~10-15% of decode time); damaged
    bytes are then caught only if the codecs or the consistency checks notice them, so keep
    it on unless the storage is trusted. ``cache_shards`` decoded shards are kept for random
    access (the streaming iterators don't fill the cache).
    """

    def __init__(self, path: str | os.PathLike, *, verify: bool = True, cache_shards: int = 2):
        location = open_location(path)
        #: a local folder as a Path, object storage as its URL
        self.path = location.root if location.is_local else location.url
        self.verify = verify
        self.cache_shards = cache_shards
        self.metadata: StoreMetadata = read_metadata(location)
        self.manifests: dict[int, WorkerManifest] = {}
        for worker in list_manifest_workers(location):
            manifest = read_manifest(location, worker)
            if manifest is not None:
                self.manifests[worker] = manifest
        self.shards: list[ShardEntry] = [s for w in sorted(self.manifests)
                                         for s in self.manifests[w].shards]
        self._init_runtime()

    @classmethod
    def open(cls, path: str | os.PathLike, **kwargs: Any) -> "TargetStore":
        return cls(path, **kwargs)

    def _init_runtime(self) -> None:
        self.location = open_location(self.path)  # per process: not pickled
        sizes = np.array([s.num_examples for s in self.shards], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._cache: OrderedDict[int, TargetBatch] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._example_indices: np.ndarray | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "verify": self.verify, "cache_shards": self.cache_shards,
                "metadata": self.metadata, "manifests": self.manifests, "shards": self.shards}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    # ------------------------------------------------------------------ sizes
    def unfinished_workers(self) -> list[str]:
        """The precompute workers that have not finished, described (``[]``: complete)."""
        out = []
        for worker in range(self.metadata.num_workers):
            manifest = self.manifests.get(worker)
            if manifest is None:
                out.append(f"worker {worker} of {self.metadata.num_workers} never committed")
            elif not manifest.finished:
                out.append(f"worker {worker} of {self.metadata.num_workers} is unfinished "
                           f"({sum(s.num_examples for s in manifest.shards)} examples so far)")
        return out

    @property
    def num_examples(self) -> int:
        return int(self._starts[-1])

    def __len__(self) -> int:
        return self.num_examples

    @property
    def num_tokens(self) -> int:
        """Response tokens (target positions) over all committed shards."""
        return sum(s.num_tokens for s in self.shards)

    @property
    def num_input_tokens(self) -> int:
        return sum(s.num_input_tokens for s in self.shards)

    def shard_of(self, position: int) -> tuple[int, int]:
        """``(shard number, position within the shard)`` of an example position."""
        if not 0 <= position < self.num_examples:
            raise IndexError(f"example {position} out of range: the store has "
                             f"{self.num_examples} examples")
        shard = int(np.searchsorted(self._starts, position, side="right") - 1)
        return shard, position - int(self._starts[shard])

    # ------------------------------------------------------------------ random access
    def __getitem__(self, position: int) -> TargetRecord:
        if position < 0:
            position += self.num_examples
        shard, local = self.shard_of(position)
        return self.load_shard(shard).record(local)

    def get(self, position: int) -> TargetRecord:
        return self[position]

    def load_shard(self, shard: int) -> TargetBatch:
        """Shard ``shard`` decoded (verified on load), through a small LRU cache."""
        with self._cache_lock:
            batch = self._cache.get(shard)
            if batch is not None:
                self._cache.move_to_end(shard)
                return batch
        batch = load_shard(self.location, self.shards[shard], verify=self.verify)
        if self.cache_shards > 0:
            with self._cache_lock:
                self._cache[shard] = batch
                while len(self._cache) > self.cache_shards:
                    self._cache.popitem(last=False)
        return batch

    def example_indices(self) -> np.ndarray:
        """``example_index`` of every position (int64), reading only that array of each shard."""
        if self._example_indices is None:
            parts = [load_shard_arrays(self.location, e, verify=self.verify,
                                       names={"example_index"})["example_index"][0]
                     for e in self.shards]
            self._example_indices = (np.concatenate(parts) if parts
                                     else np.zeros(0, dtype=np.int64))
        return self._example_indices

    def position_of(self, example_index: int) -> int:
        """The store position holding source row ``example_index`` (KeyError if absent)."""
        hits = np.flatnonzero(self.example_indices() == example_index)
        if hits.size == 0:
            raise KeyError(f"example_index {example_index} is not in the store")
        return int(hits[0])

    # ------------------------------------------------------------------ epochs
    def epoch_plan(self, *, epoch: int = 0, seed: int = 0, shuffle: bool = True, rank: int = 0,
                   world_size: int = 1) -> list[tuple[int, np.ndarray]]:
        """This rank's share of the epoch as ``[(shard number, positions within it), ...]``."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, world_size = {world_size})")
        n_shards = len(self.shards)
        if shuffle:
            order = np.random.default_rng([seed, epoch]).permutation(n_shards)
        else:
            order = np.arange(n_shards)
        total = self.num_examples
        lo, hi = total * rank // world_size, total * (rank + 1) // world_size
        plan: list[tuple[int, np.ndarray]] = []
        start = 0
        for shard in order.tolist():
            size = self.shards[shard].num_examples
            end = start + size
            if end > lo and start < hi:
                if shuffle:
                    worker, seq = parse_shard_name(self.shards[shard].name)
                    local = np.random.default_rng([seed, epoch, worker, seq]).permutation(size)
                else:
                    local = np.arange(size)
                plan.append((shard, local[max(lo - start, 0):min(hi, end) - start]))
            start = end
            if start >= hi:
                break
        return plan

    def iter_batches(self, batch_size: int, *, epoch: int = 0, seed: int = 0,
                     shuffle: bool = True, rank: int = 0, world_size: int = 1,
                     prefetch: int = 2, drop_last: bool = False) -> Iterator[TargetBatch]:
        """Stream this rank's epoch as :class:`TargetBatch` objects of ``batch_size`` examples
        (the last one smaller unless ``drop_last``). The fast path: no per-record objects,
        and batches are views of shard data already put in epoch order by the prefetch
        thread, so the consumer does almost no work."""
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        plan = self.epoch_plan(epoch=epoch, seed=seed, shuffle=shuffle, rank=rank,
                               world_size=world_size)
        pending: list[TargetBatch] = []
        pending_n = 0
        for part in self.iter_plan(plan, prefetch=prefetch):
            pos = 0
            while pos < len(part):
                piece = part.slice(pos, min(len(part), pos + batch_size - pending_n))
                pos += len(piece)
                pending.append(piece)
                pending_n += len(piece)
                if pending_n == batch_size:
                    yield TargetBatch.concat(pending)
                    pending, pending_n = [], 0
        if pending and not drop_last:
            yield TargetBatch.concat(pending)

    def iter_records(self, *, epoch: int = 0, seed: int = 0, shuffle: bool = True,
                     rank: int = 0, world_size: int = 1,
                     prefetch: int = 2) -> Iterator[TargetRecord]:
        """Stream this rank's epoch record by record (views into decoded shard data)."""
        plan = self.epoch_plan(epoch=epoch, seed=seed, shuffle=shuffle, rank=rank,
                               world_size=world_size)
        for part in self.iter_plan(plan, prefetch=prefetch):
            for i in range(len(part)):
                yield part.record(i)

    def iter_plan(self, plan: list[tuple[int, np.ndarray]], *,
                  prefetch: int = 2) -> Iterator[TargetBatch]:
        """For each ``(shard, positions)`` of ``plan`` (e.g. :meth:`epoch_plan`'s, possibly
        trimmed to resume mid-epoch), a :class:`TargetBatch` of the shard's records at those
        positions, in that order; loaded, verified, decoded and gathered up to ``prefetch``
        pieces ahead in a background thread."""
        if prefetch <= 0:
            for shard, local in plan:
                yield self._load_piece(shard, local)
            return
        yield from _Prefetcher(self, plan, prefetch)

    def _load_piece(self, shard: int, local: np.ndarray) -> TargetBatch:
        with self._cache_lock:
            cached = self._cache.get(shard)
        if cached is None:
            cached = load_shard(self.location, self.shards[shard], verify=self.verify)
        return cached.take(local)


class _Prefetcher:
    """Iterator over the plan's pieces, produced by a daemon thread into a bounded queue.

    Errors in the thread are re-raised in the consumer; abandoning the iterator (break, garbage
    collection) stops the thread.
    """

    _DONE = object()

    def __init__(self, store: TargetStore, plan: list[tuple[int, np.ndarray]], depth: int):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(store, plan), daemon=True,
                                        name="aligndistil-store-prefetch")
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, store: TargetStore, plan: list[tuple[int, np.ndarray]]) -> None:
        try:
            for shard, local in plan:
                if self._stop.is_set() or not self._put(store._load_piece(shard, local)):
                    return
        except BaseException as exc:  # handed to the consumer
            self._put(exc)
            return
        self._put(self._DONE)

    def __iter__(self) -> Iterator[TargetBatch]:
        try:
            while True:
                item = self._queue.get()
                if item is self._DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self._stop.set()
            self._thread.join(timeout=5)
