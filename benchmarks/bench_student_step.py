"""Benchmark: the AlignDistil student step against plain SFT, and the sparse loss against the
exact full-vocabulary loss.

Part A — one optimizer step on the same batch and model, in the same run:

- ``aligndistil``: the trainer's own ``train_step`` (StudentForward: decoder, LM head on the
  response rows only, ``sparse_reverse_kl`` with the uniform tail, beta_t weighting,
  backward, clipping, AdamW, scheduler).
- ``sft-hf``: plain cross-entropy SFT as people write it: ``model(input_ids, labels=...)``
  with the prompt masked (-100); Hugging Face computes logits for every position.
- ``sft-rows``: cross-entropy on the same gathered response rows as the aligndistil step
  (the same head cost), to separate the loss's own cost from the head's.

Part B — the loss alone (forward + backward) on ``[N, V]`` student logits at V = 151,936
(Qwen2's vocabulary): ``sparse_reverse_kl`` (k = 64 targets) vs ``exact_reverse_kl`` (a dense
``[N, V]`` teacher), plus ``chunked_sparse_reverse_kl`` from hidden states.

Timing: variants interleaved round by round in one process, the median per variant. On a CPU
the ratios use process CPU time with one torch thread (``--threads``): on a shared machine wall
time mostly measures the neighbours, CPU time the work; wall time is reported beside it. Peak memory: each variant in a fresh child process, as the growth of
the resident set (VmHWM) during one measured step after a warm-up step, with glibc's mmap
threshold pinned so freed large tensors leave the resident set (see ``_peak_rss_delta``).
Linux only (reads /proc/self/status). CPU by default; on CUDA, memory is
``torch.cuda.max_memory_allocated``.

Usage::

    python benchmarks/bench_student_step.py                 # prints a Markdown report
    python benchmarks/bench_student_step.py --write benchmarks/results/student_step.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from storage.record import TargetRecord  # noqa: E402
from student_trainer import losses  # noqa: E402
from student_trainer.collate import collate_records, collate_sequences  # noqa: E402
from student_trainer.distributed import DistEnv  # noqa: E402
from student_trainer.modeling import StudentForward  # noqa: E402
from student_trainer.optim import build_optimizer, build_scheduler, clip_grad_norm  # noqa: E402
from student_trainer.recipes.configs import TrainConfig  # noqa: E402
from student_trainer.recipes.train import train_step  # noqa: E402
from benchmarks.machine_info import cpu_model  # noqa: E402

STEP_VARIANTS = ("aligndistil", "sft-hf", "sft-rows")
LOSS_VARIANTS = ("sparse", "sparse-chunked", "exact")


# ---------------------------------------------------------------------------- set-up
def model_config(args):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                       intermediate_size=args.hidden * 8 // 3, num_hidden_layers=args.layers,
                       num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64,
                       head_dim=64, max_position_embeddings=4096, tie_word_embeddings=False)


def build_model(args):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(model_config(args)).train()


def synthetic_records(args, seed=0) -> list[TargetRecord]:
    """Valid records: sorted top-k log-probs <= 0, distinct ids, a small tail mass."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(args.batch):
        length, prompt = args.seq_len, args.prompt_len
        t = length - prompt
        base = rng.integers(0, args.vocab, size=(t, 1))
        ids = (base + np.arange(args.top_k)[None, :] * 97) % args.vocab
        lp = -np.sort(rng.exponential(2.0, size=(t, args.top_k)), axis=1) - 0.05
        out.append(TargetRecord.create(
            example_index=i, input_ids=rng.integers(0, args.vocab, size=length),
            prompt_len=prompt, alpha=rng.uniform(0.5, 10.0, size=t), topk_ids=ids,
            topk_logprobs=lp, tail_logmass=np.full(t, np.log(0.05)),
            dpo_logprobs=-rng.exponential(2.0, size=t),
            reverse_logprobs=-rng.exponential(2.0, size=t)))
    return out


