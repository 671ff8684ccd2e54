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
- **Figure 2** (convergence, on-policy): ``train --mode on-policy`` from the same SFT student,
  prompts, schedule and seed, for :data:`FIG2_EPOCHS` epochs, with ``--objective aligndistil``
  against the adaptive k = V server (the method) and against a constant-alpha server with
  ``alpha = beta0 / beta`` (the baselines' own optimum), and with ``reinforce-sentence`` and
  ``reinforce-token`` (student_trainer/reinforce.py; beta = 0.08) at the students' learning
  rate and at 3x and 10x it (:data:`FIG2_ARMS`). The curve is each step's token-averaged
  contrastive reward ``beta0 * (log pi_dpo - log pi_rev)`` of the step's own samples
  (``reward_token_mean``). The steps AlignDistil needs to reach a baseline's final reward (its
  mean over the last :data:`FINAL_WINDOW` steps) are counted on AlignDistil's trailing
  :data:`SMOOTH`-step mean.

    .venv/bin/python benchmarks/paper_analyses.py --workdir /tmp/fidwork --seeds 0 1 2 \\
        --out benchmarks/results/paper_analyses
    .venv/bin/python benchmarks/paper_analyses.py --workdir /tmp/fidwork --seeds 0 1 2 \\
        --tables fig2 --out benchmarks/results/paper_analyses/figure2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from aligndistil.demo import WORLD_SIZES, Runner, student_flags  # noqa: E402
from benchmarks.fidelity import WORLD, mean_ci, vocab_size  # noqa: E402
from benchmarks.machine_info import machine  # noqa: E402

CONSTANT_ALPHAS = (1.0, 1.2, 1.5, 1.8, 2.0)
HELDOUT_PROMPTS = 1024
BETA0 = 0.1
FIG2_EPOCHS = 4        #: 128 steps of 32 prompts over the 1,024 training prompts
FIG2_BETA = 0.08       #: the paper's beta for the baselines' KL penalty
FINAL_WINDOW = 16      #: a baseline's final reward: its mean over the last steps
SMOOTH = 8             #: AlignDistil's curve is read as a trailing mean over this many steps


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


@dataclass(frozen=True)
class Arm:
    """One on-policy student of Figure 2."""
    name: str
    objective: str
    teacher: str = "adaptive"   #: the server it trains against: adaptive, or constant alpha
    lr: float | None = None     #: None: the size's student learning rate


#: AlignDistil (adaptive alpha, the method; constant alpha = beta0 / beta, the baselines' own
#: optimum) and the two baselines at the students' learning rate, then at 3x and 10x it.
FIG2_ARMS = (
    Arm("aligndistil", "aligndistil"),
    Arm("aligndistil-constant", "aligndistil", teacher="constant"),
    Arm("reinforce-sentence", "reinforce-sentence"),
    Arm("reinforce-token", "reinforce-token"),
    Arm("reinforce-sentence@lr3e-4", "reinforce-sentence", lr=3e-4),
    Arm("reinforce-token@lr3e-4", "reinforce-token", lr=3e-4),
    Arm("reinforce-sentence@lr1e-3", "reinforce-sentence", lr=1e-3),
    Arm("reinforce-token@lr1e-3", "reinforce-token", lr=1e-3),
)


