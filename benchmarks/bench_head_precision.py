"""What a bf16 teacher head costs in fidelity, and what the float32 head costs in time.

Synthetic, shaped like SmolLM2-135M (hidden 576, vocabulary 49,152): bf16 hidden states and
bf16 head weights for a dpo and a reverse teacher (the reverse's weights a perturbed copy), the
logits scaled so the largest are near 25 as in real chat models. The targets (adaptive, r = 20
half-l1, top-64) are computed from the same bf16 inputs three ways:

- ``exact``: the head in float64 (the reference);
- ``float32 head``: what the engine does now (``causal_lm.head.Float32Head``);
- ``bf16 head``: the head in the decoder's dtype, the logits upcast afterwards (before).

Reported against ``exact``: alpha's absolute error, the top-5 log pi* absolute error and
KL(exact pi* || approx pi*) per position; and the head's time per chunk of 256 positions.

    .venv/bin/python benchmarks/bench_head_precision.py [--positions 512] [--out STEM]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from teacher_service.targets import TargetConfig, compute_targets, teacher_logprobs  # noqa: E402
from benchmarks.machine_info import machine as machine_record  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"


def synthetic(n: int, hidden: int, vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=g).bfloat16()
    w_d = (torch.randn(vocab, hidden, generator=g) * (4.0 / hidden ** 0.5)).bfloat16()
    noise = torch.randn(vocab, hidden, generator=g) * (0.6 / hidden ** 0.5)
    w_r = (w_d.float() + noise).bfloat16()
    h2 = (h.float() + 0.05 * torch.randn(n, hidden, generator=g)).bfloat16()
    return h, h2, w_d, w_r


def heads(h, h2, w_d, w_r):
    return {
        "exact": (h.double() @ w_d.double().T, h2.double() @ w_r.double().T),
        "float32 head": (h.float() @ w_d.float().T, h2.float() @ w_r.float().T),
        "bf16 head": ((h @ w_d.T).float(), (h2 @ w_r.T).float()),
    }


def timed(fn, repeat: int = 5) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--positions", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS / "head_precision"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    h, h2, w_d, w_r = synthetic(args.positions, args.hidden, args.vocab)
    logits = heads(h, h2, w_d, w_r)
    cfg = TargetConfig(top_k=64, r=20.0, chunk_size=128)
    next_ids = torch.zeros(args.positions, dtype=torch.long)
    exact_logp, exact_alpha = teacher_logprobs(*logits["exact"], cfg)
    exact_top5 = torch.topk(exact_logp, 5, dim=-1)
    rows = {}
    for name in ("float32 head", "bf16 head"):
        logp, alpha = teacher_logprobs(*[z.double() for z in logits[name]], cfg)
        top5 = logp.gather(-1, exact_top5.indices)
        err5 = (top5 - exact_top5.values).abs()
        kl = (exact_logp.exp() * (exact_logp - logp)).sum(-1)
        rows[name] = {"alpha_abs_err_mean": float((alpha - exact_alpha).abs().mean()),
                      "alpha_abs_err_max": float((alpha - exact_alpha).abs().max()),
                      "top5_logpi_abs_err_mean": float(err5.mean()),
                      "top5_logpi_abs_err_max": float(err5.max()),
                      "kl_exact_to_approx_mean": float(kl.mean()),
                      "kl_exact_to_approx_max": float(kl.max())}
    chunk = h[:256]
    w32 = w_d.float()
    rows["float32 head"]["head_ms_per_256_positions"] = 1e3 * timed(lambda: chunk.float() @ w32.T)
    rows["bf16 head"]["head_ms_per_256_positions"] = 1e3 * timed(lambda: chunk @ w_d.T)
    targets_s = timed(lambda: compute_targets(*logits["float32 head"], next_ids, cfg), repeat=2)
    machine = machine_record(args.threads)
    result = {"positions": args.positions, "hidden": args.hidden, "vocab": args.vocab,
              "max_logit": float(logits["exact"][0].abs().max()), "rows": rows,
              "target_math_s_per_call": targets_s, "machine": machine}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# Teacher LM head: bf16 vs float32 (synthetic, SmolLM2-shaped)", "",
             f"{args.positions} positions, hidden {args.hidden}, V = {args.vocab}, largest |logit| "
             f"{result['max_logit']:.1f}; adaptive, r = 20 (half-l1), targets from the same bf16 "
             f"hidden states and weights. Errors against the head in float64.", "",
             "| head | alpha abs err (mean / max) | top-5 log pi* abs err (mean / max) | "
             "KL(exact \\|\\| approx) per position (mean / max) | head ms / 256 positions |",
             "|---|---:|---:|---:|---:|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['alpha_abs_err_mean']:.2e} / {r['alpha_abs_err_max']:.2e} | "
                     f"{r['top5_logpi_abs_err_mean']:.2e} / {r['top5_logpi_abs_err_max']:.2e} | "
                     f"{r['kl_exact_to_approx_mean']:.2e} / {r['kl_exact_to_approx_max']:.2e} | "
                     f"{r['head_ms_per_256_positions']:.1f} |")
    ratio = (rows["float32 head"]["head_ms_per_256_positions"]
             / rows["bf16 head"]["head_ms_per_256_positions"])
    lines += ["", f"float32 head / bf16 head time on this CPU: {ratio:.2f}x (the target math "
              f"after the head: {targets_s * 1e3:.0f} ms per call for {args.positions} "
              "positions). Not measured on a GPU, where bf16 matmuls are much faster than "
              "float32 ones.", "", f"Machine: {machine}", "",
              "Command: `.venv/bin/python benchmarks/bench_head_precision.py`"]
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