class StepRunner:
    """One variant's model, optimizer and batch; ``step()`` runs one optimizer step."""

    def __init__(self, variant: str, args, device: torch.device):
        self.variant, self.device = variant, device
        self.model = build_model(args).to(device)
        self.optimizer = build_optimizer(self.model, lr=1e-6)
        self.scheduler = build_scheduler(self.optimizer, warmup_steps=1, total_steps=10 ** 6)
        records = synthetic_records(args)
        self.records = records
        self.batch = collate_records(records, pad_id=0).to(device)
        self.forward = StudentForward(self.model, args.vocab)
        self.config = TrainConfig(mode="off-policy", model="-", out="-", store="-")
        self.amp = device.type == "cuda"
        if variant == "sft-hf":
            seqs = collate_sequences([(r.input_ids, r.prompt_len) for r in records], 0)
            labels = seqs.input_ids.clone()
            for b, r in enumerate(records):
                labels[b, :r.prompt_len] = -100
            labels[seqs.attention_mask == 0] = -100
            self.labels = labels.to(device)

    def prepare(self) -> None:
        pass

    def step(self) -> None:
        if self.variant == "aligndistil":
            train_step(self.forward, [self.batch], optimizer=self.optimizer,
                       scheduler=self.scheduler, params=list(self.model.parameters()),
                       config=self.config, step_sequences=self.batch.num_sequences,
                       env=DistEnv(), device=self.device, amp=self.amp)
            return
        b = self.batch
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            if self.variant == "sft-hf":
                loss = self.model(input_ids=b.input_ids, attention_mask=b.attention_mask,
                                  labels=self.labels).loss
            else:
                logits = self.forward.head(self.forward.response_hidden(
                    b.input_ids, b.attention_mask, b.row_idx, b.col_idx))
                loss = torch.nn.functional.cross_entropy(logits.float(), b.target_ids)
        loss.backward()
        clip_grad_norm(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)


class LossRunner:
    """The loss alone on fixed student logits [N, V]; ``step()`` = forward + backward."""

    def __init__(self, variant: str, args, device: torch.device):
        self.variant, self.device = variant, device
        g = torch.Generator().manual_seed(0)
        n, v, k = args.loss_tokens, args.loss_vocab, args.top_k
        self.n, self.v, self.k = n, v, k
        if variant == "sparse-chunked":
            self.hidden = torch.randn(n, args.hidden, generator=g).to(device).requires_grad_()
            self.weight = (torch.randn(v, args.hidden, generator=g) / args.hidden ** 0.5
                           ).to(device).requires_grad_()
        else:
            self.logits = (3 * torch.randn(n, v, generator=g)).to(device).requires_grad_()
        self.g = g

    def inputs(self):
        """What the loss needs from the teacher (built inside the measured region)."""
        if self.variant == "exact":
            return (torch.log_softmax(3 * torch.randn(self.n, self.v, generator=self.g), -1)
                    .to(self.device),)
        ids = torch.randint(0, self.v, (self.n, self.k), generator=self.g).to(self.device)
        lp = -torch.sort(torch.rand(self.n, self.k, generator=self.g) * 5, dim=1).values
        tail = torch.full((self.n,), -3.0)
        return ids, lp.half().to(self.device), tail.to(self.device)

    def prepare(self) -> None:
        self._inputs = self.inputs()

    def step(self) -> None:
        inputs, self._inputs = self._inputs, None
        if self.variant == "exact":
            kl = losses.exact_reverse_kl(self.logits, *inputs)
        elif self.variant == "sparse":
            kl = losses.sparse_reverse_kl(self.logits, *inputs, tail="uniform")
        else:
            kl = losses.chunked_sparse_reverse_kl(self.hidden, self.weight, *inputs,
                                                  tail="uniform", chunk_size=128)
        kl.mean().backward()
        for t in (getattr(self, "logits", None), getattr(self, "hidden", None),
                  getattr(self, "weight", None)):
            if t is not None:
                t.grad = None


def make_runner(variant, args, device):
    return (StepRunner if variant in STEP_VARIANTS else LossRunner)(variant, args, device)


