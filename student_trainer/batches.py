"""Where each optimizer step's records come from: the store (off-policy) or fresh rollouts
scored by the teacher server (on-policy).

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

import copy
import logging
import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol, Sequence

import numpy as np
import torch

from storage.record import TargetRecord

log = logging.getLogger(__name__)


@dataclass
class StepData:
    step: int                       #: 0-based global step
    epoch: int
    records: list[TargetRecord]
    timings: dict[str, float]       #: seconds spent producing them (rollout, scoring, ...)


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


# ---------------------------------------------------------------------------- on-policy
class OnPolicySource:
    """Prompts -> sampled responses (the student) -> teacher targets (the server).

    ``generate(model, prompts, seed)`` and ``score(sequences)`` are injected, so this class only
    decides what is generated when. With ``async_rollouts`` the rollouts and scoring of step
    ``s + 1`` run in a background thread while step ``s`` trains, on a copy of the student
    holding the weights from before step ``s``'s update: the samples of step ``s + 1`` are one
    update stale (the usual price of pipelining; PPO-style trainers accept the same). Without
    it every step samples from the current weights.
    """

    def __init__(self, prompts: Sequence[Sequence[int]], *, model: torch.nn.Module,
                 generate: Callable[[torch.nn.Module, list[list[int]], int], list],
                 score: Callable[[list], list[TargetRecord]], seed: int, rank: int = 0,
                 world_size: int = 1, async_rollouts: bool = False):
        self.prompts = [list(p) for p in prompts]
        self.model = model
        self.generate, self.score = generate, score
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.records_per_epoch = len(self.prompts) // world_size
        if self.records_per_epoch < 1:
            raise ValueError(f"{len(self.prompts)} prompts cannot feed {world_size} ranks")
        self.async_rollouts = async_rollouts
        self._pool: ThreadPoolExecutor | None = None
        self._rollout_model: torch.nn.Module | None = None

    def steps_per_epoch(self, per_rank_batch: int) -> int:
        return math.ceil(self.records_per_epoch / per_rank_batch)

    def prompts_for(self, step: int, per_rank_batch: int) -> tuple[int, list[list[int]]]:
        spe = self.steps_per_epoch(per_rank_batch)
        epoch, begin = position(step, spe, per_rank_batch)
        order = epoch_permutation(len(self.prompts), self.seed, epoch)
        mine = order[self.rank::self.world_size][:self.records_per_epoch]
        chosen = mine[begin:begin + per_rank_batch]
        return epoch, [self.prompts[i] for i in chosen]

    def _job(self, model, step: int, per_rank_batch: int) -> StepData:
        epoch, prompts = self.prompts_for(step, per_rank_batch)
        t0 = time.perf_counter()
        sequences = self.generate(model, prompts,
                                  (self.seed * 1_000_003 + step) * self.world_size + self.rank)
        t1 = time.perf_counter()
        records = self.score(sequences)
        t2 = time.perf_counter()
        return StepData(step, epoch, records, {"rollout_s": t1 - t0, "score_s": t2 - t1})

    def iterate(self, start_step: int, total_steps: int, per_rank_batch: int
                ) -> Iterator[StepData]:
        if not self.async_rollouts:
            for step in range(start_step, total_steps):
                yield self._job(self.model, step, per_rank_batch)
            return
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout")
        future: Future | None = None
        for step in range(start_step, total_steps):
            if future is None:  # the first step has nothing in flight
                self._sync_rollout_model()
                future = self._pool.submit(self._job, self._rollout_model, step, per_rank_batch)
            data = future.result()
            future = None
            if step + 1 < total_steps:
                # Weights now are those before this step's update: step + 1 samples from them.
                self._sync_rollout_model()
                future = self._pool.submit(self._job, self._rollout_model, step + 1,
                                           per_rank_batch)
            yield data

    def _sync_rollout_model(self) -> None:
        """Copy the student's current weights into the rollout copy (made on first use)."""
        with torch.no_grad():
            if self._rollout_model is None:
                self._rollout_model = copy.deepcopy(self.model).eval().requires_grad_(False)
                return
            for dst, src in zip(self._rollout_model.state_dict().values(),
                                self.model.state_dict().values()):
                dst.copy_(src)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
