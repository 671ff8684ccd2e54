"""Benchmark: on-policy rollout throughput, Hugging Face ``generate`` (``--rollout-backend hf``)
against vLLM (``--rollout-backend vllm``), on the same model, prompts and sampling settings.

Each backend is called exactly as the trainer calls it: ``rollout.generate_responses`` (left-
padded batches of ``--hf-batch-size`` prompts, temperature 1, no top-k / top-p, stop at EOS)
and ``VLLMRollouts.generate`` (one request per prompt, the same settings; vLLM batches them
itself). Before every vLLM call the student's weights are synced into the engine, as in
training; that sync is timed on its own and included in the vLLM row's wall time.

Measured per model, in one process: engine start-up (once), then ``--rounds`` rounds, each
calling both backends on all prompts with the round's seed, alternating which goes first.
Throughput = response tokens / seconds (tokens are counted up to and including EOS; the two
backends draw different samples, so their token counts differ a little). Ratios are against
the HF row of the same run, on wall time and on process CPU time (on a shared machine wall
time also measures the neighbours; the load average is recorded before and after): the
columns give medians over the rounds, and "per-round" the median of each round's ratio (the
two backends of a round run back to back, so they share the machine's load). ``--threads``
sets the torch (and so vLLM's in-process) thread count; 1 makes CPU time a steadier measure
of the work on a busy machine.

Models: the toy world's initial model (built with ``aligndistil toyworld`` into a temporary
folder unless ``--toy`` names one) and, when its folder exists, SmolLM2-135M-Instruct
(``--smollm2``, made by ``benchmarks/make_smollm2_pair.py``; its ``dpo`` folder) with
ShareGPT prompts (``--sharegpt``).

Usage (in an environment with the ``vllm`` extra)::

    VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_CPU_NUM_OF_RESERVED_CPU=0 VLLM_CPU_KVCACHE_SPACE=1 \\
        .venv-vllm/bin/python benchmarks/bench_rollouts.py --write benchmarks/results/rollouts.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from causal_lm.loading import pad_token_id  # noqa: E402
from student_trainer.modeling import load_student  # noqa: E402
from student_trainer.prompts import prompt_ids, read_prompt_rows  # noqa: E402
from student_trainer.rollout.hf_generate import RolloutConfig, generate_responses  # noqa: E402
from benchmarks.machine_info import cpu_model  # noqa: E402

CPU_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
           "VLLM_CPU_KVCACHE_SPACE": "1"}


def pick_prompts(path: Path, tokenizer, n: int, max_len: int) -> list[list[int]]:
    """The first ``n`` prompts of the file whose token ids fit in ``max_len``."""
    chosen = []
    for where, row in read_prompt_rows(path):
        ids = prompt_ids(tokenizer, row, where)
        if len(ids) <= max_len:
            chosen.append(ids)
        if len(chosen) == n:
            return chosen
    raise SystemExit(f"bench_rollouts: only {len(chosen)} prompts of <= {max_len} tokens in "
                     f"{path}")


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def bench_model(name: str, model_dir: Path, prompts_path: Path, args, *, n_prompts: int,
                max_prompt_len: int, max_new_tokens: int) -> dict:
    from student_trainer.rollout.vllm_engine import VLLMRollouts

    device = torch.device("cpu")
    model, tok = load_student(model_dir, device=device)
    model.eval()
    prompts = pick_prompts(prompts_path, tok, n_prompts, max_prompt_len)
    max_seq_len = min(max_prompt_len + max_new_tokens, model.config.max_position_embeddings)
    cfg = RolloutConfig(max_new_tokens=max_new_tokens, batch_size=args.hf_batch_size)
    pad, eos = pad_token_id(tok), tok.eos_token_id
    print(f"[{name}] {len(prompts)} prompts, {max_new_tokens} new tokens max", flush=True)

    engine, startup_s, _ = timed(lambda: VLLMRollouts(model_dir, tok, cfg,
                                                      max_seq_len=max_seq_len))
    try:
        def hf(seed):
            return generate_responses(model, prompts, pad_token_id=pad, eos_token_id=eos,
                                      config=cfg, seed=seed, max_seq_len=max_seq_len)

        syncs = []

        def vllm(seed):
            _, sync_s, _ = timed(lambda: engine.sync_weights(model))
            syncs.append(sync_s)
            return engine.generate(prompts, seed)

        runs = {"hf": hf, "vllm": vllm}
        # warm-up (first-call costs: allocator, kernels), not measured
        for fn in runs.values():
            fn(12345)
        rounds = {k: [] for k in runs}
        for r in range(args.rounds):
            order = list(runs) if r % 2 == 0 else list(runs)[::-1]
            for backend in order:
                out, wall, cpu = timed(lambda: runs[backend](1000 + r))
                tokens = sum(len(ids) - n for ids, n in out)
                rounds[backend].append({"wall_s": wall, "cpu_s": cpu, "tokens": tokens})
                print(f"[{name}] round {r} {backend}: {tokens} tokens, {wall:.2f} s wall, "
                      f"{cpu:.2f} s CPU", flush=True)
    finally:
        engine.close()
    rows = {}
    for backend, rs in rounds.items():
        rows[backend] = {
            "tokens_per_s_wall": statistics.median(x["tokens"] / x["wall_s"] for x in rs),
            "tokens_per_s_cpu": statistics.median(x["tokens"] / x["cpu_s"] for x in rs),
            "wall_s": statistics.median(x["wall_s"] for x in rs),
            "cpu_s": statistics.median(x["cpu_s"] for x in rs),
            "tokens": statistics.median(x["tokens"] for x in rs), "rounds": rs}
    return {"name": name, "model": str(model_dir), "params": sum(p.numel() for p in
                                                                  model.parameters()),
            "prompts": len(prompts), "prompt_tokens_mean": sum(map(len, prompts)) / len(prompts),
            "max_new_tokens": max_new_tokens, "max_seq_len": max_seq_len,
            "vllm_startup_s": startup_s, "sync_s_median": statistics.median(syncs),
            "rows": rows}


def machine() -> dict:
    cpu = cpu_model()
    import vllm

    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "vllm": vllm.__version__,
            "python": platform.python_version(),
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "vllm_env": {k: os.environ.get(k) for k in CPU_ENV}}


def report(results: list[dict], info: dict, index: int = 0) -> str:
    head = (["# Rollout benchmark: Hugging Face generate vs vLLM (`benchmarks/bench_rollouts.py`)",
             "", "No GPU was available for these runs: GPU numbers are not measured.",
             "", "Both backends sample the trainer's way (temperature 1, no top-k/top-p, at "
             "least one token, stop at EOS): HF generate in left-padded batches of "
             f"{info['hf_batch_size']} prompts (the trainer's --rollout-batch-size default), "
             "vLLM one request per prompt (its own batching), with the student's weights synced "
             "into the engine before every call as in training (included in its time). Each "
             "table comes from one run; ratios are against the HF row of the same run. See the "
             "script's docstring for every column.", ""] if index == 0 else [])
    lines = head + [
        f"# Run {index + 1}: `{info['command']}`", "",
        f"- machine: {info['logical_cpus']} logical CPUs ({info['cpu']}), shared with other "
        f"engineers' jobs; load average (1, 5, 15 min) before {info['load_before']}, after "
        f"{info['load_after']}",
        f"- torch {info['torch']}, {info['torch_threads']} thread(s); vLLM {info['vllm']} "
        f"(vllm-cpu, in-process engine, eager, float32); Python {info['python']}; "
        f"{info['date']}",
        "- vLLM env: " + ", ".join(f"`{k}={v}`" for k, v in info["vllm_env"].items()),
        f"- median of {info['rounds']} interleaved rounds after a warm-up call", ""]
    for res in results:
        hf = res["rows"]["hf"]
        lines += [f"## {res['name']}", "",
                  f"Model `{res['model']}` ({res['params'] / 1e6:.1f} M parameters); "
                  f"{res['prompts']} prompts (mean {res['prompt_tokens_mean']:.0f} tokens), up to "
                  f"{res['max_new_tokens']} new tokens, max_seq_len {res['max_seq_len']}. vLLM "
                  f"engine start-up {res['vllm_startup_s']:.1f} s (once per run); weight sync "
                  f"{res['sync_s_median'] * 1000:.0f} ms per call (median, part of the vllm "
                  f"row's time).", "",
                  "| backend | tokens/s (wall) | vs hf | per-round | tokens/s (CPU) | vs hf | "
                  "per-round | median wall s | median CPU s |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for backend, row in res["rows"].items():
            per_round = {
                key: statistics.median(
                    (x["tokens"] / x[f"{key}_s"]) / (h["tokens"] / h[f"{key}_s"])
                    for x, h in zip(row["rounds"], hf["rounds"]))
                for key in ("wall", "cpu")}
            lines.append(
                f"| {backend} | {row['tokens_per_s_wall']:.0f} | "
                f"{row['tokens_per_s_wall'] / hf['tokens_per_s_wall']:.2f}x | "
                f"{per_round['wall']:.2f}x | {row['tokens_per_s_cpu']:.0f} | "
                f"{row['tokens_per_s_cpu'] / hf['tokens_per_s_cpu']:.2f}x | "
                f"{per_round['cpu']:.2f}x | {row['wall_s']:.2f} | {row['cpu_s']:.2f} |")
        lines.append("")
        lines.append("Rounds (response tokens / wall s / CPU s): " + "; ".join(
            f"{b}: " + ", ".join(f"{x['tokens']}/{x['wall_s']:.2f}/{x['cpu_s']:.2f}"
                                  for x in row["rounds"])
            for b, row in res["rows"].items()))
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--toy", type=Path, default=None,
                    help="a toy world folder (aligndistil toyworld --out); default: build one")
    ap.add_argument("--smollm2", type=Path, default=Path("/work/cache/smollm2-135m/dpo"),
                    help="SmolLM2 folder (make_smollm2_pair.py); skipped when missing")
    ap.add_argument("--sharegpt", type=Path, default=Path("/work/cache/sharegpt/chat.jsonl"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--hf-batch-size", type=int, default=32,
                    help="the trainer's --rollout-batch-size default")
    ap.add_argument("--toy-prompts", type=int, default=64)
    ap.add_argument("--toy-new-tokens", type=int, default=48)
    ap.add_argument("--smollm2-prompts", type=int, default=32)
    ap.add_argument("--smollm2-new-tokens", type=int, default=64)
    ap.add_argument("--smollm2-max-prompt", type=int, default=96)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--skip-toy", action="store_true")
    ap.add_argument("--skip-smollm2", action="store_true")
    ap.add_argument("--write", type=Path, default=None, help="the Markdown report (and .json)")
    ap.add_argument("--append", action="store_true",
                    help="add this run to --write as a further run (and to its .json)")
    ap.add_argument("--render", type=Path, default=None,
                    help="only rewrite the Markdown of --write from this .json")
    args = ap.parse_args()
    if args.render:
        runs = json.loads(args.render.read_text())["runs"]
        text = "\n\n".join(report(r["results"], r["machine"], i) for i, r in enumerate(runs))
        (args.write or args.render.with_suffix(".md")).write_text(text + "\n")
        print(text)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    if not torch.cuda.is_available():
        for key, value in CPU_ENV.items():
            os.environ.setdefault(key, value)

    load_before = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        toy = args.toy
        if toy is None and not args.skip_toy:
            from aligndistil.worlds.toy.build import WorldConfig, build_world

            toy = Path(tmp) / "world"
            build_world(WorldConfig(out=str(toy)))
        if not args.skip_toy:
            results.append(bench_model("toy world (init model)", toy / "init",
                                       toy / "prompts_train.jsonl", args,
                                       n_prompts=args.toy_prompts, max_prompt_len=16,
                                       max_new_tokens=args.toy_new_tokens))
    if args.skip_smollm2:
        print("SmolLM2 skipped (--skip-smollm2)", flush=True)
    elif args.smollm2 and (args.smollm2 / "config.json").is_file() and args.sharegpt.is_file():
        results.append(bench_model("SmolLM2-135M-Instruct, ShareGPT prompts", args.smollm2,
                                   args.sharegpt, args, n_prompts=args.smollm2_prompts,
                                   max_prompt_len=args.smollm2_max_prompt,
                                   max_new_tokens=args.smollm2_new_tokens))
    else:
        print("SmolLM2 skipped: no model folder or prompts", flush=True)
    info = machine()
    info.update(load_before=load_before,
                load_after=", ".join(f"{x:.2f}" for x in os.getloadavg()),
                rounds=args.rounds, hf_batch_size=args.hf_batch_size,
                command="python benchmarks/bench_rollouts.py " + " ".join(sys.argv[1:]))
    runs = []
    if args.write and args.append and args.write.with_suffix(".json").is_file():
        runs = json.loads(args.write.with_suffix(".json").read_text())["runs"]
    runs.append({"machine": info, "results": results})
    text = "\n\n".join(report(r["results"], r["machine"], i) for i, r in enumerate(runs))
    print(text)
    if args.write:
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text(text + "\n")
        args.write.with_suffix(".json").write_text(json.dumps({"runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
