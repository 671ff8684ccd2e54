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