def figure2_seed(seed: int, w: Path, size, eval_samples: int, epochs: int) -> dict:
    """On-policy AlignDistil and the two REINFORCE baselines from the same SFT student
    (:data:`FIG2_ARMS`); the per-step contrastive reward of each, the gold reward of each final
    student (evaluated against the adaptive k = V server)."""
    from student_trainer.metrics import read_jsonl

    runner = Runner(w)
    dev = ["--device", "cpu"]
    world = w / "world"
    V = vocab_size(w / "sft")
    teachers = ["--dpo-model", w / "dpo", "--reverse-model", w / "reverse"]
    result: dict = {"seed": seed, "epochs": epochs, "curves": {}, "eval": {}}
    constant = ["--mode", "constant", "--beta0", BETA0, "--beta", FIG2_BETA]
    with runner.server(["serve", *teachers, "--top-k", V, *dev]) as adaptive_url, \
            runner.server(["serve", *teachers, "--top-k", V, *constant, *dev],
                          name="serve-constant") as constant_url:
        for arm in FIG2_ARMS:
            url = adaptive_url if arm.teacher == "adaptive" else constant_url
            train = student_flags(w, size, seed=seed, device="cpu", save_every=0)
            if arm.lr is not None:
                train[train.index("--lr") + 1] = arm.lr
            out = w / "figure2" / f"epochs{epochs}" / arm.name
            # The baselines need only the sampled tokens' log-probs: ask for one top-k entry.
            k = [] if arm.objective == "aligndistil" else ["--top-k", 1]
            runner.step(f"fig2-train-{arm.name}", [
                "train", "--mode", "on-policy", "--objective", arm.objective, "--kl-coef",
                FIG2_BETA, "--beta0", BETA0, "--teacher-url", url, "--prompts",
                world / "prompts_train.jsonl", *k, "--out", out, "--epochs", epochs,
                "--max-new-tokens", size.max_new_tokens, "--rollout-batch-size",
                size.global_batch_size, *train], done=out / "final" / "model.safetensors")
            rows = read_jsonl(out / "metrics.jsonl")
            result["curves"][arm.name] = [r["reward_token_mean"] for r in rows]
            evaluation = w / "figure2" / f"epochs{epochs}" / "eval" / f"{arm.name}.json"
            runner.step(f"fig2-eval-{arm.name}", [
                "eval", "--model", out / "final", "--prompts", world / "prompts_eval.jsonl",
                "--task", WORLD, "--teacher-url", adaptive_url, "--samples-per-prompt",
                eval_samples, "--max-new-tokens", size.max_new_tokens, "--seed", seed + 1234,
                "--out", evaluation, *dev], done=evaluation)
            e = json.loads(evaluation.read_text(encoding="utf-8"))
            result["eval"][arm.name] = {k: e.get(k) for k in (
                "gold_reward", "kl_to_dpo_per_sequence", "kl_to_teacher", "mean_response_length")}
            result["eval"][arm.name]["train_seconds"] = runner.seconds.get(
                f"fig2-train-{arm.name}")
    result["speed"] = {ours: convergence(result["curves"], ours)
                       for ours in ("aligndistil", "aligndistil-constant")}
    return result


def trailing_mean(values: list[float], window: int) -> list[float]:
    out = []
    for i in range(len(values)):
        part = values[max(0, i - window + 1):i + 1]
        out.append(sum(part) / len(part))
    return out


def final_reward(curve: list[float]) -> float:
    """A run's final reward: its mean over the last FINAL_WINDOW steps."""
    tail = curve[-FINAL_WINDOW:]
    return sum(tail) / len(tail)


def convergence(curves: dict[str, list[float]], ours: str) -> dict:
    """For each baseline run: its final reward, the first step at which ``ours``'s trailing
    SMOOTH-step mean reaches it (None: never), and that step as a fraction of the baseline's
    steps."""
    smooth = trailing_mean(curves[ours], SMOOTH)
    out = {}
    for name, curve in curves.items():
        if not name.startswith("reinforce"):
            continue
        final = final_reward(curve)
        step = next((i + 1 for i, v in enumerate(smooth) if v >= final), None)
        out[name] = {"final": final, "steps_to_reach": step, "steps": len(curve),
                     "fraction": (step / len(curve)) if step else None}
    return out


