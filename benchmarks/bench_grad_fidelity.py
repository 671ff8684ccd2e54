"""Gradient fidelity on a real model: the sparse (top-k) AlignDistil loss against the exact one.

Teachers: the SmolLM2-135M pair of ``benchmarks/make_smollm2_pair.py`` (``dpo`` =
SmolLM2-135M-Instruct, ``reverse`` = a perturbed copy; V = 49,152). Student: the dpo model itself
by default (``--student``: any folder with the same tokenizer) — a student that starts at the
teacher's base is where pi*'s tail matters most, since the extrapolation pushes the dpo model's
favourite tokens down. Batch: the first ``--num`` conversations of a chat JSONL
(``benchmarks/make_sharegpt_jsonl.py``), tokenised with the chat template, cut to
``--max-len`` tokens (conversations whose prompt leaves fewer than 8 response tokens are
skipped).

For that one batch, the teachers' logits at the response positions (float32 heads) give the
exact ``log pi*`` and ``alpha`` (adaptive, r = 20 half-l1) and, at each k, the sparse targets
exactly as a store holds them (top-k log-probs rounded to float16, ``tail_logmass`` by
logsumexp). The AlignDistil loss (``beta_t = beta0 / alpha_t``, per-sequence mean) is formed
with the exact KL and with the sparse KL (``uniform`` and ``bucket`` tails), and reported:

- the cosine between the sparse and the exact gradient w.r.t. the student's logits (at the
  response positions) and w.r.t. all of the student's parameters;
- pi*'s tail mass outside the top-k (median, p90) and the loss values;
- the same with ``--dpo-top`` (the kept ids include the dpo model's top k/4, k/2 or 3k/4,
  through the engine's own ``compute_targets``).

    .venv/bin/python benchmarks/bench_grad_fidelity.py --pair /work/cache/smollm2-135m \\
        --data /work/cache/sharegpt/chat.jsonl [--num 8] [--max-len 256]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from causal_lm.head import Float32Head, head_logits, response_hidden  # noqa: E402
from causal_lm.loading import load_model_and_tokenizer, pad_token_id  # noqa: E402
from storage.datasets import read_examples  # noqa: E402
from storage.record import FIELD_DTYPES  # noqa: E402
from storage.tokenization import tokenize_example  # noqa: E402
from student_trainer import losses  # noqa: E402
from student_trainer.collate import collate_sequences  # noqa: E402
from teacher_service.targets import TargetConfig, compute_targets, teacher_logprobs  # noqa: E402
from benchmarks.machine_info import machine as machine_record  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
KS = (8, 16, 32, 64, 128)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-300))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pair", default="/work/cache/smollm2-135m")
    ap.add_argument("--student", default=None, help="default: the pair's dpo model")
    ap.add_argument("--data", default="/work/cache/sharegpt/chat.jsonl")
    ap.add_argument("--num", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--r", type=float, default=20.0)
    ap.add_argument("--beta0", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS / "grad_fidelity"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    cpu = torch.device("cpu")
    pair = Path(args.pair)
    dpo, tok = load_model_and_tokenizer(pair / "dpo", device=cpu)
    rev, _ = load_model_and_tokenizer(pair / "reverse", device=cpu)
    student, _ = load_model_and_tokenizer(args.student or pair / "dpo", device=cpu, train=True)
    vocab = len(tok)
    seqs = []
    for ex in read_examples(args.data):
        ids, p = tokenize_example(tok, ex)
        if p + 8 > args.max_len:  # a prompt that leaves fewer than 8 response tokens
            continue
        seqs.append((ids[:args.max_len], p))
        if len(seqs) == args.num:
            break
    batch = collate_sequences(seqs, pad_token_id(tok))

    # The teachers: float32 heads at the response positions; exact and sparse targets.
    with torch.no_grad():
        z_d = Float32Head(dpo, vocab)(response_hidden(dpo, batch.input_ids, batch.attention_mask,
                                                      batch.row_idx, batch.col_idx))
        z_r = Float32Head(rev, vocab)(response_hidden(rev, batch.input_ids, batch.attention_mask,
                                                      batch.row_idx, batch.col_idx))
    del dpo, rev
    cfg = TargetConfig(top_k=max(KS), r=args.r, chunk_size=64)
    log_pi, alpha = teacher_logprobs(z_d, z_r, cfg)
    n = log_pi.shape[0]

    # The student: logits at the same positions, kept as a leaf for the logit gradients.
    hidden = response_hidden(student, batch.input_ids, batch.attention_mask, batch.row_idx,
                             batch.col_idx)
    logits = head_logits(student, hidden, vocab).float()
    leaf = logits.detach().requires_grad_(True)
    params = [p for p in student.parameters() if p.requires_grad]
    alpha_b = batch.unflatten(alpha, 1.0)

    def objective(kl: torch.Tensor) -> torch.Tensor:
        return losses.aligndistil_loss(batch.unflatten(kl), alpha_b, batch.response_mask,
                                       beta0=args.beta0)

    def gradients(loss_of_logits) -> tuple[float, torch.Tensor, torch.Tensor]:
        loss = loss_of_logits(leaf)
        (g_logits,) = torch.autograd.grad(loss, leaf)
        g_params = torch.autograd.grad(logits, params, grad_outputs=g_logits, retain_graph=True)
        return float(loss.detach()), g_logits, torch.cat([g.flatten() for g in g_params])

    exact_loss, exact_gl, exact_gp = gradients(
        lambda z: objective(losses.exact_reverse_kl(z, log_pi)))
    rows = []
    for k in KS:
        row: dict = {"k": k}
        # dpo_top = 0: pi*'s top-k (the default); k/2 at every k, and k/4, 3k/4 at the larger
        # k, through the engine's own target code (teacher_service.targets, --dpo-top).
        variants = [(0, "uniform"), (0, "bucket"), (k // 2, "uniform"), (k // 2, "bucket")]
        if k >= 64:
            variants += [(k // 4, "uniform"), (3 * k // 4, "uniform")]
        for dpo_top in sorted({m for m, _ in variants}):
            targets = compute_targets(z_d, z_r, torch.zeros(n, dtype=torch.long),
                                      TargetConfig(top_k=k, r=args.r, chunk_size=64,
                                                   dpo_top=dpo_top))
            stored_lp = targets.topk_logprobs.numpy().astype(FIELD_DTYPES["topk_logprobs"])
            topk_lp = torch.from_numpy(stored_lp.astype(np.float32))
            tail_mass = targets.tail_logmass.exp()
            if dpo_top == 0:
                row.update(tail_mass_median=float(tail_mass.median()),
                           tail_mass_p90=float(torch.quantile(tail_mass.double(), 0.9)))
            for m, tail in variants:
                if m != dpo_top:
                    continue
                loss, gl, gp = gradients(lambda z, t=tail: objective(losses.sparse_reverse_kl(
                    z, targets.topk_ids, topk_lp, targets.tail_logmass, tail=t)))
                key = tail if dpo_top == 0 else f"dpo_top{dpo_top}_{tail}"
                row[key] = {"loss": loss, "cos_logits": cosine(gl, exact_gl),
                            "cos_params": cosine(gp, exact_gp),
                            "tail_mass_median": float(tail_mass.median())}
        rows.append(row)
        print(json.dumps(row), flush=True)

    top1 = log_pi.max(-1).values.exp()
    machine = machine_record(args.threads)
    result = {"pair": str(pair), "student": str(args.student or pair / "dpo"),
              "data": args.data, "sequences": len(seqs), "response_positions": n,
              "vocab": vocab, "r": args.r, "beta0": args.beta0, "exact_loss": exact_loss,
              "alpha_mean": float(alpha.mean()), "pi_star_top1_median": float(top1.median()),
              "rows": rows, "seconds": round(time.perf_counter() - started, 1),
              "machine": machine}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# Gradient fidelity: sparse vs exact AlignDistil loss, SmolLM2-135M", "",
             f"{len(seqs)} ShareGPT conversations ({n} response positions, V = {vocab}); "
             f"teachers dpo = SmolLM2-135M-Instruct, reverse = its perturbed copy "
             f"(`make_smollm2_pair.py`); student = {Path(result['student']).name}; adaptive, "
             f"r = {args.r:g} (half-l1), beta0 = {args.beta0}; alpha mean "
             f"{result['alpha_mean']:.3f}; pi* top-1 probability median "
             f"{result['pi_star_top1_median']:.3f}. Cosine of the sparse loss's gradient with "
             f"the exact loss's (1.0 = same direction).", "",
             "| k | pi* tail mass median / p90 | uniform: cos logits / params | bucket: cos "
             "logits / params | --dpo-top k/2, uniform | --dpo-top k/2, bucket | --dpo-top k/4, "
             "uniform | --dpo-top 3k/4, uniform |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def cell(r: dict, key: str) -> str:
        v = r.get(key)
        return f"{v['cos_logits']:.4f} / {v['cos_params']:.4f}" if v else "-"

    for r in rows:
        k = r["k"]
        lines.append(f"| {k} | {r['tail_mass_median']:.2e} / {r['tail_mass_p90']:.2e} | "
                     f"{cell(r, 'uniform')} | {cell(r, 'bucket')} | "
                     f"{cell(r, f'dpo_top{k // 2}_uniform')} | "
                     f"{cell(r, f'dpo_top{k // 2}_bucket')} | "
                     f"{cell(r, f'dpo_top{k // 4}_uniform')} | "
                     f"{cell(r, f'dpo_top{3 * k // 4}_uniform')} |")
    lines += ["", f"Exact loss {exact_loss:.5f}; {result['seconds']} s on {machine}.", "",
              "Command: `.venv/bin/python benchmarks/bench_grad_fidelity.py --pair PAIR --data "
              "CHAT_JSONL`"]
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
