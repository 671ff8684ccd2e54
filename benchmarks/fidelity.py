"""Fidelity: what cached, compressed targets cost against exact AlignDistil, in the grammar world.

Per seed, the demo's stages build the fidelity world (``toyworld --world grammar``: V = 2,008,
16-word answers, about 40 right words per position), the SFT model, preference pairs and the two
teachers. Then, through the ordinary commands only:

- **off-policy**: ``precompute`` at k = V (the store carries the whole pi*: exact AlignDistil,
  no separate code path), at k in {64, 16, 4} and at k = 64 with the 8-bit lossy layout; one
  ``train --mode off-policy`` per (store, tail);
- **on-policy**: one ``serve --top-k V``; ``train --mode on-policy --top-k k --tail T`` asks it
  for k entries (k = V: exact);
- every student, and the SFT model, is measured by ``eval`` against that k = V server on the
  held-out prompts: gold reward, ``kl_to_teacher`` (KL(student || pi*) over the whole vocabulary,
  exact since the server's k = V), KL to pi_dpo per sequence, response length.

Reported per setting: gold reward, its gain over SFT, ``retained`` = gain / the exact run's gain
of the same seed (paired: same teachers, same data order), KL to pi*, store bytes per response
token, training wall time; over seeds: mean and 95% t-interval. Plots: gold reward and KL to
pi* vs k, training curves. pi*'s tail mass outside its top 64 and its top-1 probability are
read from the k = V store (median, p90), the figures bench_grad_fidelity reports for SmolLM2.

    .venv/bin/python benchmarks/fidelity.py --quick --seed 0 --out /tmp/fid   # <= 10 min, 2 cores
    .venv/bin/python benchmarks/fidelity.py --seeds 0 1 2 --out benchmarks/results/fidelity

``--quick`` runs one seed of exact vs k = 64 uniform vs the shipped defaults (no target or tail
flags), off-policy, and writes ``DIR/fidelity.json`` with ``seed, exact_gain, k64_gain,
retained, median_tail_mass`` and ``default_gain, default_retained`` (its gain over the exact
run's), ``default_kl_ratio`` (its KL(student || pi*) over the exact student's) and
``default_bytes_per_token``. ``--staleness`` runs exact on-policy AlignDistil at
``--max-staleness`` 0, 1 and 2 (``benchmarks/results/staleness``). ``--budget EPS`` runs the
defaults study instead of the k
study: exact and the shipped defaults, off- and on-policy, and EPS with a cap of 64 and the
auto tail, off-policy (``benchmarks/results/fidelity_defaults``). ``--on-policy-ks K...`` runs
exact and the defaults on-policy and a server asked for K ids with the bucket tail
(``benchmarks/results/onpolicy_k_grammar``). Stages
whose outputs exist are skipped on a rerun (``--workdir`` keeps them); ``--replot`` redoes the
table and plots from ``DIR/fidelity.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from aligndistil.demo import WORLD_SIZES, DemoSize, Runner, build_teachers, student_flags  # noqa: E402
from benchmarks.machine_info import machine  # noqa: E402

WORLD = "grammar"
EXACT = 0  # k placeholder for "the whole vocabulary" (resolved per seed)
DEFAULT = -1  # k placeholder for "no flags": the shipped defaults of precompute, serve, train


@dataclass(frozen=True)
class Setting:
    mode: str            # off-policy | on-policy
    k: int               # EXACT: k = V; DEFAULT: no --top-k / --tail-budget / --tail at all
    tail: str | None = "uniform"  # None: train's default
    layout: str = "compact"
    dpo_top: int = 0     # precompute --dpo-top: the kept ids include the dpo model's top N
    budget: float = 0.0  # --tail-budget (k is then the cap)
    staleness: int = 0   # on-policy: train --max-staleness
    student_top: int = 0  # on-policy: train --student-top (the student's own candidates)

    @property
    def name(self) -> str:
        cand = f"-cand{self.student_top}" if self.student_top else ""
        if self.k == DEFAULT:
            return f"{self.mode}/default{cand}"
        k = "exact" if self.k == EXACT else f"k{self.k}"
        if self.budget:
            k = f"eps{self.budget:g}-cap{self.k}"
        lossy = "-lossy8" if self.layout != "compact" else ""
        tail = "" if self.k == EXACT else f"-{self.tail}"
        dpo = f"-dpo{self.dpo_top}" if self.dpo_top else ""
        stale = f"-stale{self.staleness}" if self.staleness else ""
        return f"{self.mode}/{k}{tail}{lossy}{dpo}{stale}{cand}"

    def target_flags(self, V: int) -> list:
        """precompute's / serve's flags for these targets ([] for the defaults)."""
        if self.k == DEFAULT:
            return []
        flags = ["--top-k", V if self.k == EXACT else self.k, "--dpo-top", self.dpo_top]
        return flags + (["--tail-budget", self.budget] if self.budget else [])

    def tail_flags(self) -> list:
        return ["--tail", self.tail] if self.tail and self.k != DEFAULT else []


def all_settings() -> list[Setting]:
    out = []
    for mode in ("off-policy", "on-policy"):
        out.append(Setting(mode, EXACT))
        for k in (64, 16, 4):
            for tail in ("uniform", "bucket"):
                out.append(Setting(mode, k, tail))
    out.append(Setting("off-policy", 64, "uniform", "compact-lossy8"))
    # Which ids a store keeps: half of them the dpo model's favourites (precompute --dpo-top).
    out += [Setting("off-policy", 64, tail, dpo_top=32) for tail in ("uniform", "bucket")]
    out.append(Setting("off-policy", 16, "uniform", dpo_top=8))
    return out


QUICK = [Setting("off-policy", EXACT), Setting("off-policy", 64, "uniform"),
         Setting("off-policy", DEFAULT, None)]


def staleness_settings(levels=(0, 1, 2)) -> list[Setting]:
    """The staleness study: exact on-policy AlignDistil (k = V) trained with --max-staleness S,
    so that only the samples' age differs between the runs."""
    return [Setting("on-policy", EXACT, staleness=s) for s in levels]


