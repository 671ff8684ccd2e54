"""Per-shard statistics kept in the worker's manifest, so that summarising a store costs
O(shards), not O(tokens): ``inspect`` and every precompute worker's closing summary read the
manifests only.

Per shard: alpha's count, sum, min, max and a histogram of :data:`ALPHA_BINS` equal bins over
alpha's range ``[eps, r * tvd_max + eps]`` (adaptive modes; the 1% bands at either end of
the range are exactly :data:`BAND_BINS` bins); the kept ids per position (a histogram of k_t)
and pi*'s tail mass (sum, and how many positions leave more than the tail budget out).
Quantiles come from the histogram, so they are good to half a bin (0.25% of the range).

The statistics live under the manifest's top-level ``shard_stats`` key, which readers before
them ignore (they read ``shards``).
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from .batch import TargetBatch

#: Bins of the alpha histogram over its range; 1% of the range is BAND_BINS bins.
ALPHA_BINS = 400
BAND_BINS = 4


def alpha_range(mode: str, r: float, eps: float, tvd_norm: str) -> tuple[float, float] | None:
    """alpha's range ``[eps, r * tvd_max + eps]`` in the adaptive modes (None otherwise)."""
    if mode not in ("adaptive", "vanilla-adaptive"):
        return None
    return eps, r * (1.0 if tvd_norm == "half-l1" else 2.0) + eps


def shard_stats(batch: TargetBatch, *, alpha_bounds: tuple[float, float] | None,
                tail_budget: float) -> dict[str, Any]:
    alpha = batch.alpha.astype(np.float64)
    out: dict[str, Any] = {"alpha": {"n": int(alpha.size), "sum": float(alpha.sum()),
                                     "min": float(alpha.min()) if alpha.size else None,
                                     "max": float(alpha.max()) if alpha.size else None}}
    if alpha_bounds is not None:
        lo, hi = alpha_bounds
        hist, _ = np.histogram(np.clip(alpha, lo, hi), bins=ALPHA_BINS, range=(lo, hi))
        out["alpha"]["hist"] = hist.tolist()
    k, counts = np.unique(batch.topk_count, return_counts=True)
    tail = np.exp(batch.tail_logmass.astype(np.float64))
    out["k"] = {str(int(a)): int(b) for a, b in zip(k, counts)}
    out["tail_mass"] = {"sum": float(tail.sum()),
                        "over_budget": int((tail > tail_budget).sum()) if tail_budget else None}
    return out


def merge_alpha(stats: Iterable[dict[str, Any]], bounds: tuple[float, float] | None
                ) -> dict[str, Any] | None:
    """alpha's mean, min, max, p50 and p90 (from the histogram) and the shares in the 1% bands
    at either end of the range, over shards' statistics. None when the statistics cannot give
    the quantiles (a mode without a range whose alpha is not constant): read the arrays."""
    parts = [s["alpha"] for s in stats]
    n = sum(p["n"] for p in parts)
    if not n:
        return None
    out: dict[str, Any] = {
        "positions": n, "mean": sum(p["sum"] for p in parts) / n,
        "min": min(p["min"] for p in parts if p["n"]),
        "max": max(p["max"] for p in parts if p["n"]),
        "p50": None, "p90": None, "frac_at_min": None, "frac_at_max": None, "range": None}
    if bounds is not None and all("hist" in p for p in parts):
        hist = np.sum([p["hist"] for p in parts], axis=0).astype(np.float64)
        lo, hi = bounds
        edges = np.linspace(lo, hi, ALPHA_BINS + 1)
        cum = np.cumsum(hist) / n
        for q, key in ((0.5, "p50"), (0.9, "p90")):
            i = int(np.searchsorted(cum, q))
            below = cum[i - 1] if i else 0.0
            share = (q - below) / hist[i] * n if hist[i] else 0.5
            out[key] = float(edges[i] + share * (edges[i + 1] - edges[i]))
        out.update(range=[lo, hi], frac_at_min=float(hist[:BAND_BINS].sum() / n),
                   frac_at_max=float(hist[-BAND_BINS:].sum() / n))
    elif out["min"] == out["max"]:  # constant alpha (modes constant, vanilla)
        out.update(p50=out["min"], p90=out["min"])
    else:
        return None
    return out
