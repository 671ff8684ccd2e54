"""On-policy scoring throughput with one teacher server vs two, through the trainer's own client.

Real processes on loopback: ``aligndistil serve`` subprocesses over a small Llama-shaped teacher
pair built here from a config (random weights; ``--hidden``, ``--layers``, ``--vocab``), and
``student_trainer.client.TeacherClient`` in this process scoring batches as the on-policy
trainer does (``--batch`` sequences per call, lengths uniform in [``--min-len``, ``--max-len``],
a quarter prompt). Each configuration scores the same ``--calls`` batches after one warm-up
call; tokens/s = the batches' tokens / wall time.

Configurations, in one run:

- ``1 server, 1 thread``: the baseline;
- ``2 servers, 1 thread each``: the scale-out (each server is one CPU core here, as each would
  be one GPU in production);
- ``1 server, 2 threads``: the same cores given to one server, for honesty: on a 2-core CPU
  this is the fair comparison for the cores, the two-server row is the one for the mechanism.

    .venv/bin/python benchmarks/bench_teacher_servers.py --out benchmarks/results/teacher_servers
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.machine_info import machine  # noqa: E402
from tests.live_server import start_server, stop_server  # noqa: E402


def build_pair(root: Path, args) -> tuple[Path, Path]:
    from aligndistil.worlds.toy.build import SPECIAL_TOKENS, build_model, build_tokenizer

    tok = build_tokenizer([f"w{i}" for i in range(args.vocab - len(SPECIAL_TOKENS))])
    out = []
    for seed, name in enumerate(("dpo", "reverse")):
        model = build_model(len(tok), seed=seed, hidden_size=args.hidden, layers=args.layers,
                            head_dim=64)
        model.config.max_position_embeddings = 4096
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out.append(root / name)
    return out[0], out[1]


def batches(args, vocab: int) -> list[list[tuple[list[int], int]]]:
    rng = random.Random(0)
    out = []
    for _ in range(args.calls + 1):
        batch = []
        for _ in range(args.batch):
            n = rng.randint(args.min_len, args.max_len)
            batch.append(([rng.randrange(7, vocab) for _ in range(n)], max(1, n // 4)))
        out.append(batch)
    return out


def measure(urls: list[str], work: list, vocab: int, tokenizer_sha: str) -> dict:
    from student_trainer.client import TeacherClient

    with TeacherClient(",".join(urls)) as client:
        client.check_compatible(tokenizer_sha256=tokenizer_sha, vocab_size=vocab)
        client.score(work[0])  # warm-up
        tokens = sum(len(ids) for batch in work[1:] for ids, _ in batch)
        t0 = time.perf_counter()
        for batch in work[1:]:
            records = client.score(batch)
            assert len(records) == len(batch)
        seconds = time.perf_counter() - t0
    return {"servers": len(urls), "seconds": seconds, "tokens": tokens,
            "tokens_per_s": tokens / seconds}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--calls", type=int, default=8)
    p.add_argument("--min-len", type=int, default=64)
    p.add_argument("--max-len", type=int, default=384)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "teacher_servers"))
    args = p.parse_args(argv)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)

    from causal_lm.loading import load_tokenizer
    from storage.tokenization import tokenizer_sha256

    root = Path(tempfile.mkdtemp(prefix="bench_servers_"))
    dpo, rev = build_pair(root, args)
    tok = load_tokenizer(dpo)
    work = batches(args, len(tok))
    flags = ("--top-k", "64", "--max-seq-len", "4096")
    rows = {}
    for name, threads, n in (("1 server, 1 thread", 1, 1), ("2 servers, 1 thread each", 1, 2),
                             ("1 server, 2 threads", 2, 1)):
        procs = [start_server(dpo, rev, *flags, env={"OMP_NUM_THREADS": str(threads)},
                              log_path=root / f"serve-{i}.log") for i in range(n)]
        try:
            print(f"[{name}]", flush=True)
            rows[name] = measure([url for _, url in procs], work, len(tok), tokenizer_sha256(tok))
        finally:
            for proc, _ in procs:
                stop_server(proc)
    base = rows["1 server, 1 thread"]["tokens_per_s"]
    res = {"args": vars(args), "rows": rows, "machine": machine(torch.get_num_threads()),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    params = sum(p.numel() for p in
                 __import__("transformers").AutoModelForCausalLM.from_pretrained(dpo).parameters())
    m = res["machine"]
    lines = ["# On-policy scoring: one teacher server vs two", "",
             f"Written by `benchmarks/bench_teacher_servers.py` (its docstring defines the rows); "
             f"one run, {res['date']}. Machine: {m['cpu']}, {m['cpus']} cores, torch "
             f"{m['torch']}. Teachers: Llama-shaped, {params / 1e6:.1f}M parameters each, "
             f"V = {args.vocab}, random weights, float32, top-k 64. {args.calls} calls of "
             f"{args.batch} sequences ({args.min_len}-{args.max_len} tokens) through the "
             f"trainer's `TeacherClient`.", "",
             "| configuration | tokens/s | x 1 server, 1 thread |", "|---|---:|---:|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / base:.2f}x |")
    lines += ["", "Not measured on a GPU."]
    Path(args.out + ".json").write_text(json.dumps(res, indent=1) + "\n")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
