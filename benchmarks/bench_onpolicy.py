"""Benchmark: where an on-policy step's time goes, Hugging Face ``generate`` against vLLM
rollouts, on 1 and 2 ranks, synchronous (``--max-staleness 0``) and one step stale (1).

Every configuration is a real ``aligndistil train --mode on-policy`` run (``torchrun
--nproc-per-node 2`` for two ranks, DDP on gloo) against one ``aligndistil serve`` of the
teacher pair, on the same prompts, seed and settings. The trainer logs, per step, the seconds
of each phase (rank 0's): ``rollout_s`` (sampling), ``weight_sync_s`` (the student's weights
into the vLLM engine, or a snapshot of them with ``--max-staleness``), ``candidates_s``,
``score_s`` (the teacher server), ``train_s`` (forward, backward, optimizer) and
``data_wait_s`` (what the trainer waited for its data: with S = 0 the whole of rollout + sync +
scoring; with S = 1 only what training did not hide). The step's wall time is ``train_s +
data_wait_s``. Medians over the steps after the first (the first pays the engine's and the
allocator's warm-up). Ratios are against the HF row with the same ranks and S, in the same
run; each configuration runs alone, one after another, with the server idle in between.

``--student-tops N...`` runs another study instead of the grid: HF rollouts on 1 rank with
S = 0, once per N with ``train --student-top N`` (0: without), so the step time the student's
candidates add is measured in a real run (``benchmarks/results/onpolicy_candidates``).

Also measured: the seconds a weight sync takes against the model's size (an in-process engine
per model, ``VLLMRollouts.sync_weights``, median of 5).

Usage (the ``vllm`` extra; SmolLM2 from ``benchmarks/make_smollm2_pair.py``, prompts from
``benchmarks/make_sharegpt_jsonl.py``)::

    VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_NUM_OF_RESERVED_CPU=0 .venv-vllm/bin/python \\
        benchmarks/bench_onpolicy.py --pair /work/cache/smollm2-135m \\
        --data /work/cache/sharegpt/chat.jsonl --out benchmarks/results/onpolicy
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.machine_info import machine  # noqa: E402

PHASES = ("rollout_s", "weight_sync_s", "candidates_s", "score_s", "train_s", "data_wait_s")
CPU_ENV = {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}


def write_prompts(data: Path, out: Path, n: int) -> Path:
    """The first ``n`` conversations' opening user turns, as ``{"messages": [...]}`` rows."""
    rows = []
    with open(data, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            user = [m for m in row["messages"] if m["role"] == "user"][:1]
            if user:
                rows.append({"messages": user})
            if len(rows) == n:
                break
    out.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return out


def run_config(args, url: str, prompts: Path, work: Path, backend: str, ranks: int,
               staleness: int, student_top: int = 0) -> dict:
    out = work / (f"{backend}-r{ranks}-s{staleness}"
                  + (f"-top{student_top}" if student_top else ""))
    train = ["train", "--mode", "on-policy", "--teacher-url", url, "--prompts", str(prompts),
             "--model", str(args.pair / "dpo"), "--out", str(out), "--overwrite",
             "--rollout-backend", backend, "--max-staleness", str(staleness),
             "--global-batch-size", str(args.batch), "--max-steps", str(args.steps),
             "--epochs", "100", "--max-new-tokens", str(args.max_new_tokens),
             "--max-prompt-len", str(args.max_prompt_len), "--rollout-batch-size",
             str(args.batch), "--lr", "1e-5", "--save-every", "0", "--no-progress",
             "--report-to", "none", "--device", "cpu", "--log-level", "warning",
             "--student-top", str(student_top)]
    if ranks == 1:
        cmd = [sys.executable, "-m", "aligndistil.cli", *train]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
               "--master-addr", "127.0.0.1", "--master-port", str(29400 + ranks + staleness),
               "-m", "aligndistil.cli", *train]
    env = {**os.environ, **CPU_ENV, "OMP_NUM_THREADS": str(max(1, args.threads // ranks))}
    started = time.perf_counter()
    with open(work / f"{out.name}.log", "wb") as log:
        rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - started
    if rc != 0:
        raise SystemExit(f"{out.name} failed (rc {rc}); see {work / (out.name + '.log')}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    later = rows[1:] or rows
    med = {k: statistics.median(r.get(k, 0.0) for r in later) for k in PHASES}
    step = statistics.median(r["train_s"] + r["data_wait_s"] for r in later)
    tokens = statistics.median(r["response_tokens"] for r in later)
    return {"backend": backend, "ranks": ranks, "staleness": staleness,
            "student_top": student_top, "step_s": step,
            "response_tokens": tokens, "tokens_per_s": tokens / step, "run_wall_s": wall,
            "staleness_logged": [r["staleness"] for r in rows], **med}


def sync_seconds(model_dirs: list[Path]) -> list[dict]:
    """Seconds per ``sync_weights`` for each model (median of 5), engine in this process."""
    import torch

    from student_trainer.modeling import load_student
    from student_trainer.rollout.hf_generate import RolloutConfig
    from student_trainer.rollout.vllm_engine import VLLMRollouts

    out = []
    for d in model_dirs:
        model, tok = load_student(d, device=torch.device("cpu"))
        params = sum(p.numel() for p in model.parameters())
        with VLLMRollouts(d, tok, RolloutConfig(max_new_tokens=4), max_seq_len=256) as engine:
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                engine.sync_weights(model)
                times.append(time.perf_counter() - t0)
        out.append({"model": str(d), "parameters": params, "sync_s": statistics.median(times),
                    "mb_float32": params * 4 / 2 ** 20})
    return out


def render_candidates(result: dict) -> str:
    """The ``--student-tops`` study: HF rollouts, 1 rank, S = 0, with and without the student's
    top N ids scored (``train --student-top N``)."""
    rows = result["runs"]
    base = next(r for r in rows if not r["student_top"])
    lines = [
        "# On-policy step with the student's own candidates (`bench_onpolicy.py "
        "--student-tops`)", "",
        "No GPU was available: not measured on a GPU. CPU only, "
        f"{result['machine']['cpus']} cores shared by the trainer and the teacher server.", "",
        f"Student and teachers: SmolLM2-135M (`{result['pair']}`; the server at `--top-k 64`); "
        f"{result['prompts']} ShareGPT prompts (first user turn, at most "
        f"{result['max_prompt_len']} tokens), {result['batch']} sequences per step, at most "
        f"{result['max_new_tokens']} new tokens, HF rollouts, 1 rank, S = 0; "
        f"{result['steps']} steps per run, medians over steps 2..{result['steps']}. "
        "`candidates` is the no-grad pass that picks the student's top N ids; `score` "
        "includes the server's work on the named ids and the merge. Ratios: this row's step over the "
        "row without candidates, in the same run.", "",
        "| N | s/step | vs N = 0 | rollout | candidates | score | train |",
        "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['student_top'] or '- (off)'} | {r['step_s']:.2f} | "
                     f"{r['step_s'] / base['step_s']:.2f}x | {r['rollout_s']:.2f} | "
                     f"{r.get('candidates_s', 0.0):.2f} | {r['score_s']:.2f} | "
                     f"{r['train_s']:.2f} |")
    lines += ["", f"{result['seconds']:.0f} s on {result['machine']}.", "",
              f"Command: `{result['command']}`", ""]
    return "\n".join(lines)


def render(result: dict) -> str:
    if result.get("study") == "candidates":
        return render_candidates(result)
    rows = result["runs"]
    base = {(r["ranks"], r["staleness"]): r for r in rows if r["backend"] == "hf"}
    lines = [
        "# On-policy step: where the time goes (`benchmarks/bench_onpolicy.py`)", "",
        "No GPU was available: not measured on a GPU. CPU only, "
        f"{result['machine']['cpus']} cores shared by the ranks and the teacher server.", "",
        f"Student and teachers: SmolLM2-135M (`{result['pair']}`); {result['prompts']} "
        f"ShareGPT prompts (first user turn, at most {result['max_prompt_len']} tokens), "
        f"{result['batch']} sequences per optimizer step over all ranks, at most "
        f"{result['max_new_tokens']} new tokens, temperature 1; {result['steps']} steps per "
        f"run, medians over steps 2..{result['steps']} (rank 0's phases). `step` = train + "
        "wait; with S = 1 rollout, sync and scoring run beside training and only `wait` is "
        "exposed. Ratios: the HF run with the same ranks and S over this row.", "",
        "| backend | ranks | S | s/step | vs hf | rollout | sync | score | train | wait | "
        "resp. tokens/s | staleness logged |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        ref = base[(r["ranks"], r["staleness"])]
        lines.append(
            f"| {r['backend']} | {r['ranks']} | {r['staleness']} | {r['step_s']:.2f} | "
            f"{ref['step_s'] / r['step_s']:.2f}x | {r['rollout_s']:.2f} | "
            f"{r['weight_sync_s']:.2f} | {r['score_s']:.2f} | {r['train_s']:.2f} | "
            f"{r['data_wait_s']:.2f} | {r['tokens_per_s']:.1f} | "
            f"{','.join(str(int(s)) for s in r['staleness_logged'])} |")
    lines += ["", "Share of each phase in the step (S = 0, where the phases add up: rollout + "
              "sync + score + train):", "", "| backend | ranks | rollout | sync | score | train |",
              "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["staleness"]:
            continue
        total = sum(r[k] for k in ("rollout_s", "weight_sync_s", "score_s", "train_s")) or 1
        lines.append(f"| {r['backend']} | {r['ranks']} | "
                     + " | ".join(f"{100 * r[k] / total:.0f}%" for k in
                                  ("rollout_s", "weight_sync_s", "score_s", "train_s")) + " |")
    lines += ["", "Scaling (vLLM's gain over HF at 2 ranks against at 1 rank, same S):", ""]
    for s in sorted({r["staleness"] for r in rows}):
        gains = {}
        for ranks in (1, 2):
            hf = base.get((ranks, s))
            v = next((r for r in rows if r["backend"] == "vllm" and r["ranks"] == ranks
                      and r["staleness"] == s), None)
            if hf and v:
                gains[ranks] = hf["step_s"] / v["step_s"]
        if len(gains) == 2:
            lines.append(f"- S = {s}: {gains[1]:.2f}x at 1 rank, {gains[2]:.2f}x at 2 ranks")
    if result.get("sync"):
        lines += ["", "Weight sync into an in-process vLLM engine against the model's size "
                  "(median of 5 calls):", "", "| model | parameters | float32 MiB | sync s |",
                  "|---|---:|---:|---:|"]
        for s in result["sync"]:
            lines.append(f"| `{Path(s['model']).name}` | {s['parameters'] / 1e6:.2f} M | "
                         f"{s['mb_float32']:.0f} | {s['sync_s']:.3f} |")
    lines += ["", f"{result['seconds']:.0f} s on {result['machine']}.", "",
              f"Command: `{result['command']}`", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pair", type=Path, required=True, help="folder with dpo/ and reverse/")
    ap.add_argument("--data", type=Path, required=True, help="ShareGPT chat JSONL")
    ap.add_argument("--out", type=Path, required=True, help="writes OUT.md and OUT.json")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--max-prompt-len", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2, help="torch threads over all ranks")
    ap.add_argument("--backends", default="hf,vllm")
    ap.add_argument("--ranks", default="1,2")
    ap.add_argument("--staleness", default="0,1")
    ap.add_argument("--student-tops", type=int, nargs="+", default=None, metavar="N",
                    help="instead of the grid: HF rollouts, 1 rank, S = 0, with train "
                         "--student-top N for each N (0: without)")
    ap.add_argument("--sync-models", type=Path, nargs="*", default=None,
                    help="models to time weight syncs on (default: a tiny one and the pair's dpo)")
    args = ap.parse_args(argv)
    if args.student_tops and 0 not in args.student_tops:
        ap.error("--student-tops needs 0 among its values (the run the others are compared "
                 "with)")
    from aligndistil.demo import Runner

    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="bench_onpolicy_"))
    prompts = write_prompts(args.data, work / "prompts.jsonl", args.prompts)
    runner = Runner(work)
    server_args = ["serve", "--dpo-model", args.pair / "dpo", "--reverse-model",
                   args.pair / "reverse", "--top-k", "64", "--device", "cpu",
                   "--max-seq-len", str(args.max_prompt_len + args.max_new_tokens)]
    runs = []
    with runner.server(server_args) as url:
        for n in args.student_tops or ():
            print(f"[hf ranks=1 S=0 student-top={n}]", flush=True)
            runs.append(run_config(args, url, prompts, work, "hf", 1, 0, student_top=n))
            print(json.dumps(runs[-1]), flush=True)
        for ranks in (() if args.student_tops else map(int, args.ranks.split(","))):
            for s in map(int, args.staleness.split(",")):
                for backend in args.backends.split(","):
                    print(f"[{backend} ranks={ranks} S={s}]", flush=True)
                    runs.append(run_config(args, url, prompts, work, backend, ranks, s))
                    print(json.dumps(runs[-1]), flush=True)
    sync_models = [] if args.student_tops else args.sync_models
    if sync_models is None:
        sys.path.insert(0, str(REPO / "tests"))
        from tiny_models import save_model_dir

        sync_models = [save_model_dir(work / "tiny", seed=7), args.pair / "dpo"]
    sync = sync_seconds(sync_models) if sync_models else []
    result = {"study": "candidates" if args.student_tops else "grid",
              "runs": runs, "sync": sync, "pair": str(args.pair), "prompts": args.prompts,
              "batch": args.batch, "steps": args.steps, "max_new_tokens": args.max_new_tokens,
              "max_prompt_len": args.max_prompt_len, "threads": args.threads,
              "machine": machine(args.threads),
              "date": dt.datetime.now(dt.timezone.utc).isoformat(),
              "seconds": time.perf_counter() - started,
              "command": (".venv/bin/python" if args.student_tops else ".venv-vllm/bin/python")
                         + " benchmarks/bench_onpolicy.py " +
                         " ".join(argv if argv is not None else sys.argv[1:])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(render(result))
    print(render(result))
    # every run saves a model; a failed run keeps the folder (its log is named in the error)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
