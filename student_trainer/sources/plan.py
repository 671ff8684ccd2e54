"""The step plan both batch sources follow: which records each optimizer step gets.

The sources: :mod:`.store` (off-policy, the target store) and :mod:`.on_policy` (fresh rollouts
scored by the teacher server).

Both sources map a global step number to the records of that step deterministically, and the
same way for any number of ranks: an epoch is one order of all its records (shuffled by
``(seed, epoch)``), step ``s`` is ``(epoch, offset) = divmod(s, steps_per_epoch)`` and takes
the ``global_batch`` records of that epoch's order from ``offset * global_batch`` (fewer at the
end of an epoch), and each rank takes one contiguous block of them (:func:`rank_block`, sizes
differing by at most one). So step ``s`` trains on the same records on 1, 2 or 8 ranks; the
data position a checkpoint needs is just the step, and a run may resume on another number of
ranks. A rank whose block is empty (a last step with fewer records than ranks) gets a
``filler``: a record of the step it runs forward and backward with weight 0, because DDP and
FSDP need every rank in every step. No record is left out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol

import numpy as np

from storage.record import TargetRecord


@dataclass
class StepData:
    step: int                       #: 0-based global step
    epoch: int
    records: list[TargetRecord]     #: this rank's block of the step (may be empty)
    timings: dict[str, float]       #: seconds spent producing them (rollout, scoring, ...)
    counts: dict[str, float] = field(default_factory=dict)  #: e.g. responses cut without EOS
    step_sequences: int = 0         #: the step's records over all ranks (the loss's divisor)
    filler: TargetRecord | None = None  #: with no records: one to run with weight 0
    staleness: int = 0              #: on-policy: updates between the sampling and trained weights
    rollout: Any = None             #: on-policy: the samples (kept by checkpoints while in flight)


class BatchSource(Protocol):
    records_per_epoch: int          #: over all ranks

    def steps_per_epoch(self, global_batch: int) -> int: ...

    def iterate(self, start_step: int, total_steps: int, global_batch: int
                ) -> Iterator[StepData]: ...

    def close(self) -> None: ...


def steps_per_epoch(records_per_epoch: int, global_batch: int) -> int:
    return math.ceil(records_per_epoch / global_batch)


def step_range(step: int, records_per_epoch: int, global_batch: int) -> tuple[int, int, int]:
    """``(epoch, start, stop)``: step ``step``'s records are positions ``start:stop`` of that
    epoch's order."""
    epoch, in_epoch = divmod(step, steps_per_epoch(records_per_epoch, global_batch))
    start = in_epoch * global_batch
    return epoch, start, min(start + global_batch, records_per_epoch)


def rank_block(start: int, stop: int, rank: int, world_size: int) -> tuple[int, int]:
    """This rank's contiguous block ``[lo, hi)`` of ``[start, stop)``."""
    n = stop - start
    return start + n * rank // world_size, start + n * (rank + 1) // world_size


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The same shuffled order of ``n`` items on every rank for a given (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)
