"""Everything a GPU run should measure, in one process, within about 8 minutes on an H100/H200.

Run through ``benchmarks/gpu/run.sh`` (which makes the packages importable on a bare GPU
image). Models: a Qwen2.5-1.5B-shaped teacher pair and student built from a config (random
weights, bf16, V = 151,936 embedding rows for a 151,665-token word-level tokenizer; no hub).
Sequences: ``--sequences`` random token sequences with log-normal lengths (median
``--median-len``, clipped to [64, 2048]) and a prompt of a quarter of each.

Sections (each times itself; a section that fails is recorded as failed and the rest go on, as
do the set-up steps: building the models, loading the teachers, scoring the student's records;
a section whose inputs a failed step should have made is recorded as skipped; the results file
is rewritten after every measurement, so a run stopped by its time limit keeps what it
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
5. ``student``: one optimizer step (fwd + bwd + AdamW, float32 master weights, bf16 autocast) over
   the records of ``--student-sequences`` sequences, cut into the trainer's micro-batches
   (``student_trainer.collate.micro_batches``: ``--student-tokens`` per micro-batch, gradients
   accumulated): the AlignDistil sparse loss (records from the engine) vs SFT cross-entropy
   (``model(input_ids, labels=...)`` on the same micro-batches, each weighted by its share of
   the response tokens, so the loss is the step's token mean): seconds and peak memory; packed
   and padded micro-batches.
6. ``server``: a real ``aligndistil serve`` subprocess on the saved teachers; 1, 8 and 32 client
   threads, one sequence per request, Arrow responses, ``--server-seconds`` each: tokens/s,
   p50/p99 latency. The tail of the server's log is kept in the results.
7. ``packing``: packed vs padded equality under FlashAttention-2 (``flash_attn`` importable;
   otherwise recorded as skipped): the student in bf16 with ``attn_implementation=
   "flash_attention_2"``; ``causal_lm.packed.packing_check`` and, on the student's real
   token-budgeted packed micro-batches, the decoder's hidden states at the response positions
   (``causal_lm.head.response_hidden``) packed vs padded: max abs / relative difference.

``--dry-run``: tiny shapes on the CPU, a few seconds per section, to keep this script working
(``tests/test_gpu_bench.py`` runs it); ``packing`` runs with ``sdpa`` there. Its results go to a
temporary folder unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import os
import platform
import socket
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

# rope_parameters, not the legacy rope_theta keyword: the form every transformers 5.x accepts.
QWEN25_15B = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                  num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                  max_position_embeddings=32768, tie_word_embeddings=True,
                  rope_parameters={"rope_type": "default", "rope_theta": 1e6})
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=1024, max_position_embeddings=4096,
            tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
TOKENIZER_WORDS = {"full": 151665, "tiny": 1000}  # tokens the tokenizer has (<= vocab rows)
SECTIONS = ("forward", "precompute", "target_math", "head_fp32", "student", "server", "packing")


# ------------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


NO_WARMUP = False  # a dry run: each thing once (the numbers mean nothing; the code paths run)


def timed(fn, device, reps: int, warmup: int = 1) -> list[float]:
    for _ in range(0 if NO_WARMUP else warmup):
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


def reset_peak(device) -> None:
    """Free cached blocks and restart the peak-memory count (before each measured thing)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


class Results(dict):
    """The results, written (JSON and Markdown, each replaced atomically) on every :meth:`put`,
    so a run stopped mid-section keeps every measurement made so far."""

    def __init__(self, out: str, **values):
        super().__init__(**values)
        self.out = out

    def put(self, key: str, value) -> None:
        self[key] = value
        self.write()

    def write(self) -> None:
        Path(self.out).parent.mkdir(parents=True, exist_ok=True)
        for suffix, text in ((".json", json.dumps(self, indent=1, default=str) + "\n"),
                             (".md", markdown(self))):
            tmp = Path(self.out + suffix + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, self.out + suffix)


