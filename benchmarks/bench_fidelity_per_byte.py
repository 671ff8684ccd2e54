"""Fidelity per byte on a real chat model: store bytes per token against the gradient cosine
with exact AlignDistil, for fixed k and for tail budgets, with and without the student's own
candidates.

Teachers: a SmolLM2-135M pair (``--pair``: ``make_smollm2_pair.py``'s perturbed copy, or
``make_smollm2_dpo_pair.py``'s DPO pair trained both ways). Student (``--student``): by default
the pair's dpo model, as in ``bench_grad_fidelity.py``; for a trained pair, the model both
teachers were trained from, where AlignDistil starts its student. Data: ShareGPT conversations
(``make_sharegpt_jsonl.py``) with the chat template, cut to ``--max-len`` tokens.

Per variant, through the engine's own target code (``compute_targets``) and the store's own
encoder:

- **bytes per token**: the targets of ``--bytes-num`` conversations encoded as one shard with
  the default layout (``compact``) and with the ``packed`` layout (the zarr chunk bytes; the
  per-array metadata files, a few KB per shard whatever its size, are left out), in total and
  by array;
- **gradient cosine** with the exact loss (``beta_t = beta0 / alpha_t``, per-sequence mean),
  w.r.t. the student's logits and all its parameters, on the first ``--num`` conversations;
  for ``packed``, with the targets after its lossy round trip (encode, decode) and the tail
  model the trainer's ``--tail auto`` picks for them;
- k per position (mean, p50, p90, max) and the share of positions that hit the cap with more
  than EPS left out.

Variants: fixed k in {16, 32, 64, 128} (with and without ``--dpo-top k/2``), tail budgets EPS
with a cap of 128 (with and without the dpo model's ids to the same budget, ``--dpo-top 127``),
each with the uniform, the bucket and the auto tail, and budgets with the student's top N ids merged in (``--student-top N``, through
``student_trainer.candidates.merge_candidates``, the trainer's own code).

``--variants SPEC...`` runs only the variants named (``k=48,eps=0.05,dpo=47`` is the tail
budget 0.05 with a cap of 48 and the dpo model's mass held to it; ``,student=N`` merges the
student's top N), and ``--tails`` picks the tail models (``fidelity_per_byte_budget_*.md``:
``--tails bucket``, the trainer's).

    .venv/bin/python benchmarks/bench_fidelity_per_byte.py --pair /work/cache/smollm2-135m \\
        --data /work/cache/sharegpt/chat.jsonl --out benchmarks/results/fidelity_per_byte
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
from storage.ragged import offsets_from_lengths  # noqa: E402
from storage.record import TargetRecord  # noqa: E402
from storage.store.batch import TargetBatch  # noqa: E402
from storage.store.layout import DEFAULT_LAYOUT, decode_shard, encode_shard, get_layout  # noqa: E402
from storage.store.shardio import encode_shard_files  # noqa: E402
from storage.tokenization import tokenize_example  # noqa: E402
from student_trainer import losses  # noqa: E402
from student_trainer.candidates import merge_candidates  # noqa: E402
from student_trainer.collate import collate_sequences  # noqa: E402
from teacher_service.targets import TargetConfig, compute_targets, teacher_logprobs  # noqa: E402
from benchmarks.bench_grad_fidelity import cosine  # noqa: E402
from benchmarks.machine_info import machine as machine_record  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
#: DistillKit's published store sizes (bytes per token): k = 50 (lossy) and k = 128.
DISTILLKIT = {"DistillKit k=50 (lossy)": 114.0, "DistillKit k=128": 300.0}
FIXED_KS = (16, 32, 64, 128)
BUDGETS = (0.05, 0.02, 0.01, 0.005, 0.002)
CAP = 128
DPO_TOP = 32
STUDENT_TOPS = (8, 16, 32)
TAILS = ("uniform", "bucket", "auto")


def load_batch(tok, path: str, num: int, max_len: int) -> list[tuple[list[int], int]]:
    seqs = []
    for ex in read_examples(path):
        ids, p = tokenize_example(tok, ex)
        if p + 8 > max_len:  # a prompt that leaves fewer than 8 response tokens
            continue
        seqs.append((ids[:max_len], p))
        if len(seqs) == num:
            break
    return seqs


def teacher_logits(dpo, rev, vocab, seqs, pad_id):
    batch = collate_sequences(seqs, pad_id)
    with torch.no_grad():
        z_d = Float32Head(dpo, vocab)(response_hidden(dpo, batch.input_ids,
                                                      batch.attention_mask, batch.row_idx,
                                                      batch.col_idx))
        z_r = Float32Head(rev, vocab)(response_hidden(rev, batch.input_ids,
                                                      batch.attention_mask, batch.row_idx,
                                                      batch.col_idx))
    return batch, z_d, z_r


def as_batch(seqs, targets) -> TargetBatch:
    """The targets as the store's in-memory batch (float16 log-probs, int32 ids)."""
    seq_lens = np.array([len(ids) for ids, _ in seqs])
    pos_lens = np.array([len(ids) - p for ids, p in seqs])
    return TargetBatch(
        example_index=np.arange(len(seqs), dtype=np.int64),
        prompt_len=np.array([p for _, p in seqs], dtype=np.int32),
        seq_offsets=offsets_from_lengths(seq_lens),
        input_ids=np.concatenate([np.asarray(ids, np.int32) for ids, _ in seqs]),
        pos_offsets=offsets_from_lengths(pos_lens),
        alpha=targets.alpha.numpy().astype(np.float32),
        topk_ids=targets.topk_ids.numpy().astype(np.int32),
        topk_logprobs=targets.topk_logprobs.numpy().astype(np.float16),
        tail_logmass=targets.tail_logmass.numpy().astype(np.float32),
        dpo_logprobs=targets.dpo_logprobs.numpy().astype(np.float32),
        reverse_logprobs=targets.reverse_logprobs.numpy().astype(np.float32),
        topk_count=targets.topk_count.numpy().astype(np.int32))


