"""The pieces for users with their own training loop: a store as a PyTorch ``DataLoader``, the
AlignDistil loss of one batch, and the teacher client for on-policy targets.

    from student_trainer.api import store_dataloader, aligndistil_batch_loss, StudentForward

    loader = store_dataloader("work/targets.zarr", batch_size=8, pad_id=tokenizer.pad_token_id)
    forward = StudentForward(model, len(tokenizer))
    for batch in loader:
        loss = aligndistil_batch_loss(forward, batch.to(device))
        loss.backward(); optimizer.step(); optimizer.zero_grad()

A batch is a :class:`~student_trainer.collate.Batch`: the padded (or packed) token tensors,
the response positions' coordinates and the teacher's sparse targets, aligned with the
student's logit rows. ``examples/hf_trainer.py`` trains through Hugging Face's ``Trainer``
with these pieces.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from storage.record import TargetRecord
from storage.store import TargetStore
from student_trainer import losses
from student_trainer.client import TeacherClient
from student_trainer.collate import Batch, collate_records
from student_trainer.modeling import StudentForward


class StoreDataset(Dataset):
    """The records of a target store, by position (each shard verified when first read)."""

    def __init__(self, store: str | Path | TargetStore):
        self.store = store if isinstance(store, TargetStore) else TargetStore.open(store)

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, position: int) -> TargetRecord:
        return self.store[position]


def store_dataloader(store: str | Path | TargetStore, batch_size: int, *, pad_id: int,
                     shuffle: bool = True, seed: int = 0, **kwargs) -> DataLoader:
    """A ``DataLoader`` of :class:`Batch` es over a store (``kwargs`` go to ``DataLoader``:
    ``num_workers``, ``drop_last``, ...). ``seed`` fixes the shuffled order."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(StoreDataset(store), batch_size=batch_size, shuffle=shuffle,
                      generator=generator, collate_fn=partial(collate_records, pad_id=pad_id),
                      **kwargs)


def aligndistil_batch_loss(forward: StudentForward, batch: Batch, *, beta0: float = 0.1,
                           weighting: str = "alpha") -> Tensor:
    """The AlignDistil loss (DESIGN §2: the mean over the batch's sequences of
    ``(1/T) sum_t beta_t KL(pi_theta || pi*)_t``) of one batch, on the batch's device."""
    kl = forward(batch.input_ids, batch.attention_mask, batch.row_idx, batch.col_idx,
                 topk_ids=batch.topk_ids, topk_logprobs=batch.topk_logprobs,
                 tail_logmass=batch.tail_logmass, position_ids=batch.position_ids,
                 topk_count=batch.topk_count)
    return losses.aligndistil_loss(batch.unflatten(kl.float()),
                                   batch.unflatten(batch.alpha, 1.0), batch.response_mask,
                                   beta0=beta0, weighting=weighting)


__all__ = ["Batch", "StoreDataset", "StudentForward", "TeacherClient", "aligndistil_batch_loss",
           "losses", "store_dataloader"]