# ------------------------------------------------------------------------------- set-up
def build_models(args, device) -> tuple[dict[str, Path], int]:
    """Save a tokenizer and three random models (dpo, reverse, student) as HF folders; returns
    the folders and the tokenizer's size."""
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
    return folders, len(tokenizer)


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
    results.put("forward", out)


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
        reset_peak(device)
        t = statistics.median(timed(lambda: engine.score(requests), device, args.reps))
        out[layout] = {"seconds": t, "tokens_per_s": tokens / t,
                       "peak_memory_bytes": peak_memory(device)}
        results.put("precompute", out)
        del engine
    from benchmarks.bench_precompute import naive_score  # [B, T, V] logits, the released way

    # Its [B, T, V] float32 tensors (~8 alive at once) need a smaller budget: 8192 tokens x
    # V = 151,936 x 4 B = 5 GB each.
    naive_budget = min(args.max_batch_tokens, 8192)
    reset_peak(device)
    t = statistics.median(timed(lambda: naive_score(pair, config, requests, naive_budget,
                                                    keep_records=False),
                                device, max(1, args.reps - 1)))
    out["naive"] = {"seconds": t, "tokens_per_s": tokens / t, "max_batch_tokens": naive_budget,
                    "peak_memory_bytes": peak_memory(device)}
    results.put("precompute", out)


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
    results.put("target_math", out)


def section_head_fp32(args, device, pair, results):
    from causal_lm.head import Float32Head, head_logits

    n = 8192 if not args.dry_run else 256
    h = torch.randn(n, pair.dpo.config.hidden_size, device=device, dtype=pair.dtype)
    f32 = Float32Head(pair.dpo, pair.vocab_size)
    with torch.inference_mode():
        t32 = statistics.median(timed(lambda: f32(h), device, args.reps))
        t16 = statistics.median(timed(lambda: head_logits(pair.dpo, h, pair.vocab_size).float(),
                                      device, args.reps))
    results.put("head_fp32", {"positions": n, "float32_head_ms": t32 * 1e3,
                              "bf16_head_ms": t16 * 1e3, "ratio": t32 / t16,
                              "float32_copy_bytes": f32.weight.numel() * 4})


def section_student(args, device, folders, sequences, records, results):
    """``records``: the engine's records of ``sequences`` (None when scoring them failed: then
    only the SFT baseline runs)."""
    from causal_lm.loading import load_model_and_tokenizer
    from storage.packing import batch_plan
    from student_trainer.collate import collate_sequences, micro_batches
    from student_trainer.distributed import DistEnv
    from student_trainer.modeling import StudentForward
    from student_trainer.optim import build_optimizer, build_scheduler, clip_grad_norm
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
    if records is not None:
        sequences = [(r.input_ids.tolist(), r.prompt_len) for r in records]
    out = {"sequences": len(sequences), "tokens": sum(len(ids) for ids, _ in sequences),
           "max_tokens_per_micro_batch": args.student_tokens}
    if records is None:
        out["aligndistil"] = "skipped: the student's records were not scored (see failed)"

    for layout in ("packed", "padded"):
        if records is None:
            continue
        batches = micro_batches(records, max_tokens=args.student_tokens, pad_id=0,
                                packing=layout == "packed")

        def step():
            train_step(StudentForward(model, len(tok)), batches, optimizer=optimizer,
                       scheduler=scheduler, params=params, config=config,
                       env=DistEnv(), device=device, amp=amp,
                       step_sequences=len(records))

        reset_peak(device)
        t = statistics.median(timed(step, device, args.reps))
        out[f"aligndistil_{layout}"] = {"seconds": t, "micro_batches": len(batches),
                                        "peak_memory_bytes": peak_memory(device)}
        results.put("student", out)
        del batches

    # The baseline: Hugging Face's own cross-entropy (model(..., labels=...): logits at every
    # position) on the same micro-batches (the same plan, the same layouts), each micro-batch's
    # mean weighted by its share of the step's response tokens: the step's token mean.
    lengths = [len(ids) for ids, _ in sequences]
    for layout in ("packed", "padded"):
        batches = [collate_sequences([sequences[i] for i in members], 0, rows)
                   for members, rows in batch_plan(lengths, args.student_tokens,
                                                   packing=layout == "packed")]
        total = sum(b.num_response_tokens for b in batches)

        def sft():
            for batch in batches:
                batch = batch.to(device)
                labels = torch.full_like(batch.input_ids, -100)
                labels[batch.row_idx, batch.col_idx + 1] = batch.target_ids  # row c predicts c+1
                shape = ({"position_ids": batch.position_ids} if batch.position_ids is not None
                         else {"attention_mask": batch.attention_mask})
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    loss = model(input_ids=batch.input_ids, labels=labels, use_cache=False,
                                 **shape).loss
                (loss * (batch.num_response_tokens / total)).backward()
            clip_grad_norm(params, config.max_grad_norm or None)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

        reset_peak(device)
        t = statistics.median(timed(sft, device, args.reps))
        out[f"sft_cross_entropy_{layout}"] = {"seconds": t, "micro_batches": len(batches),
                                              "peak_memory_bytes": peak_memory(device)}
        results.put("student", out)
        del batches


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_bytes()[-chars:].decode("utf-8", "replace")
    except OSError as exc:
        return f"(no log: {exc})"


