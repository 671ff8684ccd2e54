"""Off-policy records: this rank's blocks of the target store's steps, epoch by epoch.

The store's own epoch plan (``TargetStore.epoch_plan`` over all records) decides the order:
shards shuffled by ``(seed, epoch)``, examples shuffled within each shard. A step is a slice of
that order, the same for any number of ranks, and each rank reads its block of every step
(:mod:`.plan`). A rank's reads stay within the shards of the steps it trains: the blocks of
consecutive steps follow the shards in order, so each shard is decoded once per epoch per rank
(the reader's prefetcher decodes the next shard in a background thread while the current one
is consumed), and resuming at step ``s`` never reads the shards before it.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from storage.record import TargetRecord
from student_trainer.errors import ConfigError, check_same_tokenizer
from student_trainer.sources.plan import StepData, rank_block, step_range, steps_per_epoch


class StoreSource:
    """This rank's records of the store, step by step (see the module docstring)."""

    def __init__(self, path: str, *, seed: int, rank: int = 0, world_size: int = 1,
                 prefetch: int = 1, allow_incomplete: bool = False):
        from storage.store import TargetStore

        self.store = TargetStore.open(path)
        missing = self.store.unfinished_workers()
        if missing and not allow_incomplete:
            raise ConfigError(f"store {path} is incomplete: {'; '.join(missing)} (it holds "
                              f"{len(self.store)} examples); finish those precompute workers "
                              f"(rerun their commands), or pass --allow-incomplete to train on "
                              f"what is there")
        self.path = path
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.prefetch = prefetch
        self.records_per_epoch = len(self.store)
        if self.records_per_epoch < 1:
            raise ConfigError(f"store {path} holds no examples")

    @property
    def metadata(self):
        return self.store.metadata

    def check_tokenizer(self, *, tokenizer_sha256: str, vocab_size: int, model: str) -> None:
        meta = self.store.metadata
        check_same_tokenizer(f"store {self.path}", theirs_sha256=meta.tokenizer_sha256,
                             theirs_vocab=meta.vocab_size, student_sha256=tokenizer_sha256,
                             student_vocab=vocab_size, student=f"--model {model}")

    def steps_per_epoch(self, global_batch: int) -> int:
        return steps_per_epoch(self.records_per_epoch, global_batch)

    def iterate(self, start_step: int, total_steps: int, global_batch: int
                ) -> Iterator[StepData]:
        spe = self.steps_per_epoch(global_batch)
        step = start_step
        while step < total_steps:
            epoch = step // spe
            last = min(total_steps, (epoch + 1) * spe)
            # this rank's positions in the epoch order, step by step (a filler: weight 0)
            wanted = []
            for s in range(step, last):
                _, start, stop = step_range(s, self.records_per_epoch, global_batch)
                lo, hi = rank_block(start, stop, self.rank, self.world_size)
                filler = hi == lo
                wanted.append((s, stop - start, filler,
                               np.array([start]) if filler else np.arange(lo, hi)))
            records = self._read(epoch, np.concatenate([p for *_, p in wanted]))
            for s, size, filler, positions in wanted:
                got = [next(records) for _ in range(len(positions))]
                yield StepData(s, epoch, [] if filler else got, {}, step_sequences=size,
                               filler=got[0] if filler else None)
            records.close()
            step = last

    def _read(self, epoch: int, positions: np.ndarray) -> Iterator[TargetRecord]:
        """The records at ``positions`` (ascending) of the epoch's order, in that order,
        each shard read once (its positions merged into one piece of the plan)."""
        plan = self.store.epoch_plan(epoch=epoch, seed=self.seed, shuffle=True)
        sizes = np.array([len(local) for _, local in plan])
        ends = np.cumsum(sizes)
        which = np.searchsorted(ends, positions, side="right")
        pieces: list[tuple[int, np.ndarray]] = []
        for part in np.unique(which):  # ascending positions: parts in plan order
            shard, local = plan[part]
            offsets = positions[which == part] - (ends[part] - sizes[part])
            pieces.append((shard, local[offsets]))
        for batch in self.store.iter_plan(pieces, prefetch=self.prefetch):
            yield from batch.records()

    def close(self) -> None:
        pass
