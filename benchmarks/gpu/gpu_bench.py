"""Everything a GPU run should measure, in one process, within about 8 minutes on an H100/H200.

Run through ``benchmarks/gpu/run.sh`` (which makes the packages importable on a bare GPU
image). Models: a Qwen2.5-1.5B-shaped teacher pair and student built from a config (random
weights, bf16, V = 151,936 embedding rows for a 151,665-token word-level tokenizer; no hub).
Sequences: ``--sequences`` random token sequences with log-normal lengths (median
``--median-len``, clipped to [64, 2048]) and a prompt of a quarter of each.

Sections (each times itself; a section that fails is recorded as failed and the rest go on; the
results file is rewritten after every section, so a run stopped by its time limit keeps what it
measured):

1. ``forward``: one teacher's decoder, bf16, ``[8, 1024]`` tokens per call: tokens/s and MFU
   (model FLOPs ``2 x decoder params + 2 x layers x context x hidden`` per token, against
   ``--peak-tflops``, 989 = H100/H200 SXM dense bf16).
2. ``precompute``: the engine (``TeacherEngine.score``, both teachers, top-k 64) over the
   sequences, padded and packed, and the naive way (``benchmarks/bench_precompute.py``'s
   ``naive_score``: ``[B, T, V]`` float32 logits of both teachers and the target math on the
   whole tensors, as the released code does): tokens/s.
3. ``target_math``: on the precompute's response positions, the time of the two float32 heads
   alone and of the heads plus the target math (``compute_targets``: two log-softmaxes, TVD,
   z*, top-k, tail), as a share of the packed precompute's time. Above 15%, fusing the math is
   worth it (issue: teacher throughput).
4. ``head_fp32``: the float32 teacher head against a bf16 head on 8,192 positions: ms per call
   and the float32 copy's bytes.
5. ``student``: one optimizer step (fwd + bwd + AdamW, float32 master weights, bf16 autocast) on
   one micro-batch of about ``--student-tokens`` tokens: the AlignDistil sparse loss (records
   from the engine) vs SFT cross-entropy (``model(input_ids, labels=...)``): seconds and peak
   memory; packed and padded micro-batches.
6. ``server``: a real ``aligndistil serve`` subprocess on the saved teachers; 1, 8 and 32 client
   threads, one sequence per request, Arrow responses, ``--server-seconds`` each: tokens/s,
   p50/p99 latency.

``--dry-run``: tiny shapes on the CPU, a few seconds per section, to keep this script working
(``tests/test_gpu_bench.py`` runs it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

QWEN25_15B = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                  num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                  max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=True)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=1024, max_position_embeddings=4096,
            rope_theta=1e6, tie_word_embeddings=True)
TOKENIZER_WORDS = {"full": 151665, "tiny": 1000}  # tokens the tokenizer has (<= vocab rows)


# ------------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, reps: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def peak_memory(device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


# ------------------------------------------------------------------------------- set-up
def build_models(args, device) -> dict[str, Path]:
    """Save a tokenizer and three random models (dpo, reverse, student) as HF folders."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from aligndistil.worlds.toy.build import SPECIAL_TOKENS, build_tokenizer

    shape = TINY if args.dry_run else QWEN25_15B
    words = TOKENIZER_WORDS["tiny" if args.dry_run else "full"] - len(SPECIAL_TOKENS)
    tokenizer = build_tokenizer([f"w{i}" for i in range(words)])
    config = Qwen2Config(**shape, bos_token_id=2, eos_token_id=3, pad_token_id=0)
    folders = {}
    for seed, name in enumerate(("dpo", "reverse", "student")):
        torch.manual_seed(seed)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=args.dtype)
        folder = Path(args.work) / name
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders[name] = folder
        del model
    return folders


