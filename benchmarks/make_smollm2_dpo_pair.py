"""A real DPO teacher pair for SmolLM2-135M-Instruct, offline: ``aligndistil dpo`` both ways on
preference pairs whose preference can be checked.

Usage::

    .venv/bin/python benchmarks/make_smollm2_pair.py            # the base model (GGUF -> HF)
    .venv/bin/python benchmarks/make_smollm2_dpo_pair.py [--out /work/cache/smollm2-135m-dpo]

Prints the two teacher folders (``OUT/dpo`` and ``OUT/reverse``), one a line, last, and writes
``OUT/pair.json`` (settings, pair counts, held-out reward accuracies, the checked preference).

The preference ("prose"): the share of an answer's characters that are ASCII letters or
spaces. The base model at temperature 1 often answers ShareGPT prompts with code, symbol runs
or emoji; the rule prefers plain prose. It is a rule, so the preference can be checked on the
trained teachers' own samples: the dpo teacher's answers should score above the base's, and the
reverse teacher's below.

Steps (each skipped when its output exists with the same settings):

1. Prompts: the first user turn of ShareGPT rows from ``--first-row`` on (10-300 characters),
   ``--prompts`` of them; the last ``--held-out`` are kept out of training. The fidelity
   benchmarks read the first 48 rows, so the default ``--first-row 1000`` keeps them apart.
2. Pairs: ``aligndistil pairs``' own recipe with the rule registered as a task:
   ``--samples`` answers per prompt from the base model, best and worst by the rule.
3. ``aligndistil dpo`` (the dpo teacher) and ``aligndistil dpo --reverse`` (the reverse
   teacher), both from the base model, on the training pairs.
4. ``aligndistil reward-accuracy`` on the held-out pairs.
5. The check: ``--check-samples`` answers per held-out prompt from base, dpo and reverse,
   scored by the rule.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_BASE = Path("/work/cache/smollm2-135m/dpo")  # make_smollm2_pair.py's de-quantised model
DEFAULT_DATA = Path("/work/cache/sharegpt/chat.jsonl")
DEFAULT_OUT = Path("/work/cache/smollm2-135m-dpo")


def prose_score(prompt: str, answer: str) -> float:
    """The share of the answer's characters that are ASCII letters or spaces (0 if empty)."""
    if not answer:
        return 0.0
    return sum(ch == " " or ("a" <= ch.lower() <= "z") for ch in answer) / len(answer)


def write_prompts(data: Path, first_row: int, count: int, held_out: int,
                  out: Path) -> tuple[Path, Path]:
    prompts = []
    with data.open() as fh:
        for i, line in enumerate(fh):
            if i < first_row:
                continue
            messages = json.loads(line).get("messages") or []
            if messages and messages[0].get("role") == "user":
                text = messages[0].get("content") or ""
                if 10 <= len(text) <= 300:
                    prompts.append({"prompt": text})
            if len(prompts) == count:
                break
    if len(prompts) < count:
        raise SystemExit(f"{data}: only {len(prompts)} usable prompts from row {first_row}")
    train, test = out / "prompts_train.jsonl", out / "prompts_test.jsonl"
    train.write_text("".join(json.dumps(p) + "\n" for p in prompts[:count - held_out]))
    test.write_text("".join(json.dumps(p) + "\n" for p in prompts[count - held_out:]))
    return train, test


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default=str(DEFAULT_BASE))
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--first-row", type=int, default=1000)
    ap.add_argument("--prompts", type=int, default=360)
    ap.add_argument("--held-out", type=int, default=40)
    ap.add_argument("--samples", type=int, default=4, help="answers per prompt for the pairs")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=5e-6)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--check-samples", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from aligndistil.worlds.pairs import PairsConfig, run_pairs
    from student_trainer.rollout.hf_generate import RolloutConfig
    from student_trainer.sampling import sample_answers
    from student_trainer.tasks import Task, register_task

    register_task(Task("prose", prose_score, "share of ASCII letters and spaces"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = out / "pair.json"
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    info = json.loads(stamp.read_text()) if stamp.is_file() else {}
    if info.get("settings") != settings:
        info = {"settings": settings}
    python = sys.executable
    cli = [python, "-m", "aligndistil.cli"]

    def save() -> None:
        stamp.write_text(json.dumps(info, indent=1) + "\n")

    train_prompts, test_prompts = write_prompts(Path(args.data), args.first_row, args.prompts,
                                                args.held_out, out)
    for split, prompts in (("train", train_prompts), ("test", test_prompts)):
        if f"pairs_{split}" not in info or not (out / f"pairs_{split}.jsonl").is_file():
            info[f"pairs_{split}"] = run_pairs(PairsConfig(
                model=args.base, prompts=str(prompts), out=str(out / f"pairs_{split}.jsonl"),
                task="prose", samples_per_prompt=args.samples,
                max_new_tokens=args.max_new_tokens, batch_size=64, seed=args.seed,
                device="cpu"))
            save()
    for name, extra in (("dpo", []), ("reverse", ["--reverse"])):
        if f"{name}_summary" not in info or not (out / name / "dpo_summary.json").is_file():
            run(cli + ["dpo", "--model", args.base, "--data", str(out / "pairs_train.jsonl"),
                       "--out", str(out / name), "--beta", str(args.beta), "--lr", str(args.lr),
                       "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
                       "--warmup-ratio", "0.1", "--max-seq-len", "512", "--seed",
                       str(args.seed), "--device", "cpu", "--overwrite"] + extra)
        info[f"{name}_summary"] = json.loads((out / name / "dpo_summary.json").read_text())
        save()
    if "reward_accuracy" not in info:
        run(cli + ["reward-accuracy", "--dpo-model", str(out / "dpo"), "--reverse-model",
                   str(out / "reverse"), "--reference-model", args.base, "--test-pairs",
                   str(out / "pairs_test.jsonl"), "--beta0", str(args.beta), "--device", "cpu",
                   "--out", str(out / "reward_accuracy.json")])
        info["reward_accuracy"] = json.loads((out / "reward_accuracy.json").read_text())
        save()
    if "check" not in info:
        check = {}
        for name, model in (("base", args.base), ("dpo", str(out / "dpo")),
                            ("reverse", str(out / "reverse"))):
            samples = sample_answers(model, str(test_prompts), n=args.check_samples,
                                     sampling=RolloutConfig(max_new_tokens=args.max_new_tokens,
                                                            batch_size=64),
                                     seed=args.seed + 1, device="cpu")
            scores = [prose_score(s.prompt, s.text) for s in samples]
            check[name] = {"samples": len(scores), "mean_prose": sum(scores) / len(scores)}
        info["check"] = check
        save()
    c = info["check"]
    print("held-out prose score of sampled answers: "
          + ", ".join(f"{k} {v['mean_prose']:.3f}" for k, v in c.items()), file=sys.stderr)
    print(out / "dpo")
    print(out / "reverse")
    return 0


if __name__ == "__main__":
    sys.exit(main())
