"""Off-policy records: this rank's part of the target store, epoch by epoch.

The store's own epoch plan (``TargetStore.epoch_plan``) decides the order: shards shuffled by
``(seed, epoch)``, examples shuffled within each shard, the sequence cut into ``world_size``
contiguous parts. A step is a slice of this rank's part, so resuming at step ``s`` means
starting the plan at record ``(s % steps_per_epoch) * per_rank_batch``: the plan is trimmed
there, and shards before it are never read. Shards are decoded one ahead in a background
thread (the reader's own prefetcher) while the current one is consumed.
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np

from storage.record import TargetRecord
from student_trainer.errors import ConfigError, check_same_tokenizer
from student_trainer.sources.plan import StepData, position


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
        # Parts differ by at most one record; every rank takes the smallest part's size.
        self.records_per_epoch = len(self.store) // world_size
        if self.records_per_epoch < 1:
            raise ConfigError(f"store {path} holds {len(self.store)} examples: too few for "
                             f"{world_size} ranks")

    @property
    def metadata(self):
        return self.store.metadata

    def check_tokenizer(self, *, tokenizer_sha256: str, vocab_size: int, model: str) -> None:
        meta = self.store.metadata
        check_same_tokenizer(f"store {self.path}", theirs_sha256=meta.tokenizer_sha256,
                             theirs_vocab=meta.vocab_size, student_sha256=tokenizer_sha256,
                             student_vocab=vocab_size, student=f"--model {model}")

    def steps_per_epoch(self, per_rank_batch: int) -> int:
        return math.ceil(self.records_per_epoch / per_rank_batch)

    def iterate(self, start_step: int, total_steps: int, per_rank_batch: int
                ) -> Iterator[StepData]:
        spe = self.steps_per_epoch(per_rank_batch)
        step = start_step
        while step < total_steps:
            epoch, offset = position(step, spe, per_rank_batch)
            records = self.epoch_records(epoch, offset)
            while step < total_steps and step // spe == epoch:
                take = min(per_rank_batch, self.records_per_epoch - offset)
                batch = [next(records) for _ in range(take)]
                yield StepData(step, epoch, batch, {})
                offset += take
                step += 1
            records.close()

    def epoch_records(self, epoch: int, offset: int = 0) -> Iterator[TargetRecord]:
        """This rank's records of ``epoch`` from ``offset`` on (cut to ``records_per_epoch``)."""
        plan = self.store.epoch_plan(epoch=epoch, seed=self.seed, shuffle=True, rank=self.rank,
                                     world_size=self.world_size)
        trimmed, skip, left = [], offset, self.records_per_epoch - offset
        for shard, local in plan:
            if skip >= local.size:
                skip -= local.size
                continue
            part = local[skip:skip + left]
            skip = 0
            if part.size:
                trimmed.append((shard, part))
                left -= part.size
            if left <= 0:
                break
        return self._read(trimmed)

    def _read(self, plan: list[tuple[int, np.ndarray]]) -> Iterator[TargetRecord]:
        for batch in self.store.iter_plan(plan, prefetch=self.prefetch):
            yield from batch.records()

    def close(self) -> None:
        pass