def section_server(args, device, folders, sequences, results):
    import httpx

    from storage import wire

    port = free_port()
    log_path = Path(args.work) / "serve.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "aligndistil.cli", "serve", "--dpo-model", str(folders["dpo"]),
         "--reverse-model", str(folders["reverse"]), "--port", str(port), "--device",
         device.type, "--log-level", "warning", "--max-queue", "4096", "--max-bodies", "64"],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"serve exited with {proc.returncode} before it was ready "
                                   f"(its log's tail: server_log_tail)")
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("serve was not ready within 300 s (its log's tail: "
                                   "server_log_tail)")
            time.sleep(0.5)
        out = {}
        for clients in (1, 8, 32):
            out[str(clients)] = load(url, sequences, clients, args.server_seconds,
                                     wire.ARROW_STREAM_MEDIA_TYPE)
            results.put("server", out)
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)
        log.close()
        results.put("server_log_tail", log_tail(log_path))


def flash_attn_missing() -> str | None:
    """Why FlashAttention-2 cannot run here (None when ``flash_attn`` imports)."""
    if importlib.util.find_spec("flash_attn") is None:
        return "flash_attn not installed"
    try:
        importlib.import_module("flash_attn")
    except Exception as exc:  # noqa: BLE001 - e.g. built against another torch
        return f"flash_attn does not import ({type(exc).__name__}: {exc})"[:300]
    return None


