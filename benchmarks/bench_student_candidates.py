"""What ``--student-top N`` costs per on-policy step: the student's no-grad pass that picks its
top N ids, and merging the server's log pi* at them into the records, against the training
forward and backward on the same sequences.

The trainer takes the ids from a no-grad pass of the sampling model over the step's sequences
(:func:`student_trainer.candidates.student_top_ids`), not from the rollout: Hugging Face
``generate`` would have to keep every step's scores (``[B, V]`` per new token for the whole
generation, 196 KB per token and sequence at V = 49,152 in float32). vLLM can return each
sampled token's top N log-probs (``logprobs=N``), which would make them free, but the vLLM
backend does not ask for them yet. This measures the pass that is used.

Setup: SmolLM2-135M-Instruct (``make_smollm2_pair.py``'s ``dpo``) as the student, ``--num``
ShareGPT conversations cut to ``--max-len`` tokens, float32 on the CPU; a training step is
``StudentForward`` (LM head at the response rows) + the AlignDistil loss on k = 64 targets +
backward, the same micro-batch. Median of ``--repeats`` timings each.

    .venv/bin/python benchmarks/bench_student_candidates.py --pair /work/cache/smollm2-135m \\
        --data /work/cache/sharegpt/chat.jsonl --out benchmarks/results/student_candidates
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from causal_lm.loading import load_model_and_tokenizer, pad_token_id  # noqa: E402
from storage.record import TargetRecord  # noqa: E402
from student_trainer.api import aligndistil_batch_loss  # noqa: E402
from student_trainer.candidates import merge_candidates, student_top_ids  # noqa: E402
from student_trainer.collate import collate_records  # noqa: E402
from student_trainer.modeling import StudentForward  # noqa: E402
from benchmarks.bench_fidelity_per_byte import load_batch  # noqa: E402
from benchmarks.machine_info import machine as machine_record  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pair", default="/work/cache/smollm2-135m")
    ap.add_argument("--data", default="/work/cache/sharegpt/chat.jsonl")
    ap.add_argument("--num", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS / "student_candidates"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model_and_tokenizer(Path(args.pair) / "dpo", device=torch.device("cpu"),
                                          train=True)
    vocab, pad = len(tok), pad_token_id(tok)
    seqs = load_batch(tok, args.data, args.num, args.max_len)
    rng = np.random.default_rng(0)

    def record(ids, p, k=64, extra=0):
        t = len(ids) - p
        lps = np.sort(np.log(rng.dirichlet(np.ones(k + 8), size=t)[:, :k]), axis=1)[:, ::-1]
        return TargetRecord.create(
            example_index=0, input_ids=ids, prompt_len=p, alpha=np.full(t, 3.0),
            topk_ids=np.stack([rng.choice(vocab, k, replace=False) for _ in range(t)]),
            topk_logprobs=lps, tail_logmass=np.full(t, -5.0), dpo_logprobs=np.full(t, -1.0),
            reverse_logprobs=np.full(t, -2.0))

    records = [record(ids, p) for ids, p in seqs]
    batch = collate_records(records, pad)
    forward = StudentForward(model, vocab, tail="auto")

    def train_step():
        model.zero_grad(set_to_none=True)
        aligndistil_batch_loss(forward, batch).backward()

    step_s = timed(train_step, args.repeats)
    rows = []
    for n in (8, 16, 32):
        pass_s = timed(lambda: student_top_ids(model, seqs, n, pad_id=pad, vocab_size=vocab,
                                               batch_size=len(seqs)), args.repeats)
        top = student_top_ids(model, seqs, n, pad_id=pad, vocab_size=vocab)
        named_lp = [np.full(t.shape, -8.0, dtype=np.float32) for t in top]
        merge_s = timed(lambda: [merge_candidates(r, t, lp) for r, t, lp
                                 in zip(records, top, named_lp)], args.repeats)
        rows.append({"n": n, "pass_s": pass_s, "merge_s": merge_s,
                     "share_of_train_step": (pass_s + merge_s) / step_s})
        print(json.dumps(rows[-1]), flush=True)
    tokens = int(batch.attention_mask.sum())
    result = {"student": str(Path(args.pair) / "dpo"), "sequences": len(seqs), "tokens": tokens,
              "response_positions": batch.num_response_tokens, "train_step_s": step_s,
              "rows": rows, "machine": machine_record(args.threads)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# --student-top N: the cost of the student's candidates", "",
             f"SmolLM2-135M-Instruct as the student, {len(seqs)} ShareGPT conversations "
             f"({tokens} tokens, {batch.num_response_tokens} response positions), float32, "
             f"{args.threads} threads. Training step (forward + k = 64 loss + backward, same "
             f"micro-batch): {step_s:.2f} s. Median of {args.repeats}.", "",
             "| N | no-grad pass s | merge s | (pass + merge) / training step |",
             "|---:|---:|---:|---:|"]
    lines += [f"| {r['n']} | {r['pass_s']:.2f} | {r['merge_s']:.3f} | "
              f"{r['share_of_train_step']:.2f} |" for r in rows]
    lines += ["", f"Machine: {result['machine']}.", "",
              "Command: `.venv/bin/python benchmarks/bench_student_candidates.py`"]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