# ---------------------------------------------------------------------------- measuring
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(variants, args, device, rounds) -> dict[str, dict[str, list[float]]]:
    """Per variant, the wall-clock and CPU (process) seconds of each round's step."""
    runners = {v: make_runner(v, args, device) for v in variants}
    for r in runners.values():  # warm-up: allocator, optimizer state, kernels
        r.prepare()
        r.step()
    times = {v: {"wall": [], "cpu": []} for v in variants}
    for _ in range(rounds):
        for v, r in runners.items():
            r.prepare()  # the loss's inputs are made outside the timed region
            sync(device)
            w0, c0 = time.perf_counter(), time.process_time()
            r.step()
            sync(device)
            times[v]["wall"].append(time.perf_counter() - w0)
            times[v]["cpu"].append(time.process_time() - c0)
    return times


def cost(times: dict[str, list[float]], device: torch.device) -> float:
    """The figure ratios are taken on: CPU seconds on a CPU (steady on a shared machine, where
    wall time mostly measures the neighbours), wall seconds on a GPU."""
    return statistics.median(times["cpu" if device.type == "cpu" else "wall"])


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _peak_rss_delta(fn) -> int:
    """Bytes the resident set grew to above its level before ``fn`` (VmHWM reset first).

    The parent starts children with MALLOC_MMAP_THRESHOLD_ pinned, so every large tensor is
    its own mmap and freeing it returns it to the OS: the resident set then follows the live
    tensors, and its high-water mark is the step's peak."""
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) * 1024


def child_memory(variant, args) -> int:
    device = torch.device(args.device)
    runner = make_runner(variant, args, device)
    runner.prepare()
    runner.step()  # warm-up: optimizer state exists before the measured step

    def measured() -> None:  # the loss's inputs count towards its memory
        runner.prepare()
        runner.step()

    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        measured()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return _peak_rss_delta(measured)


def memory_in_children(variants, args) -> dict[str, int]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    out = {}
    for v in variants:
        cmd = [sys.executable, __file__, "--child", v, *args.passthrough]
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"child {v} failed: {res.stderr[-2000:]}")
        out[v] = json.loads(res.stdout.strip().splitlines()[-1])["peak_bytes"]
    return out


# ---------------------------------------------------------------------------- report
def mib(x: float) -> str:
    return f"{x / 2 ** 20:,.1f} MiB"


def report(args, step, loss) -> str:
    device = torch.device(args.device)
    cpu = cpu_model()
    machine = (torch.cuda.get_device_name() if device.type == "cuda"
               else f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, "
                    f"{torch.get_num_threads()} threads")
    lines = [
        f"- date: {dt.date.today().isoformat()}",
        f"- machine: {machine}",
        f"- device: {args.device}; command: `"
        + " ".join(["python benchmarks/bench_student_step.py", *args.passthrough]) + "`",
        "",
    ]
    if step is not None:
        lines += _report_steps(args, *step)
    if loss is not None:
        lines += _report_loss(args, *loss)
    return "\n".join(lines)