def section_packing(args, device, folders, sequences, results):
    """Packed vs padded under FlashAttention-2 (``sdpa`` in a dry run, so the code runs on the
    CPU): ``packing_check`` and the hidden states at the response positions of the student's
    real packed micro-batches (several rows each) against the padded layout of the same
    sequences."""
    from transformers import AutoModelForCausalLM

    from causal_lm.head import response_hidden
    from causal_lm.packed import packing_check
    from storage.packing import batch_plan
    from student_trainer.collate import collate_sequences  # rows from causal_lm.packed.pack_rows

    attn = "sdpa" if args.dry_run else "flash_attention_2"
    out = {"attn_implementation": attn}
    if attn == "flash_attention_2":
        why = flash_attn_missing()
        if why:
            out["status"] = f"skipped: {why}"
            results.put("packing", out)
            return
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(folders["student"], dtype=dtype,
                                                 attn_implementation=attn, use_safetensors=True,
                                                 local_files_only=True)
    model = model.to(device).eval().requires_grad_(False)
    out.update(dtype=str(dtype).removeprefix("torch."),
               model_attn_implementation=getattr(model.config, "_attn_implementation", None))
    ok, why = packing_check(model)
    out["packing_check"] = {"ok": ok, "why": why}
    results.put("packing", out)

    lengths = [len(ids) for ids, _ in sequences]
    plan = batch_plan(lengths, args.student_tokens, packing=True)
    max_abs = max_ref = sum_abs = 0.0
    positions = 0
    with torch.inference_mode():
        for members, rows in plan:
            seqs = [sequences[i] for i in members]
            packed = collate_sequences(seqs, 0, rows)
            padded = collate_sequences(seqs, 0)
            h_packed = response_hidden(model, packed.input_ids, packed.attention_mask,
                                       packed.row_idx, packed.col_idx,
                                       packed.position_ids).float()
            h_padded = response_hidden(model, padded.input_ids, padded.attention_mask,
                                       padded.row_idx, padded.col_idx).float()
            diff = (h_packed - h_padded).abs()
            max_abs = max(max_abs, float(diff.max()))
            max_ref = max(max_ref, float(h_padded.abs().max()))
            sum_abs += float(diff.sum())
            positions += diff.shape[0]
    tol = 1e-4 if dtype == torch.float32 else 2e-2  # packing_check's tolerances
    rel = max_abs / (max_ref or 1.0)
    out["hidden_states"] = {
        "micro_batches": len(plan), "multi_row_micro_batches": sum(len(r) > 1 for _, r in plan),
        "most_rows": max(len(r) for _, r in plan),
        "rows_with_several_sequences": sum(len(row) > 1 for _, r in plan for row in r),
        "sequences": len(sequences),
        "response_positions": positions, "max_abs_diff": max_abs,
        "mean_abs_diff": sum_abs / max(1, positions * h_padded.shape[-1]),
        "max_rel_diff": rel, "tolerance": tol, "match": rel <= tol}
    out["status"] = "ok" if ok and rel <= tol else "packed and padded differ"
    results.put("packing", out)


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
                try:
                    resp = client.post("/v1/score", json={"sequences": [{"input_ids": ids,
                                                                         "prompt_len": p}]})
                    status, body = resp.status_code, resp.content
                except httpx.HTTPError:  # a dropped connection counts as an error
                    status, body = None, b""
                t1 = time.perf_counter()
                with lock:
                    if status == 200 and body:
                        latencies.append(t1 - t0)
                        tokens[0] += len(ids)
                    elif status == 429:
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
        lines += ["## Student step", "",
                  f"{s['sequences']} sequences, {s['tokens']:,} tokens, micro-batches of at most "
                  f"{s['max_tokens_per_micro_batch']:,} tokens (gradients accumulated).", "",
                  "| loss | layout | s / step | micro-batches | peak memory GiB |",
                  "|---|---|---:|---:|---:|"]
        for loss in ("aligndistil", "sft_cross_entropy"):
            for layout in ("packed", "padded"):
                r = s.get(f"{loss}_{layout}")
                if r:
                    mem = r.get("peak_memory_bytes")
                    lines.append(f"| {loss} | {layout} | {num(r['seconds'], '{:.3f}')} | "
                                 f"{r['micro_batches']} | "
                                 f"{num(mem / 2**30 if mem else None, '{:.1f}')} |")
        if isinstance(s.get("aligndistil"), str):
            lines.append(f"\naligndistil: {s['aligndistil']}")
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
    k = results.get("packing")
    if k:
        lines += [f"## Packed vs padded ({k['attn_implementation']})", "",
                  f"Status: {k.get('status', 'running')}."]
        check = k.get("packing_check")
        if check:
            lines.append(f"`packing_check`: {'ok' if check['ok'] else 'FAILS'} ({check['why']}).")
        hs = k.get("hidden_states")
        if hs:
            lines.append(
                f"Hidden states at {hs['response_positions']:,} response positions of "
                f"{hs['micro_batches']} packed micro-batches ({hs['multi_row_micro_batches']} "
                f"with several rows, up to {hs['most_rows']}) vs padded: max abs diff "
                f"{hs['max_abs_diff']:.3g}, mean {hs['mean_abs_diff']:.3g}, max relative "
                f"{hs['max_rel_diff']:.3g} (tolerance {hs['tolerance']:g}): "
                f"{'match' if hs['match'] else 'DIFFER'}.")
        lines.append("")
    if results.get("failed"):
        lines += ["## Failed sections", ""] + [f"- {k}: {v}" for k, v in
                                               results["failed"].items()] + [""]
        if "server" in results["failed"] and results.get("server_log_tail"):
            lines += ["Server log (tail):", "", "```", results["server_log_tail"].rstrip(),
                      "```", ""]
    if results.get("skipped"):
        lines += ["## Skipped", ""] + [f"- {k}: {v}" for k, v in
                                       results["skipped"].items()] + [""]
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
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU")
    p.add_argument("--out", default=None,
                   help="writes OUT.md and OUT.json (default: benchmarks/results/gpu; a dry run: "
                        "a temporary folder's gpu)")
    p.add_argument("--work", default=None, help="model folders (default: a temporary folder)")
    p.add_argument("--sequences", type=int, default=64)
    p.add_argument("--median-len", type=int, default=512)
    p.add_argument("--max-batch-tokens", type=int, default=16384)
    p.add_argument("--student-tokens", type=int, default=8192,
                   help="the student's token budget per micro-batch (and the packing section's)")
    p.add_argument("--student-sequences", type=int, default=13,
                   help="the student step's sequences (the first ones)")
    p.add_argument("--fwd-batch", type=int, default=8)
    p.add_argument("--fwd-len", type=int, default=1024)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--server-seconds", type=float, default=20)
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--sections", default=",".join(SECTIONS), help="a comma-separated subset")
    args = p.parse_args(argv)
    unknown = sorted(set(args.sections.split(",")) - set(SECTIONS))
    if unknown:
        p.error(f"--sections: unknown {unknown}; known: {', '.join(SECTIONS)}")
    if args.dry_run:
        args.sequences, args.median_len, args.max_batch_tokens = 8, 80, 1024
        args.student_tokens, args.fwd_batch, args.fwd_len, args.reps = 1024, 2, 64, 1
        args.student_sequences = 8  # two padded micro-batches: the accumulation runs too
        args.server_seconds = 1
    if args.out is None:  # a dry run never lands where the real GPU results live
        args.out = (str(Path(tempfile.mkdtemp(prefix="gpu_bench_dry_")) / "gpu") if args.dry_run
                    else str(REPO / "benchmarks" / "results" / "gpu"))
    return args


