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
}

#: Fields with one value per response position (leading dimension T).
PER_POSITION_FIELDS: tuple[str, ...] = (
    "alpha",
    "topk_ids",
    "topk_logprobs",
    "tail_logmass",
    "dpo_logprobs",
    "reverse_logprobs",
)

#: Fields that a REST result carries (a store record adds ``example_index``).
WIRE_FIELDS: tuple[str, ...] = tuple(f for f in FIELD_DTYPES if f != "example_index")


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

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(cls, *, vocab_size: int | None = None, **values: Any) -> "TargetRecord":
        """Coerce every field to its contract dtype and validate.

        ``vocab_size``, when given, also bounds ``input_ids`` and ``topk_ids``.
        Raises :class:`RecordError` naming the offending field.
        """
        missing = [f for f in FIELD_DTYPES if f not in values]
        if missing:
            raise RecordError(f"record is missing field(s): {', '.join(missing)}")
        extra = [f for f in values if f not in FIELD_DTYPES]
        if extra:
            raise RecordError(f"record has unknown field(s): {', '.join(extra)}")
        coerced: dict[str, Any] = {}
        for name, dtype in FIELD_DTYPES.items():
            coerced[name] = _coerce(name, values[name], dtype)
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
        return int(self.topk_ids.shape[1])

    def to_dict(self, *, include_example_index: bool = True) -> dict[str, Any]:
        """JSON-ready dict (plain Python lists; -inf tails become ``None``)."""
        out: dict[str, Any] = {}
        for name in FIELD_DTYPES:
            if name == "example_index" and not include_example_index:
                continue
            value = getattr(self, name)
            if name == "tail_logmass":
                out[name] = [None if math.isinf(v) else float(v) for v in value.tolist()]
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
            want_ndim = 2 if name.startswith("topk_") else 1
            if arr.ndim != want_ndim or arr.shape[0] != T:
                raise RecordError(f"{name}: expected {want_ndim}-D with leading dimension "
                                  f"T = {T} response positions, got shape {tuple(arr.shape)}")
        if self.topk_ids.shape != self.topk_logprobs.shape:
            raise RecordError(f"topk_logprobs: shape {tuple(self.topk_logprobs.shape)} differs "
                              f"from topk_ids {tuple(self.topk_ids.shape)}")
        if self.topk_ids.shape[1] < 1:
            raise RecordError("topk_ids: k must be >= 1")
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
        if self.topk_ids.shape[1] > 1 and (np.diff(self.topk_logprobs.astype(np.float32), axis=1)
                                           > 0).any():
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
    if name.startswith("topk_") and arr.ndim == 1 and arr.size == 0:
        arr = arr.reshape(0, 0)
    return np.ascontiguousarray(arr.astype(dtype, copy=False))


def _json_to_float(v: Any) -> float:
    if v is None or v == "-inf":
        return -math.inf
    return v
