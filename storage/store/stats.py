"""``aligndistil inspect --stats`` / ``--plot``: the distributions that say whether a store's
targets are sane, read from its shards (every shard verified as it is read).

Per response position: alpha (and the share of positions at either end of its range: r too
large saturates at the top, too small leaves alpha at eps), the TVD between the teachers (for
the adaptive modes, ``(alpha - eps) / r``, exactly what alpha was made from), pi*'s top-1
probability, the mass its kept ids carry, the tail mass outside them, and the token-level
contrastive reward ``beta0 * (log pi_dpo - log pi_reverse)`` of the actual token; per example:
the response length. Each as mean and quantiles; ``--plot`` draws their histograms.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .reader import TargetStore
from .shardio import load_shard

QUANTILES = (0.01, 0.1, 0.5, 0.9, 0.99)
#: An alpha within this fraction of its range from either end counts as "at the end".
END_BAND = 0.01


def target_arrays(store: TargetStore) -> dict[str, np.ndarray]:
    """The per-position and per-example arrays the statistics are made of (float64)."""
    meta = store.metadata
    beta0 = float(meta.extra.get("beta0", 0.1))  # recorded by precompute; the paper's 0.1
    parts: dict[str, list[np.ndarray]] = {k: [] for k in
                                          ("alpha", "top1", "kept_mass", "tail_mass",
                                           "reward", "response_len", "k")}
    for entry in store.shards:
        batch = load_shard(store.location, entry)
        logq = batch.topk_logprobs.astype(np.float64)
        kept = np.arange(batch.top_k) < batch.topk_count[:, None]  # not a ragged shard's padding
        parts["alpha"].append(batch.alpha.astype(np.float64))
        parts["top1"].append(np.exp(logq.max(axis=1)))
        parts["kept_mass"].append(np.where(kept, np.exp(logq), 0.0).sum(axis=1))
        parts["k"].append(batch.topk_count.astype(np.float64))
        parts["tail_mass"].append(np.exp(batch.tail_logmass.astype(np.float64)))
        parts["reward"].append(beta0 * (batch.dpo_logprobs.astype(np.float64)
                                             - batch.reverse_logprobs.astype(np.float64)))
        parts["response_len"].append(batch.response_lens.astype(np.float64))
    arrays = {k: (np.concatenate(v) if v else np.zeros(0)) for k, v in parts.items()}
    if meta.mode in ("adaptive", "vanilla-adaptive") and meta.r > 0:
        arrays["tvd"] = (arrays["alpha"] - meta.eps) / meta.r
    return arrays


def describe(values: np.ndarray) -> dict[str, float] | None:
    if values.size == 0:
        return None
    out = {"mean": float(values.mean()), "min": float(values.min()),
           "max": float(values.max())}
    for q in QUANTILES:
        out[f"p{round(q * 100)}"] = float(np.quantile(values, q))
    return out


def target_stats(store: TargetStore, arrays: dict[str, np.ndarray] | None = None
                 ) -> dict[str, Any]:
    """JSON-ready statistics of every array of :func:`target_arrays`."""
    meta = store.metadata
    arrays = arrays if arrays is not None else target_arrays(store)
    stats: dict[str, Any] = {"positions": int(arrays["alpha"].size),
                             "examples": int(arrays["response_len"].size),
                             "top_k": meta.top_k, "mode": meta.mode}
    for name, values in arrays.items():
        stats[name] = describe(values)
    alpha = arrays["alpha"]
    if alpha.size and meta.mode in ("adaptive", "vanilla-adaptive"):
        top = meta.r + meta.eps  # alpha's largest value (TVD = 1)
        band = END_BAND * (top - meta.eps)
        stats["alpha_at_bottom"] = float((alpha <= meta.eps + band).mean())
        stats["alpha_at_top"] = float((alpha >= top - band).mean())
    if meta.tail_budget and arrays["k"].size:
        # the positions where the cap, not the budget, decided: more than EPS left out
        capped = (arrays["k"] >= meta.top_k) & (arrays["tail_mass"] > meta.tail_budget)
        stats["tail_budget"] = meta.tail_budget
        stats["capped_over_budget"] = float(capped.mean())
        values, counts = np.unique(arrays["k"].astype(np.int64), return_counts=True)
        stats["k_histogram"] = {int(v): int(c) for v, c in zip(values, counts)}
    return stats


LABELS = {
    "alpha": "alpha (extrapolation per position)",
    "tvd": "TVD(p_dpo, p_reverse)",
    "top1": "pi* top-1 probability",
    "kept_mass": "pi* mass on the kept ids",
    "tail_mass": "pi* tail mass (outside the kept ids)",
    "reward": "contrastive reward per token",
    "response_len": "response length (tokens)",
    "k": "ids kept per position (k_t)",
}


def format_stats(stats: dict[str, Any]) -> str:
    lines = [f"target statistics over {stats['positions']} response positions of "
             f"{stats['examples']} examples (top_k {stats['top_k']}, mode {stats['mode']}):",
             f"  {'':38} {'mean':>9} {'p1':>9} {'p10':>9} {'p50':>9} {'p90':>9} {'p99':>9}"]
    for name, label in LABELS.items():
        s = stats.get(name)
        if not s:
            continue
        lines.append(f"  {label:38} " + " ".join(f"{s[k]:9.4g}" for k in
                                                ("mean", "p1", "p10", "p50", "p90", "p99")))
    if "alpha_at_bottom" in stats:
        lines.append(f"  alpha within {END_BAND:.0%} of its range: "
                     f"{stats['alpha_at_bottom']:.1%} at the bottom (eps), "
                     f"{stats['alpha_at_top']:.1%} at the top (r + eps)")
    if "capped_over_budget" in stats:
        lines.append(f"  tail budget {stats['tail_budget']:g}: {stats['capped_over_budget']:.2%} of "
                     f"positions hit the cap top_k {stats['top_k']} with more than "
                     f"{stats['tail_budget']:g} of pi*'s mass left out")
        hist = stats["k_histogram"]
        total = sum(hist.values())
        lines.append("  k_t distribution: " + ", ".join(
            f"{k}: {n / total:.1%}" for k, n in sorted(hist.items())[:24])
            + (" ..." if len(hist) > 24 else ""))
    return "\n".join(lines)


def plot_stats(arrays: dict[str, np.ndarray], stats: dict[str, Any], path: str | Path) -> Path:
    """Histograms of every array, one panel each, into ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in LABELS if n in arrays and arrays[n].size]
    cols = 4
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        ax.hist(arrays[name], bins=60, color="tab:blue")
        ax.set_title(LABELS[name], fontsize=9)
        ax.axvline(stats[name]["p50"], color="tab:red", lw=1, label="median")
        ax.tick_params(labelsize=8)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(f"{stats['positions']} positions, {stats['examples']} examples, "
                 f"top_k {stats['top_k']}, mode {stats['mode']}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
