"""``aligndistil serve`` and ``aligndistil precompute`` (argparse only here; handlers import lazily)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser(
        "serve", help="serve teacher targets over REST (on-policy batches)",
        description="Host the dpo and reverse teachers and serve sparse targets on POST /v1/score.")
    add_teacher_args(serve)
    serve.add_argument("--host", default="127.0.0.1",
                       help="bind address (default loopback; expose deliberately, with --api-key)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=None,
                       help="require 'Authorization: Bearer KEY' (or set ALIGNDISTIL_API_KEY)")
    serve.add_argument("--batch-wait-ms", type=float, default=5.0,
                       help="how long a pass waits for concurrent requests to join (default 5)")
    serve.add_argument("--max-queue", type=int, default=256,
                       help="requests waiting for the engine before new ones get 429")
    serve.add_argument("--max-body-bytes", type=int, default=8 << 20)
    serve.add_argument("--max-request-tokens", type=int, default=65536)
    serve.add_argument("--log-level", default="info")
    serve.set_defaults(func=_run_serve, policy="on")

    pre = subparsers.add_parser(
        "precompute", help="precompute sparse teacher targets for a dataset into a store",
        description="Score a dataset with the teacher pair and write the targets to a Zarr store. "
                    "Rerunning the same command resumes where it stopped.")
    add_teacher_args(pre)
    pre.add_argument("--data", required=True, help="JSONL or Parquet file")
    pre.add_argument("--out", required=True, help="the store to write (created or resumed)")
    pre.add_argument("--response-field", default=None,
                     help="for preference rows {prompt, chosen, rejected}: which list is the "
                          "response (default chosen); other row shapes are unaffected")
    pre.add_argument("--worker-index", type=int, default=None,
                     help="this worker's index (default: $RANK under torchrun, else 0)")
    pre.add_argument("--num-workers", type=int, default=None,
                     help="workers writing the store (default: $WORLD_SIZE under torchrun, else 1)")
    pre.add_argument("--shard-tokens", type=int, default=65536,
                     help="response tokens per committed shard (the unit of atomic commit)")
    pre.add_argument("--group-size", type=int, default=256,
                     help="examples sorted and packed together per engine call")
    pre.add_argument("--skip-bad-rows", action="store_true",
                     help="skip and count malformed rows instead of stopping at the first")
    pre.add_argument("--limit", type=int, default=None, help="only the first N examples")
    pre.set_defaults(func=_run_precompute, policy="off")


def add_teacher_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("teachers")
    g.add_argument("--dpo-model", required=True, help="local HF folder of the DPO-trained teacher")
    g.add_argument("--reverse-model", default=None,
                   help="local HF folder of the reverse-DPO teacher (modes adaptive, constant)")
    g.add_argument("--reference-model", default=None,
                   help="local HF folder of the reference model (mode vanilla)")
    g.add_argument("--mode", choices=("adaptive", "constant", "vanilla"), default="adaptive")
    g.add_argument("--top-k", type=int, default=64)
    g.add_argument("--r", type=float, default=None,
                   help="alpha_t = r * tvd_t + eps; default reproduces the released runs: "
                        "half-l1 20 off-policy / 30 on-policy (l1: 10 / 15)")
    g.add_argument("--eps", type=float, default=1e-3)
    g.add_argument("--tvd-norm", choices=("half-l1", "l1"), default="half-l1")
    g.add_argument("--beta0", type=float, default=0.1, help="the teachers' DPO beta")
    g.add_argument("--beta", type=float, default=0.05,
                   help="modes constant/vanilla: alpha = beta0 / beta")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    g.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="model weights (default float32 on CPU, bfloat16 on GPU); the target "
                        "math is always float32")
    g.add_argument("--max-seq-len", type=int, default=None)
    g.add_argument("--max-batch-tokens", type=int, default=8192,
                   help="padded tokens per engine pass")
    g.add_argument("--chunk-size", type=int, default=256,
                   help="response positions per LM-head chunk (memory O(chunk x V))")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="allow model code from the model folder (off: it runs arbitrary code)")


def target_config_from_args(args: argparse.Namespace):
    from teacher_service.targets import TargetConfig, default_r

    r = args.r if args.r is not None else default_r(args.tvd_norm, args.policy)
    return TargetConfig(top_k=args.top_k, r=r, eps=args.eps, tvd_norm=args.tvd_norm,
                        mode=args.mode, beta0=args.beta0, beta=args.beta,
                        chunk_size=args.chunk_size)


def other_model_path(args: argparse.Namespace) -> str:
    if args.mode == "vanilla":
        if not args.reference_model:
            raise SystemExit("aligndistil: --mode vanilla needs --reference-model")
        return args.reference_model
    if not args.reverse_model:
        raise SystemExit(f"aligndistil: --mode {args.mode} needs --reverse-model")
    return args.reverse_model


def build_engine(args: argparse.Namespace):
    from teacher_service.engine import TeacherEngine
    from teacher_service.models import load_teacher_pair

    config = target_config_from_args(args)
    pair = load_teacher_pair(args.dpo_model, other_model_path(args), mode=args.mode,
                             device=args.device, dtype=args.dtype,
                             trust_remote_code=args.trust_remote_code)
    return TeacherEngine(pair, config, max_batch_tokens=args.max_batch_tokens,
                         max_seq_len=args.max_seq_len)


def engine_info(engine) -> dict:
    from teacher_service.models import describe

    c = engine.config
    return {**describe(engine.pair), "top_k": c.top_k, "r": c.r, "eps": c.eps,
            "tvd_norm": c.tvd_norm, "mode": c.mode, "beta0": c.beta0, "beta": c.beta,
            "max_seq_len": engine.max_seq_len}


def _run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from teacher_service.server import ServerSettings, create_app

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    other_model_path(args)  # fail fast on a missing flag, before binding the port
    target_config_from_args(args)
    settings = ServerSettings(
        max_body_bytes=args.max_body_bytes, max_request_tokens=args.max_request_tokens,
        max_batch_tokens=args.max_batch_tokens, batch_wait_s=args.batch_wait_ms / 1000,
        max_queue_requests=args.max_queue,
        api_key=args.api_key or os.environ.get("ALIGNDISTIL_API_KEY") or None)
    app = create_app(lambda: build_engine(args), settings, engine_info)
    # uvicorn finishes in-flight requests on SIGTERM, then re-raises the signal to whatever
    # handler was there before: make that a clean exit, since the shutdown was graceful.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=30)
    return 0


def _run_precompute(args: argparse.Namespace) -> int:
    from teacher_service.precompute import run_precompute

    return run_precompute(args)
