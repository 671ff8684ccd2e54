"""``TargetBatch``: many records as flat token-major arrays plus offsets (no per-record objects).

This is the in-memory form of a decoded shard and what the streaming reader yields to a
trainer: per-position fields are concatenated over examples (``[N]`` or ``[N, k]``, ``N`` the
total response tokens) and ``pos_offsets[b]:pos_offsets[b+1]`` selects example ``b``'s rows;
``input_ids`` likewise with ``seq_offsets``. Gathering, slicing and concatenating are vectorised
so a batch of thousands of tokens costs a handful of numpy calls, not a Python loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np

from ..ragged import offsets_from_lengths, widen_columns

from ..record import FIELD_DTYPES, PER_POSITION_FIELDS, TargetRecord


@dataclass(frozen=True, eq=False)
class TargetBatch:
    """Records ``0..B-1`` in flat form. Arrays use the record contract's dtypes."""

    example_index: np.ndarray   # int64 [B]
    prompt_len: np.ndarray      # int32 [B]
    seq_offsets: np.ndarray     # int64 [B + 1], into input_ids
    input_ids: np.ndarray       # int32 [sum L]
    pos_offsets: np.ndarray     # int64 [B + 1], into the per-position arrays
    alpha: np.ndarray           # float32 [N]
    topk_ids: np.ndarray        # int32 [N, k]
    topk_logprobs: np.ndarray   # float16 [N, k]
    tail_logmass: np.ndarray    # float32 [N]
    dpo_logprobs: np.ndarray    # float32 [N]
    reverse_logprobs: np.ndarray  # float32 [N]
    #: int32 [N]: entries kept per position; a batch of ragged records is padded to its widest
    topk_count: np.ndarray

    # ------------------------------------------------------------------ views
    def __len__(self) -> int:
        return int(self.example_index.shape[0])

    @property
    def num_tokens(self) -> int:
        """Response tokens (= target positions) in the batch."""
        return int(self.pos_offsets[-1])

    @property
    def top_k(self) -> int:
        return int(self.topk_ids.shape[1])

    @property
    def response_lens(self) -> np.ndarray:
        return np.diff(self.pos_offsets)

    def record(self, i: int) -> TargetRecord:
        """Record ``i`` as views into this batch's arrays (no copy, no re-validation)."""
        if not 0 <= i < len(self):
            raise IndexError(f"record {i} out of range for a batch of {len(self)}")
        s0, s1 = int(self.seq_offsets[i]), int(self.seq_offsets[i + 1])
        p0, p1 = int(self.pos_offsets[i]), int(self.pos_offsets[i + 1])
        return TargetRecord(
            example_index=int(self.example_index[i]),
            input_ids=self.input_ids[s0:s1],
            prompt_len=int(self.prompt_len[i]),
            alpha=self.alpha[p0:p1],
            topk_ids=self.topk_ids[p0:p1],
            topk_logprobs=self.topk_logprobs[p0:p1],
            tail_logmass=self.tail_logmass[p0:p1],
            dpo_logprobs=self.dpo_logprobs[p0:p1],
            reverse_logprobs=self.reverse_logprobs[p0:p1],
            topk_count=self.topk_count[p0:p1],
        )

    def records(self) -> Iterator[TargetRecord]:
        for i in range(len(self)):
            yield self.record(i)

    # ------------------------------------------------------------------ building
    @classmethod
    def from_records(cls, records: Sequence[TargetRecord]) -> "TargetBatch":
        if not records:
            raise ValueError("from_records: need at least one record")
        k = max(r.top_k for r in records)  # narrower records are padded (their counts stay)
        seq_lens = np.array([r.seq_len for r in records], dtype=np.int64)
        pos_lens = np.array([r.response_len for r in records], dtype=np.int64)
        return cls(
            example_index=np.array([r.example_index for r in records], dtype=np.int64),
            prompt_len=np.array([r.prompt_len for r in records], dtype=np.int32),
            seq_offsets=offsets_from_lengths(seq_lens),
            input_ids=np.concatenate([r.input_ids for r in records]).astype(np.int32, copy=False),
            pos_offsets=offsets_from_lengths(pos_lens),
            **{name: np.concatenate([widen_columns(getattr(r, name), k) for r in records]).astype(
                FIELD_DTYPES[name], copy=False) for name in PER_POSITION_FIELDS},
        )

    def slice(self, lo: int, hi: int) -> "TargetBatch":
        """Records ``lo..hi-1`` as views (no copy)."""
        s = slice(int(self.pos_offsets[lo]), int(self.pos_offsets[hi]))
        q = slice(int(self.seq_offsets[lo]), int(self.seq_offsets[hi]))
        return TargetBatch(example_index=self.example_index[lo:hi],
                           prompt_len=self.prompt_len[lo:hi],
                           seq_offsets=self.seq_offsets[lo:hi + 1] - self.seq_offsets[lo],
                           input_ids=self.input_ids[q],
                           pos_offsets=self.pos_offsets[lo:hi + 1] - self.pos_offsets[lo],
                           **{name: getattr(self, name)[s] for name in PER_POSITION_FIELDS})

    def take(self, indices: np.ndarray | Sequence[int]) -> "TargetBatch":
        """The records at ``indices`` (any order, repeats allowed), gathered into a new batch
        (a run of consecutive indices is sliced instead, without a copy)."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (np.diff(idx) == 1).all():
            return self.slice(int(idx[0]), int(idx[-1]) + 1)
        seq_gather, seq_offsets = _ragged_gather(self.seq_offsets, idx)
        pos_gather, pos_offsets = _ragged_gather(self.pos_offsets, idx)
        per_pos = {name: getattr(self, name)[pos_gather] for name in PER_POSITION_FIELDS}
        input_ids = self.input_ids[seq_gather]
        return TargetBatch(example_index=self.example_index[idx],
                           prompt_len=self.prompt_len[idx], seq_offsets=seq_offsets,
                           input_ids=input_ids, pos_offsets=pos_offsets, **per_pos)

    @classmethod
    def concat(cls, batches: Iterable["TargetBatch"]) -> "TargetBatch":
        batches = list(batches)
        if len(batches) == 1:
            return batches[0]
        if not batches:
            raise ValueError("concat: need at least one batch")
        k = max(b.top_k for b in batches)
        return cls(
            example_index=np.concatenate([b.example_index for b in batches]),
            prompt_len=np.concatenate([b.prompt_len for b in batches]),
            seq_offsets=offsets_from_lengths(
                np.concatenate([np.diff(b.seq_offsets) for b in batches])),
            input_ids=np.concatenate([b.input_ids for b in batches]),
            pos_offsets=offsets_from_lengths(
                np.concatenate([np.diff(b.pos_offsets) for b in batches])),
            **{name: np.concatenate([widen_columns(getattr(b, name), k) for b in batches])
               for name in PER_POSITION_FIELDS},
        )

    def check(self) -> None:
        """Internal consistency of offsets and shapes (used after decoding a shard)."""
        B = len(self)
        if self.seq_offsets.shape != (B + 1,) or self.pos_offsets.shape != (B + 1,):
            raise ValueError("offsets: length differs from the number of examples + 1")
        if self.seq_offsets[-1] != self.input_ids.shape[0]:
            raise ValueError("input_ids: length differs from the sum of sequence lengths")
        n = self.pos_offsets[-1]
        for name in PER_POSITION_FIELDS:
            if getattr(self, name).shape[0] != n:
                raise ValueError(f"{name}: {getattr(self, name).shape[0]} rows, expected {n}")
        if (np.diff(self.seq_offsets) - np.diff(self.pos_offsets) != self.prompt_len).any():
            raise ValueError("prompt_len: differs from sequence length - response length")


def _ragged_gather(offsets: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat row indices selecting segments ``idx`` of a ragged array, and the new offsets."""
    starts = offsets[idx]
    lengths = offsets[idx + 1] - starts
    new_offsets = offsets_from_lengths(lengths)
    # Row j of the result comes from starts[seg(j)] + (j - new_offsets[seg(j)]).
    shift = np.repeat(starts - new_offsets[:-1], lengths)
    return np.arange(new_offsets[-1], dtype=np.int64) + shift, new_offsets