def plot_figure2(per_seed: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8))
    colors = {"aligndistil": "tab:blue", "aligndistil-constant": "tab:purple",
              "reinforce-sentence": "tab:orange", "reinforce-token": "tab:green"}
    for arm in FIG2_ARMS:
        curves = [p["curves"][arm.name] for p in per_seed if arm.name in p["curves"]]
        if not curves:
            continue
        base = arm.name.split("@")[0]
        n = min(len(c) for c in curves)
        mean = [sum(c[i] for c in curves) / len(curves) for i in range(n)]
        style = {None: "-", 3e-4: "--", 1e-3: ":"}[arm.lr]
        ax.plot(range(1, n + 1), trailing_mean(mean, SMOOTH), color=colors[base], ls=style,
                lw=2 if arm.lr is None else 1.2, label=arm.name)
    ax.set_xlabel("optimizer step (32 sampled responses each)")
    ax.set_ylabel("contrastive reward per token, β0·(log π_dpo − log π_rev)")
    ax.set_title(f"On-policy convergence, grammar world, mean of {len(per_seed)} seeds "
                 f"({SMOOTH}-step trailing mean)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def format_figure2(per_seed: list[dict]) -> str:
    lines = [f"Figure 2: on-policy, {per_seed[0]['epochs']} epochs, seeds "
             f"{[p['seed'] for p in per_seed]} (mean ± 95% half-interval where more than one)",
             "", "| run | final contrastive reward / token | gold reward | KL to π_dpo / seq | "
             "KL(student ‖ adaptive π*) | train s |", "|---|---|---|---|---|---|"]

    for arm in FIG2_ARMS:
        if not all(arm.name in p["curves"] for p in per_seed):
            continue
        ev = [p["eval"][arm.name] for p in per_seed]
        finals = [final_reward(p["curves"][arm.name]) for p in per_seed]
        lines.append(f"| {arm.name} | {mean_pm(finals, 4)} | "
                     f"{mean_pm([e['gold_reward'] for e in ev])} | "
                     f"{mean_pm([e['kl_to_dpo_per_sequence'] for e in ev], 2)} | "
                     f"{mean_pm([e['kl_to_teacher'] for e in ev])} | "
                     f"{mean_pm([e['train_seconds'] for e in ev], 0)} |")
    for ours in ("aligndistil", "aligndistil-constant"):
        lines += ["", f"Steps {ours} needs to reach each baseline's final reward (its "
                  f"{SMOOTH}-step trailing mean >= the baseline's mean over its last "
                  f"{FINAL_WINDOW} steps):", "", "| baseline | " +
                  " | ".join(f"seed {p['seed']}" for p in per_seed) + " |",
                  "|---|" + "---|" * len(per_seed)]
        for name in per_seed[0]["speed"][ours]:
            cells = []
            for p in per_seed:
                s = p["speed"][ours][name]
                cells.append(f"{s['steps_to_reach']} of {s['steps']} "
                             f"({100 * s['fraction']:.0f}%)" if s["fraction"] else
                             f"not reached in {s['steps']}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def mean_pm(values, digits=3, pct=False) -> str:
    """"mean ± 95% half-interval" over seeds ("-" without values, the mean alone for one)."""
    m = mean_ci(values)
    if m["mean"] is None:
        return "-"
    s = 100 if pct else 1
    text = f"{s * m['mean']:.{digits}f}"
    if m["ci95"]:
        text += f" ± {s * (m['ci95'][1] - m['mean']):.{digits}f}"
    return text


def format_tables(per_seed: list[dict]) -> str:
    lines = ["Table 2: reward accuracy (%), mean ± 95% half-interval over seeds", "",
             "| reward | train pairs | held-out pairs |", "|---|---|---|",
             "| gold reward (labelled the pairs) | 100 | 100 |"]
    for key, label in (("dpo_reward", "DPO reward"), ("contrastive_reward", "contrastive")):
        row = [mean_pm([p["table2"].get(split, {}).get(key, {}).get("accuracy") for p in per_seed],
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
        lines.append(f"| {name} | {mean_pm([v['gold_reward'] for v in vals])} | "
                     f"{mean_pm([v['kl_to_dpo_per_sequence'] for v in vals], 2)} | "
                     f"{mean_pm([v['mean_response_length'] for v in vals], 2)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", required=True, help="benchmarks/fidelity.py's --workdir")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", required=True)
    ap.add_argument("--eval-samples", type=int, default=16)
    ap.add_argument("--alphas", type=float, nargs="+", default=list(CONSTANT_ALPHAS))
    ap.add_argument("--tables", nargs="+", choices=["2", "3", "fig2"], default=["2", "3"],
                    help="which analyses to run (3 trains five students per seed, fig2 three "
                         "on-policy students; fig2 alone skips 2 and 3)")
    ap.add_argument("--fig2-epochs", type=int, default=FIG2_EPOCHS)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    size = WORLD_SIZES[WORLD]["default"]
    started = time.perf_counter()
    if args.tables == ["fig2"]:
        per_seed = [figure2_seed(s, Path(args.workdir) / f"seed{s}", size, args.eval_samples,
                                 args.fig2_epochs) for s in args.seeds]
        result = {"world": WORLD, "seeds": args.seeds, "per_seed": per_seed,
                  "seconds": round(time.perf_counter() - started, 1),
                  "machine": machine(torch.get_num_threads()),
                  "command": " ".join(["benchmarks/paper_analyses.py",
                                       *(argv or sys.argv[1:])])}
        (out / "figure2.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        plot_figure2(per_seed, out / "figure2_convergence.png")
        text = format_figure2(per_seed)
        (out / "figure2.md").write_text(text + "\n", encoding="utf-8")
        print(text)
        return 0
    if "fig2" in args.tables:
        ap.error("run --tables fig2 on its own (it writes figure2.json beside the tables)")
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
