"""``aligndistil train`` and ``aligndistil dpo`` (argparse only here; handlers import lazily,
so ``aligndistil --help`` never imports torch)."""

from __future__ import annotations

import argparse
import logging
import os
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this package's subcommands. Handlers import heavy modules lazily."""
    _add_train(subparsers)
    _add_dpo(subparsers)


# ---------------------------------------------------------------------------- train
def _add_train(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train the student with AlignDistil (off-policy from a store, or "
                      "on-policy through a teacher server)",
        description="AlignDistil student training. Off-policy streams sparse teacher targets "
                    "from a store; on-policy samples responses from the student and scores them "
                    "with a running 'aligndistil serve'. Multi-GPU/CPU: launch with torchrun "
                    "(e.g. torchrun --nproc-per-node 8 -m aligndistil.cli train ...); each rank "
                    "reads its own part of the data and gradients are averaged with DDP.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--mode", choices=("off-policy", "on-policy"), required=True)
    p.add_argument("--model", required=True, help="the initial student: a local Hugging Face "
                   "folder (safetensors) whose tokenizer matches the teachers'")
    p.add_argument("--out", required=True, help="output folder: checkpoint-N/, final/, "
                   "metrics.jsonl, tensorboard/, training_curves.png")

    off = p.add_argument_group("off-policy")
    off.add_argument("--store", help="the precomputed target store (aligndistil precompute)")

    on = p.add_argument_group("on-policy")
    on.add_argument("--teacher-url", help="base URL of 'aligndistil serve', e.g. "
                    "http://127.0.0.1:8000")
    on.add_argument("--prompts", help="JSONL/Parquet of prompts ('prompt', 'messages' or "
                    "'input_ids' rows)")
    on.add_argument("--api-key", default=None,
                    help="bearer token for the server (default: $ALIGNDISTIL_API_KEY)")
    on.add_argument("--top-k", type=int, default=None,
                    help="ask the server for this many top-k entries (default: the server's)")
    on.add_argument("--max-new-tokens", type=int, default=256)
    on.add_argument("--rollout-batch-size", type=int, default=32,
                    help="prompts per generate call")
    on.add_argument("--rollout-backend", choices=("hf", "vllm"), default="hf",
                    help="sampler, temperature 1, no top-k/top-p: hf = Hugging Face generate; "
                         "vllm = an in-process vLLM engine that gets the student's weights "
                         "before every rollout (needs the 'vllm' extra; one process only; "
                         "--rollout-batch-size does not apply: vLLM batches by itself)")
    on.add_argument("--async-rollouts", action="store_true",
                    help="sample and score step s+1 while step s trains (samples one update "
                         "stale; keeps a second copy of the student for sampling)")
    on.add_argument("--max-seq-len", type=int, default=None,
                    help="prompt + response limit (default: the server's max_seq_len)")
    on.add_argument("--request-timeout", type=float, default=300.0, help="seconds per request")
    on.add_argument("--max-retries", type=int, default=6,
                    help="retries on connection errors/429/503 before stopping")

    loss = p.add_argument_group("loss")
    loss.add_argument("--tail", choices=("uniform", "bucket"), default="uniform",
                      help="how the teacher's mass outside its top-k is modelled")
    loss.add_argument("--beta0", type=float, default=0.1, help="beta_t = beta0 / alpha_t")
    loss.add_argument("--weighting", choices=("alpha", "uniform"), default="alpha",
                      help="alpha: beta_t = beta0/alpha_t (released code); uniform: beta0")
    loss.add_argument("--loss-chunk-size", type=int, default=None,
                      help="compute the LM head + loss this many positions at a time "
                           "(memory O(chunk x V) instead of O(tokens x V); one extra matmul)")

    opt = p.add_argument_group("optimisation (defaults: the paper's)")
    opt.add_argument("--lr", type=float, default=1e-6)
    opt.add_argument("--weight-decay", type=float, default=0.0)
    opt.add_argument("--adam-betas", type=float, nargs=2, default=(0.9, 0.95))
    opt.add_argument("--warmup-ratio", type=float, default=0.1)
    opt.add_argument("--lr-schedule", choices=("cosine", "linear", "constant"), default="cosine")
    opt.add_argument("--min-lr-ratio", type=float, default=0.0,
                     help="the decay ends at this fraction of --lr")
    opt.add_argument("--global-batch-size", type=int, default=128,
                     help="sequences per optimizer step, over all ranks")
    opt.add_argument("--max-tokens", type=int, default=8192,
                     help="padded tokens per micro-batch (gradient accumulation fills the "
                          "global batch)")
    opt.add_argument("--epochs", type=int, default=1)
    opt.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    opt.add_argument("--max-grad-norm", type=float, default=1.0, help="0 disables clipping")
    opt.add_argument("--seed", type=int, default=42)

    rt = p.add_argument_group("runtime")
    rt.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    rt.add_argument("--bf16", choices=("auto", "on", "off"), default="auto",
                    help="bf16 autocast (auto: on with CUDA); weights stay float32")
    rt.add_argument("--gradient-checkpointing", action="store_true")
    rt.add_argument("--save-every", type=int, default=100,
                    help="checkpoint every N steps (0: only the final one)")
    rt.add_argument("--save-total-limit", type=int, default=2,
                    help="keep this many checkpoint-N folders (final/ is always kept)")
    rt.add_argument("--resume", nargs="?", const="latest", default=None,
                    help="continue from the newest checkpoint in --out, or from the given "
                         "checkpoint folder")
    rt.add_argument("--no-progress", action="store_true", help="no progress bar")
    rt.add_argument("--no-tensorboard", action="store_true")
    rt.add_argument("--trust-remote-code", action="store_true")
    rt.add_argument("--log-level", default="info")
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level)
    from student_trainer.train import TrainConfig, run_train

    config = TrainConfig(
        mode=args.mode, model=args.model, out=args.out, store=args.store,
        teacher_url=args.teacher_url, prompts=args.prompts,
        api_key=args.api_key or os.environ.get("ALIGNDISTIL_API_KEY") or None,
        top_k=args.top_k, max_new_tokens=args.max_new_tokens,
        rollout_batch_size=args.rollout_batch_size, rollout_backend=args.rollout_backend,
        async_rollouts=args.async_rollouts, max_seq_len=args.max_seq_len,
        request_timeout=args.request_timeout, max_retries=args.max_retries,
        tail=args.tail, beta0=args.beta0, weighting=args.weighting,
        loss_chunk_size=args.loss_chunk_size, lr=args.lr, weight_decay=args.weight_decay,
        adam_betas=tuple(args.adam_betas), warmup_ratio=args.warmup_ratio,
        schedule=args.lr_schedule, min_lr_ratio=args.min_lr_ratio,
        global_batch_size=args.global_batch_size, max_tokens=args.max_tokens,
        epochs=args.epochs, max_steps=args.max_steps,
        max_grad_norm=args.max_grad_norm or None, seed=args.seed, device=args.device,
        bf16={"auto": None, "on": True, "off": False}[args.bf16],
        gradient_checkpointing=args.gradient_checkpointing, save_every=args.save_every,
        save_total_limit=args.save_total_limit, resume=args.resume,
        progress=not args.no_progress, tensorboard=not args.no_tensorboard,
        trust_remote_code=args.trust_remote_code)
    return _report(lambda: run_train(config))


