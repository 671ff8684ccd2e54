"""Padded vs packed (padding-free) forwards, in one run: precompute, the server at 8 clients,
and the student's step.

Teachers and student: the SmolLM2-135M pair (``benchmarks/make_smollm2_pair.py``; float32 on
CPU). Sequences: pre-tokenised ShareGPT conversations of ``--min-len``..``--max-len`` tokens, in
file order (their lengths vary as real requests do).

1. **Precompute** (the engine in process, as ``precompute`` runs it): the pool scored by a
   ``TeacherEngine`` with ``packing`` off and on, ``--reps`` times each, alternating; tokens/s =
   the pool's tokens / the median wall time. Decoder places = what the batches' tensors hold
   (sequences x longest padded; rows x longest packed) over the real tokens.
2. **Server, 8 clients**: a real ``aligndistil serve`` subprocess with ``--packing off``, then
   one with ``--packing on``; each gets ``benchmarks/bench_server.py``'s load phase (8 client
   threads, one sequence per request, ``--duration`` seconds). Tokens/s, p50/p99 latency.
3. **Student step**: one optimizer step of ``--step-seqs`` sequences (AlignDistil loss on the
   engine's own targets, AdamW), micro-batches padded and packed under the same
   ``--max-tokens``, ``--reps`` times each, alternating, from the same starting weights.

Records, loss and gradients of the two layouts agree within float32 rounding (tests:
``tests/test_engine.py``, ``tests/test_trainer_components.py``); this script measures time.

Usage::

    .venv/bin/python benchmarks/bench_packing.py --out benchmarks/results/packing
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_server import load_phase  # noqa: E402
from benchmarks.machine_info import machine  # noqa: E402
from tests.live_server import start_server, stop_server  # noqa: E402

PAIR = Path("/work/cache/smollm2-135m")
DATA = Path("/work/cache/sharegpt/chat.jsonl")


def load_pool(args) -> list[tuple[list[int], int]]:
    from causal_lm.loading import load_tokenizer
    from storage.datasets import read_examples
    from storage.tokenization import TokenizationError, tokenize_example

    tok = load_tokenizer(args.dpo)
    out = []
    for ex in read_examples(args.data):
        try:
            ids, p = tokenize_example(tok, ex, args.max_len, truncation="response-keep-eos")
        except TokenizationError:
            continue
        if len(ids) >= args.min_len:
            out.append((list(ids), p))
        if len(out) >= args.pool:
            break
    return out


def places(lengths: list[int], max_tokens: int, packing: bool) -> int:
    """Token places the engine's / trainer's batches compute for these lengths."""
    from storage.packing import pack_by_token_budget, pack_rows_by_token_budget

    if packing:
        return sum(len(rows) * max(lengths[i] for row in rows for i in row)
                   for rows in pack_rows_by_token_budget(lengths, max_tokens))
    return sum(len(g) * max(lengths[i] for i in g)
               for g in pack_by_token_budget(lengths, max_tokens))


def bench_precompute(args, pool) -> dict:
    from teacher_service.engine import ScoreRequest, TeacherEngine
    from teacher_service.models import load_teacher_pair
    from teacher_service.targets import TargetConfig

    pair = load_teacher_pair(args.dpo, args.reverse, device="cpu")
    config = TargetConfig(top_k=64)
    engines = {layout: TeacherEngine(pair, config, max_batch_tokens=args.max_tokens,
                                     packing=layout == "packed")
               for layout in ("padded", "packed")}
    requests = [ScoreRequest(ids, p) for ids, p in pool]
    engines["packed"].score(requests[:2])  # warm-up
    times: dict[str, list[float]] = {k: [] for k in engines}
    for _ in range(args.reps):
        for layout, engine in engines.items():
            t0 = time.perf_counter()
            engine.score(requests)
            times[layout].append(time.perf_counter() - t0)
    tokens = sum(len(ids) for ids, _ in pool)
    lengths = [len(ids) for ids, _ in pool]
    return {layout: {"seconds": times[layout], "tokens_per_s": tokens / statistics.median(t),
                     "places_per_token": places(lengths, args.max_tokens,
                                                layout == "packed") / tokens}
            for layout, t in times.items()}


def bench_server(args, pool) -> dict:
    out = {}
    for layout, flag in (("padded", "off"), ("packed", "on")):
        env = {"OMP_NUM_THREADS": str(args.server_threads)}
        proc, url = start_server(
            args.dpo, args.reverse, "--top-k", "64", "--packing", flag, "--max-batch-tokens",
            str(args.max_tokens), "--log-level", "info", env=env,
            log_path=Path(f"/tmp/bench_packing_server_{layout}.log"))
        try:
            load_phase(url, pool[:4], 1, 60, 2, 1)  # warm-up
            out[layout] = load_phase(url, pool, args.clients, args.duration, 10 ** 6, 1)
        finally:
            stop_server(proc)
    return out


def bench_student(args, pool) -> dict:
    from causal_lm.loading import load_model_and_tokenizer
    from student_trainer.collate import micro_batches
    from student_trainer.distributed import DistEnv
    from student_trainer.modeling import StudentForward
    from student_trainer.optim import build_optimizer, build_scheduler
    from student_trainer.recipes.configs import TrainConfig
    from student_trainer.recipes.train import train_step
    from teacher_service.engine import ScoreRequest, TeacherEngine
    from teacher_service.models import load_teacher_pair
    from teacher_service.targets import TargetConfig

    pair = load_teacher_pair(args.dpo, args.reverse, device="cpu")
    records = TeacherEngine(pair, TargetConfig(top_k=64), packing=True).score(
        [ScoreRequest(ids, p) for ids, p in pool[:args.step_seqs]])
    del pair
    model, tok = load_model_and_tokenizer(args.dpo, device=torch.device("cpu"), train=True)
    start = copy.deepcopy(model.state_dict())
    config = TrainConfig(mode="off-policy", model=args.dpo, out="/tmp/unused", store="/tmp/x",
                         max_tokens=args.max_tokens)
    times: dict[str, list[float]] = {"padded": [], "packed": []}
    for _ in range(args.reps):
        for layout in times:
            model.load_state_dict(start)
            forward = StudentForward(model, len(tok))
            optimizer = build_optimizer(model, lr=1e-6, weight_decay=0.0, betas=(0.9, 0.95))
            scheduler = build_scheduler(optimizer, warmup_steps=0, total_steps=10,
                                        schedule="constant", min_lr_ratio=0.0)
            t0 = time.perf_counter()
            batches = micro_batches(records, max_tokens=args.max_tokens, pad_id=0,
                                    packing=layout == "packed")
            train_step(forward, batches, optimizer=optimizer, scheduler=scheduler,
                       params=[p for p in model.parameters() if p.requires_grad], config=config,
                       step_sequences=len(records), env=DistEnv(), device=torch.device("cpu"),
                       amp=False)
            times[layout].append(time.perf_counter() - t0)
    lengths = [r.seq_len for r in records]
    return {layout: {"seconds": t, "step_s": statistics.median(t),
                     "places_per_token": places(lengths, args.max_tokens, layout == "packed")
                     / sum(lengths)} for layout, t in times.items()}


def markdown(res: dict) -> str:
    m, a = res["machine"], res["args"]
    pre, srv, stu = res["precompute"], res["server"], res["student"]
    lines = [
        "# Padded vs packed forwards (CPU)", "",
        f"Written by `benchmarks/bench_packing.py` (its docstring defines every number); one run, "
        f"{res['date']}. Machine: {m['cpu']}, {m['cpus']} cores, torch {m['torch']}. Models: "
        f"SmolLM2-135M pair (float32), V = 49152. Sequences: {res['pool']} ShareGPT "
        f"conversations of {a['min_len']}..{a['max_len']} tokens (median {res['median_len']}); "
        f"budget {a['max_tokens']} tokens per pass.", "",
        "| | padded | packed | packed / padded |", "|---|---:|---:|---:|",
        f"| precompute tokens/s | {pre['padded']['tokens_per_s']:.1f} | "
        f"{pre['packed']['tokens_per_s']:.1f} | "
        f"{pre['packed']['tokens_per_s'] / pre['padded']['tokens_per_s']:.2f}x |",
        f"| precompute decoder places per real token | {pre['padded']['places_per_token']:.3f} | "
        f"{pre['packed']['places_per_token']:.3f} | |",
        f"| server tokens/s, {a['clients']} clients | {srv['padded']['tokens_per_s']:.1f} | "
        f"{srv['packed']['tokens_per_s']:.1f} | "
        f"{srv['packed']['tokens_per_s'] / srv['padded']['tokens_per_s']:.2f}x |",
        f"| server p50 / p99 latency s | {srv['padded']['latency_p50_s']:.2f} / "
        f"{srv['padded']['latency_p99_s']:.2f} | {srv['packed']['latency_p50_s']:.2f} / "
        f"{srv['packed']['latency_p99_s']:.2f} | |",
        f"| server sequences per pass | {srv['padded']['sequences_per_pass']:.2f} | "
        f"{srv['packed']['sequences_per_pass']:.2f} | |",
        f"| student step s ({a['step_seqs']} sequences) | {stu['padded']['step_s']:.2f} | "
        f"{stu['packed']['step_s']:.2f} | "
        f"{stu['padded']['step_s'] / stu['packed']['step_s']:.2f}x faster |",
        f"| student decoder places per real token | {stu['padded']['places_per_token']:.3f} | "
        f"{stu['packed']['places_per_token']:.3f} | |", "",
        "Packed rows hold at most the batch's longest sequence, so attention per row never "
        "spans more than the padded layout's; on CPU (sdpa with a block-diagonal mask) the "
        "attention inside a row is computed whole, masked places included, so the saving is in "
        "the per-token work (projections, MLP). With flash-attention on a GPU the packed rows "
        "run as variable-length sequences.", "",
        "Not measured on a GPU.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dpo", default=str(PAIR / "dpo"))
    p.add_argument("--reverse", default=str(PAIR / "reverse"))
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--pool", type=int, default=32)
    p.add_argument("--min-len", type=int, default=32)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=2048)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--duration", type=float, default=90)
    p.add_argument("--server-threads", type=int, default=2)
    p.add_argument("--step-seqs", type=int, default=8)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "packing"))
    args = p.parse_args(argv)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pool = load_pool(args)
    lengths = sorted(len(ids) for ids, _ in pool)
    res = {"args": vars(args), "pool": len(pool), "median_len": lengths[len(lengths) // 2],
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print("precompute ...", flush=True)
    res["precompute"] = bench_precompute(args, pool)
    print("server ...", flush=True)
    res["server"] = bench_server(args, pool)
    print("student ...", flush=True)
    res["student"] = bench_student(args, pool)
    res["machine"] = machine(torch.get_num_threads())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")
    Path(args.out + ".md").write_text(markdown(res), encoding="utf-8")
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
