"""The step plan both batch sources follow: which records each optimizer step gets.

The sources: :mod:`.store` (off-policy, the target store) and :mod:`.on_policy` (fresh rollouts
scored by the teacher server).

Both sources map a global step number to the records of that step deterministically: step
``s`` of a run is ``(epoch, offset) = divmod(s, steps_per_epoch)`` into that epoch's order, and
each step takes ``per_rank_batch`` records (fewer at the end of an epoch). So the data
position a checkpoint needs is just the step, and a resumed run sees exactly the records an
uninterrupted one would.

Every rank gets the same number of steps and the same number of records per step: ranks read
disjoint parts, and the part sizes are cut to the smallest one (at most ``world_size - 1``
records per epoch are left out), because DDP needs every rank in every step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Protocol

import numpy as np

from storage.record import TargetRecord


@dataclass
class StepData:
    step: int                       #: 0-based global step
    epoch: int
    records: list[TargetRecord]
    timings: dict[str, float]       #: seconds spent producing them (rollout, scoring, ...)
    counts: dict[str, float] = field(default_factory=dict)  #: e.g. responses cut without EOS


class BatchSource(Protocol):
    records_per_epoch: int          #: per rank

    def steps_per_epoch(self, per_rank_batch: int) -> int: ...

    def iterate(self, start_step: int, total_steps: int, per_rank_batch: int
                ) -> Iterator[StepData]: ...

    def close(self) -> None: ...


def position(step: int, steps_per_epoch: int, per_rank_batch: int) -> tuple[int, int]:
    """``(epoch, first record of the step within this rank's epoch order)``."""
    epoch, in_epoch = divmod(step, steps_per_epoch)
    return epoch, in_epoch * per_rank_batch


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The same shuffled order of ``n`` items on every rank for a given (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)