def main(argv=None) -> int:
    global NO_WARMUP
    args = parse_args(argv)
    NO_WARMUP = args.dry_run
    wanted = args.sections.split(",")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    args.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    work = tempfile.TemporaryDirectory(prefix="gpu_bench_") if args.work is None else None
    args.work = args.work or work.name
    results = Results(args.out,
                      date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                      dry_run=args.dry_run, machine=machine_record(device),
                      args={k: str(v) if isinstance(v, torch.dtype) else v
                            for k, v in vars(args).items()},
                      shape="tiny" if args.dry_run else "Qwen2.5-1.5B-shaped",
                      dtype=str(args.dtype).removeprefix("torch."),
                      vocab=(TINY if args.dry_run else QWEN25_15B)["vocab_size"],
                      failed={}, skipped={}, section_seconds={})
    print(f"results: {args.out}.json and .md", flush=True)
    state: dict = {}  # what the set-up steps made: folders, vocab, sequences, pair, records

    def run(name, fn, needs=(), step=False):
        """Run a set-up ``step`` or a wanted section, guarded: a failure is recorded and the rest
        go on; a section whose inputs a failed step should have made is recorded as skipped."""
        if not step and name not in wanted:
            return
        missing = [n for n in needs if n not in state]
        if missing:
            results["skipped"][name] = f"needs {', '.join(missing)}: an earlier step failed"
            results.write()
            return
        print(f"[{name}]", flush=True)
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - record it, measure the rest
            traceback.print_exc()
            results["failed"][name] = f"{type(exc).__name__}: {exc}"[:500]
        reset_peak(device)  # what a failed section left behind is freed before the next
        results["section_seconds"][name] = round(time.perf_counter() - t0, 1)
        results.write()

    def setup():
        state["folders"], state["vocab"] = build_models(args, device)
        state["sequences"] = random_sequences(args, state["vocab"])

    def load_teachers():
        from teacher_service.models import load_teacher_pair

        state["pair"] = load_teacher_pair(
            state["folders"]["dpo"], state["folders"]["reverse"], device=device.type,
            dtype="bfloat16" if device.type == "cuda" else "float32")

    def score_student_records():
        from teacher_service.engine import ScoreRequest, TeacherEngine
        from teacher_service.targets import TargetConfig

        state["records"] = TeacherEngine(state["pair"], TargetConfig(top_k=64),
                                         packing=True).score(
            [ScoreRequest(ids, p) for ids, p in student_sequences()])

    def student_sequences():
        return state["sequences"][:max(1, args.student_sequences)]

    teacher_sections = {"forward", "precompute", "target_math", "head_fp32", "student"}
    run("setup", setup, step=True)
    if teacher_sections & set(wanted):
        run("load_teachers", load_teachers, needs=("folders",), step=True)
    run("forward", lambda: section_forward(args, device, state["pair"], results),
        needs=("pair",))
    run("precompute", lambda: section_precompute(args, device, state["pair"],
                                                 state["sequences"], results),
        needs=("pair", "sequences"))
    run("target_math", lambda: section_target_math(args, device, state["pair"],
                                                   state["sequences"], results),
        needs=("pair", "sequences"))
    run("head_fp32", lambda: section_head_fp32(args, device, state["pair"], results),
        needs=("pair",))
    if "student" in wanted:
        run("score_student_records", score_student_records, needs=("pair", "sequences"),
            step=True)
    state.pop("pair", None)  # the teachers leave the GPU before the student and the server
    reset_peak(device)
    run("student", lambda: section_student(args, device, state["folders"], student_sequences(),
                                           state.get("records"), results),
        needs=("folders", "sequences"))
    run("server", lambda: section_server(args, device, state["folders"], state["sequences"],
                                         results),
        needs=("folders", "sequences"))
    run("packing", lambda: section_packing(args, device, state["folders"], state["sequences"],
                                           results),
        needs=("folders", "sequences"))
    results.write()
    print(markdown(results))
    print(f"results: {args.out}.json and .md", flush=True)
    if work is not None:
        work.cleanup()
    return 1 if results["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
