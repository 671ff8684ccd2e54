"""The student's own candidates, on-policy (``--student-top N``).

The reverse KL weighs pi* where the student puts its mass. A teacher record keeps pi*'s own
best ids; the ids the student likes but pi* does not are in the record's tail, where the loss
only knows their total. On-policy the trainer knows the student, so it names the student's top
N ids at each response position, the server returns log pi* at them (``/v1/score``'s
``extra_ids``), and the loss runs on the union of both sets.

- :func:`student_top_ids`: the ids, from one no-grad pass of the sampling model over the step's
  sequences (one call per step, so FSDP ranks make equal numbers of collective calls).
- :func:`merge_candidates`: a record whose kept ids are the union, sorted by log pi*, with the
  tail made smaller by the mass of the ids that joined (computed in float64).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from causal_lm.head import head_logits, response_hidden
from storage.record import TargetRecord
from student_trainer.collate import collate_sequences

#: Rows of logits alive at a time while picking the top ids (memory O(rows x V)).
HEAD_ROWS = 256


@torch.no_grad()
def student_top_ids(model: torch.nn.Module, sequences: Sequence[tuple[Sequence[int], int]],
                    n: int, *, pad_id: int, vocab_size: int, batch_size: int = 32,
                    forward=None) -> list[np.ndarray]:
    """The student's ``n`` likeliest next ids at every response position: one ``[T, n]`` int64
    array per sequence, from passes of ``batch_size`` sequences in eval mode (no dropout, no
    random numbers drawn). ``forward`` (the FSDP root's ``StudentForward``) replaces the plain
    ``model`` when its parameters are sharded: then all sequences go in one pass, so every rank
    makes the same number of collective calls whatever its share of the step."""
    sequences = list(sequences)
    module = forward if forward is not None else model
    was_training = module.training
    module.eval()
    try:
        parts = []
        step = len(sequences) if forward is not None else max(1, batch_size)
        for start in range(0, len(sequences), step):
            batch = collate_sequences(sequences[start:start + step], pad_id)
            if forward is not None:
                top = forward(batch.input_ids, batch.attention_mask, batch.row_idx,
                              batch.col_idx, mode="top", top_n=n)
            else:
                device = model.get_input_embeddings().weight.device
                hidden = response_hidden(model, batch.input_ids.to(device),
                                         batch.attention_mask.to(device), batch.row_idx,
                                         batch.col_idx)
                top = top_ids_of_hidden(model, hidden, n, vocab_size)
            parts.append(top.cpu().numpy())
    finally:
        module.train(was_training)
    top = np.concatenate(parts)
    lengths = [len(ids) - p for ids, p in sequences]
    return np.split(top, np.cumsum(lengths)[:-1])


def top_ids_of_hidden(model: torch.nn.Module, hidden: torch.Tensor, n: int,
                      vocab_size: int) -> torch.Tensor:
    """``[N, n]`` ids of the largest logits, the LM head applied :data:`HEAD_ROWS` rows at a
    time."""
    parts = [torch.topk(head_logits(model, hidden[s:s + HEAD_ROWS], vocab_size), n,
                        dim=-1).indices for s in range(0, hidden.shape[0], HEAD_ROWS)]
    return torch.cat(parts) if parts else hidden.new_zeros((0, n), dtype=torch.long)


def merge_candidates(record: TargetRecord, extra_ids: np.ndarray,
                     extra_logprobs: np.ndarray) -> TargetRecord:
    """``record`` with the named ids (``[T, m]``, -1 for none) and their log pi* (float32)
    joined to its kept ids. Per position the ids not kept yet are added, the whole row is sorted
    by log pi* descending (ties keep the record's order first), and the tail loses their mass:
    ``exp(tail) - sum(exp(added))`` in float64. Where that leaves less than the tail's float32
    resolution, the tail is set to that resolution (it is below what float32 log pi* can say)."""
    T, width = record.topk_ids.shape
    extra_ids = np.asarray(extra_ids, dtype=np.int64)
    extra_lp = np.asarray(extra_logprobs, dtype=np.float64)
    if extra_ids.shape != extra_lp.shape or extra_ids.ndim != 2 or extra_ids.shape[0] != T:
        raise ValueError(f"extra ids {extra_ids.shape} and log-probs {extra_lp.shape} must be "
                         f"[T = {T}, m]")
    m = extra_ids.shape[1]
    counts = record.topk_count.astype(np.int64)
    slot = np.arange(width)
    kept = slot[None, :] < counts[:, None]
    # an extra id is new when it is real and neither kept nor named earlier in its row
    in_kept = ((extra_ids[:, :, None] == record.topk_ids[:, None, :]) & kept[:, None, :]).any(-1)
    earlier = np.triu(np.ones((m, m), dtype=bool), 1)  # [j, i]: j < i
    dup = ((extra_ids[:, :, None] == extra_ids[:, None, :]) & earlier[None]).any(1)
    new = (extra_ids >= 0) & ~in_kept & ~dup
    new_lp16 = extra_lp.astype(np.float16)
    ids = np.concatenate([record.topk_ids.astype(np.int64), extra_ids], axis=1)
    lps = np.concatenate([record.topk_logprobs, new_lp16], axis=1)
    keep = np.concatenate([kept, new], axis=1)
    key = np.where(keep, lps.astype(np.float32), -np.inf)
    order = np.argsort(-key, axis=1, kind="stable")
    ids, lps = np.take_along_axis(ids, order, 1), np.take_along_axis(lps, order, 1)
    count = keep.sum(1)
    new_width = int(count.max()) if T else width
    ids, lps = ids[:, :new_width], lps[:, :new_width]
    pad = np.arange(new_width)[None, :] >= count[:, None]
    ids = np.where(pad, ids[:, :1], ids)
    lps = np.where(pad, lps[:, :1], lps)

    tail = record.tail_logmass.astype(np.float64)
    added = np.where(new, np.exp(extra_lp), 0.0).sum(1)
    with np.errstate(divide="ignore"):
        left = np.exp(tail) - added
        floor = np.exp(tail) * 2.0 ** -23  # float32's relative resolution of the tail
        new_tail = np.where(np.isneginf(tail), -math.inf,
                            np.log(np.maximum(left, floor)))
    return TargetRecord(
        example_index=record.example_index, input_ids=record.input_ids,
        prompt_len=record.prompt_len, alpha=record.alpha, topk_ids=ids.astype(np.int32),
        topk_logprobs=lps.astype(np.float16), tail_logmass=new_tail.astype(np.float32),
        dpo_logprobs=record.dpo_logprobs, reverse_logprobs=record.reverse_logprobs,
        topk_count=count.astype(np.int32))