PACKED = "packed"


def shard_bytes(batch: TargetBatch, vocab: int, ragged: bool,
                layout: str = DEFAULT_LAYOUT) -> dict[str, int]:
    """Chunk bytes per array of the batch written as one shard with ``layout``."""
    files = encode_shard_files(batch, get_layout(layout), vocab,
                               ragged=ragged or get_layout(layout).ragged_only)
    out: dict[str, int] = {}
    for name, data in files.items():
        if name.endswith("zarr.json"):
            continue
        array = name.split("/", 1)[0]
        out[array] = out.get(array, 0) + len(data)
    return out


def packed_round_trip(batch: TargetBatch, vocab: int) -> TargetBatch:
    """The batch as a packed shard gives it back (lossy: 8-bit log-probs, float16 scalars)."""
    arrays = encode_shard(batch, get_layout(PACKED), vocab, ragged=True)
    return decode_shard({name: (a.data, a.attributes) for name, a in arrays.items()})


def parse_variant(spec: str, r: float) -> tuple[str, TargetConfig, int]:
    """``--variants`` item, comma-separated ``key=value``: ``k`` (the cap with ``eps``),
    ``eps`` (``--tail-budget``), ``dpo`` (``--dpo-top``), ``student`` (``--student-top``);
    e.g. ``k=48,eps=0.05,dpo=47`` or ``k=64,student=32``. Returns (name, config, student
    top)."""
    known = {"k": int, "eps": float, "dpo": int, "student": int}
    values: dict = {"k": CAP, "eps": 0.0, "dpo": 0, "student": 0}
    for item in spec.split(","):
        key, _, value = item.partition("=")
        if key.strip() not in known:
            raise SystemExit(f"--variants {spec!r}: unknown key {key.strip()!r} (expected one "
                             f"of {', '.join(known)})")
        try:
            values[key.strip()] = known[key.strip()](value)
        except ValueError:
            raise SystemExit(f"--variants {spec!r}: {key.strip()} must be a number, got "
                             f"{value!r}") from None
    k, eps, dpo, student = values["k"], values["eps"], values["dpo"], values["student"]
    name = f"EPS={eps:g}, cap {k}" if eps else f"k={k}"
    if dpo:
        name += (", dpo budget" if eps and dpo == k - 1 else f", dpo-top {dpo}")
    if student < 0:
        raise SystemExit(f"--variants {spec!r}: student must be >= 0, got {student}")
    if student:
        name += f" + student top {student}"
    try:
        config = TargetConfig(top_k=k, r=r, chunk_size=64, tail_budget=eps, dpo_top=dpo)
    except ValueError as err:
        raise SystemExit(f"--variants {spec!r}: {err}") from None
    return name, config, student