# ---------------------------------------------------------------------------- dpo
def _add_dpo(subparsers) -> None:
    p = subparsers.add_parser(
        "dpo", help="train a teacher with DPO (or the reverse teacher with --reverse)",
        description="Sigmoid DPO against the initial model as the reference (its log-probs are "
                    "computed once, up front). --reverse swaps chosen and rejected, giving the "
                    "reverse-DPO teacher. The trained model is saved into --out as a Hugging "
                    "Face folder (with metrics.jsonl, training_curves.png, dpo_summary.json).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="the initial model (and the reference)")
    p.add_argument("--data", required=True, help="preference pairs, JSONL/Parquet rows "
                   "{'prompt', 'chosen': [messages], 'rejected': [messages]}")
    p.add_argument("--out", required=True, help="where the trained model is saved")
    p.add_argument("--reverse", action="store_true", help="swap chosen and rejected")
    p.add_argument("--beta", type=float, default=0.1, help="the DPO beta (the paper's beta0)")
    p.add_argument("--lr", type=float, default=5e-7)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup-ratio", type=float, default=0.1)
    p.add_argument("--lr-schedule", choices=("cosine", "linear", "constant"), default="cosine")
    p.add_argument("--batch-size", type=int, default=64, help="pairs per optimizer step")
    p.add_argument("--max-tokens", type=int, default=4096,
                   help="padded tokens per micro-batch (chosen + rejected)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="0 disables clipping")
    p.add_argument("--max-seq-len", type=int, default=1024,
                   help="longer responses are cut from their end")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=_run_dpo)


def _run_dpo(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level)
    from student_trainer.dpo import DPOConfig, run_dpo

    config = DPOConfig(
        model=args.model, data=args.data, out=args.out, reverse=args.reverse, beta=args.beta,
        lr=args.lr, weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio,
        schedule=args.lr_schedule, batch_size=args.batch_size, max_tokens=args.max_tokens,
        epochs=args.epochs, max_steps=args.max_steps, max_grad_norm=args.max_grad_norm or None,
        max_seq_len=args.max_seq_len, seed=args.seed, device=args.device,
        trust_remote_code=args.trust_remote_code, progress=not args.no_progress)
    return _report(lambda: run_dpo(config))


# ---------------------------------------------------------------------------- shared
def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # One line per HTTP request drowns the training log; retries are logged by our client.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))


def _report(fn) -> int:
    """Run a handler; known user-facing errors become one clear line and exit status 2."""
    from student_trainer.errors import USER_ERRORS

    try:
        result = fn()
    except USER_ERRORS as exc:
        print(f"aligndistil: error: {exc}", file=sys.stderr)
        return 2
    if isinstance(result, dict) and "final" in result:
        last = result.get("last") or {}
        figures = ", ".join(f"{k} {last[k]:.4g}" for k in ("loss", "kl", "alpha_mean")
                            if isinstance(last.get(k), (int, float)))
        print(f"done: {result.get('steps')} steps; model saved to {result['final']}"
              + (f"; last step: {figures}" if figures else ""))
    elif isinstance(result, dict) and "preference_accuracy" in result:
        print(f"done: {result['steps']} steps on {result['pairs']} pairs"
              f"{' (reverse)' if result['reverse'] else ''}; preference accuracy "
              f"{result['preference_accuracy']:.3f}; log-prob ranking "
              f"{result['logprob_accuracy_before']:.3f} -> {result['logprob_accuracy_after']:.3f}")
    return 0