def budget_settings(budget: float, cap: int = 64) -> list[Setting]:
    """The defaults study: exact and the shipped defaults, off- and on-policy, and the tail
    budget EPS (cap 64) with the default tail model off-policy. (Fixed k = 64 with each tail
    model is the k study's, benchmarks/results/fidelity.)"""
    out = []
    for mode in ("off-policy", "on-policy"):
        out += [Setting(mode, EXACT), Setting(mode, DEFAULT, None)]
    out.append(Setting("off-policy", cap, "auto", budget=budget))
    return out


def candidates_settings(tops=(8, 32)) -> list[Setting]:
    """The candidates study: exact and the shipped defaults on-policy, and the defaults with the
    student's own top N ids scored too (train --student-top N)."""
    return [Setting("on-policy", EXACT), Setting("on-policy", DEFAULT, None),
            *[Setting("on-policy", DEFAULT, None, student_top=n) for n in tops]]


def on_policy_k_settings(ks=(128, 256)) -> list[Setting]:
    """The on-policy k study: exact and the shipped defaults (k = 64) on-policy, and a server
    asked for k ids with the default tail (bucket): what the defaults' on-policy gap costs to
    close, since live targets are not stored."""
    return [Setting("on-policy", EXACT), Setting("on-policy", DEFAULT, None),
            *[Setting("on-policy", k, "bucket") for k in ks]]


# ------------------------------------------------------------------------------ one seed
def vocab_size(model_dir: Path) -> int:
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(model_dir))


def store_name(k: int, layout: str, dpo_top: int = 0, budget: float = 0.0) -> str:
    if k == DEFAULT:
        return "store_default"
    return (f"store_k{'V' if k == EXACT else k}{'' if layout == 'compact' else '_' + layout}"
            f"{f'_dpo{dpo_top}' if dpo_top else ''}{f'_eps{budget:g}' if budget else ''}")


def k_distribution(store_dir: Path) -> dict:
    """Ids kept per position in a store (mean, quantiles) and the share of positions where the
    cap left more than the tail budget out."""
    import numpy as np

    from storage.store import TargetStore

    store = TargetStore.open(store_dir)
    counts, tails = [], []
    for shard in range(len(store.shards)):
        batch = store.load_shard(shard)
        counts.append(batch.topk_count)
        tails.append(np.exp(batch.tail_logmass.astype(np.float64)))
    c, t = np.concatenate(counts), np.concatenate(tails)
    meta = store.metadata
    return {"k_mean": float(c.mean()), "k_p10": float(np.quantile(c, 0.1)),
            "k_p50": float(np.quantile(c, 0.5)), "k_p90": float(np.quantile(c, 0.9)),
            "k_max": int(c.max()), "top_k": meta.top_k, "tail_budget": meta.tail_budget,
            "capped_over_budget": float(((c >= meta.top_k) & (t > meta.tail_budget)).mean())
            if meta.tail_budget else None}