def random_sequences(args, vocab: int) -> list[tuple[list[int], int]]:
    g = torch.Generator().manual_seed(0)
    lengths = torch.exp(torch.randn(args.sequences, generator=g) * 0.6
                        + math.log(args.median_len)).clamp(64, 2048).long().tolist()
    out = []
    for n in lengths:
        ids = torch.randint(7, vocab, (n,), generator=g).tolist()
        out.append((ids, max(1, n // 4)))
    return out


def decoder_params(model) -> int:
    emb = model.get_input_embeddings().weight.numel()
    return sum(p.numel() for p in model.model.parameters()) - emb


# ----------------------------------------------------------------------------- sections
def section_forward(args, device, pair, results):
    model = pair.dpo
    ids = torch.randint(7, pair.vocab_size, (args.fwd_batch, args.fwd_len), device=device)
    decoder = model.get_decoder()

    def run():
        with torch.inference_mode():
            decoder(input_ids=ids, use_cache=False)

    t = statistics.median(timed(run, device, args.reps, warmup=2))
    tokens = ids.numel()
    cfg = model.config
    flops_per_token = 2 * decoder_params(model) + \
        2 * cfg.num_hidden_layers * args.fwd_len * cfg.hidden_size
    out = {"tokens_per_call": tokens, "seconds": t, "tokens_per_s": tokens / t,
           "decoder_params": decoder_params(model), "flops_per_token": flops_per_token}
    if device.type == "cuda":
        out["mfu"] = flops_per_token * tokens / t / (args.peak_tflops * 1e12)
    results["forward"] = out


def section_precompute(args, device, pair, sequences, results):
    from teacher_service.engine import ScoreRequest, TeacherEngine
    from teacher_service.targets import TargetConfig

    config = TargetConfig(top_k=64)
    requests = [ScoreRequest(ids, p) for ids, p in sequences]
    tokens = sum(len(ids) for ids, _ in sequences)
    out = {"sequences": len(sequences), "tokens": tokens,
           "response_tokens": sum(len(ids) - p for ids, p in sequences)}
    for layout in ("padded", "packed"):
        engine = TeacherEngine(pair, config, max_batch_tokens=args.max_batch_tokens,
                               packing=layout == "packed")
        t = statistics.median(timed(lambda: engine.score(requests), device, args.reps))
        out[layout] = {"seconds": t, "tokens_per_s": tokens / t}
        results["precompute"] = out
    from benchmarks.bench_precompute import naive_score  # [B, T, V] logits, the released way

    # Its [B, T, V] float32 tensors (~8 alive at once) need a smaller budget: 8192 tokens x
    # V = 151,936 x 4 B = 5 GB each.
    naive_budget = min(args.max_batch_tokens, 8192)
    t = statistics.median(timed(lambda: naive_score(pair, config, requests, naive_budget,
                                                    keep_records=False),
                                device, max(1, args.reps - 1)))
    out["naive"] = {"seconds": t, "tokens_per_s": tokens / t, "max_batch_tokens": naive_budget}
    if device.type == "cuda":
        out["naive"]["peak_memory_bytes"] = peak_memory(device)
    results["precompute"] = out


def section_target_math(args, device, pair, sequences, results):
    from causal_lm.head import Float32Head
    from teacher_service.targets import TargetConfig, compute_targets

    config = TargetConfig(top_k=64)
    n = sum(len(ids) - p for ids, p in sequences)  # the precompute's response positions
    hidden = pair.dpo.config.hidden_size
    g = torch.Generator(device=device).manual_seed(0)
    h_d = torch.randn(n, hidden, generator=g, device=device, dtype=pair.dtype)
    h_r = torch.randn(n, hidden, generator=g, device=device, dtype=pair.dtype)
    next_ids = torch.randint(0, pair.vocab_size, (n,), generator=g, device=device)
    head_d, head_r = Float32Head(pair.dpo, pair.vocab_size), Float32Head(pair.other,
                                                                         pair.vocab_size)
    chunk = config.chunk_size

    def heads_only():
        for s in range(0, n, chunk):
            head_d(h_d[s:s + chunk])
            head_r(h_r[s:s + chunk])

    def heads_and_math():
        for s in range(0, n, chunk):
            compute_targets(head_d(h_d[s:s + chunk]), head_r(h_r[s:s + chunk]),
                            next_ids[s:s + chunk], config)

    with torch.inference_mode():
        t_heads = statistics.median(timed(heads_only, device, args.reps))
        t_all = statistics.median(timed(heads_and_math, device, args.reps))
    total = results.get("precompute", {}).get("packed", {}).get("seconds")
    out = {"positions": n, "heads_s": t_heads, "heads_and_math_s": t_all,
           "math_s": t_all - t_heads}
    if total:
        out["math_share_of_precompute"] = (t_all - t_heads) / total
        out["heads_share_of_precompute"] = t_heads / total
    results["target_math"] = out


def section_head_fp32(args, device, pair, results):
    from causal_lm.head import Float32Head, head_logits

    n = 8192 if not args.dry_run else 256
    h = torch.randn(n, pair.dpo.config.hidden_size, device=device, dtype=pair.dtype)
    f32 = Float32Head(pair.dpo, pair.vocab_size)
    with torch.inference_mode():
        t32 = statistics.median(timed(lambda: f32(h), device, args.reps))
        t16 = statistics.median(timed(lambda: head_logits(pair.dpo, h, pair.vocab_size).float(),
                                      device, args.reps))
    results["head_fp32"] = {"positions": n, "float32_head_ms": t32 * 1e3,
                            "bf16_head_ms": t16 * 1e3, "ratio": t32 / t16,
                            "float32_copy_bytes": f32.weight.numel() * 4}


def section_student(args, device, folders, records, results):
    from causal_lm.loading import load_model_and_tokenizer
    from student_trainer.collate import micro_batches
    from student_trainer.distributed import DistEnv
    from student_trainer.modeling import StudentForward
    from student_trainer.optim import build_optimizer, build_scheduler
    from student_trainer.recipes.configs import TrainConfig
    from student_trainer.recipes.train import train_step

    model, tok = load_model_and_tokenizer(folders["student"], device=device,
                                          dtype=torch.float32, train=True)
    amp = device.type == "cuda"
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, lr=1e-6, weight_decay=0.0, betas=(0.9, 0.95))
    scheduler = build_scheduler(optimizer, warmup_steps=0, total_steps=1000,
                                schedule="constant", min_lr_ratio=0.0)
    config = TrainConfig(mode="off-policy", model=str(folders["student"]), out="/tmp/unused",
                         store="/tmp/unused", max_tokens=args.student_tokens)
    out = {"sequences": len(records), "tokens": sum(r.seq_len for r in records)}

    def reset_peak():
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)

    for layout in ("packed", "padded"):
        batches = micro_batches(records, max_tokens=args.student_tokens, pad_id=0,
                                packing=layout == "packed")

        def step():
            train_step(StudentForward(model, len(tok)), batches, optimizer=optimizer,
                       scheduler=scheduler, params=params, config=config,
                       rank_sequences=len(records), env=DistEnv(), device=device, amp=amp)

        reset_peak()
        t = statistics.median(timed(step, device, args.reps))
        out[f"aligndistil_{layout}"] = {"seconds": t, "micro_batches": len(batches),
                                        "peak_memory_bytes": peak_memory(device)}
        results["student"] = out

    from student_trainer.collate import collate_sequences

    batch = collate_sequences([(r.input_ids.tolist(), r.prompt_len) for r in records], pad_id=0)
    labels = batch.input_ids.clone()
    labels[batch.attention_mask == 0] = -100
    for b, r in enumerate(records):
        labels[b, :r.prompt_len] = -100
    ids, mask, labels = (x.to(device) for x in (batch.input_ids, batch.attention_mask, labels))

    def sft():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    reset_peak()
    t = statistics.median(timed(sft, device, args.reps))
    out["sft_cross_entropy"] = {"seconds": t, "peak_memory_bytes": peak_memory(device)}
    results["student"] = out


def section_server(args, device, folders, sequences, results):
    import httpx

    from storage import wire
    from tests.live_server import free_port

    port = free_port()
    log = open(Path(args.work) / "serve.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "aligndistil.cli", "serve", "--dpo-model", str(folders["dpo"]),
         "--reverse-model", str(folders["reverse"]), "--port", str(port), "--device",
         device.type, "--log-level", "warning", "--max-queue", "4096", "--max-bodies", "64"],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"serve exited with {proc.returncode}; see {log.name}")
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        out = {}
        for clients in (1, 8, 32):
            out[str(clients)] = load(url, sequences, clients, args.server_seconds,
                                     wire.ARROW_STREAM_MEDIA_TYPE)
            results["server"] = out
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def load(url, sequences, clients: int, seconds: float, accept: str) -> dict:
    import httpx

    lock = threading.Lock()
    latencies: list[float] = []
    tokens = [0]
    errors = [0]
    shed = [0]
    counter = iter(range(10 ** 9))
    deadline = time.perf_counter() + seconds
    started = time.perf_counter()

    def worker():
        with httpx.Client(base_url=url, timeout=300, headers={"Accept": accept}) as client:
            while time.perf_counter() < deadline:
                with lock:
                    i = next(counter)
                ids, p = sequences[i % len(sequences)]
                t0 = time.perf_counter()
                resp = client.post("/v1/score", json={"sequences": [{"input_ids": ids,
                                                                     "prompt_len": p}]})
                body = resp.content
                t1 = time.perf_counter()
                with lock:
                    if resp.status_code == 200 and body:
                        latencies.append(t1 - t0)
                        tokens[0] += len(ids)
                    elif resp.status_code == 429:
                        shed[0] += 1
                    else:
                        errors[0] += 1

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    lat = sorted(latencies)

    def pct(q):
        return lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")

    return {"requests": len(lat), "errors": errors[0], "shed_429": shed[0],
            "tokens_per_s": tokens[0] / wall,
            "p50_s": pct(0.5), "p99_s": pct(0.99)}


