"""Memory while the student is loaded at 2 ranks: DDP (every rank loads the whole model) vs
FSDP2 (rank 0 loads it on the CPU, the other ranks build it on the meta device, then shards
are filled from rank 0), through the trainer's own loading code, in one run.

Usage (CPU, gloo; about a minute on 2 cores)::

    .venv/bin/python benchmarks/bench_fsdp_load.py

A Llama-shaped model of about 110M parameters (the one ``bench_fsdp.py`` trains) is saved once
as safetensors with a word-level tokenizer. Then ``torchrun --nproc-per-node 2`` runs once per
strategy; each rank records its resident memory (``VmRSS``) after its imports, its peak
(``VmHWM``) from there to the end of loading, its resident memory once loading is over, and the
bytes of parameters it holds (a DTensor counts its local shard). On a GPU the same loading
code moves only each rank's shards to its device; host memory is what the CPU run shows.
Writes ``benchmarks/results/fsdp_load.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"


def _status_bytes(field: str) -> int:
    """A ``kB`` field of /proc/self/status, in bytes (VmRSS: resident now; VmHWM: peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> None:
    """Make VmHWM start again from the current resident size (Linux 4.0+)."""
    Path("/proc/self/clear_refs").write_text("5")


def worker(strategy: str, model_dir: str, out: Path) -> None:
    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(ROOT))
    from causal_lm.loading import load_model_and_tokenizer
    from student_trainer import fsdp
    from student_trainer.modeling import StudentForward

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    device = torch.device("cpu")
    dist.barrier()
    _reset_peak()
    base = _status_bytes("VmRSS")
    t0 = time.perf_counter()
    if strategy == "fsdp":
        model, tokenizer, full = fsdp.load_for_sharding(model_dir, rank=rank)
        forward = StudentForward(model, len(tokenizer))
        fsdp.shard(forward, model, device=device, bf16=False)
        fsdp.broadcast_weights(model, full, device)
        del full
    else:
        model, tokenizer = load_model_and_tokenizer(model_dir, device=device, train=True)
        forward = StudentForward(model, len(tokenizer))
        torch.nn.parallel.DistributedDataParallel(forward)
    dist.barrier()
    seconds = time.perf_counter() - t0
    import gc

    gc.collect()
    result = {"rank": rank, "strategy": strategy, "seconds": seconds,
              "rss_before": base, "peak": _status_bytes("VmHWM"),
              "rss_after": _status_bytes("VmRSS"),
              "param_bytes": fsdp.local_bytes(model, torch.optim.SGD(
                  model.parameters(), lr=0.0))["parameters"]}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, result)
    if rank == 0:
        out.write_text(json.dumps(gathered))
    dist.destroy_process_group()


def save_model(folder: Path) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT))
    from aligndistil.worlds.toy.build import build_tokenizer

    tokenizer = build_tokenizer([f"w{i}" for i in range(15000)])
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=16000, hidden_size=768, intermediate_size=2048,
                         num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
                         max_position_embeddings=512, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(RESULTS / "fsdp_load"))
    parser.add_argument("--worker", nargs=3, metavar=("STRATEGY", "MODEL", "FILE"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker[0], args.worker[1], Path(args.worker[2]))
        return 0

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_fsdp import torchrun_two_ranks
    from machine_info import machine

    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        params = save_model(model_dir)
        weights_bytes = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
        for strategy in ("ddp", "fsdp"):
            result = Path(tmp) / f"{strategy}.json"
            torchrun_two_ranks(__file__, ["--worker", strategy, str(model_dir), str(result)])
            runs[strategy] = json.loads(result.read_text())
    info = {"machine": machine(torch_threads=1), "ranks": 2, "backend": "gloo (CPU)",
            "params": params, "safetensors_bytes": weights_bytes,
            "command": "benchmarks/bench_fsdp_load.py"}
    mb = 1 / 2 ** 20
    summary = {s: [{"rank": r["rank"], "peak_over_base": r["peak"] - r["rss_before"],
                    "held_after": r["rss_after"] - r["rss_before"],
                    "param_bytes": r["param_bytes"], "seconds": r["seconds"]}
                   for r in sorted(ranks, key=lambda r: r["rank"])]
               for s, ranks in runs.items()}
    ratios = {"ddp_over_fsdp_peak_rank0": summary["ddp"][0]["peak_over_base"]
              / summary["fsdp"][0]["peak_over_base"],
              "ddp_over_fsdp_peak_rank1": summary["ddp"][1]["peak_over_base"]
              / summary["fsdp"][1]["peak_over_base"]}
    Path(args.out + ".json").write_text(json.dumps({"info": info, "results": summary,
                                                    "ratios": ratios}, indent=1) + "\n")
    lines = ["# Loading the student at 2 ranks: DDP vs FSDP2 (CPU, gloo)", "",
             f"Llama-shaped model, {params / 1e6:.1f}M parameters, float32 safetensors of "
             f"{weights_bytes * mb:.0f} MiB. Memory is each rank's resident memory above what it "
             f"held after its imports: its peak while loading (and sharding, for FSDP) and what "
             f"it still holds once loading is over. Machine: {info['machine']['cpu']}, "
             f"{info['machine']['cpus']} cores, torch {info['machine']['torch']}. "
             f"Not measured on a GPU.", "",
             "| strategy | rank | peak while loading MiB | held after MiB | "
             "parameters held MiB | seconds |",
             "|---|---:|---:|---:|---:|---:|"]
    for strategy, ranks in summary.items():
        for r in ranks:
            lines.append(f"| {strategy} | {r['rank']} | {r['peak_over_base'] * mb:.0f} | "
                         f"{r['held_after'] * mb:.0f} | {r['param_bytes'] * mb:.0f} | "
                         f"{r['seconds']:.2f} |")
    lines += ["", f"Peak while loading, DDP over FSDP: rank 0 "
              f"{ratios['ddp_over_fsdp_peak_rank0']:.2f}x, rank 1 "
              f"{ratios['ddp_over_fsdp_peak_rank1']:.2f}x. Under FSDP only rank 0 reads the "
              f"whole model (on the CPU, freed once the shards are filled); every other rank "
              f"allocates its shards only. On a GPU, no device holds more than its shards and "
              f"the one unit being sharded; rank 0's host must hold the whole model while "
              f"loading.", "", f"Command: `{info['command']}`", ""]
    Path(args.out + ".md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
