"""The paper's Table 2 and Table 3, in miniature, in the grammar (fidelity) world.

Runs on the teachers ``benchmarks/fidelity.py`` built for a seed (``WORKDIR/seed<S>``: world,
sft, pairs.jsonl, dpo, reverse), through the ordinary commands:

- **Table 2** (reward accuracy): held-out pairs are sampled from the SFT model on 1,024 fresh
  prompts (none a training prompt) and labelled by the gold reward (``pairs``);
  ``reward-accuracy`` then reports how often the DPO reward
  ``beta0 * sum_t log(pi_dpo / pi_ref)`` and the contrastive reward
  ``beta0 * sum_t log(pi_dpo / pi_rev)`` rank chosen above rejected, on the training pairs and
  on the held-out ones. The gold reward's row is 100% by construction (it labelled the pairs;
  ties are not pairs).
- **Table 3** (adaptive vs constant extrapolation, off-policy): ``precompute --mode constant``
  with ``beta0 / beta`` in {1.0, 1.2, 1.5, 1.8, 2.0} (alpha fixed at that value; the loss weight
  is then ``beta``) against ``--mode adaptive`` (the fidelity benchmark's exact run), all at
  k = V, each trained like the benchmark's off-policy students; ``eval`` against a k = V
  adaptive server gives the gold reward, KL to pi_dpo per sequence and response length.

    .venv/bin/python benchmarks/paper_analyses.py --workdir /tmp/fidwork --seeds 0 1 2 \\
        --out benchmarks/results/paper_analyses
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from aligndistil.demo import WORLD_SIZES, Runner, student_flags  # noqa: E402
from benchmarks.fidelity import WORLD, mean_ci, vocab_size  # noqa: E402
from benchmarks.machine_info import machine  # noqa: E402

CONSTANT_ALPHAS = (1.0, 1.2, 1.5, 1.8, 2.0)
HELDOUT_PROMPTS = 1024
BETA0 = 0.1


def heldout_prompts(train: Path, out: Path, *, n: int, seed: int) -> Path:
    """``n`` grammar prompts none of which is a training prompt (the world's 128 evaluation
    prompts give too few pairs to tell two accuracies apart)."""
    import random

    from aligndistil.worlds.toy.grammar import GrammarTask

    if out.exists():
        return out
    seen = {json.loads(line)["prompt"] for line in train.open(encoding="utf-8")}
    task, rng, rows = GrammarTask(), random.Random(10_000 + seed), []
    while len(rows) < n:
        prompt = task.prompt(task.sample_key(rng))
        if prompt not in seen:
            seen.add(prompt)
            rows.append({"prompt": prompt})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return out


def run_seed(seed: int, w: Path, size, eval_samples: int, alphas, tables=("2", "3")) -> dict:
    runner = Runner(w)
    dev = ["--device", "cpu"]
    world = w / "world"
    V = vocab_size(w / "sft")
    teachers = ["--dpo-model", w / "dpo", "--reverse-model", w / "reverse"]
    # ---- Table 2
    test_pairs = w / "analyses" / "test_pairs.jsonl"
    prompts = heldout_prompts(world / "prompts_train.jsonl", w / "analyses" / "heldout.jsonl",
                              n=HELDOUT_PROMPTS, seed=seed)
    runner.step("pairs-heldout", ["pairs", "--model", w / "sft", "--prompts",
                                  prompts, "--out", test_pairs, "--task",
                                  WORLD, "--samples-per-prompt", size.samples_per_prompt,
                                  "--max-new-tokens", size.max_new_tokens, "--seed", seed + 77,
                                  *dev], done=test_pairs)
    table2_path = w / "analyses" / "reward_accuracy.json"
    runner.step("reward-accuracy", ["reward-accuracy", *teachers, "--reference-model", w / "sft",
                                    "--train-pairs", w / "pairs.jsonl", "--test-pairs",
                                    test_pairs, "--beta0", BETA0, "--no-progress", "--out",
                                    table2_path, *dev], done=table2_path)
    table2 = json.loads(table2_path.read_text(encoding="utf-8"))
    if "3" not in tables:
        return {"seed": seed, "table2": table2["splits"], "table3": None}
    # ---- Table 3
    train = [*student_flags(w, size, seed=seed, device="cpu", save_every=0), "--epochs",
             size.off_policy_epochs]
    runs = {}
    for alpha in alphas:
        name = f"constant-{alpha:g}"
        store = w / "analyses" / f"store_{name}"
        runner.step(f"precompute-{name}", ["precompute", *teachers, "--data", w / "pairs.jsonl",
                                           "--response-field", "chosen", "--out", store,
                                           "--top-k", V, "--mode", "constant", "--beta0",
                                           BETA0, "--beta", BETA0 / alpha, "--no-progress",
                                           *dev])
        out = w / "analyses" / "runs" / name
        runner.step(f"train-{name}", ["train", "--mode", "off-policy", "--store", store,
                                      "--beta0", BETA0, "--out", out, *train],
                    done=out / "final" / "model.safetensors")
        runs[name] = out / "final"
    runs["adaptive"] = w / "runs" / "off-policy" / "exact" / "final"
    runs["sft"] = w / "sft"
    runs["dpo"] = w / "dpo"
    table3 = {}
    with runner.server(["serve", *teachers, "--top-k", V, *dev]) as url:
        for name, folder in runs.items():
            out = w / "analyses" / "eval" / f"{name}.json"
            runner.step(f"eval-{name}", ["eval", "--model", folder, "--prompts",
                                         world / "prompts_eval.jsonl", "--task", WORLD,
                                         "--teacher-url", url, "--samples-per-prompt",
                                         eval_samples, "--max-new-tokens", size.max_new_tokens,
                                         "--seed", seed + 1234, "--out", out, *dev], done=out)
            e = json.loads(out.read_text(encoding="utf-8"))
            table3[name] = {k: e.get(k) for k in ("gold_reward", "kl_to_dpo_per_sequence",
                                                  "mean_response_length", "kl_to_teacher")}
    return {"seed": seed, "table2": table2["splits"], "table3": table3}


def format_tables(per_seed: list[dict]) -> str:
    def cell(values, digits=3, pct=False):
        m = mean_ci(values)
        if m["mean"] is None:
            return "-"
        s = 100 if pct else 1
        text = f"{s * m['mean']:.{digits}f}"
        if m["ci95"]:
            text += f" ± {s * (m['ci95'][1] - m['mean']):.{digits}f}"
        return text

    lines = ["Table 2: reward accuracy (%), mean ± 95% half-interval over seeds", "",
             "| reward | train pairs | held-out pairs |", "|---|---|---|",
             "| gold reward (labelled the pairs) | 100 | 100 |"]
    for key, label in (("dpo_reward", "DPO reward"), ("contrastive_reward", "contrastive")):
        row = [cell([p["table2"].get(split, {}).get(key, {}).get("accuracy") for p in per_seed],
                    1, pct=True) for split in ("train", "test")]
        lines.append(f"| {label} | {row[0]} | {row[1]} |")
    with3 = [p for p in per_seed if p["table3"]]
    if with3:
        lines += ["", f"Table 3: off-policy, alpha adaptive vs constant (k = V), seeds "
                  f"{[p['seed'] for p in with3]} (mean ± 95% half-interval where more than "
                  f"one)", "",
                  "| teacher | gold reward | KL to π_dpo / seq | length |", "|---|---|---|---|"]
    for name in (list(with3[0]["table3"]) if with3 else []):
        vals = [p["table3"][name] for p in with3]
        lines.append(f"| {name} | {cell([v['gold_reward'] for v in vals])} | "
                     f"{cell([v['kl_to_dpo_per_sequence'] for v in vals], 2)} | "
                     f"{cell([v['mean_response_length'] for v in vals], 2)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", required=True, help="benchmarks/fidelity.py's --workdir")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", required=True)
    ap.add_argument("--eval-samples", type=int, default=16)
    ap.add_argument("--alphas", type=float, nargs="+", default=list(CONSTANT_ALPHAS))
    ap.add_argument("--tables", nargs="+", choices=["2", "3"], default=["2", "3"],
                    help="which tables to run (3 trains five students per seed)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    size = WORLD_SIZES[WORLD]["default"]
    started = time.perf_counter()
    per_seed = [run_seed(s, Path(args.workdir) / f"seed{s}", size, args.eval_samples,
                         args.alphas, args.tables) for s in args.seeds]
    result = {"world": WORLD, "seeds": args.seeds, "per_seed": per_seed,
              "seconds": round(time.perf_counter() - started, 1),
              "machine": machine(torch.get_num_threads()),
              "command": " ".join(["benchmarks/paper_analyses.py", *(argv or sys.argv[1:])])}
    (out / "paper_analyses.json").write_text(json.dumps(result, indent=2) + "\n",
                                             encoding="utf-8")
    tables = format_tables(per_seed)
    (out / "paper_analyses.md").write_text(tables + "\n", encoding="utf-8")
    print(tables)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