def grid_variants(args) -> list[tuple[str, TargetConfig, int]]:
    """The default grid: fixed k with and without ``--dpo-top k/2``, tail budgets (cap
    :data:`CAP`) with and without the dpo budget, and the student's candidates merged into
    budgets and fixed k. Returns (name, config, student top)."""
    def config(**kw) -> TargetConfig:
        return TargetConfig(r=args.r, chunk_size=64, **kw)

    out = []
    for k in (args.ks if not args.quick else (32, 64)):
        out.append((f"k={k}", config(top_k=k), 0))
        out.append((f"k={k}, dpo-top {k // 2}", config(top_k=k, dpo_top=k // 2), 0))
    for eps in (args.budgets if not args.quick else (0.01,)):
        out.append((f"EPS={eps:g}", config(top_k=CAP, tail_budget=eps), 0))
        # the dpo model's mass to the same budget, within the cap (--dpo-top cap - 1)
        out.append((f"EPS={eps:g}, dpo budget",
                    config(top_k=CAP, tail_budget=eps, dpo_top=CAP - 1), 0))
    for eps in (args.candidate_budgets if not args.quick else (0.01,)):
        for m in (args.student_tops if not args.quick else (16,)):
            out.append((f"EPS={eps:g} + student top {m}", config(top_k=CAP, tail_budget=eps),
                        m))
    for k in args.candidate_ks:
        for m in args.student_tops:
            out.append((f"k={k} + student top {m}", config(top_k=k), m))
    return out


def k_stats(counts: np.ndarray, tails: np.ndarray, cap: int, eps: float) -> dict:
    return {"k_mean": float(counts.mean()), "k_p50": float(np.quantile(counts, 0.5)),
            "k_p90": float(np.quantile(counts, 0.9)), "k_max": int(counts.max()),
            "capped_over_budget": float(((counts >= cap) & (tails > eps)).mean()) if eps
            else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pair", default="/work/cache/smollm2-135m")
    ap.add_argument("--pair-label", default="SmolLM2-135M-Instruct and a perturbed copy")
    ap.add_argument("--data", default="/work/cache/sharegpt/chat.jsonl")
    ap.add_argument("--num", type=int, default=8, help="conversations for the gradients")
    ap.add_argument("--bytes-num", type=int, default=32, help="conversations for the bytes")
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--r", type=float, default=20.0)
    ap.add_argument("--beta0", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="fewer variants (a smoke run)")
    ap.add_argument("--student", default=None, help="the student (default: the pair's dpo)")
    ap.add_argument("--ks", type=int, nargs="+", default=list(FIXED_KS))
    ap.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS))
    ap.add_argument("--candidate-budgets", type=float, nargs="+", default=[0.01, 0.002],
                    help="budgets measured with the student's top N merged in")
    ap.add_argument("--candidate-ks", type=int, nargs="*", default=[],
                    help="fixed k (pi*'s top k, the on-policy default's form) measured with the "
                    "student's top N merged in")
    ap.add_argument("--student-tops", type=int, nargs="+", default=list(STUDENT_TOPS))
    ap.add_argument("--variants", nargs="+", default=None, metavar="SPEC",
                    help="run only these variants, each 'k=K[,eps=EPS][,dpo=M][,student=N]' "
                         "(k is the cap with eps; dpo=k-1 with eps is the dpo budget)")
    ap.add_argument("--tails", nargs="+", choices=TAILS, default=list(TAILS),
                    help="the tail models to take the gradient with (default: all three)")
    ap.add_argument("--out", default=str(RESULTS / "fidelity_per_byte"))
    ap.add_argument("--report-only", action="store_true", help="redo OUT.md and OUT.png from "
                    "OUT.json")
    args = ap.parse_args()
    if args.report_only:
        write_report(json.loads(Path(args.out).with_suffix(".json").read_text()), Path(args.out))
        return
    # (name, config, student top); --variants typos fail here, before any model loads
    variants = [parse_variant(spec, args.r) for spec in args.variants or ()] \
        or grid_variants(args)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    cpu = torch.device("cpu")
    pair = Path(args.pair)
    dpo, tok = load_model_and_tokenizer(pair / "dpo", device=cpu)
    rev, _ = load_model_and_tokenizer(pair / "reverse", device=cpu)
    vocab, pad = len(tok), pad_token_id(tok)
    all_seqs = load_batch(tok, args.data, max(args.num, args.bytes_num), args.max_len)
    grad_seqs = all_seqs[:args.num]

    # Bytes: the targets of --bytes-num conversations; their teacher logits are computed once
    # (8 conversations at a time) and kept for every variant.
    cached = [teacher_logits(dpo, rev, vocab, all_seqs[s:s + 8], pad)
              for s in range(0, len(all_seqs), 8)]

    def targets_of(config: TargetConfig):  # with the actual next tokens, as a store holds them
        return [compute_targets(z_d, z_r, b.target_ids, config) for b, z_d, z_r in cached]

    # Gradients: the teachers' logits on the first --num conversations, kept.
    batch, z_d, z_r = teacher_logits(dpo, rev, vocab, grad_seqs, pad)
    base = TargetConfig(top_k=CAP, r=args.r, chunk_size=64)
    log_pi, alpha = teacher_logprobs(z_d, z_r, base)
    n = log_pi.shape[0]
    student_dir = Path(args.student) if args.student else pair / "dpo"
    student, _ = load_model_and_tokenizer(student_dir, device=cpu, train=True)
    hidden = response_hidden(student, batch.input_ids, batch.attention_mask, batch.row_idx,
                             batch.col_idx)
    logits = head_logits(student, hidden, vocab).float()
    leaf = logits.detach().requires_grad_(True)
    params = [p for p in student.parameters() if p.requires_grad]
    alpha_b = batch.unflatten(alpha, 1.0)
    student_top = {m: torch.topk(logits.detach(), m, dim=-1).indices
                   for m in {m for _, _, m in variants} if m}

    def objective(kl, alpha_of=None):
        weights = alpha_b if alpha_of is None else batch.unflatten(alpha_of, 1.0)
        return losses.aligndistil_loss(batch.unflatten(kl), weights, batch.response_mask,
                                       beta0=args.beta0)

    def gradients(loss_of_logits):
        loss = loss_of_logits(leaf)
        (g_logits,) = torch.autograd.grad(loss, leaf)
        g_params = torch.autograd.grad(logits, params, grad_outputs=g_logits, retain_graph=True)
        return float(loss.detach()), g_logits, torch.cat([g.flatten() for g in g_params])

    exact_loss, exact_gl, exact_gp = gradients(
        lambda z: objective(losses.exact_reverse_kl(z, log_pi)))
    print(f"exact loss {exact_loss:.5f} over {n} positions", flush=True)

    tails = tuple(args.tails)
    rows = []
    for name, config, m in variants:
        t0 = time.perf_counter()
        row: dict = {"variant": name, "top_k": config.top_k, "tail_budget": config.tail_budget,
                     "dpo_top": config.dpo_top, "student_top": m}
        ragged = bool(config.tail_budget)
        if not m:  # a store holds these: its bytes
            parts = targets_of(config)
            counts = torch.cat([p.topk_count for p in parts]).numpy()
            tails_mass = torch.cat([p.tail_logmass for p in parts]).exp().numpy()
            merged = TargetBatch.concat([as_batch(all_seqs[8 * i:8 * i + 8], p)
                                         for i, p in enumerate(parts)])
            by_field = shard_bytes(merged, vocab, ragged)
            row["bytes_per_token"] = sum(by_field.values()) / merged.num_tokens
            row["bytes_by_field"] = {f: b / merged.num_tokens for f, b in sorted(by_field.items())}
            row["bytes_tokens"] = merged.num_tokens
            packed = shard_bytes(merged, vocab, ragged, PACKED)
            row["packed_bytes_per_token"] = sum(packed.values()) / merged.num_tokens
            row["packed_bytes_by_field"] = {f: b / merged.num_tokens
                                            for f, b in sorted(packed.items())}
            row.update(k_stats(counts, tails_mass, config.top_k, config.tail_budget))
        targets = compute_targets(z_d, z_r, batch.target_ids, config)
        if not m:  # the same targets after the packed layout's lossy round trip
            back = packed_round_trip(as_batch(grad_seqs, targets), vocab)
            tail_model = losses.resolve_tail("auto")
            loss, gl, gp = gradients(lambda z: objective(losses.sparse_reverse_kl(
                z, torch.from_numpy(back.topk_ids).long(),
                torch.from_numpy(back.topk_logprobs).float(),
                torch.from_numpy(back.tail_logmass), tail=tail_model,
                topk_count=torch.from_numpy(back.topk_count).long()),
                torch.from_numpy(back.alpha)))
            row[PACKED] = {"tail": tail_model, "loss": loss, "cos_logits": cosine(gl, exact_gl),
                           "cos_params": cosine(gp, exact_gp)}
        ids, lp16 = targets.topk_ids, targets.topk_logprobs.half()
        tail, count = targets.tail_logmass, targets.topk_count
        if m:  # on-policy: the student's top m merged in, as the trainer does
            named = student_top[m]
            named_lp = log_pi.gather(-1, named).float()
            record = TargetRecord(
                example_index=0, input_ids=np.zeros(n + 1, np.int32), prompt_len=1,
                alpha=targets.alpha.numpy(), topk_ids=ids.numpy().astype(np.int32),
                topk_logprobs=lp16.numpy(), tail_logmass=tail.numpy(),
                dpo_logprobs=targets.dpo_logprobs.numpy(),
                reverse_logprobs=targets.reverse_logprobs.numpy(),
                topk_count=count.numpy().astype(np.int32))
            union = merge_candidates(record, named.numpy(), named_lp.numpy())
            ids, lp16 = torch.from_numpy(union.topk_ids).long(), torch.from_numpy(
                union.topk_logprobs)
            tail, count = torch.from_numpy(union.tail_logmass), torch.from_numpy(
                union.topk_count).long()
            row.update({f"union_{k}": v for k, v in k_stats(
                count.numpy(), tail.exp().numpy(), 10 ** 9, 0.0).items()
                if k != "capped_over_budget"})
        for tail_model in tails:
            loss, gl, gp = gradients(lambda z, t=tail_model: objective(losses.sparse_reverse_kl(
                z, ids, lp16.float(), tail, tail=t, topk_count=count)))
            row[tail_model] = {"loss": loss, "cos_logits": cosine(gl, exact_gl),
                               "cos_params": cosine(gp, exact_gp)}
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)

    top1 = log_pi.max(-1).values.exp()
    result = {"pair": str(pair), "pair_label": args.pair_label, "data": args.data,
              "student": str(student_dir),
              "grad_sequences": len(grad_seqs), "grad_positions": n,
              "bytes_sequences": len(all_seqs), "vocab": vocab, "r": args.r,
              "beta0": args.beta0, "exact_loss": exact_loss,
              "pi_star_top1_median": float(top1.median()), "layout": DEFAULT_LAYOUT,
              "distillkit": DISTILLKIT, "rows": rows,
              "seconds": round(time.perf_counter() - started, 1),
              "machine": machine_record(args.threads),
              "command": " ".join([".venv/bin/python benchmarks/bench_fidelity_per_byte.py",
                                   *sys.argv[1:]])}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    write_report(result, out)


def write_report(result: dict, out: Path) -> None:
    rows = result["rows"]
    ran = [t for t in TAILS if any(t in r for r in rows)]

    def cos(r, t):
        v = r.get(t)
        return f"{v['cos_params']:.4f} ({v['cos_logits']:.3f})" if v else "-"

    lines = [f"# Fidelity per byte: {result['pair_label']}", "",
             f"Teachers: `{result['pair']}` ({result['pair_label']}); student = "
             f"`{result.get('student', result['pair'] + '/dpo')}`; "
             f"adaptive, r = {result['r']:g}, beta0 = {result['beta0']}; pi* top-1 median "
             f"{result['pi_star_top1_median']:.3f}. Gradient cosines with exact AlignDistil on "
             f"{result['grad_sequences']} ShareGPT conversations ({result['grad_positions']} "
             f"positions): parameters (logits in brackets). Bytes per token: the "
             f"`{result['layout']}` shard of {result['bytes_sequences']} conversations, chunk "
             f"bytes of every array (input ids, alpha, tail and the other per-token scalars "
             f"included). DistillKit publishes "
             + ", ".join(f"{v:g} B/token ({k.split(' ', 1)[1]})"
                         for k, v in result["distillkit"].items()) + ".", "",
             *(["The `auto` column is the loss's per-position rule (bucket where more than 5% "
                "of pi*'s mass is left out, uniform elsewhere). The trainer's `--tail auto` "
                "(`losses.resolve_tail`) uses the bucket tail everywhere since 2026-12-06, so "
                "it gets the bucket column; before, it used the per-position rule except on "
                "targets made with a tail budget and no `--student-top`.", ""]
               if "auto" in ran else
               [f"Tails: {', '.join(ran)} (the trainer's `--tail auto` is `bucket`).", ""]),
             "The `packed` columns: the same targets in the packed layout (ids as sorted "
             "per-position sets, 8-bit log-spaced log-probs, float16 tail and teacher "
             "log-probs, float32 alpha; lossy), the gradient taken after its round trip with "
             "the tail named in the cell (what `--tail auto` resolved to when the run was "
             "made); compare it with the same tail's lossless column.", "",
             "| variant | B/token | k mean / p90 / max | capped over EPS | "
             + "".join(f"{t}: cos | " for t in ran) + "packed B/token | packed: cos |",
             "|---|---:|---:|---:|" + "---:|" * len(ran) + "---:|---:|"]
    for r in rows:
        if r.get("student_top"):
            continue
        capped = (f"{r['capped_over_budget']:.1%}" if r.get("capped_over_budget") is not None
                  else "-")
        lines.append(f"| {r['variant']} | {r['bytes_per_token']:.1f} | {r['k_mean']:.1f} / "
                     f"{r['k_p90']:.0f} / {r['k_max']} | {capped} | "
                     + "".join(f"{cos(r, t)} | " for t in ran) +
                     f"{r.get('packed_bytes_per_token', float('nan')):.1f} | "
                     f"{cos(r, PACKED)} {r.get(PACKED, {}).get('tail', '')} |")
    cand = [r for r in rows if r.get("student_top")]
    if cand:
        lines += ["", "On-policy, the student's own top N ids merged in (`--student-top N`; "
                  "not stored, so no bytes):", "",
                  "| variant | union k mean / p90 / max | "
                  + " | ".join(f"{t}: cos" for t in ran) + " |",
                  "|---|---:|" + "---:|" * len(ran)]
        for r in cand:
            lines.append(f"| {r['variant']} | {r['union_k_mean']:.1f} / {r['union_k_p90']:.0f} "
                         f"/ {r['union_k_max']} | " + " | ".join(cos(r, t) for t in ran) + " |")
    for key, title in (("bytes_by_field", "Bytes per token by array:"),
                       ("packed_bytes_by_field", "Bytes per token by array, packed layout:")):
        fields = sorted({f for r in rows for f in r.get(key, {})})
        if not fields:
            continue
        lines += ["", title, "", "| variant | " + " | ".join(fields) + " |",
                  "|---|" + "---:|" * len(fields)]
        lines += [f"| {r['variant']} | " + " | ".join(f"{r[key].get(f, 0):.2f}" for f in fields)
                  + " |" for r in rows if key in r]
    for note in result.get("notes", []):
        lines += ["", note]
    lines += ["", f"{result['seconds']} s on {result['machine']}.", "",
              "Command: `" + result.get("command", ".venv/bin/python "
                                        "benchmarks/bench_fidelity_per_byte.py --pair PAIR "
                                        "--data CHAT_JSONL --out OUT") + "`"]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(result, out.with_suffix(".png"))


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    families = (
        ("fixed k", "o", lambda r: not r["tail_budget"] and not r["dpo_top"]),
        ("fixed k, --dpo-top k/2", "s", lambda r: not r["tail_budget"] and r["dpo_top"]),
        ("tail budget", "^", lambda r: r["tail_budget"] and not r["dpo_top"]),
        ("tail budget, dpo budget", "D", lambda r: r["tail_budget"] and r["dpo_top"]))
    for tail_model, ls in (("uniform", "-"), ("bucket", "--"), ("auto", ":")):
        for label, marker, pick in families:
            pts = [(r["bytes_per_token"], r[tail_model]["cos_params"], r["variant"])
                   for r in result["rows"] if "bytes_per_token" in r and pick(r)
                   and tail_model in r]
            if not pts:
                continue
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, ls=ls,
                    label=f"{label}, {tail_model}")
            for x, y, name in pts:
                label_of = ", ".join(name.split(", ")[:2 if "cap" in name else 1])
                ax.annotate(label_of, (x, y), fontsize=5, xytext=(3, -8),
                            textcoords="offset points")
    for label, marker, pick in families:
        pts = [(r["packed_bytes_per_token"], r[PACKED]["cos_params"], r["variant"])
               for r in result["rows"] if "packed_bytes_per_token" in r and pick(r)
               and PACKED in r]
        if pts:
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, ls="-",
                    color="black", lw=0.8, label=f"{label}, packed")
    for name, x in result["distillkit"].items():
        ax.axvline(x, color="grey", ls=":", lw=1)
        ax.text(x, ax.get_ylim()[0], " " + name, rotation=90, fontsize=7, va="bottom")
    ax.set_xscale("log")
    ax.set_xlabel("store bytes per token")
    ax.set_ylabel("parameter-gradient cosine with exact AlignDistil")
    ax.axhline(0.97, color="grey", lw=0.8)
    ax.axvline(60, color="tab:red", lw=0.8, ls="--")
    ax.set_title(result["pair_label"], fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
