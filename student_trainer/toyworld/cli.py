"""``aligndistil toyworld``, ``sft``, ``pairs`` and ``eval`` (argparse only; handlers import
lazily so ``aligndistil --help`` stays instant).

``toyworld`` builds the embedded default (DESIGN §5); ``sft`` and ``pairs`` work on any model
and data (the toy world is just their first user); ``eval`` measures any model on prompts.
"""

from __future__ import annotations

import argparse
import json
import os

_FMT = argparse.ArgumentDefaultsHelpFormatter


def register(subparsers: argparse._SubParsersAction) -> None:
    _add_toyworld(subparsers)
    _add_sft(subparsers)
    _add_pairs(subparsers)
    _add_eval(subparsers)


def _add_toyworld(subparsers) -> None:
    p = subparsers.add_parser(
        "toyworld", help="build the toy world offline: tokenizer, tiny model, demonstrations, "
                         "prompts", formatter_class=_FMT,
        description="Writes OUT/init (a tiny Llama-architecture model + word-level tokenizer "
                    "with a chat template, safetensors), OUT/sft_demos.jsonl (noisy "
                    "demonstrations of sorting short lists of numbers), OUT/prompts_train.jsonl "
                    "and OUT/prompts_eval.jsonl (held-out). Same files for the same seed.")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--demos", type=int, default=4000, help="noisy SFT demonstrations")
    p.add_argument("--noise", type=float, default=0.2,
                   help="probability that a demonstration's answer token is a random number")
    p.add_argument("--train-prompts", type=int, default=512)
    p.add_argument("--eval-prompts", type=int, default=128)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.set_defaults(func=_run_toyworld)


def _run_toyworld(args) -> int:
    from .build import WorldConfig, build_world

    paths = build_world(WorldConfig(
        out=args.out, seed=args.seed, demos=args.demos, noise=args.noise,
        train_prompts=args.train_prompts, eval_prompts=args.eval_prompts,
        hidden_size=args.hidden_size, layers=args.layers))
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def _add_sft(subparsers) -> None:
    p = subparsers.add_parser(
        "sft", help="supervised fine-tuning on chat demonstrations", formatter_class=_FMT,
        description="Cross-entropy on the assistant's response tokens of {'messages': [...]} "
                    "(or prompt/response) rows, tokenised with the model's chat template. "
                    "Saves a Hugging Face folder with metrics.jsonl and training_curves.png.")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--warmup-ratio", type=float, default=0.05)
    p.add_argument("--lr-schedule", choices=("cosine", "linear", "constant"), default="cosine")
    p.add_argument("--max-seq-len", type=int, default=1024)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=_run_sft)


def _run_sft(args) -> int:
    from student_trainer.cli import _report, _setup_logging

    from .sft import SFTConfig, run_sft

    _setup_logging(args.log_level)
    config = SFTConfig(model=args.model, data=args.data, out=args.out, lr=args.lr,
                       batch_size=args.batch_size, epochs=args.epochs, max_steps=args.max_steps,
                       warmup_ratio=args.warmup_ratio, schedule=args.lr_schedule,
                       max_seq_len=args.max_seq_len, seed=args.seed, device=args.device,
                       progress=not args.no_progress)
    return _report(lambda: _print_json(run_sft(config), ("steps", "examples", "last", "final")))


def _add_pairs(subparsers) -> None:
    p = subparsers.add_parser(
        "pairs", help="sample answers from a model and label preference pairs with a gold "
                      "reward", formatter_class=_FMT,
        description="For every prompt, samples answers at temperature 1; the best and worst "
                    "by the task's gold reward become 'chosen' and 'rejected' "
                    "(UltraFeedback-style JSONL, read by 'aligndistil dpo').")
    p.add_argument("--model", required=True)
    p.add_argument("--prompts", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--task", default="sort", choices=("sort",))
    p.add_argument("--samples-per-prompt", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.set_defaults(func=_run_pairs)


def _run_pairs(args) -> int:
    from student_trainer.cli import _report

    from .pairs import PairsConfig, run_pairs

    config = PairsConfig(model=args.model, prompts=args.prompts, out=args.out, task=args.task,
                         samples_per_prompt=args.samples_per_prompt,
                         max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                         seed=args.seed, device=args.device)
    return _report(lambda: _print_json(run_pairs(config)))


def _add_eval(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="sample a model on held-out prompts: gold reward, contrastive reward, "
                     "KL to the dpo teacher, response length (JSON)", formatter_class=_FMT,
        description="Samples --samples-per-prompt answers per prompt at temperature 1. With "
                    "--task, the task's exact gold reward; with --teacher-url (a running "
                    "'aligndistil serve'), the token-averaged contrastive reward "
                    "beta0*mean_t(log pi_dpo - log pi_reverse) and the per-token KL(model || "
                    "dpo) estimated on the samples. Prints the JSON and writes it to --out.")
    p.add_argument("--model", required=True)
    p.add_argument("--prompts", required=True, help="JSONL/Parquet rows with 'prompt' or "
                   "'messages'")
    p.add_argument("--out", default=None, help="write the JSON here too")
    p.add_argument("--teacher-url", default=None)
    p.add_argument("--api-key", default=None, help="or ALIGNDISTIL_API_KEY")
    p.add_argument("--task", default=None, choices=("sort",),
                   help="score with this task's gold reward")
    p.add_argument("--samples-per-prompt", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--beta0", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.set_defaults(func=_run_eval)


def _run_eval(args) -> int:
    from student_trainer.cli import _report
    from student_trainer.evaluate import EvalConfig, run_eval

    config = EvalConfig(model=args.model, prompts=args.prompts, out=args.out,
                        teacher_url=args.teacher_url,
                        api_key=args.api_key or os.environ.get("ALIGNDISTIL_API_KEY") or None,
                        task=args.task, samples_per_prompt=args.samples_per_prompt,
                        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                        beta0=args.beta0, seed=args.seed, device=args.device)
    return _report(lambda: _print_json(run_eval(config)))


def _print_json(result: dict, keys: tuple[str, ...] | None = None) -> dict:
    shown = {k: result[k] for k in keys if k in result} if keys else result
    print(json.dumps(shown, indent=2))
    return {}