def pi_star_shape(store_dir: Path, ks=(4, 16, 64)) -> dict:
    """From a k = V store: pi*'s mass outside its top k (median, p90) and its top-1 probability
    (median), over every response position."""
    import numpy as np

    from storage.store import TargetStore

    store = TargetStore.open(store_dir)
    tails = {k: [] for k in ks}
    top1 = []
    for shard in range(len(store.shards)):
        batch = store.load_shard(shard)
        p = np.exp(batch.topk_logprobs.astype(np.float64))  # sorted, descending
        top1.append(p[:, 0])
        cum = np.cumsum(p, axis=1)
        for k in ks:
            tails[k].append(np.clip(1.0 - cum[:, k - 1], 0.0, 1.0))
    out = {"positions": int(sum(t.size for t in top1)),
           "top1_median": float(np.median(np.concatenate(top1)))}
    for k, parts in tails.items():
        t = np.concatenate(parts)
        out[f"tail_mass_k{k}_median"] = float(np.median(t))
        out[f"tail_mass_k{k}_p90"] = float(np.quantile(t, 0.9))
    return out


def run_seed(seed: int, workdir: Path, settings: list[Setting], size: DemoSize,
             eval_samples: int) -> dict:
    from storage.store import TargetStore, summarize

    workdir.mkdir(parents=True, exist_ok=True)
    runner = Runner(workdir)
    w, dev = workdir, ["--device", "cpu"]
    world_dir = build_teachers(runner, w, size, seed=seed, world=WORLD, device="cpu")
    V = vocab_size(w / "sft")
    k_of = lambda s: V if s.k == EXACT else s.k  # noqa: E731
    teachers = ["--dpo-model", w / "dpo", "--reverse-model", w / "reverse"]
    train = student_flags(w, size, seed=seed, device="cpu", save_every=0)
    stores: dict[str, dict] = {}
    runs: dict[str, dict] = {}
    for s in settings:
        if s.mode != "off-policy":
            continue
        name = store_name(s.k, s.layout, s.dpo_top, s.budget)
        if name not in stores:
            runner.step(f"precompute-{name}", ["precompute", *teachers, "--data",
                                               w / "pairs.jsonl", "--response-field", "chosen",
                                               "--out", w / name, *s.target_flags(V),
                                               "--layout", s.layout, "--no-progress", *dev])
            summary = summarize(TargetStore.open(w / name))
            stores[name] = {"bytes_per_token": summary["bytes_per_token"],
                            "response_tokens": summary["response_tokens"],
                            "seconds": runner.seconds.get(f"precompute-{name}"),
                            **k_distribution(w / name)}
        out = w / "runs" / s.name
        runner.step(f"train-{s.name}", ["train", "--mode", "off-policy", "--store", w / name,
                                        *s.tail_flags(), "--out", out, "--epochs",
                                        size.off_policy_epochs, *train],
                    done=out / "final" / "model.safetensors")
        runs[s.name] = {"setting": asdict(s), "k": k_of(s), "store": name,
                        "train_seconds": runner.seconds.get(f"train-{s.name}")}
    shape = pi_star_shape(w / store_name(EXACT, "compact")) \
        if store_name(EXACT, "compact") in stores else None
    def train_on_policy(s: Setting, url: str) -> None:
        out = w / "runs" / s.name
        # fixed k: the k = V server truncates to --top-k; a budget or the defaults: a server
        # of their own, asked for everything it keeps
        ask = ["--top-k", k_of(s)] if s.k != DEFAULT and not s.budget else []
        runner.step(f"train-{s.name}", ["train", "--mode", "on-policy", "--teacher-url", url,
                                        "--prompts", world_dir / "prompts_train.jsonl",
                                        *ask, *s.tail_flags(), "--out", out,
                                        "--max-staleness", s.staleness,
                                        "--student-top", s.student_top,
                                        "--epochs", size.on_policy_epochs,
                                        "--max-new-tokens", size.max_new_tokens,
                                        "--rollout-batch-size", size.global_batch_size,
                                        *train],
                    done=out / "final" / "model.safetensors")
        runs[s.name] = {"setting": asdict(s), "k": k_of(s),
                        "train_seconds": runner.seconds.get(f"train-{s.name}")}

    with runner.server(["serve", *teachers, "--top-k", V, *dev]) as url:
        for s in settings:
            if s.mode == "on-policy" and s.k != DEFAULT and not s.budget:
                train_on_policy(s, url)
        for s in settings:
            if s.mode == "on-policy" and (s.k == DEFAULT or s.budget):
                tag = s.name.split("/", 1)[1].replace(".", "_")
                with runner.server(["serve", *teachers, *s.target_flags(V), *dev],
                                   name=f"serve-{tag}") as own_url:
                    train_on_policy(s, own_url)
        models = {"sft": w / "sft", **{n: w / "runs" / n / "final" for n in runs}}
        evals = {}
        for name, folder in models.items():
            out = w / "eval" / f"{name.replace('/', '_')}.json"
            runner.step(f"eval-{name}", ["eval", "--model", folder, "--prompts",
                                         world_dir / "prompts_eval.jsonl", "--task", WORLD,
                                         "--teacher-url", url, "--samples-per-prompt",
                                         eval_samples, "--max-new-tokens", size.max_new_tokens,
                                         "--seed", seed + 1234, "--out", out, *dev],
                        done=out)
            evals[name] = json.loads(out.read_text(encoding="utf-8"))
    sft_gold = evals["sft"]["gold_reward"]
    exact_gain = {mode: evals[f"{mode}/exact"]["gold_reward"] - sft_gold
                  for mode in ("off-policy", "on-policy") if f"{mode}/exact" in evals}
    exact_kl = {mode: evals[f"{mode}/exact"].get("kl_to_teacher")
                for mode in ("off-policy", "on-policy") if f"{mode}/exact" in evals}
    for name, r in runs.items():
        e = evals[name]
        gain = e["gold_reward"] - sft_gold
        base = exact_gain.get(r["setting"]["mode"])
        base_kl = exact_kl.get(r["setting"]["mode"])
        r.update(gold_reward=e["gold_reward"], gain=gain,
                 retained=(gain / base) if base else None,
                 kl_ratio=(e.get("kl_to_teacher") / base_kl
                           if base_kl and e.get("kl_to_teacher") is not None else None),
                 k_mean=stores.get(r.get("store"), {}).get("k_mean"),
                 kl_to_teacher=e.get("kl_to_teacher"),
                 kl_to_dpo_per_sequence=e.get("kl_to_dpo_per_sequence"),
                 length=e.get("mean_response_length"),
                 bytes_per_token=stores.get(r.get("store"), {}).get("bytes_per_token"))
    return {"seed": seed, "vocab_size": V, "sft": {k: evals["sft"].get(k) for k in (
                "gold_reward", "kl_to_teacher", "kl_to_dpo_per_sequence",
                "mean_response_length")},
            "pi_star": shape, "stores": stores, "runs": runs,
            "stage_seconds": runner.seconds}


