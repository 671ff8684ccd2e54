"""From target records to padded tensors the student step consumes.

Alignment (DESIGN §2, :mod:`causal_lm.positions`): record target ``t`` is the teacher's
distribution of ``input_ids[P+t]`` given ``input_ids[:P+t]``, i.e. it meets the student's logit
row ``P+t-1``. A batch therefore
carries, besides the right-padded ``input_ids``/``attention_mask`` ``[B, L]``, the flat
coordinates of every response position, ``row_idx`` / ``col_idx`` ``[N]`` (sequence, logit
row ``P-1 .. L-2``), and the targets flattened the same way (``[N, k]`` and ``[N]``), in
sequence order. ``response_mask`` ``[B, T_max]`` maps the flat positions back to a per-sequence
layout: ``flat_values`` fill ``x[response_mask]`` in the same (row-major) order.

Batches are cut by a token budget: the records of one optimizer step are sorted by length and
packed greedily so that ``sequences x longest`` (padded tokens) stays under the budget.

Packed batches (``packing=True``, for models :func:`causal_lm.packed.packing_check` passed):
``input_ids``/``attention_mask`` are ``[R, C]`` rows holding several sequences back to back,
``position_ids`` restart at 0 for each, and ``row_idx``/``col_idx`` point into the rows; the
per-sequence fields (``response_mask``, the flat targets) are as above, in the batch's sequence
order. Rows hold at most the batch's longest sequence and ``rows x longest`` stays under the
budget, so a packed micro-batch never computes more than a padded one.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from causal_lm.packed import pack_rows
from causal_lm.positions import response_coordinates
from storage.packing import batch_plan
from storage.ragged import widen_columns
from storage.record import TargetRecord


@dataclass
class Batch:
    input_ids: Tensor        #: [B, L] long, right-padded (packed: [R, C] rows)
    attention_mask: Tensor   #: [B, L] long, 1 on real tokens (packed: [R, C], not for the model)
    row_idx: Tensor          #: [N] long: sequence of each response position
    col_idx: Tensor          #: [N] long: its logit row (P-1 .. L-2)
    target_ids: Tensor       #: [N] long: the actual next token input_ids[P+t]
    response_mask: Tensor    #: [B, T_max] bool
    # teacher targets (absent for plain sequences, e.g. DPO)
    topk_ids: Tensor | None = None          #: [N, k] long (ragged records: padded, see count)
    topk_count: Tensor | None = None        #: [N] long: kept columns per position
    topk_logprobs: Tensor | None = None     #: [N, k] float32
    tail_logmass: Tensor | None = None      #: [N] float32
    alpha: Tensor | None = None             #: [N] float32
    dpo_logprobs: Tensor | None = None      #: [N] float32
    reverse_logprobs: Tensor | None = None  #: [N] float32
    position_ids: Tensor | None = None      #: [R, C] long, packed rows only

    @property
    def num_sequences(self) -> int:
        return int(self.response_mask.shape[0])

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens."""
        return int(self.attention_mask.sum())

    @property
    def num_response_tokens(self) -> int:
        return int(self.row_idx.shape[0])

    def to(self, device: torch.device | str) -> "Batch":
        return replace(self, **{f.name: getattr(self, f.name).to(device, non_blocking=True)
                                for f in fields(self) if getattr(self, f.name) is not None})

    def unflatten(self, flat: Tensor, fill: float = 0.0) -> Tensor:
        """``[N, ...]`` per-position values -> ``[B, T_max, ...]`` (``fill`` on padding)."""
        out = flat.new_full((*self.response_mask.shape, *flat.shape[1:]), fill)
        out[self.response_mask] = flat
        return out


def collate_sequences(sequences: Sequence[tuple[Sequence[int], int]], pad_id: int,
                      packed_rows: Sequence[Sequence[int]] | None = None) -> Batch:
    """Right-padded tensors and response coordinates for ``(input_ids, prompt_len)`` pairs; with
    ``packed_rows`` (lists of indices into ``sequences``), packed rows instead."""
    if not sequences:
        raise ValueError("cannot collate an empty batch")
    lengths = [len(ids) for ids, _ in sequences]
    prompt_lens = [p for _, p in sequences]
    responses = [n - p for p, n in zip(prompt_lens, lengths)]
    rmask = torch.zeros((len(sequences), max(responses)), dtype=torch.bool)
    for b, (p, n, t) in enumerate(zip(prompt_lens, lengths, responses)):
        if not 1 <= p < n:
            raise ValueError(f"sequence {b}: prompt_len must satisfy 1 <= prompt_len < "
                             f"len(input_ids) = {n}, got {p}")
        rmask[b, :t] = True
    positions = None
    if packed_rows is not None:
        packed = pack_rows([ids for ids, _ in sequences], packed_rows, pad_id)
        ids, mask, positions = packed.input_ids, packed.token_mask, packed.position_ids
        rows, cols = packed.response_coordinates(prompt_lens, lengths)
    else:
        ids = torch.full((len(sequences), max(lengths)), pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), max(lengths)), dtype=torch.long)
        for b, ((seq, _), n) in enumerate(zip(sequences, lengths)):
            ids[b, :n] = torch.as_tensor(np.asarray(seq, dtype=np.int64))
            mask[b, :n] = 1
        rows, cols = response_coordinates(lengths, prompt_lens)
    row_idx, col_idx = torch.from_numpy(rows), torch.from_numpy(cols)
    return Batch(input_ids=ids, attention_mask=mask, row_idx=row_idx, col_idx=col_idx,
                 target_ids=ids[row_idx, col_idx + 1], response_mask=rmask,
                 position_ids=positions)


def collate_records(records: Sequence[TargetRecord], pad_id: int,
                    packed_rows: Sequence[Sequence[int]] | None = None) -> Batch:
    """:func:`collate_sequences` plus the records' teacher targets, flattened in the same order."""
    batch = collate_sequences([(r.input_ids, r.prompt_len) for r in records], pad_id,
                              packed_rows)
    k = max(r.top_k for r in records)  # ragged records: each padded to the widest

    def cat(name: str, dtype) -> Tensor:
        return torch.from_numpy(np.concatenate([widen_columns(getattr(r, name), k)
                                                for r in records]).astype(dtype))

    ragged = any(r.ragged or r.top_k != k for r in records)
    return replace(
        batch,
        topk_ids=cat("topk_ids", np.int64),
        topk_count=cat("topk_count", np.int64) if ragged else None,
        topk_logprobs=cat("topk_logprobs", np.float32),
        tail_logmass=cat("tail_logmass", np.float32),
        alpha=cat("alpha", np.float32),
        dpo_logprobs=cat("dpo_logprobs", np.float32),
        reverse_logprobs=cat("reverse_logprobs", np.float32),
    )


def micro_batches(records: Sequence[TargetRecord], *, max_tokens: int, pad_id: int,
                  packing: bool = False) -> list[Batch]:
    """One optimizer step's records as token-budgeted micro-batches: padded, or packed rows."""
    plan = batch_plan([r.seq_len for r in records], max_tokens, packing=packing)
    return [collate_records([records[i] for i in members], pad_id, rows)
            for members, rows in plan]
