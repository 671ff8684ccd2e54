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


def pack_rows_by_token_budget(lengths: Sequence[int], max_tokens: int) -> list[list[list[int]]]:
    """Group indices into batches of packed rows (padding-free forwards): each batch is a list
    of rows, each row the indices of the sequences laid back to back in it.

    A batch's rows all hold at most the batch's longest sequence (its first), so no row
    attends over a longer span than the padded layout's would, and ``rows x longest <=
    max_tokens`` (a sequence longer than the budget gets a batch of its own). Longest first,
    each sequence into the first row it fits (first-fit decreasing); ties keep input order, so
    the layout is deterministic. Only each batch's last rows end with unused places.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[list[int]]] = []
    rows: list[list[int]] = []
    fill: list[int] = []
    capacity = 0
    for i in order:
        n = lengths[i]
        slot = next((r for r, used in enumerate(fill) if used + n <= capacity), None)
        if slot is not None:
            rows[slot].append(i)
            fill[slot] += n
        elif rows and (len(rows) + 1) * capacity <= max_tokens:
            rows.append([i])
            fill.append(n)
        else:
            if rows:
                batches.append(rows)
            rows, fill, capacity = [[i]], [n], n
    if rows:
        batches.append(rows)
    return batches


def batch_plan(lengths: Sequence[int], max_tokens: int, *, packing: bool
               ) -> list[tuple[list[int], list[list[int]] | None]]:
    """Each batch as ``(members, rows)``: ``members`` index ``lengths``; ``rows`` (packed only,
    else None) lay the batch out by positions within ``members``, which are in row order."""
    if not packing:
        return [(group, None) for group in pack_by_token_budget(lengths, max_tokens)]
    plan = []
    for rows in pack_rows_by_token_budget(lengths, max_tokens):
        members = [i for row in rows for i in row]
        at = iter(range(len(members)))
        plan.append((members, [[next(at) for _ in row] for row in rows]))
    return plan
