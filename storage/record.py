"""The sparse-target record: one example's teacher targets, as every part of the system sees it.

The store, the REST wire codec, the engine and the trainer all speak this one type, so the
field names and dtypes below are the contract (DESIGN §2 and §4). Per example:

- ``example_index``  int64 scalar: the row in the source dataset (-1 when there is none, e.g. a
  live REST request).
- ``input_ids``      int32 ``[L]``: prompt + response token ids.
- ``prompt_len``     int32 scalar ``P`` with ``1 <= P < L``.

and per response position ``t`` in ``[0, T)``, ``T = L - P`` (target ``t`` is the teacher's
distribution over ``input_ids[P + t]`` given ``input_ids[:P + t]``):

- ``alpha``            float32 ``[T]``: the adaptive (or constant) extrapolation weight.
- ``topk_ids``         int32   ``[T, k]``: the kept ids, by ``log pi*`` descending: the top-k of
  ``log pi*`` or, from a teacher with ``dpo_top`` = N > 0, the dpo model's top N and then
  pi*'s best others (the store's metadata and ``/v1/info`` say which).
- ``topk_logprobs``    float16 ``[T, k]``: ``log pi*`` at those ids, normalised over the FULL
  vocabulary.
- ``tail_logmass``     float32 ``[T]``: log of pi*'s mass outside the kept ids (``-inf`` when
  k = V).
- ``dpo_logprobs``     float32 ``[T]``: log-prob of the actual next token under the dpo teacher.
- ``reverse_logprobs`` float32 ``[T]``: the same under the reverse teacher (the reference model
  in mode ``vanilla``).
- ``topk_count``       int32   ``[T]``: how many of the ``k`` columns position t keeps, in
  ``[1, k]``. A teacher with a tail budget (``tail_budget`` > 0) keeps a different number of ids
  per position, so the record is ragged: ``k`` is the widest position, and the columns past a
  position's count repeat its column 0 (id and log-prob) and are not entries. Without a budget
  the count is ``k`` everywhere. The wire and the store carry the ragged form (inner lists of
  ``k_t`` entries; flat arrays), not the padding: :meth:`TargetRecord.create` and the readers
  pad. A record that omits it (every writer before format version 3) has ``k`` everywhere.

float16 for ``topk_logprobs`` is the storage precision chosen for compactness (k of them per
token); everything scalar-per-token stays float32. Converting to a record is the one place
where the engine's float32 targets are rounded, so the store and the server agree bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Mapping

import numpy as np

from storage.errors import UserError

#: Field name -> numpy dtype. The order is the canonical order used by every encoding.
FIELD_DTYPES: dict[str, np.dtype] = {
    "example_index": np.dtype(np.int64),
    "input_ids": np.dtype(np.int32),
    "prompt_len": np.dtype(np.int32),
    "alpha": np.dtype(np.float32),
    "topk_ids": np.dtype(np.int32),
    "topk_logprobs": np.dtype(np.float16),
    "tail_logmass": np.dtype(np.float32),
    "dpo_logprobs": np.dtype(np.float32),
    "reverse_logprobs": np.dtype(np.float32),
    "topk_count": np.dtype(np.int32),
}

#: Fields with one value per response position (leading dimension T).
PER_POSITION_FIELDS: tuple[str, ...] = (
    "alpha",
    "topk_ids",
    "topk_logprobs",
    "tail_logmass",
    "dpo_logprobs",
    "reverse_logprobs",
    "topk_count",
)

#: Fields that a REST result carries (a store record adds ``example_index``); ``topk_count`` is
#: the length of each inner ``topk_*`` list there.
WIRE_FIELDS: tuple[str, ...] = tuple(f for f in FIELD_DTYPES
                                     if f not in ("example_index", "topk_count"))


class RecordError(UserError, ValueError):
    """A record that breaks the contract: the message names the field and what is wrong."""


@dataclass(frozen=True, eq=False)
class TargetRecord:
    """One example's sparse teacher targets. Build with :meth:`create` to coerce and validate."""

    example_index: int
    input_ids: np.ndarray
    prompt_len: int
    alpha: np.ndarray
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    tail_logmass: np.ndarray
    dpo_logprobs: np.ndarray
    reverse_logprobs: np.ndarray
    topk_count: np.ndarray

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(cls, *, vocab_size: int | None = None, **values: Any) -> "TargetRecord":
        """Coerce every field to its contract dtype and validate.

        ``vocab_size``, when given, also bounds ``input_ids`` and ``topk_ids``. ``topk_ids`` and
        ``topk_logprobs`` may be ragged (a list of per-position lists, of ``topk_count`` entries
        each when that is given): they are padded to the widest position here. Raises
        :class:`RecordError` naming the offending field.
        """
        values = dict(values)
        values.setdefault("topk_count", [])  # absent: k everywhere (filled in below)
        _pad_ragged_topk(values)
        missing = [f for f in FIELD_DTYPES if f not in values]
        if missing:
            raise RecordError(f"record is missing field(s): {', '.join(missing)}")
        extra = [f for f in values if f not in FIELD_DTYPES]
        if extra:
            raise RecordError(f"record has unknown field(s): {', '.join(extra)}")
        coerced: dict[str, Any] = {}
        for name, dtype in FIELD_DTYPES.items():
            coerced[name] = _coerce(name, values[name], dtype)
        _pad_columns(coerced)
        record = cls(**coerced)
        record.validate(vocab_size=vocab_size)
        return record

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, vocab_size: int | None = None,
                  example_index: int | None = None) -> "TargetRecord":
        """From a JSON-style mapping (lists of numbers). ``tail_logmass`` may hold ``None`` or
        the string ``"-inf"`` for -inf (JSON has no infinities)."""
        values = dict(data)
        if "example_index" not in values:
            values["example_index"] = -1 if example_index is None else example_index
        if "tail_logmass" in values and isinstance(values["tail_logmass"], (list, tuple)):
            values["tail_logmass"] = [_json_to_float(v) for v in values["tail_logmass"]]
        return cls.create(vocab_size=vocab_size, **values)

    # ------------------------------------------------------------------ views
    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def response_len(self) -> int:
        return self.seq_len - self.prompt_len

    @property
    def top_k(self) -> int:
        """The width ``k`` of the ``topk_*`` arrays (the widest position of a ragged record)."""
        return int(self.topk_ids.shape[1])

    @property
    def ragged(self) -> bool:
        """Whether some position keeps fewer than ``k`` ids."""
        return bool(self.topk_count.size) and int(self.topk_count.min()) < self.top_k

    def kept_rows(self, name: str) -> list[np.ndarray]:
        """``topk_ids`` or ``topk_logprobs`` as one array of ``k_t`` entries per position."""
        arr = getattr(self, name)
        return [arr[t, :c] for t, c in enumerate(self.topk_count.tolist())]

    def to_dict(self, *, include_example_index: bool = True) -> dict[str, Any]:
        """JSON-ready dict (plain Python lists; -inf tails become ``None``)."""
        out: dict[str, Any] = {}
        for name in FIELD_DTYPES:
            if name == "example_index" and not include_example_index:
                continue
            value = getattr(self, name)
            if name == "topk_count":
                continue  # the lengths of the topk_* lists
            if name == "tail_logmass":
                out[name] = [None if math.isinf(v) else float(v) for v in value.tolist()]
            elif name.startswith("topk_") and self.ragged:
                out[name] = [row.tolist() for row in self.kept_rows(name)]
            elif isinstance(value, np.ndarray):
                out[name] = value.tolist()
            else:
                out[name] = int(value)
        return out

    def equals(self, other: "TargetRecord") -> bool:
        """Exact, bitwise-on-values equality (NaN never appears in a valid record)."""
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if isinstance(a, np.ndarray):
                if a.dtype != b.dtype or a.shape != b.shape or not np.array_equal(a, b):
                    return False
            elif a != b:
                return False
        return True

    # ------------------------------------------------------------------ validation
    def validate(self, *, vocab_size: int | None = None) -> None:
        """Check shapes, dtypes and ranges; raise :class:`RecordError` naming the field."""
        L = self.input_ids.shape[0] if self.input_ids.ndim == 1 else -1
        if self.input_ids.ndim != 1 or L < 2:
            raise RecordError(f"input_ids: need a 1-D sequence of length >= 2, got shape "
                              f"{tuple(self.input_ids.shape)}")
        if not 1 <= self.prompt_len < L:
            raise RecordError(f"prompt_len: must satisfy 1 <= prompt_len < len(input_ids) = {L}, "
                              f"got {self.prompt_len}")
        T = L - self.prompt_len
        for name in PER_POSITION_FIELDS:
            arr = getattr(self, name)
            want_ndim = 2 if name in ("topk_ids", "topk_logprobs") else 1
            if arr.ndim != want_ndim or arr.shape[0] != T:
                raise RecordError(f"{name}: expected {want_ndim}-D with leading dimension "
                                  f"T = {T} response positions, got shape {tuple(arr.shape)}")
        if self.topk_ids.shape != self.topk_logprobs.shape:
            raise RecordError(f"topk_logprobs: shape {tuple(self.topk_logprobs.shape)} differs "
                              f"from topk_ids {tuple(self.topk_ids.shape)}")
        if self.topk_ids.shape[1] < 1:
            raise RecordError("topk_ids: k must be >= 1")
        if self.topk_count.shape != (T,):
            raise RecordError(f"topk_count: expected shape ({T},), got "
                              f"{tuple(self.topk_count.shape)}")
        if T and (self.topk_count.min() < 1 or self.topk_count.max() > self.topk_ids.shape[1]):
            raise RecordError(f"topk_count: each position keeps 1 to k = "
                              f"{self.topk_ids.shape[1]} ids, got counts in "
                              f"[{self.topk_count.min()}, {self.topk_count.max()}]")
        if (self.input_ids < 0).any():
            raise RecordError("input_ids: negative token id")
        if (self.topk_ids < 0).any():
            raise RecordError("topk_ids: negative token id")
        if vocab_size is not None:
            if (self.input_ids >= vocab_size).any():
                raise RecordError(f"input_ids: id >= vocab_size {vocab_size}")
            if (self.topk_ids >= vocab_size).any():
                raise RecordError(f"topk_ids: id >= vocab_size {vocab_size}")
            if self.topk_ids.shape[1] > vocab_size:
                raise RecordError(f"topk_ids: k = {self.topk_ids.shape[1]} exceeds vocab_size "
                                  f"{vocab_size}")
        for name in ("alpha", "topk_logprobs", "dpo_logprobs", "reverse_logprobs"):
            arr = getattr(self, name)
            if not np.isfinite(arr).all():
                raise RecordError(f"{name}: non-finite value")
        if (self.alpha <= 0).any():
            raise RecordError("alpha: must be > 0 (alpha = r * tvd + eps with eps > 0)")
        if np.isnan(self.tail_logmass).any() or np.isposinf(self.tail_logmass).any():
            raise RecordError("tail_logmass: NaN or +inf")
        if (self.topk_logprobs > 0).any():
            raise RecordError("topk_logprobs: log-probabilities must be <= 0")
        if (self.tail_logmass > 0).any():
            raise RecordError("tail_logmass: log of a mass must be <= 0")
        if self.topk_ids.shape[1] > 1:
            rising = np.diff(self.topk_logprobs.astype(np.float32), axis=1) > 0
            inside = np.arange(1, self.topk_ids.shape[1]) < self.topk_count[:, None]
            if (rising & inside).any():
                raise RecordError("topk_logprobs: must be sorted by log-prob, descending")