# ------------------------------------------------------------------------------ statistics
#: Two-sided 95% Student-t quantiles by degrees of freedom.
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def mean_ci(values: list[float]) -> dict:
    values = [v for v in values if v is not None and math.isfinite(v)]
    n = len(values)
    if not n:
        return {"mean": None, "ci95": None, "n": 0}
    mean = sum(values) / n
    if n == 1:
        return {"mean": mean, "ci95": None, "n": 1}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = T95.get(n - 1, 1.96) * sd / math.sqrt(n)
    return {"mean": mean, "ci95": [mean - half, mean + half], "n": n}


def aggregate(per_seed: list[dict], settings: list[Setting]) -> dict:
    out = {}
    for s in settings:
        rows = [p["runs"][s.name] for p in per_seed if s.name in p["runs"]]
        out[s.name] = {"k": rows[0]["k"] if rows else None, "setting": asdict(s)} | {
            key: mean_ci([r.get(key) for r in rows])
            for key in ("gold_reward", "gain", "retained", "kl_to_teacher", "kl_ratio",
                        "kl_to_dpo_per_sequence", "length", "bytes_per_token", "k_mean",
                        "train_seconds")}
    out["sft"] = {"gold_reward": mean_ci([p["sft"]["gold_reward"] for p in per_seed]),
                  "kl_to_teacher": mean_ci([p["sft"]["kl_to_teacher"] for p in per_seed])}
    return out


