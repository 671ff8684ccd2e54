"""Grouping sequences into padded batches under a token budget (the teacher's engine and the
student's micro-batches both pack this way)."""

from __future__ import annotations

from typing import Sequence


def pack_by_token_budget(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Group indices into batches with ``count x longest <= max_tokens`` padded tokens.

    Longest first, so each batch holds similar lengths (little padding); ties keep input order,
    so the split is deterministic. A sequence longer than the budget gets a batch of its own.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        grown = max(longest, lengths[i])
        if current and grown * (len(current) + 1) > max_tokens:
            groups.append(current)
            current, grown = [], lengths[i]
        current.append(i)
        longest = grown
    if current:
        groups.append(current)
    return groups