def _coerce(name: str, value: Any, dtype: np.dtype) -> Any:
    if name in ("example_index", "prompt_len"):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            if isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "iu":
                return int(value)
            raise RecordError(f"{name}: expected an integer, got {type(value).__name__}")
        return int(value)
    try:
        arr = np.asarray(value)
    except Exception as exc:  # ragged lists and the like
        raise RecordError(f"{name}: not an array of numbers ({exc})") from None
    if arr.dtype == object:
        raise RecordError(f"{name}: not a rectangular array of numbers")
    if dtype.kind in "iu":
        if arr.size and arr.dtype.kind not in "iu":
            if arr.dtype.kind != "f" or not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
                raise RecordError(f"{name}: expected integers, got {arr.dtype}")
        if arr.size and arr.dtype.kind in "iu" and (arr.max() > np.iinfo(dtype).max or
                                                     arr.min() < np.iinfo(dtype).min):
            raise RecordError(f"{name}: value outside the {dtype} range")
    elif arr.size and arr.dtype.kind not in "fiu":
        raise RecordError(f"{name}: expected numbers, got {arr.dtype}")
    if name in ("topk_ids", "topk_logprobs") and arr.ndim == 1 and arr.size == 0:
        arr = arr.reshape(0, 0)
    return np.ascontiguousarray(arr.astype(dtype, copy=False))