def format_table(agg: dict, settings: list[Setting]) -> str:
    def f(cell, digits=3, pct=False):
        if cell is None or cell.get("mean") is None:
            return "-"
        scale = 100 if pct else 1
        text = f"{scale * cell['mean']:.{digits}f}"
        if cell.get("ci95"):
            lo, hi = (scale * v for v in cell["ci95"])
            text += f" [{lo:.{digits}f}, {hi:.{digits}f}]"
        return text

    lines = ["| setting | gold reward | gain over SFT | gain kept (%) | KL(student ‖ π*) | "
             "KL / exact's | KL to π_dpo / seq | length | store B/token | k mean | train s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines.append(f"| SFT | {f(agg['sft']['gold_reward'])} | | | "
                 f"{f(agg['sft']['kl_to_teacher'])} | | | | | | |")
    for s in settings:
        a = agg[s.name]
        lines.append(f"| {s.name} | {f(a['gold_reward'])} | {f(a['gain'])} | "
                     f"{f(a['retained'], 1, pct=True)} | {f(a['kl_to_teacher'])} | "
                     f"{f(a.get('kl_ratio'), 2)} | "
                     f"{f(a['kl_to_dpo_per_sequence'], 2)} | {f(a['length'], 2)} | "
                     f"{f(a['bytes_per_token'], 0)} | {f(a.get('k_mean'), 1)} | "
                     f"{f(a['train_seconds'], 0)} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ plots
def plot(agg: dict, per_seed: list[dict], workdir: Path, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from student_trainer.metrics import read_jsonl

    paths = []
    sft = agg["sft"]["gold_reward"]["mean"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for mode, marker in (("off-policy", "o"), ("on-policy", "s")):
        for tail, style in (("uniform", "-"), ("bucket", "--")):
            pts = sorted(((a["k"], a["gold_reward"], a["kl_to_teacher"])
                          for n, a in agg.items() if n != "sft"
                          and a["setting"]["mode"] == mode and a["setting"]["layout"] == "compact"
                          and not a["setting"].get("dpo_top")
                          and (a["setting"]["tail"] == tail or a["setting"]["k"] == EXACT)),
                         key=lambda p: p[0])
            if len(pts) < 2:
                continue
            for ax, i in zip(axes, (1, 2)):
                ax.errorbar([p[0] for p in pts], [p[i]["mean"] for p in pts],
                            yerr=[[p[i]["mean"] - p[i]["ci95"][0] if p[i]["ci95"] else 0
                                   for p in pts],
                                  [p[i]["ci95"][1] - p[i]["mean"] if p[i]["ci95"] else 0
                                   for p in pts]],
                            fmt=style, marker=marker, capsize=3, label=f"{mode}, {tail}")
    axes[0].axhline(sft, color="grey", lw=1, ls=":", label="SFT")
    axes[0].set_ylabel("gold reward (held-out)")
    axes[1].set_ylabel("KL(student || exact pi*) per token")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("k (top-k of log pi* kept; rightmost: k = V, exact)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    paths.append(_save(fig, out / "fidelity_vs_k.png"))

    seed = per_seed[0]["seed"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, mode in zip(axes, ("off-policy", "on-policy")):
        for name in per_seed[0]["runs"]:
            if not name.startswith(mode) or name.endswith("bucket"):
                continue
            rows = read_jsonl(workdir / f"seed{seed}" / "runs" / name / "metrics.jsonl")
            pts = [(r["step"], r["kl"]) for r in rows if isinstance(r.get("kl"), (int, float))]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name.split("/")[1])
        ax.set_title(f"{mode}: KL(student || teacher targets), seed {seed}", fontsize=9)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    paths.append(_save(fig, out / "fidelity_training_curves.png"))
    return paths


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for fidelity.json, the table and plots")
    ap.add_argument("--workdir", default=None, help="where each seed's pipeline runs (kept; a "
                    "rerun skips finished stages); default OUT/work")
    ap.add_argument("--quick", action="store_true", help="one seed, exact vs k=64 uniform, "
                    "off-policy")
    ap.add_argument("--seed", type=int, default=None, help="the one seed of --quick")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--budget", type=float, default=None, help="run the defaults study (exact "
                    "and the shipped defaults, off- and on-policy, and this tail budget with "
                    "the auto tail off-policy) instead of the k study")
    ap.add_argument("--staleness", action="store_true", help="run the staleness study (exact "
                    "on-policy at --max-staleness 0, 1, 2) instead of the k study")
    ap.add_argument("--candidates", type=int, nargs="+", default=None, metavar="N",
                    help="run the candidates study (exact and the shipped defaults on-policy, "
                    "and the defaults with train --student-top N) instead of the k study")
    ap.add_argument("--on-policy-ks", type=int, nargs="+", default=None, metavar="K",
                    help="run the on-policy k study (exact and the shipped defaults on-policy, "
                    "and k ids with the bucket tail) instead of the k study")
    ap.add_argument("--size", choices=["default", "small"], default="default",
                    help="the demo size of the grammar world")
    ap.add_argument("--replot", action="store_true", help="only redo the table and plots from "
                    "OUT/fidelity.json")
    ap.add_argument("--eval-samples", type=int, default=None,
                    help="samples per held-out prompt (default 16; 8 with --quick)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(args.workdir) if args.workdir else out / "work"
    if args.replot:
        result = json.loads((out / "fidelity.json").read_text(encoding="utf-8"))
        known = {s.name: s for s in all_settings() + QUICK + staleness_settings()
                 + (candidates_settings(args.candidates) if args.candidates else [])
                 + (on_policy_k_settings(args.on_policy_ks) if args.on_policy_ks else [])
                 + (budget_settings(args.budget) if args.budget else [])}
        missing = [n for n in result["settings"] if n not in known]
        if missing:
            raise SystemExit(f"--replot: settings {missing} need the flag the study ran with "
                             f"(--budget, --candidates or --on-policy-ks)")
        settings = [known[n] for n in result["settings"]]
        table = format_table(result["aggregate"], settings)
        (out / "fidelity_table.md").write_text(table + "\n", encoding="utf-8")
        print(table)
        print(plot(result["aggregate"], result["per_seed"], workdir, out))
        return 0
    seeds = [args.seed if args.seed is not None else 0] if args.quick else args.seeds
    settings = QUICK if args.quick else (
        staleness_settings() if args.staleness else
        candidates_settings(args.candidates) if args.candidates else
        on_policy_k_settings(args.on_policy_ks) if args.on_policy_ks else
        budget_settings(args.budget) if args.budget else all_settings())
    size = WORLD_SIZES[WORLD][args.size]
    eval_samples = args.eval_samples or (8 if args.quick else 16)
    started = time.perf_counter()
    per_seed = [run_seed(s, workdir / f"seed{s}", settings, size, eval_samples) for s in seeds]
    agg = aggregate(per_seed, settings)
    result = {"world": WORLD, "size": asdict(size), "eval_samples_per_prompt": eval_samples,
              "seeds": seeds, "settings": [s.name for s in settings], "aggregate": agg,
              "per_seed": per_seed, "seconds": round(time.perf_counter() - started, 1),
              "machine": machine(torch.get_num_threads()),
              "command": " ".join(["benchmarks/fidelity.py", *(argv or sys.argv[1:])])}
    if args.quick:
        p = per_seed[0]
        exact, k64 = p["runs"]["off-policy/exact"], p["runs"]["off-policy/k64-uniform"]
        default = p["runs"]["off-policy/default"]
        result.update(seed=p["seed"], exact_gain=exact["gain"], k64_gain=k64["gain"],
                      retained=k64["retained"],
                      median_tail_mass=(p["pi_star"] or {}).get("tail_mass_k64_median"),
                      default_gain=default["gain"], default_retained=default["retained"],
                      default_kl_ratio=default["kl_ratio"],
                      default_bytes_per_token=default["bytes_per_token"])
    (out / "fidelity.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    table = format_table(agg, settings)
    (out / "fidelity_table.md").write_text(table + "\n", encoding="utf-8")
    pngs = plot(agg, per_seed, workdir, out)
    print(table)
    print(f"\nwrote {out / 'fidelity.json'}, {', '.join(str(p) for p in pngs)} "
          f"in {result['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
