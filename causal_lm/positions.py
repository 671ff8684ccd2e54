"""Which logit row predicts which response token (DESIGN §2).

For a sequence of length ``L`` with ``prompt_len`` ``P``, response token ``t`` (``0 <= t < L-P``)
is ``input_ids[P + t]``; the logit at row ``i`` predicts token ``i + 1``, so response token
``t`` is predicted by row ``P + t - 1``: rows ``P - 1 .. L - 2``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def response_rows(prompt_len: int, length: int) -> np.ndarray:
    """The logit rows ``P - 1 .. L - 2`` that predict a sequence's response tokens."""
    rows = response_logit_positions(prompt_len, length)
    return np.arange(rows.start, rows.stop, dtype=np.int64)


def response_coordinates(lengths: Sequence[int], prompt_lens: Sequence[int]
                         ) -> tuple[np.ndarray, np.ndarray]:
    """``(batch_row, logit_row)`` of every response position of a padded batch, in sequence
    order: sequence ``b``'s ``L_b - P_b`` positions, then ``b + 1``'s."""
    rows, cols = [], []
    for b, (n, p) in enumerate(zip(lengths, prompt_lens)):
        rows.append(np.full(n - p, b, dtype=np.int64))
        cols.append(response_rows(p, n))
    if not rows:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(rows), np.concatenate(cols)


def response_logit_positions(prompt_len: int, seq_len: int) -> slice:
    """The same rows as a slice, for one sequence: ``P - 1 .. L - 2``."""
    if not 1 <= prompt_len < seq_len:
        raise ValueError(f"prompt_len: must satisfy 1 <= prompt_len < seq_len = {seq_len}, "
                         f"got {prompt_len}")
    return slice(prompt_len - 1, seq_len - 1)
