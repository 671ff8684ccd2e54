"""vLLM's scoring protocol on ``aligndistil serve``: what it costs, and TRL through it.

Two measurements, each in one run on one machine (recorded), with the teachers built here
(a word-level tokenizer of ``--vocab`` words and two Llama teachers of ``--hidden`` x
``--layers``; the student is a third such model):

1. **Protocols.** The same sequences scored by one server three ways, K = ``--k``: vLLM's
   ``POST /v1/completions`` (token-id prompts, ``prompt_logprobs: K``, ``max_tokens: 1``, as
   TRL's ``VLLMClient.get_sequence_logprobs`` sends it), ``/v1/score`` as JSON, and ``/v1/score``
   as Arrow. Tokens/s are scored positions over the wall time of the calls (after a warm-up
   call); bytes/token are the response bodies' bytes over the scored positions.
2. **TRL's trainers.** TRL's ``ServerDistillationTrainer`` against ``aligndistil serve`` (the
   teachers in their own process) beside TRL's ``GKDTrainer`` with the composite teacher in the
   trainer's process (``benchmarks/vs_trl.py``'s ``ZStarTeacher``), both on-policy with the same
   student, prompts, batch, ``max_new_tokens`` and learning rate: seconds per step (the median
   after the first) and peak memory (the trainer's peak resident set; the server's beside it).
   They do not learn the same thing: GKD takes the full-vocabulary reverse KL, the server trainer
   the top-1 reverse KL with a tail bucket (README, "AlignDistil's teacher from TRL").

Usage::

    .venv/bin/python benchmarks/bench_vllm_protocol.py --out benchmarks/results/vllm_protocol
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

import httpx  # noqa: E402
import torch  # noqa: E402

from benchmarks.machine_info import machine  # noqa: E402
from tests.live_server import start_server, stop_server  # noqa: E402


def build_models(root: Path, args) -> dict[str, Path]:
    from aligndistil.worlds.toy.build import SPECIAL_TOKENS, build_model, build_tokenizer

    tok = build_tokenizer([f"w{i}" for i in range(args.vocab - len(SPECIAL_TOKENS))])
    out = {}
    for seed, name in enumerate(("dpo", "reverse", "student")):
        model = build_model(len(tok), seed=seed, hidden_size=args.hidden, layers=args.layers,
                            head_dim=64)
        model.config.max_position_embeddings = 4096
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = root / name
    return out


def sequences(args, vocab: int) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(7, vocab) for _ in range(args.seq_len)] for _ in range(args.batch)]


def measure_protocols(url: str, seqs: list[list[int]], k: int, calls: int) -> dict:
    from storage import wire

    bodies = {
        "vLLM /v1/completions (JSON)": ("/v1/completions", {
            "prompt": seqs, "max_tokens": 1, "prompt_logprobs": k}, {}),
        "/v1/score (JSON)": ("/v1/score", {
            "sequences": [{"input_ids": s, "prompt_len": 1} for s in seqs], "top_k": k}, {}),
        "/v1/score (Arrow)": ("/v1/score", {
            "sequences": [{"input_ids": s, "prompt_len": 1} for s in seqs], "top_k": k},
            {"Accept": wire.ARROW_STREAM_MEDIA_TYPE}),
    }
    positions = sum(len(s) - 1 for s in seqs)
    rows = {}
    with httpx.Client(base_url=url, timeout=600) as client:
        for name, (path, body, headers) in bodies.items():
            client.post(path, json=body, headers=headers).raise_for_status()  # warm-up
            seconds, size = [], 0
            for _ in range(calls):
                t0 = time.perf_counter()
                r = client.post(path, json=body, headers=headers)
                seconds.append(time.perf_counter() - t0)
                r.raise_for_status()
                size = len(r.content)
            rows[name] = {"seconds_per_call": statistics.median(seconds),
                          "tokens_per_s": positions / statistics.median(seconds),
                          "bytes_per_token": size / positions, "response_bytes": size}
    return {"positions_per_call": positions, "rows": rows}


# ------------------------------------------------------------------------------ trainers
def server_trainer_worker(spec: dict) -> dict:
    """TRL's ServerDistillationTrainer against the server at ``spec['url']``."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.server_distillation import (ServerDistillationConfig,
                                                      ServerDistillationTrainer)
    from trl.generation import vllm_client

    vllm_client.is_vllm_available = lambda *a, **k: True  # the client only speaks HTTP
    torch.manual_seed(spec["seed"])
    tok = AutoTokenizer.from_pretrained(spec["student"])
    model = AutoModelForCausalLM.from_pretrained(spec["student"])
    prompts = [tok.decode(r["input_ids"][:r["prompt_len"]]) for r in _rows(spec["data"])]

    class Clock(TrainerCallback):
        marks: list[float] = []

        def on_train_begin(self, *a, **k):
            self.marks.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            self.marks.append(time.perf_counter())

    args = ServerDistillationConfig(
        output_dir=spec["scratch"], teacher_model_server_url=spec["url"], loss_top_k=1,
        beta=1.0, max_steps=spec["steps"], per_device_train_batch_size=spec["batch"],
        max_completion_length=spec["max_new_tokens"], learning_rate=spec["lr"],
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, optim="adamw_torch",
        logging_steps=1, report_to=[], use_cpu=True, bf16=False, save_strategy="no",
        seed=spec["seed"], disable_tqdm=True)
    clock = Clock()
    trainer = ServerDistillationTrainer(model=model, args=args,
                                        train_dataset=Dataset.from_dict({"prompt": prompts}),
                                        processing_class=tok, callbacks=[clock])
    trainer.train()
    return {"step_s": [b - a for a, b in zip(clock.marks, clock.marks[1:])],
            "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h]}


def _rows(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def run_worker(kind: str, spec: dict, work: Path) -> dict:
    from vs_trl import run_measured

    spec = {**spec, "scratch": str(work / f"scratch-{kind}"), "result": str(work / f"{kind}.json")}
    spec_file = work / f"{kind}.spec.json"
    spec_file.write_text(json.dumps(spec), encoding="utf-8")
    print(f"[{kind}]", flush=True)
    proc = run_measured([sys.executable, str(Path(__file__).resolve()), "--worker", kind,
                         "--spec", str(spec_file)], work / f"{kind}.log")
    return {**json.loads(Path(spec["result"]).read_text(encoding="utf-8")), **proc}


def worker_main(kind: str, spec_file: str) -> None:
    spec = json.loads(Path(spec_file).read_text(encoding="utf-8"))
    torch.set_num_threads(spec["threads"])
    if kind == "gkd":
        from vs_trl import trl_worker

        result = trl_worker(spec, on_policy=True)
    else:
        result = server_trainer_worker(spec)
    Path(spec["result"]).write_text(json.dumps(result), encoding="utf-8")


# ------------------------------------------------------------------------------ report
def report(res: dict) -> str:
    m = res["machine"]
    lines = ["# vLLM's scoring protocol on `aligndistil serve`", "",
             f"Measured {res['date']} on {m['cpu']} ({m['cpus']} cores, torch {m['torch']}, "
             f"{m['torch_threads']} threads; load average at the end "
             f"{', '.join(f'{x:.2f}' for x in m['load_average'])}). Teachers and student: "
             f"Llama, hidden {res['args']['hidden']}, {res['args']['layers']} layers, "
             f"vocabulary {res['args']['vocab']} ({res['params']:,} parameters each). "
             f"`benchmarks/bench_vllm_protocol.py`.", "",
             f"## Scoring the same sequences three ways ({res['args']['batch']} sequences of "
             f"{res['args']['seq_len']} tokens per call, K = {res['args']['k']}, one server)", "",
             "| protocol | seconds per call | tokens/s | bytes per token | vs /v1/score Arrow |",
             "|---|---:|---:|---:|---:|"]
    rows = res["protocols"]["rows"]
    base = rows["/v1/score (Arrow)"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['seconds_per_call']:.3f} | {r['tokens_per_s']:,.0f} | "
                     f"{r['bytes_per_token']:,.0f} | {r['tokens_per_s'] / base['tokens_per_s']:.2f}x"
                     f" tokens/s, {r['bytes_per_token'] / base['bytes_per_token']:.1f}x bytes |")
    lines += ["", "vLLM's layout repeats each id as a JSON key with its `logprob`, `rank` and "
              "`decoded_token` (K + 1 entries per position), and `/v1/completions` also draws "
              "the one completion token `max_tokens: 1` asks for (from the scoring pass's last "
              "row: no extra forward); `/v1/score` sends ids and float16 log-probs in arrays, "
              "and Arrow as binary.", "",
              f"## TRL on-policy: the teacher behind the server vs in the trainer's process "
              f"({res['args']['steps']} steps, batch {res['args']['batch_train']}, "
              f"{res['args']['max_new_tokens']} new tokens)", "",
              "| trainer | seconds per step (median after the first) | trainer peak RSS (MiB) | "
              "server peak RSS (MiB) |", "|---|---:|---:|---:|"]
    tr = res["trainers"]
    for name, r in tr.items():
        server = f"{r['server_peak_rss_mib']:.0f}" if "server_peak_rss_mib" in r else "-"
        lines.append(f"| {name} | {statistics.median(r['step_s'][1:]):.3f} | "
                     f"{r['peak_rss_mib']:.0f} | {server} |")
    gkd, srv = tr["GKDTrainer, teacher in process"], tr["ServerDistillationTrainer + aligndistil serve"]
    lines += ["", f"Server trainer over GKD: {statistics.median(srv['step_s'][1:]) / statistics.median(gkd['step_s'][1:]):.2f}x "
              f"the step time, {srv['peak_rss_mib'] / gkd['peak_rss_mib']:.2f}x the trainer's "
              f"peak memory (the teachers' weights and activations move to the server's "
              f"process). Not measured on a GPU."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", choices=("gkd", "server"))
    p.add_argument("--spec")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--batch", type=int, default=8, help="sequences per scoring call")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--calls", type=int, default=5)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch-train", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "vllm_protocol"))
    args = p.parse_args(argv)
    if args.worker:
        worker_main(args.worker, args.spec)
        return 0
    from vs_trl import peak_rss_of

    root = Path(tempfile.mkdtemp(prefix="bench_vllm_protocol_"))
    models = build_models(root, args)
    from causal_lm.loading import load_tokenizer

    tok = load_tokenizer(models["dpo"])
    env = {"OMP_NUM_THREADS": str(args.threads)}
    flags = ("--top-k", str(args.k), "--max-seq-len", "4096")
    proc, url = start_server(models["dpo"], models["reverse"], *flags, env=env,
                             log_path=root / "serve.log")
    try:
        print("[protocols]", flush=True)
        protocols = measure_protocols(url, sequences(args, len(tok)), args.k, args.calls)
        data = root / "data.jsonl"
        rng = random.Random(1)
        with data.open("w") as fh:
            for _ in range(args.steps * args.batch_train):
                prompt = [rng.randrange(7, len(tok)) for _ in range(rng.randint(8, 24))]
                response = [rng.randrange(7, len(tok)) for _ in range(args.max_new_tokens)]
                fh.write(json.dumps({"input_ids": prompt + response,
                                     "prompt_len": len(prompt)}) + "\n")
        spec = {"student": str(models["student"]), "dpo": str(models["dpo"]),
                "reverse": str(models["reverse"]), "data": str(data), "batch": args.batch_train,
                "lr": 1e-5, "seed": 0, "beta0": 0.1, "max_new_tokens": args.max_new_tokens,
                "steps": args.steps, "threads": args.threads, "url": url}
        trainers = {"GKDTrainer, teacher in process": run_worker("gkd", spec, root)}
        server = run_worker("server", spec, root)
        server["server_peak_rss_mib"] = peak_rss_of(proc.pid)
        trainers["ServerDistillationTrainer + aligndistil serve"] = server
    finally:
        stop_server(proc)
    from transformers import AutoModelForCausalLM

    params = sum(x.numel() for x in AutoModelForCausalLM.from_pretrained(models["dpo"]).parameters())
    res = {"args": vars(args), "params": params, "protocols": protocols, "trainers": trainers,
           "machine": machine(args.threads),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1), encoding="utf-8")
    out.with_suffix(".md").write_text(report(res), encoding="utf-8")
    print(report(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
