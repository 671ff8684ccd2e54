"""What ``aligndistil inspect`` reports: a store's summary and a full checksum verification."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from .errors import StoreError
from .location import open_location
from .manifest import (ShardEntry, list_manifest_workers, parse_shard_name, read_manifest,
                       verify_shard)
from .metadata import read_metadata
from .reader import TargetStore


def summarize(store: TargetStore) -> dict[str, Any]:
    """A JSON-ready summary: sizes, metadata and completeness per worker."""
    meta = store.metadata
    committed = {s.name for s in store.shards}
    location = store.location
    shard_bytes = sum(location.total_bytes(s.relpath) for s in store.shards)
    leftovers: dict[int, int] = {}
    for name in location.list_names("shards"):
        parsed = parse_shard_name(name)
        if parsed and name not in committed:
            leftovers[parsed[0]] = leftovers.get(parsed[0], 0) + 1
    workers = []
    for w in sorted(set(range(meta.num_workers)) | set(store.manifests)):
        m = store.manifests.get(w)
        shards = m.shards if m else []
        state = ("not started" if m is None else "finished" if m.finished else "in progress")
        workers.append({"worker": w, "state": state, "shards": len(shards),
                        "examples": sum(s.num_examples for s in shards),
                        "response_tokens": sum(s.num_tokens for s in shards),
                        "skipped": dict(m.skipped) if m else {},
                        "uncommitted_shard_dirs": leftovers.get(w, 0)})
    tokens = store.num_tokens
    return {
        "path": str(store.path),
        "format_version": meta.format_version,
        "examples": store.num_examples,
        "response_tokens": tokens,
        "input_tokens": store.num_input_tokens,
        "shards": len(store.shards),
        "bytes_on_disk": location.total_bytes(""),
        "shard_bytes": shard_bytes,
        "bytes_per_token": (shard_bytes / tokens) if tokens else None,
        "top_k": meta.top_k,
        "dpo_top": meta.dpo_top,
        "tail_budget": meta.tail_budget, "min_k": meta.min_k,
        "vocab_size": meta.vocab_size,
        "teachers": meta.teachers,
        "tokenizer_sha256": meta.tokenizer_sha256,
        "r": meta.r, "eps": meta.eps, "tvd_norm": meta.tvd_norm, "mode": meta.mode,
        "source_fingerprint": meta.source_fingerprint,
        "layout": meta.layout,
        "num_workers": meta.num_workers,
        "complete": all(w["state"] == "finished" for w in workers),
        "alpha": alpha_summary(store),
        "kept_ids": kept_ids_summary(store),
        "skipped": {k: sum(w["skipped"].get(k, 0) for w in workers)
                    for k in sorted({k for w in workers for k in w["skipped"]})},
        "workers": workers,
        "extra": meta.extra,
    }


#: An alpha within this fraction of its range from either end counts as "at the end".
END_BAND = 0.01


def alpha_summary(store: TargetStore) -> dict[str, Any] | None:
    """What the user's r did: alpha's mean, p50, p90, min and max over every response position,
    and (adaptive modes) the fraction within 1% of either end of its range ``[eps, r * tvd_max +
    eps]`` (``tvd_max`` 1 for half-l1, 2 for l1): near ``eps`` the teacher is just the dpo model,
    at the top r saturates. From the manifests' per-shard statistics when every shard has them
    (quantiles to a quarter of a percent of the range, :mod:`.shardstats`); otherwise, for
    stores written before them, from the ``alpha`` array of each shard."""
    import numpy as np

    from .layout import _decode_array
    from .shardio import load_shard_arrays
    from .shardstats import alpha_range, merge_alpha

    meta = store.metadata
    bounds = alpha_range(meta.mode, meta.r, meta.eps, meta.tvd_norm)
    kept = {name: st for m in store.manifests.values() for name, st in m.shard_stats.items()}
    if store.shards and all(s.name in kept for s in store.shards):
        merged = merge_alpha([kept[s.name] for s in store.shards], bounds)
        if merged is not None:
            return merged
    parts = []
    for entry in store.shards:
        arrays = load_shard_arrays(store.location, entry, names={"alpha"})
        data, attrs = arrays["alpha"]
        parts.append(np.asarray(_decode_array("alpha", data, attrs, arrays), dtype=np.float64))
    if not parts or not sum(p.size for p in parts):
        return None
    alpha = np.concatenate(parts)
    out: dict[str, Any] = {
        "positions": int(alpha.size), "mean": float(alpha.mean()),
        "p50": float(np.quantile(alpha, 0.5)), "p90": float(np.quantile(alpha, 0.9)),
        "min": float(alpha.min()), "max": float(alpha.max()),
        "frac_at_min": None, "frac_at_max": None, "range": None}
    if meta.mode in ("adaptive", "vanilla-adaptive"):
        top = meta.r * (1.0 if meta.tvd_norm == "half-l1" else 2.0) + meta.eps
        band = END_BAND * (top - meta.eps)
        out.update(range=[meta.eps, top],
                   frac_at_min=float((alpha <= meta.eps + band).mean()),
                   frac_at_max=float((alpha >= top - band).mean()))
    return out


def kept_ids_summary(store: TargetStore) -> dict[str, Any] | None:
    """Ids kept per position (mean, histogram) and pi*'s mean tail mass, with the share of
    positions over the tail budget, from the manifests' per-shard statistics (None for stores
    written before them)."""
    kept = {name: st for m in store.manifests.values() for name, st in m.shard_stats.items()}
    if not store.shards or not all(s.name in kept for s in store.shards):
        return None
    stats = [kept[s.name] for s in store.shards]
    hist: dict[int, int] = {}
    for st in stats:
        for k, n in st["k"].items():
            hist[int(k)] = hist.get(int(k), 0) + int(n)
    n = sum(hist.values())
    if not n:
        return None
    over = [st["tail_mass"]["over_budget"] for st in stats]
    return {"mean": sum(k * c for k, c in hist.items()) / n, "histogram": dict(sorted(hist.items())),
            "tail_mass_mean": sum(st["tail_mass"]["sum"] for st in stats) / n,
            "over_budget": (sum(over) / n) if all(o is not None for o in over) else None}


def format_alpha(a: dict[str, Any] | None) -> str:
    if not a:
        return "alpha           -"
    ends = (f"; within 1% of its range [{a['range'][0]:g}, {a['range'][1]:g}]: "
            f"{100 * a['frac_at_min']:.1f}% at the bottom, {100 * a['frac_at_max']:.1f}% at the "
            f"top" if a["range"] else "")
    def g(v):
        return "-" if v is None else f"{v:.4g}"
    return (f"alpha           mean {a['mean']:.4g}, p50 {g(a['p50'])}, p90 {g(a['p90'])}, max "
            f"{a['max']:.4g} over {a['positions']} positions{ends}")


def format_summary(s: dict[str, Any]) -> str:
    bpt = f"{s['bytes_per_token']:.1f}" if s["bytes_per_token"] is not None else "-"
    lines = [
        f"store           {s['path']}  (format v{s['format_version']}, layout {s['layout']})",
        f"examples        {s['examples']}",
        f"response tokens {s['response_tokens']}  (input tokens {s['input_tokens']})",
        f"shards          {s['shards']}",
        f"bytes on disk   {s['bytes_on_disk']}  ({bpt} B/response token in shards)",
        f"top_k           {s['top_k']}   vocab_size {s['vocab_size']}"
        + (f"   (includes the dpo model's top {s['dpo_top']})" if s.get("dpo_top") else "")
        + (f"   (a cap: tail budget {s['tail_budget']:g}, at least {s['min_k']} per position)"
           if s.get("tail_budget") else ""),
        f"teachers        " + ", ".join(f"{k}={v}" for k, v in s["teachers"].items()),
        f"tokenizer       sha256 {s['tokenizer_sha256']}",
        f"targets         mode {s['mode']}, r {s['r']}, eps {s['eps']}, tvd_norm {s['tvd_norm']}",
        f"source          {s['source_fingerprint']}",
        format_alpha(s.get("alpha")),
        *([f"kept ids        mean {s['kept_ids']['mean']:.2f} per position; pi* tail mass mean "
           f"{s['kept_ids']['tail_mass_mean']:.3g}"
           + (f"; {100 * s['kept_ids']['over_budget']:.1f}% of positions leave more than the "
              f"budget out (the cap decided)" if s["kept_ids"]["over_budget"] is not None
              else "")] if s.get("kept_ids") else []),
        "skipped rows    " + (", ".join(f"{n} {why}" for why, n in s["skipped"].items())
                              if s.get("skipped") else "none"),
        f"workers         {s['num_workers']} ({'complete' if s['complete'] else 'INCOMPLETE'})",
    ]
    for w in s["workers"]:
        extra = (f", {w['uncommitted_shard_dirs']} uncommitted shard dir(s)"
                 if w["uncommitted_shard_dirs"] else "")
        lines.append(f"  worker {w['worker']:<4d} {w['state']:<12s} {w['shards']} shards, "
                     f"{w['examples']} examples, {w['response_tokens']} tokens{extra}")
    return "\n".join(lines)


@dataclass
class VerifyReport:
    checked_shards: int = 0
    bad: dict[str, list[str]] = field(default_factory=dict)  # shard or manifest -> problems

    @property
    def ok(self) -> bool:
        return not self.bad


def verify_store(path: str | os.PathLike) -> VerifyReport:
    """Recompute every committed shard's checksums. Manifests that can't be read are reported
    under their file name; metadata problems raise (the store can't be read at all)."""
    root = open_location(path)
    read_metadata(root)
    report = VerifyReport()
    entries: list[ShardEntry] = []
    for worker in list_manifest_workers(root):
        try:
            manifest = read_manifest(root, worker)
        except StoreError as exc:
            report.bad[f"manifest-w{worker:04d}.json"] = [str(exc)]
            continue
        if manifest is not None:
            entries.extend(manifest.shards)
    for entry in entries:
        report.checked_shards += 1
        problems = verify_shard(root, entry)
        if problems:
            report.bad[entry.relpath] = problems
    return report
