"""Ragged arrays: a flat array plus ``offsets`` (``[n + 1]``, int64), item ``i`` being
``flat[offsets[i]:offsets[i + 1]]``. The store's batches, its chunk layout and the Arrow wire
codec all cut records this way."""

from __future__ import annotations

import numpy as np


def offsets_from_lengths(lengths: np.ndarray) -> np.ndarray:
    """``[0, l0, l0 + l1, ...]`` as int64."""
    lengths = np.asarray(lengths)
    out = np.zeros(lengths.shape[0] + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def widen_columns(arr: np.ndarray, k: int) -> np.ndarray:
    """A ``[n, j]`` topk array padded to ``[n, k]`` by repeating column 0 (the padding rule of
    ragged records, :mod:`storage.record`), so records of different widths share one array;
    anything that is not 2-D, or already ``k`` wide, as is."""
    if arr.ndim != 2 or arr.shape[1] == k:
        return arr
    return np.concatenate([arr, np.repeat(arr[:, :1], k - arr.shape[1], axis=1)], axis=1)


def padded_index(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``[n, max(lengths)]`` indices into a flat array holding row i at ``starts[i]`` with
    ``lengths[i]`` (>= 1) entries; the columns past a row's length point at its first entry."""
    slot = np.arange(int(lengths.max()) if lengths.size else 1)
    return starts[:, None] + np.where(slot < lengths[:, None], slot, 0)
