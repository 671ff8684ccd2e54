"""A torch ``IterableDataset`` over a target store (imports torch; the rest of the package
doesn't).

Each DataLoader worker takes its own slice of the rank's epoch: worker ``w`` of ``W`` on rank
``r`` of ``R`` reads part ``r * W + w`` of ``R * W`` (see :meth:`TargetStore.epoch_plan`), so
examples are neither repeated nor dropped whatever the number of workers. The dataset pickles
to the store's path and manifest snapshot, so ``multiprocessing_context="spawn"`` is fine.
Use ``DataLoader(dataset, batch_size=None)``: batching is done here, on flat arrays.
"""

from __future__ import annotations

import os
from typing import Iterator

import torch.utils.data

from .batch import TargetBatch
from .reader import TargetStore


class TargetIterableDataset(torch.utils.data.IterableDataset):
    """Yields :class:`TargetBatch` (``batch_size`` examples) or, with ``batch_size=None``,
    :class:`~storage.record.TargetRecord` objects. Call :meth:`set_epoch` before each epoch."""

    def __init__(self, store: TargetStore | str | os.PathLike, *, batch_size: int | None = None,
                 shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1,
                 prefetch: int = 2, drop_last: bool = False):
        self.store = store if isinstance(store, TargetStore) else TargetStore.open(store)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.prefetch = prefetch
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[TargetBatch]:
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        part = dict(epoch=self.epoch, seed=self.seed, shuffle=self.shuffle,
                    rank=self.rank * workers + worker, world_size=self.world_size * workers,
                    prefetch=self.prefetch)
        if self.batch_size is None:
            return self.store.iter_records(**part)
        return self.store.iter_batches(self.batch_size, drop_last=self.drop_last, **part)
