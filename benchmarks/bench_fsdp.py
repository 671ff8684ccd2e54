"""DDP vs FSDP2 for the student at 2 ranks: bytes per rank of parameters, gradients and AdamW
states, and the step time, on the same model and batch, in one run.

Usage (CPU, gloo; about 3 minutes on 2 cores)::

    .venv/bin/python benchmarks/bench_fsdp.py

It starts ``torchrun --nproc-per-node 2`` once per strategy. The model is a Llama-shaped decoder
of about 110M parameters built from a config (random weights; hidden 768, 12 layers, vocab
16000, untied head); a step is forward + backward of cross-entropy on 2 sequences of 256 tokens
per rank, gradient clipping and AdamW, as the trainer does, sharded by the trainer's own
:func:`student_trainer.fsdp.shard`; then on-policy sampling through the trainer's rollout
backend (``HFRollouts``, 32 new tokens for 2 prompts per rank). Bytes are counted from the tensors each rank holds after a
step (a DTensor counts its local shard). Peak RSS is per rank (it also holds the process's
libraries and the transient gathered layers). Writes ``benchmarks/results/fsdp.md`` and
``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
SAMPLE_PROMPT_LEN, SAMPLE_NEW_TOKENS = 16, 32


def worker(strategy: str, steps: int, out: Path) -> None:
    import torch
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT))
    from student_trainer import fsdp

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=16000, hidden_size=768, intermediate_size=2048,
                         num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
                         max_position_embeddings=512, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).train()
    total_params = sum(p.numel() for p in model.parameters())
    if strategy == "fsdp":
        module = fsdp.shard(model, model, device=torch.device("cpu"), bf16=False)
    else:
        module = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(0, config.vocab_size, (2, 256),
                        generator=torch.Generator().manual_seed(rank))
    times = []
    from student_trainer.optim import clip_grad_norm

    for step in range(steps + 1):
        t0 = time.perf_counter()
        loss = module(input_ids=ids, labels=ids).loss
        loss.backward()
        clip_grad_norm(list(model.parameters()), 1.0)
        optimizer.step()
        if step == steps:  # count before the gradients are freed
            held = fsdp.local_bytes(model, optimizer)
        optimizer.zero_grad(set_to_none=True)
        dist.barrier()
        if step:  # the first step allocates the optimizer states
            times.append(time.perf_counter() - t0)
    # On-policy sampling as the trainer does it: HF generate through the rollout backend, with
    # the root gathered and every rank in step under FSDP (no EOS: every call makes
    # SAMPLE_NEW_TOKENS tokens, so both strategies do the same work).
    from student_trainer.rollout.hf_generate import HFRollouts, RolloutConfig

    prompts = ids[:, :SAMPLE_PROMPT_LEN].tolist()
    sample_times: dict[str, list[float]] = {}
    for sampling in (("per-layer", "gathered") if strategy == "fsdp" else ("whole",)):
        rollouts = HFRollouts(RolloutConfig(max_new_tokens=SAMPLE_NEW_TOKENS), pad_token_id=0,
                              eos_token_id=None,
                              sharded_root=module if strategy == "fsdp" else None,
                              gathered=sampling == "gathered")
        sample_times[sampling] = []
        for call in range(3):
            dist.barrier()
            t0 = time.perf_counter()
            rollouts.sample(model, prompts, seed=call)
            if call:  # the first call warms up
                sample_times[sampling].append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = {"rank": rank, "strategy": strategy, "params": total_params, "held": held,
              "step_s": times, "sample_s": sample_times, "peak_rss": peak}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, result)
    if rank == 0:
        out.write_text(json.dumps(gathered))
    dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_two_ranks(script: str, args: list[str]) -> None:
    """``script args`` under ``torchrun --nproc-per-node 2`` on loopback, one thread per rank."""
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                    "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), script,
                    *args], check=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS / "fsdp"))
    parser.add_argument("--worker", nargs=2, metavar=("STRATEGY", "FILE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker[0], args.steps, Path(args.worker[1]))
        return 0

    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from machine_info import machine

    runs = {}
    for strategy in ("ddp", "fsdp"):
        with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
            torchrun_two_ranks(__file__, ["--steps", str(args.steps), "--worker", strategy,
                                          tmp.name])
            runs[strategy] = json.loads(Path(tmp.name).read_text())
    summary = {}
    for strategy, ranks in runs.items():
        held = ranks[0]["held"]
        summary[strategy] = {
            "params": ranks[0]["params"], "bytes_per_rank": held,
            "total_per_rank": sum(held.values()),
            "bytes_per_param_per_rank": sum(held.values()) / ranks[0]["params"],
            "step_s": statistics.median(t for r in ranks for t in r["step_s"]),
            "sample_s": {k: statistics.median(t for r in ranks for t in r["sample_s"][k])
                         for k in ranks[0]["sample_s"]},
            "peak_rss_per_rank": max(r["peak_rss"] for r in ranks)}
    ratio_bytes = summary["ddp"]["total_per_rank"] / summary["fsdp"]["total_per_rank"]
    ratio_time = summary["fsdp"]["step_s"] / summary["ddp"]["step_s"]
    ratio_sample = {k: v / summary["ddp"]["sample_s"]["whole"]
                    for k, v in summary["fsdp"]["sample_s"].items()}
    info = {"machine": machine(torch_threads=1), "ranks": 2, "backend": "gloo (CPU)",
            "steps_timed": args.steps, "command": "benchmarks/bench_fsdp.py"}
    Path(args.out + ".json").write_text(json.dumps({"info": info, "results": summary,
                                                    "ddp_over_fsdp_bytes": ratio_bytes,
                                                    "fsdp_over_ddp_step_time": ratio_time,
                                                    "fsdp_over_ddp_sample_time": ratio_sample},
                                                   indent=1) + "\n")
    mb = 1 / 2 ** 20
    lines = ["# DDP vs FSDP2 at 2 ranks (CPU, gloo)", "",
             f"Llama-shaped model, {summary['ddp']['params'] / 1e6:.1f}M parameters (float32), "
             f"2 x 256 tokens per rank per step, AdamW; median of {args.steps} steps x 2 ranks "
             f"after one warm-up step. Machine: {info['machine']['cpu']}, "
             f"{info['machine']['cpus']} cores, 1 thread per rank, torch "
             f"{info['machine']['torch']}. Not measured on a GPU.", "",
             "| strategy | parameters MiB/rank | gradients MiB/rank | AdamW MiB/rank | "
             "total MiB/rank | bytes/param/rank | step s | sampling s | peak RSS MiB/rank |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for strategy, s in summary.items():
        h = s["bytes_per_rank"]
        lines.append(f"| {strategy} | {h['parameters'] * mb:.0f} | {h['gradients'] * mb:.0f} | "
                     f"{h['optimizer'] * mb:.0f} | {s['total_per_rank'] * mb:.0f} | "
                     f"{s['bytes_per_param_per_rank']:.1f} | {s['step_s']:.2f} | "
                     f"{' / '.join(f'{v:.2f}' for v in s['sample_s'].values())} | "
                     f"{s['peak_rss_per_rank'] * mb:.0f} |")
    lines += ["", f"DDP holds {ratio_bytes:.2f}x the bytes per rank of FSDP; an FSDP step takes "
              f"{ratio_time:.2f}x the time of a DDP step here (gloo on 2 CPU cores: the "
              f"all-gathers and reduce-scatters are not overlapped with compute as NCCL on GPUs "
              f"would be).", "",
              f"Sampling (on-policy rollouts through the trainer's HF backend: 2 prompts of "
              f"{SAMPLE_PROMPT_LEN} tokens, {SAMPLE_NEW_TOKENS} new tokens, median of 2 calls x "
              f"2 ranks after one warm-up call; FSDP's column: per-layer / gathered): "
              f"`--fsdp-sampling per-layer` takes {ratio_sample['per-layer']:.2f}x DDP's time, "
              f"`--fsdp-sampling gathered` {ratio_sample['gathered']:.2f}x. Per-layer, every "
              f"new token all-gathers each layer's shards (the decode step is otherwise cheap); "
              f"gathered, the whole student is all-gathered once per call and then held on "
              f"each rank (its weights must fit).", "",
              f"Command: `{info['command']}`", ""]
    Path(args.out + ".md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