def _report_steps(args, times, step_m) -> list[str]:
    device = torch.device(args.device)
    n_resp = args.batch * (args.seq_len - args.prompt_len)
    c = {v: cost(times[v], device) for v in STEP_VARIANTS}
    wall = {v: statistics.median(times[v]["wall"]) for v in STEP_VARIANTS}
    basis = "CPU time" if device.type == "cpu" else "wall time"
    lines = [
        "## A. One optimizer step: AlignDistil sparse loss vs plain cross-entropy SFT",
        "",
        f"Llama-architecture model: hidden {args.hidden}, {args.layers} layers, vocabulary "
        f"{args.vocab:,}; batch {args.batch} sequences x {args.seq_len} tokens (prompt "
        f"{args.prompt_len}, {n_resp} response tokens), top-k {args.top_k}. Step = forward, "
        "loss, backward, clipping, AdamW, scheduler. Time: median of "
        f"{args.rounds} interleaved rounds, {torch.get_num_threads()} thread(s); ratios on "
        f"{basis}. Memory: peak growth during one step in a fresh process after a warm-up "
        "step (see the script's docstring).",
        "",
        f"| variant | {basis} / step | vs sft-hf | vs sft-rows | wall time / step "
        "| peak memory | vs sft-hf | vs sft-rows |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v in STEP_VARIANTS:
        lines.append(f"| {v} | {c[v] * 1000:,.0f} ms | {c[v] / c['sft-hf']:.2f}x | "
                     f"{c[v] / c['sft-rows']:.2f}x | {wall[v] * 1000:,.0f} ms | "
                     f"{mib(step_m[v])} | {step_m[v] / step_m['sft-hf']:.2f}x | "
                     f"{step_m[v] / step_m['sft-rows']:.2f}x |")
    goal_t, goal_m = c["aligndistil"] / c["sft-hf"], step_m["aligndistil"] / step_m["sft-hf"]
    lines += [
        "",
        f"Goal (vs plain SFT, `sft-hf`): time <= 1.15x -> **{goal_t:.2f}x** "
        f"({'met' if goal_t <= 1.15 else 'NOT met'}); peak memory <= 1.2x -> "
        f"**{goal_m:.2f}x** ({'met' if goal_m <= 1.2 else 'NOT met'}).",
        "",
        f"All rounds, {basis} (ms): " + "; ".join(
            f"{v}: " + ", ".join(f"{t * 1000:.0f}" for t in times[v]["cpu" if device.type ==
                                                                  "cpu" else "wall"])
            for v in STEP_VARIANTS),
        "",
    ]
    return lines


def _report_loss(args, times, loss_m) -> list[str]:
    device = torch.device(args.device)
    c = {v: cost(times[v], device) for v in LOSS_VARIANTS}
    basis = "CPU time" if device.type == "cpu" else "wall time"
    lines = [
        f"## B. The loss alone at V = {args.loss_vocab:,}",
        "",
        f"{args.loss_tokens} positions, forward + backward on float32 student logits "
        f"[{args.loss_tokens}, {args.loss_vocab:,}] "
        f"({mib(args.loss_tokens * args.loss_vocab * 4)} themselves, not counted below). "
        "Memory counts what the loss needs from the teacher (built inside the measured "
        f"region: k = {args.top_k} ids and log-probs for the sparse forms, a dense [N, V] "
        "log-prob tensor for the exact one; their construction is not timed) plus the loss's "
        "temporaries and the gradient. `sparse-chunked` starts from hidden states and the LM "
        f"head instead of logits (hidden {args.hidden}, 128 rows at a time; its time includes "
        "the head matmuls forward and again in backward, and its memory the head's weight "
        "gradient).",
        "",
        f"| variant | {basis} (fwd + bwd) | peak memory |",
        "|---|---|---|",
    ]
    for v in LOSS_VARIANTS:
        lines.append(f"| {v} | {c[v] * 1000:,.0f} ms | {mib(loss_m[v])} |")
    lines += ["", f"exact / sparse: time {c['exact'] / c['sparse']:.2f}x, memory "
                  f"{loss_m['exact'] / loss_m['sparse']:.2f}x.", ""]
    return lines


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--loss-vocab", type=int, default=151936)
    p.add_argument("--loss-tokens", type=int, default=512)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: CPU time is then a steady cost measure)")
    p.add_argument("--parts", default="A,B", help="which parts to run: A (step), B (loss)")
    p.add_argument("--write", type=Path, default=None, help="also write the report here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    raw = list(sys.argv[1:] if argv is None else argv)
    drop = {"--write", "--child"}
    args.passthrough = []
    skip = False
    for tok in raw:
        if skip:
            skip = False
            continue
        if tok in drop:
            skip = True
            continue
        args.passthrough.append(tok)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps({"peak_bytes": child_memory(args.child, args)}))
        return 0
    device = torch.device(args.device)
    parts = set(args.parts.upper().split(","))
    step = loss = None
    if "A" in parts:
        step = (time_interleaved(STEP_VARIANTS, args, device, args.rounds),
                memory_in_children(STEP_VARIANTS, args))
    if "B" in parts:
        loss = (time_interleaved(LOSS_VARIANTS, args, device, max(3, args.rounds // 2)),
                memory_in_children(LOSS_VARIANTS, args))
    text = report(args, step, loss)
    print(text)
    if args.write:
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