def _pad_ragged_topk(values: dict[str, Any]) -> None:
    """Per-position lists of unequal lengths (the wire's ragged form) -> padded rows repeating
    entry 0, with ``topk_count`` from the lengths (checked against a given one)."""
    ids, lps = values.get("topk_ids"), values.get("topk_logprobs")
    if isinstance(ids, np.ndarray) and ids.ndim == 2:  # rectangular: nothing to pad
        return
    rows = (list, tuple, np.ndarray)
    if not (isinstance(ids, rows) and isinstance(lps, rows)):
        return
    if not all(isinstance(row, rows) and np.ndim(row) == 1 for row in (*ids, *lps)):
        return
    lengths, lp_lengths = [len(row) for row in ids], [len(row) for row in lps]
    if len(set(lengths)) <= 1 and len(set(lp_lengths)) <= 1:
        return
    if lp_lengths != lengths:
        raise RecordError(f"topk_logprobs: per-position lengths {lp_lengths[:8]} differ from "
                          f"topk_ids' {lengths[:8]}")
    if min(lengths) < 1:
        raise RecordError("topk_ids: every position keeps at least one id")
    given = values.get("topk_count")
    if given is not None:
        given = np.asarray(given)
        if given.ndim != 1 or (given.size and given.tolist() != lengths):
            raise RecordError("topk_count: differs from the lengths of the topk_ids lists")
    width = max(lengths)
    values["topk_ids"] = [list(row) + [row[0]] * (width - len(row)) for row in ids]
    values["topk_logprobs"] = [list(row) + [row[0]] * (width - len(row)) for row in lps]
    values["topk_count"] = lengths


def _pad_columns(coerced: dict[str, Any]) -> None:
    """Default ``topk_count`` (all ``k``); make the columns past each count repeat column 0,
    so that padding is canonical (equal records are bitwise equal)."""
    ids, lps = coerced["topk_ids"], coerced["topk_logprobs"]
    count = coerced["topk_count"]
    if count.ndim == 1 and count.size == 0 and ids.ndim == 2 and ids.shape[0]:
        count = np.full(ids.shape[0], ids.shape[1], dtype=np.int32)
        coerced["topk_count"] = count
    if (ids.ndim != 2 or lps.shape != ids.shape or count.shape != ids.shape[:1]
            or not ids.size or int(count.min()) >= ids.shape[1] or int(count.min()) < 1):
        return
    pad = np.arange(ids.shape[1]) >= count[:, None]
    coerced["topk_ids"] = np.where(pad, ids[:, :1], ids)
    coerced["topk_logprobs"] = np.where(pad, lps[:, :1], lps)


def _json_to_float(v: Any) -> float:
    if v is None or v == "-inf":
        return -math.inf
    return v