# ------------------------------------------------------------------------------ report
def markdown(results: dict) -> str:
    m = results["machine"]
    lines = ["# GPU benchmark (`benchmarks/gpu/run.sh`)", "",
             f"{results['date']}. Machine: {m.get('gpu', 'no GPU')}; {m['cpus']} CPU cores; "
             f"torch {m['torch']}, CUDA {m.get('cuda')}, transformers {m['transformers']}. "
             f"Models: {results['shape']} (random weights, {results['dtype']}), V = "
             f"{results['vocab']:,}." + (" **Dry run: tiny shapes on the CPU; the numbers mean "
                                         "nothing.**" if results["dry_run"] else ""), ""]

    def num(x, fmt="{:,.1f}"):
        return fmt.format(x) if isinstance(x, (int, float)) else "-"

    f = results.get("forward")
    if f:
        lines += [f"## Teacher forward ({results['dtype']}, one decoder)", "",
                  f"{num(f['tokens_per_s'])} tokens/s at {f['tokens_per_call']:,} tokens per "
                  f"call; MFU {num(f.get('mfu'), '{:.1%}')} (against "
                  f"{results['args']['peak_tflops']} TFLOP/s).", ""]
    p = results.get("precompute")
    if p:
        lines += ["## Precompute (engine, both teachers, top-k 64)", "",
                  "| way | tokens/s | x padded |", "|---|---:|---:|"]
        base = p.get("padded", {}).get("tokens_per_s")
        for way in ("padded", "packed", "naive"):
            if way in p:
                r = p[way]["tokens_per_s"]
                lines.append(f"| {way} | {num(r)} | {num(r / base if base else None, '{:.2f}x')} |")
        lines.append("")
    t = results.get("target_math")
    if t:
        lines += ["## Target math", "",
                  f"{t['positions']:,} response positions: heads {num(t['heads_s'], '{:.3f}')} s, "
                  f"target math {num(t['math_s'], '{:.3f}')} s: "
                  f"{num(t.get('math_share_of_precompute'), '{:.1%}')} of the packed "
                  f"precompute (heads: {num(t.get('heads_share_of_precompute'), '{:.1%}')}). "
                  "Over 15%: fuse it.", ""]
    h = results.get("head_fp32")
    if h:
        lines += ["## Float32 teacher head", "",
                  f"{h['positions']:,} positions: float32 {num(h['float32_head_ms'], '{:.2f}')} ms "
                  f"vs bf16 {num(h['bf16_head_ms'], '{:.2f}')} ms ({num(h['ratio'], '{:.2f}')}x); "
                  f"the float32 copy holds {h['float32_copy_bytes'] / 2**30:.2f} GiB.", ""]
    s = results.get("student")
    if s:
        lines += ["## Student step", "", f"{s['sequences']} sequences, {s['tokens']:,} tokens.",
                  "", "| loss | s / step | peak memory GiB |", "|---|---:|---:|"]
        for name in ("aligndistil_packed", "aligndistil_padded", "sft_cross_entropy"):
            if name in s:
                mem = s[name].get("peak_memory_bytes")
                lines.append(f"| {name} | {num(s[name]['seconds'], '{:.3f}')} | "
                             f"{num(mem / 2**30 if mem else None, '{:.1f}')} |")
        lines.append("")
    v = results.get("server")
    if v:
        lines += ["## Server (Arrow responses, one sequence per request)", "",
                  "| clients | tokens/s | p50 s | p99 s | requests | 429s | errors |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        for c, r in v.items():
            lines.append(f"| {c} | {num(r['tokens_per_s'])} | {num(r['p50_s'], '{:.3f}')} | "
                         f"{num(r['p99_s'], '{:.3f}')} | {r['requests']} | "
                         f"{r.get('shed_429', 0)} | {r['errors']} |")
        lines.append("")
    if results.get("failed"):
        lines += ["## Failed sections", ""] + [f"- {k}: {v}" for k, v in
                                               results["failed"].items()] + [""]
    lines.append(f"Seconds per section: {json.dumps(results['section_seconds'])}")
    return "\n".join(lines) + "\n"


def machine_record(device) -> dict:
    import transformers

    out = {"cpus": os.cpu_count(), "python": platform.python_version(),
           "torch": torch.__version__, "cuda": torch.version.cuda,
           "transformers": transformers.__version__}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
        out["gpu_memory_bytes"] = torch.cuda.get_device_properties(device).total_memory
    return out


# -------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "gpu"),
                   help="writes OUT.md and OUT.json")
    p.add_argument("--work", default=None, help="model folders (default: a temporary folder)")
    p.add_argument("--sequences", type=int, default=64)
    p.add_argument("--median-len", type=int, default=512)
    p.add_argument("--max-batch-tokens", type=int, default=16384)
    p.add_argument("--student-tokens", type=int, default=8192)
    p.add_argument("--fwd-batch", type=int, default=8)
    p.add_argument("--fwd-len", type=int, default=1024)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--server-seconds", type=float, default=20)
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--sections", default="forward,precompute,target_math,head_fp32,student,"
                                         "server")
    args = p.parse_args(argv)
    if args.dry_run:
        args.sequences, args.median_len, args.max_batch_tokens = 8, 80, 1024
        args.student_tokens, args.fwd_batch, args.fwd_len, args.reps = 1024, 2, 64, 1
        args.server_seconds = 1
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    args.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    work = tempfile.TemporaryDirectory(prefix="gpu_bench_") if args.work is None else None
    args.work = args.work or work.name
    wanted = args.sections.split(",")
    results: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                     "dry_run": args.dry_run, "machine": machine_record(device),
                     "args": {k: str(v) if isinstance(v, torch.dtype) else v
                              for k, v in vars(args).items()},
                     "shape": "tiny" if args.dry_run else "Qwen2.5-1.5B-shaped",
                     "dtype": str(args.dtype).removeprefix("torch."),
                     "vocab": (TINY if args.dry_run else QWEN25_15B)["vocab_size"],
                     "failed": {}, "section_seconds": {}}

    def write():
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out + ".json").write_text(json.dumps(results, indent=1) + "\n")
        Path(args.out + ".md").write_text(markdown(results))

    def run(name, fn, *a):
        if name not in wanted:
            return
        print(f"[{name}]", flush=True)
        t0 = time.perf_counter()
        try:
            fn(*a)
        except Exception as exc:  # noqa: BLE001 - record it, measure the rest
            traceback.print_exc()
            results["failed"][name] = f"{type(exc).__name__}: {exc}"[:500]
        results["section_seconds"][name] = round(time.perf_counter() - t0, 1)
        write()

    from teacher_service.engine import ScoreRequest, TeacherEngine
    from teacher_service.models import load_teacher_pair
    from teacher_service.targets import TargetConfig

    t0 = time.perf_counter()
    folders = build_models(args, device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    pair = load_teacher_pair(folders["dpo"], folders["reverse"], device=device.type,
                             dtype="bfloat16" if device.type == "cuda" else "float32")
    sequences = random_sequences(args, pair.vocab_size)
    results["section_seconds"]["setup"] = round(time.perf_counter() - t0, 1)
    run("forward", section_forward, args, device, pair, results)
    run("precompute", section_precompute, args, device, pair, sequences, results)
    run("target_math", section_target_math, args, device, pair, sequences, results)
    run("head_fp32", section_head_fp32, args, device, pair, results)
    student_records = TeacherEngine(pair, TargetConfig(top_k=64), packing=True).score(
        [ScoreRequest(ids, p) for ids, p in sequences[:max(1, args.student_tokens // 600)]])
    del pair
    if device.type == "cuda":
        torch.cuda.empty_cache()
    run("student", section_student, args, device, folders, student_records, results)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    run("server", section_server, args, device, folders, sequences, results)
    write()
    print(markdown(results))
    if work is not None:
        work.cleanup()
    return 1 if results["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
