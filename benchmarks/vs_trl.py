"""Side by side with TRL: the same student, data and teacher distribution through TRL's GKD
trainer, through aligndistil, and through the exact full-vocabulary loop, in one run.

The teacher both systems distil towards is pi* (eq. 17, the adaptive alpha of DESIGN.md):

- **TRL** gets pi* as its teacher model: :class:`ZStarTeacher` runs the dpo and reverse models
  and returns ``log pi*`` as its logits (softmax of them is pi*). ``GKDTrainer`` with
  ``beta = 1`` (its reverse KL, KL(student || teacher)), ``temperature = 1``, and ``lmbda = 0``
  (off-policy: the dataset's responses) or ``lmbda = 1`` (on-policy: the student samples each
  batch's responses in the trainer process). TRL pays both teachers' forwards every step.
- **aligndistil** off-policy: ``precompute`` once (top-k = 64 sparse targets in a store), then
  ``train --mode off-policy`` streams the store. On-policy: ``serve`` (the teachers in their own
  process) and ``train --mode on-policy``.
- **exact**: the loop of the released AlignDistil code's kind, in one process: student, dpo and
  reverse logits of ``[B, T, V]`` every step, the dense pi*, the full-vocabulary reverse KL
  weighted by ``beta_t = beta0 / alpha_t`` (on-policy: the student samples first).

What TRL cannot express: AlignDistil's per-token weight ``beta_t = beta0 / alpha_t`` and its
per-sequence mean (``(1/T) sum_t``, then the mean over sequences). GKD's loss is the plain
token mean of KL(student || teacher) over the batch. A teacher cannot carry a weight (it only
shapes the distribution), so TRL here minimises a differently weighted sum of the same per-token
KLs towards the same pi*. The comparison is therefore of cost (time, memory, tokens/s), not of
what is learned; what is learned at the same weighting is benchmarks/results/fidelity.md's
subject. The per-token KL itself is the same: the benchmark checks on one batch that TRL's
``generalized_jsd_loss`` equals the token mean of aligndistil's ``exact_reverse_kl`` towards
the wrapper's pi* (``kl_check`` in the results).

Every system gets the same pre-tokenised sequences (one JSONL of ``{input_ids, prompt_len}``
written here, read by ``precompute``, the TRL collator and the exact loop alike), the same
batch of sequences per optimizer step, learning rate, AdamW without weight decay, float32 on
CPU, and for on-policy the same prompts, ``max_new_tokens`` and plain sampling (temperature 1,
no top-k/top-p).

Timing: each system in its own fresh process, one after another (never two at once); per
optimizer step, wall time from the end of one step to the end of the next (data loading,
generation and teacher scoring included; aligndistil's ``step_s + data_wait_s`` from its
metrics), the median over the steps after the first. Peak memory: the process's peak resident
set (``ru_maxrss`` from ``wait4``; the teacher server's VmHWM beside it). Precompute: the wall
time of the whole ``precompute`` command, models' loading included; the payback is the epoch
count after which ``precompute + E * aligndistil_epoch < E * trl_epoch``.

Usage::

    .venv/bin/pip install -e '.[bench]'       # TRL, an optional benchmark dependency
    # the grammar world (built, or reused, in --grammar-workdir by the demo's stages):
    .venv/bin/python benchmarks/vs_trl.py --grammar-workdir work/vs_trl/grammar \\
        --out benchmarks/results/vs_trl
    # SmolLM2-135M (README: "SmolLM2-135M offline example" makes the folders):
    .venv/bin/python benchmarks/vs_trl.py --name smollm2 --student work/smollm2/dpo \\
        --dpo work/smollm2/dpo --reverse work/smollm2/reverse \\
        --data work/sharegpt/chat.jsonl --limit 16 --batch 4 --max-seq-len 256 \\
        --max-new-tokens 32 --on-steps 3 --lr 1e-5 --out benchmarks/results/vs_trl

Each call adds (or replaces) its world's entry in ``OUT/vs_trl.json`` and rewrites
``OUT/vs_trl.md`` from all entries.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.machine_info import machine  # noqa: E402
from teacher_service.targets import TargetConfig, default_r, teacher_logprobs  # noqa: E402

ROWS = ("trl", "aligndistil", "exact", "trl-defaults")


# ------------------------------------------------------------------------- the TRL teacher
class ZStarTeacher(torch.nn.Module):
    """AlignDistil's teacher pi* as one model for trainers that take a teacher model: its
    forward runs the dpo and reverse decoders, applies each LM head in float32 to their hidden
    states (as the engine does: DESIGN.md's precision rule) and returns ``log pi*`` (float32,
    normalised over the model's vocabulary rows) as ``logits``, so any softmax of them is pi*."""

    def __init__(self, dpo: torch.nn.Module, reverse: torch.nn.Module, target: TargetConfig):
        from causal_lm.head import Float32Head

        super().__init__()
        self.dpo, self.reverse, self.target = dpo, reverse, target
        self.config = dpo.config  # what trainers read (vocab_size) from a teacher
        rows = dpo.get_output_embeddings().weight.shape[0]  # as wide as the student's logits
        self.heads = (Float32Head(dpo, rows), Float32Head(reverse, rows))

    @classmethod
    def from_folders(cls, dpo: str, reverse: str, target: TargetConfig) -> "ZStarTeacher":
        from causal_lm.loading import load_causal_lm

        cpu = torch.device("cpu")
        return cls(load_causal_lm(dpo, device=cpu), load_causal_lm(reverse, device=cpu), target)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **_: object):
        from transformers.modeling_outputs import CausalLMOutput

        hidden = [m.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                  use_cache=False).last_hidden_state
                  for m in (self.dpo, self.reverse)]
        b, t, _ = hidden[0].shape
        z_dpo, z_rev = (head(h.reshape(b * t, -1)) for head, h in zip(self.heads, hidden))
        log_star, _ = teacher_logprobs(z_dpo, z_rev, self.target)
        return CausalLMOutput(logits=log_star.reshape(b, t, -1))


# ------------------------------------------------------------------------------- batches
def pad_batch(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``attention_mask``, ``labels`` with the prompt and padding
    at -100, and the left-padded prompts (``prompts``, ``prompt_attention_mask``) that
    generation needs — from rows of ``{input_ids, prompt_len}``."""
    width = max(len(r["input_ids"]) for r in rows)
    p_width = max(r["prompt_len"] for r in rows)
    n = len(rows)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), -100, dtype=torch.long)
    prompts = torch.full((n, p_width), pad_id, dtype=torch.long)
    p_mask = torch.zeros((n, p_width), dtype=torch.long)
    for i, r in enumerate(rows):
        seq, p = r["input_ids"], r["prompt_len"]
        ids[i, :len(seq)] = torch.tensor(seq)
        mask[i, :len(seq)] = 1
        labels[i, p:len(seq)] = torch.tensor(seq[p:], dtype=torch.long)
        prompts[i, p_width - p:] = torch.tensor(seq[:p])
        p_mask[i, p_width - p:] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "prompts": prompts,
            "prompt_attention_mask": p_mask}


def response_mask(labels: torch.Tensor) -> torch.Tensor:
    """``[B, T-1]``: logits position t predicts token t+1, a response token iff its label is
    not -100."""
    return (labels[:, 1:] != -100)


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def target_config(spec: dict, on_policy: bool) -> TargetConfig:
    return TargetConfig(top_k=1, r=default_r("half-l1", "on" if on_policy else "off"),
                        beta0=spec["beta0"])


# -------------------------------------------------------------------------------- workers
def trl_worker(spec: dict, on_policy: bool, trl_defaults: bool = False) -> dict:
    """TRL's GKDTrainer towards :class:`ZStarTeacher` for ``spec['steps']`` optimizer steps:
    in float32 without gradient checkpointing, as the other systems run here; with
    ``trl_defaults``, with GKDConfig's own defaults for those (bf16 autocast, gradient
    checkpointing, fused AdamW)."""
    import datasets
    import trl
    from transformers import AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from causal_lm.loading import load_causal_lm

    torch.manual_seed(spec["seed"])
    tok = AutoTokenizer.from_pretrained(spec["student"])
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    student = load_causal_lm(spec["student"], device=torch.device("cpu"), train=True)
    teacher = ZStarTeacher.from_folders(spec["dpo"], spec["reverse"],
                                        target_config(spec, on_policy))
    # On-policy too, the rows carry the dataset's responses, as TRL's own collator's do: GKD
    # replaces them by the student's samples, but the Trainer counts the batch's label tokens
    # (``num_items_in_batch``, the loss's divisor) before that; prompt-only rows make it 0.
    rows = read_jsonl(spec["data"])

    class Clock(TrainerCallback):
        def __init__(self):
            self.marks: list[float] = []

        def on_train_begin(self, args, state, control, **kw):
            self.marks.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            self.marks.append(time.perf_counter())

    class CountingGKD(GKDTrainer):
        """GKDTrainer unchanged; it only counts the response tokens each step trains on."""
        tokens: list[int] = []

        def compute_loss(self, model, inputs, *a, **kw):
            self.tokens.append(int(response_mask(inputs["labels"]).sum()))
            return super().compute_loss(model, inputs, *a, **kw)

    args = GKDConfig(
        output_dir=spec["scratch"], per_device_train_batch_size=spec["batch"],
        gradient_accumulation_steps=1, max_steps=spec["steps"], learning_rate=spec["lr"],
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        **({} if trl_defaults else {"optim": "adamw_torch", "bf16": False,
                                    "gradient_checkpointing": False}),
        lmbda=1.0 if on_policy else 0.0, beta=1.0, temperature=1.0,
        max_new_tokens=spec["max_new_tokens"], max_length=None, logging_steps=1,
        report_to="none", save_strategy="no", use_cpu=True, seed=spec["seed"],
        dataloader_num_workers=0, disable_tqdm=True, dataloader_drop_last=True)
    clock = Clock()
    trainer = CountingGKD(model=student, teacher_model=teacher, args=args,
                          train_dataset=datasets.Dataset.from_list(rows),
                          data_collator=lambda batch: pad_batch(batch, pad_id),
                          processing_class=tok, callbacks=[clock])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    result = {"versions": {"trl": trl.__version__, "datasets": datasets.__version__},
              "step_s": [b - a for a, b in zip(clock.marks, clock.marks[1:])],
              "response_tokens": CountingGKD.tokens, "losses": losses,
              "torch_threads": torch.get_num_threads()}
    if not on_policy:
        result["kl_check"] = kl_check(rows[:spec["batch"]], teacher, spec, pad_id)
    return result


def kl_check(rows: list[dict], teacher: ZStarTeacher, spec: dict, pad_id: int) -> dict:
    """On one batch and the untrained student: TRL's GKD loss (beta = 1) against the token
    mean of aligndistil's ``exact_reverse_kl`` towards the same pi* — the same quantity."""
    from trl.experimental.gkd import GKDTrainer

    from causal_lm.loading import load_causal_lm
    from student_trainer.losses import exact_reverse_kl

    student = load_causal_lm(spec["student"], device=torch.device("cpu"))
    batch = pad_batch(rows, pad_id)
    with torch.no_grad():
        z_s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        log_star = teacher(batch["input_ids"], batch["attention_mask"]).logits
        mask = response_mask(batch["labels"])
        trl_loss = GKDTrainer.generalized_jsd_loss(z_s[:, :-1], log_star[:, :-1],
                                                   labels=batch["labels"][:, 1:], beta=1.0)
        ours = exact_reverse_kl(z_s[:, :-1], log_star[:, :-1])[mask].mean()
    return {"trl_gkd_loss": float(trl_loss), "aligndistil_exact_kl_token_mean": float(ours),
            "abs_diff": abs(float(trl_loss) - float(ours))}


def exact_worker(spec: dict, on_policy: bool) -> dict:
    """The released code's kind of loop: three ``[B, T, V]`` logits every step."""
    from transformers import AutoTokenizer

    from causal_lm.loading import load_causal_lm
    from student_trainer.losses import aligndistil_loss, exact_reverse_kl
    from student_trainer.rollout.hf_generate import RolloutConfig, generate_responses

    torch.manual_seed(spec["seed"])
    tok = AutoTokenizer.from_pretrained(spec["student"])
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    cpu = torch.device("cpu")
    student = load_causal_lm(spec["student"], device=cpu, train=True)
    dpo, reverse = (load_causal_lm(spec[k], device=cpu) for k in ("dpo", "reverse"))
    config = target_config(spec, on_policy)
    opt = torch.optim.AdamW(student.parameters(), lr=spec["lr"], weight_decay=0.0)
    rows = read_jsonl(spec["data"])  # on-policy: only their prompts are used
    gen = torch.Generator().manual_seed(spec["seed"])
    order = torch.randperm(len(rows), generator=gen).tolist()
    b = spec["batch"]
    marks, tokens, losses = [time.perf_counter()], [], []
    for step in range(spec["steps"]):
        start = (step * b) % max(len(rows) - b + 1, 1)
        chunk = [rows[i] for i in order[start:start + b]]
        if on_policy:
            sampled = generate_responses(
                student, [r["input_ids"][:r["prompt_len"]] for r in chunk], pad_token_id=pad_id,
                eos_token_id=student.generation_config.eos_token_id or tok.eos_token_id,
                config=RolloutConfig(max_new_tokens=spec["max_new_tokens"], batch_size=b),
                seed=spec["seed"] + step)
            chunk = [{"input_ids": ids, "prompt_len": p} for ids, p in sampled
                     if len(ids) > p]
        batch = pad_batch(chunk, pad_id)
        ids, attn = batch["input_ids"], batch["attention_mask"]
        with torch.no_grad():
            z_d = dpo(input_ids=ids, attention_mask=attn).logits[:, :-1]
            z_r = reverse(input_ids=ids, attention_mask=attn).logits[:, :-1]
        z_s = student(input_ids=ids, attention_mask=attn).logits[:, :-1]
        n, t, v = z_s.shape
        log_star, alpha = teacher_logprobs(z_d.reshape(n * t, v).float(),
                                           z_r.reshape(n * t, v).float(), config)
        kl = exact_reverse_kl(z_s, log_star.reshape(n, t, v))
        mask = response_mask(batch["labels"])
        loss = aligndistil_loss(kl, alpha.reshape(n, t), mask, beta0=spec["beta0"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        marks.append(time.perf_counter())
        tokens.append(int(mask.sum()))
        losses.append(float(loss))
    return {"step_s": [b2 - a for a, b2 in zip(marks, marks[1:])], "response_tokens": tokens,
            "losses": losses, "torch_threads": torch.get_num_threads()}


WORKERS = {"trl-off": lambda s: trl_worker(s, False), "trl-on": lambda s: trl_worker(s, True),
           "trl-defaults-off": lambda s: trl_worker(s, False, trl_defaults=True),
           "exact-off": lambda s: exact_worker(s, False),
           "exact-on": lambda s: exact_worker(s, True)}


# ------------------------------------------------------------------------ measured processes
def run_measured(argv: list[str], log: Path, env: dict | None = None) -> dict:
    """Run a command to its end; its wall seconds and peak resident set (MiB, ``wait4``)."""
    started = time.perf_counter()
    with open(log, "w", encoding="utf-8") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO,
                                env=env or _env())
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    rc = os.waitstatus_to_exitcode(status)
    proc.returncode = rc
    if rc != 0:
        tail = "".join(log.read_text(encoding="utf-8", errors="replace")
                       .splitlines(keepends=True)[-30:])
        raise RuntimeError(f"{shlex.join(argv)} failed with {rc}; last lines of {log}:\n{tail}")
    return {"wall_s": seconds, "peak_rss_mib": usage.ru_maxrss / 1024}


def _env() -> dict:
    return {**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "aligndistil.cli", *map(str, args)]


def run_worker(kind: str, spec: dict, work: Path) -> dict:
    spec = {**spec, "scratch": str(work / f"scratch-{kind}"), "result": str(work / f"{kind}.json")}
    spec_file = work / f"{kind}.spec.json"
    spec_file.write_text(json.dumps(spec, indent=1), encoding="utf-8")
    print(f"[{kind}]", flush=True)
    proc = run_measured([sys.executable, str(Path(__file__).resolve()), "--worker", kind,
                         "--spec", str(spec_file)], work / f"{kind}.log")
    result = json.loads(Path(spec["result"]).read_text(encoding="utf-8"))
    return {**result, **proc}


def trainer_metrics(run_dir: Path) -> dict:
    """aligndistil's own per-step numbers: wall per step = compute + waiting for data."""
    rows = read_jsonl(run_dir / "metrics.jsonl")
    return {"step_s": [r["step_s"] + r["data_wait_s"] for r in rows],
            "response_tokens": [int(r["response_tokens"]) for r in rows],
            "losses": [r["loss"] for r in rows]}


def precompute_scoring_seconds(log: Path) -> float | None:
    """The seconds ``precompute`` reports for its scoring loop (its summary line), without the
    interpreter's start-up and the models' loading."""
    import re

    found = re.search(r"tokens in ([0-9.]+) s", log.read_text(encoding="utf-8"))
    return float(found.group(1)) if found else None


def peak_rss_of(pid: int) -> float:
    """VmHWM of a live process, MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return math.nan


# ------------------------------------------------------------------------------ the runs
def prepare_data(args, work: Path) -> tuple[Path, Path, int]:
    """The pre-tokenised sequences and prompts every system reads. Returns their paths and the
    vocabulary size."""
    from transformers import AutoTokenizer

    from storage.datasets import read_examples
    from storage.tokenization import TokenizationError, tokenize_example

    tok = AutoTokenizer.from_pretrained(args.student)
    rows, skipped = [], 0
    for example in read_examples(args.data, response_field=args.response_field):
        try:
            ids, p = tokenize_example(tok, example, args.max_seq_len,
                                      truncation="response-keep-eos")
        except TokenizationError:  # a prompt longer than --max-seq-len
            skipped += 1
            continue
        if args.max_new_tokens and args.max_seq_len and \
                p + args.max_new_tokens > args.max_seq_len:
            skipped += 1  # no room to sample a whole on-policy response
            continue
        rows.append({"input_ids": list(map(int, ids)), "prompt_len": int(p)})
        if args.limit and len(rows) >= args.limit:
            break
    if len(rows) < args.batch:
        raise SystemExit(f"--data {args.data}: {len(rows)} usable rows, fewer than --batch "
                         f"{args.batch}")
    data, prompts = work / "data.jsonl", work / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    prompts.write_text("".join(json.dumps({"input_ids": r["input_ids"][:r["prompt_len"]],
                                           "prompt_len": r["prompt_len"]}) + "\n"
                               for r in rows), encoding="utf-8")
    if skipped:
        print(f"{skipped} rows of {args.data} skipped: prompt too long for --max-seq-len "
              f"{args.max_seq_len}", flush=True)
    return data, prompts, len(rows)


def summarise(raw: dict, steps_per_epoch: int) -> dict:
    """Median step time after the first step, tokens/s, time per epoch."""
    steps = raw["step_s"][1:] or raw["step_s"]
    toks = raw["response_tokens"][1:] or raw["response_tokens"]
    median = statistics.median(steps)
    out = {"steps": len(raw["step_s"]), "step_s_median": median,
           "step_s_first": raw["step_s"][0],
           "response_tokens_per_s": sum(toks) / sum(steps),
           "epoch_s": median * steps_per_epoch,
           "peak_rss_mib": raw.get("peak_rss_mib"), "wall_s": raw.get("wall_s")}
    return {k: v for k, v in out.items() if v is not None}


def run_world(args) -> dict:
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    data, prompts, n_rows = prepare_data(args, work)
    steps_per_epoch = n_rows // args.batch
    off_steps = args.off_steps or steps_per_epoch
    spec = {"student": args.student, "dpo": args.dpo, "reverse": args.reverse,
            "data": str(data), "prompts": str(prompts), "batch": args.batch, "lr": args.lr,
            "seed": args.seed, "beta0": args.beta0, "max_new_tokens": args.max_new_tokens}
    common = ["--model", args.student, "--lr", args.lr, "--global-batch-size", args.batch,
              "--weight-decay", 0, "--lr-schedule", "constant", "--warmup-ratio", 0,
              "--seed", args.seed, "--save-every", 0, "--no-progress", "--report-to", "none",
              "--overwrite", "--device", "cpu"]
    commands: list[str] = []
    off: dict[str, dict] = {}
    on: dict[str, dict] = {}

    # off-policy
    off["trl"] = run_worker("trl-off", {**spec, "steps": off_steps}, work)
    argv = cli("precompute", "--dpo-model", args.dpo, "--reverse-model", args.reverse,
               "--data", data, "--out", work / "store", "--top-k", args.top_k, "--device", "cpu",
               "--no-progress", "--overwrite")
    commands.append(shlex.join(argv[2:]))
    print("[aligndistil precompute]", flush=True)
    precompute = run_measured(argv, work / "precompute.log")
    precompute["scoring_s"] = precompute_scoring_seconds(work / "precompute.log")
    argv = cli("train", "--mode", "off-policy", "--store", work / "store",
               "--out", work / "ad-off", "--max-steps", off_steps, *common)
    commands.append(shlex.join(argv[2:]))
    print("[aligndistil train off-policy]", flush=True)
    proc = run_measured(argv, work / "ad-off.log")
    off["aligndistil"] = {**trainer_metrics(work / "ad-off"), **proc}
    off["exact"] = run_worker("exact-off", {**spec, "steps": off_steps}, work)
    if args.trl_defaults:
        off["trl-defaults"] = run_worker("trl-defaults-off", {**spec, "steps": off_steps}, work)

    # on-policy
    on["trl"] = run_worker("trl-on", {**spec, "steps": args.on_steps}, work)
    from aligndistil.demo import Runner

    runner = Runner(work)
    server_args = ["serve", "--dpo-model", args.dpo, "--reverse-model", args.reverse,
                   "--top-k", args.top_k, "--device", "cpu"]
    server = runner.server(server_args, name="serve")
    with server as url:
        argv = cli("train", "--mode", "on-policy", "--teacher-url", url, "--prompts", prompts,
                   "--out", work / "ad-on", "--max-steps", args.on_steps,
                   "--max-new-tokens", args.max_new_tokens, "--rollout-batch-size", args.batch,
                   "--rollout-backend", args.rollout_backend,
                   "--max-staleness", args.max_staleness, *common)
        commands.append(shlex.join(["serve", *map(str, server_args[1:])]) + " &")
        commands.append(shlex.join(argv[2:]))
        print("[aligndistil train on-policy]", flush=True)
        proc = run_measured(argv, work / "ad-on.log")
        server_rss = peak_rss_of(server.proc.pid)
    on["aligndistil"] = {**trainer_metrics(work / "ad-on"), **proc,
                         "server_peak_rss_mib": server_rss}
    on["exact"] = run_worker("exact-on", {**spec, "steps": args.on_steps}, work)

    result = {
        "name": args.name, "rows": n_rows, "batch": args.batch,
        "steps_per_epoch": steps_per_epoch, "off_steps": off_steps, "on_steps": args.on_steps,
        "top_k": args.top_k, "max_new_tokens": args.max_new_tokens, "lr": args.lr,
        "max_seq_len": args.max_seq_len, "vocab": vocab_of(args.student),
        "rollout_backend": args.rollout_backend, "max_staleness": args.max_staleness,
        "params": params_of(args.student),
        "precompute": precompute,
        "off_policy": {k: summarise(v, steps_per_epoch) for k, v in off.items()},
        "on_policy": {k: summarise(v, steps_per_epoch) for k, v in on.items()},
        "kl_check": off["trl"].get("kl_check"),
        "versions": {**off["trl"].get("versions", {}), "torch": torch.__version__,
                     "transformers": _version("transformers")},
        "commands": commands,
        "raw": {"off_policy": off, "on_policy": on},
        "machine": machine(torch.get_num_threads()),
        "date": dt.date.today().isoformat(),
    }
    on_ad = result["on_policy"]["aligndistil"]
    on_ad["server_peak_rss_mib"] = server_rss
    result["payback"] = payback(result)
    return result


def payback(result: dict) -> dict:
    """Epochs after which the precompute has paid for itself against TRL's teacher-in-the-loop
    epochs: ``precompute / (trl_epoch - aligndistil_epoch)``."""
    trl_epoch = result["off_policy"]["trl"]["epoch_s"]
    ad_epoch = result["off_policy"]["aligndistil"]["epoch_s"]
    saving = trl_epoch - ad_epoch
    pre = result["precompute"]["wall_s"]
    return {"precompute_s": pre, "trl_epoch_s": trl_epoch, "aligndistil_epoch_s": ad_epoch,
            "epochs": pre / saving if saving > 0 else math.inf}


def vocab_of(folder: str) -> int:
    return json.loads((Path(folder) / "config.json").read_text())["vocab_size"]


def params_of(folder: str) -> int:
    from safetensors import safe_open

    total = 0
    for f in Path(folder).glob("*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            for key in fh.keys():
                total += math.prod(fh.get_slice(key).get_shape())
    return total


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


# ------------------------------------------------------------------------------- report
def format_report(results: dict) -> str:
    lines = ["# aligndistil vs TRL (GKD towards the same pi*) vs the exact loop", "",
             "Written by `benchmarks/vs_trl.py` (its docstring gives the method). One process per "
             "system, run one after another on the same machine; step time = median wall seconds "
             "per optimizer step after the first step.", "",
             "- **trl**: `trl.experimental.gkd.GKDTrainer` (beta = 1: KL(student || teacher); "
             "lmbda = 0 off-policy, 1 on-policy; temperature 1), its teacher model a wrapper whose "
             "logits are log pi* computed from the dpo and reverse models every step; float32, no "
             "gradient checkpointing, AdamW: configured as the other two run.",
             "- **trl-defaults**: the same with GKDConfig's own defaults for those (bf16 autocast, "
             "gradient checkpointing, fused AdamW): what a user who changes nothing gets on a CPU.",
             "- **aligndistil**: `precompute` once, then `train --mode off-policy` from the store "
             "(top-k sparse targets, uniform tail); on-policy, `serve` + `train --mode on-policy`.",
             "- **exact**: the released code's kind of loop in one process: student, dpo and "
             "reverse logits of [B, T, V] every step, dense pi*, full-vocabulary reverse KL.",
             "",
             "What TRL cannot express: AlignDistil's per-token weight beta_t = beta0 / alpha_t and "
             "its per-sequence mean. GKD's loss is the plain token mean of the KL, and a teacher "
             "model can only shape the distribution, not weight a token. So TRL minimises a "
             "differently weighted sum of the same per-token KLs towards the same pi* (the check "
             "below shows the per-token KL is the same). The tables compare cost, not what is "
             "learned; what is learned is the subject of [fidelity.md](fidelity.md).", "",
             "Noticed in TRL 1.16 along the way (not changed here): GKDConfig turns on bf16 "
             "autocast and gradient checkpointing by default, also on a CPU (the trl-defaults "
             "row); and on-policy, the Trainer counts the loss's divisor (num_items_in_batch) "
             "from the dataset's labels before GKD replaces them by the student's samples, so "
             "the loss is divided by the dataset responses' token count, not the sampled ones' "
             "(prompt-only rows make it 0/0: NaN gradients). The benchmark gives TRL the "
             "dataset's responses, as TRL's own collator does.", ""]
    for name, r in results.items():
        m = r["machine"]
        lines += [f"## {name}", "",
                  f"{r['params'] / 1e6:.1f}M parameters per model, V = {r['vocab']:,}; "
                  f"{r['rows']} sequences, {r['batch']} per optimizer step "
                  f"({r['steps_per_epoch']} steps per epoch); aligndistil top-k = {r['top_k']}; "
                  f"on-policy {r['max_new_tokens']} new tokens at most; aligndistil samples "
                  f"with {r.get('rollout_backend', 'hf')} rollouts"
                  f"{', --max-staleness ' + str(r['max_staleness']) if r.get('max_staleness') else ''}"
                  f" (TRL with HF generate). "
                  f"Machine: {m['cpu']}, {m['cpus']} cores, torch {r['versions']['torch']}, "
                  f"transformers {r['versions']['transformers']}, "
                  f"TRL {r['versions'].get('trl', '?')}; {r['date']}.", ""]
        lines += _table("Off-policy", r["off_policy"], r["off_policy"]["trl"])
        p = r["payback"]
        scoring = r["precompute"].get("scoring_s")
        lines += [f"One-time precompute (whole command, models loaded): **{p['precompute_s']:.1f} s**"
                  + (f" (its scoring loop: {scoring:.1f} s)" if scoring else "") + ". "
                  f"Epoch: TRL {p['trl_epoch_s']:.1f} s, aligndistil {p['aligndistil_epoch_s']:.1f} s: "
                  f"the precompute pays back after **{p['epochs']:.2f} epochs**.", ""]
        lines += _table("On-policy", r["on_policy"], r["on_policy"]["trl"])
        srv = r["on_policy"]["aligndistil"].get("server_peak_rss_mib")
        if srv is not None:
            lines += [f"aligndistil on-policy: the trainer's peak RSS is in the table; the teacher "
                      f"server's own is {srv:.0f} MiB (a separate process, on a GPU its own "
                      "device).", ""]
        kc = r.get("kl_check")
        if kc:
            lines += [f"Same per-token KL: on one batch, TRL's GKD loss = {kc['trl_gkd_loss']:.6f}, "
                      f"aligndistil's exact reverse KL (token mean) = "
                      f"{kc['aligndistil_exact_kl_token_mean']:.6f} (|diff| {kc['abs_diff']:.1e}).",
                      ""]
        lines += ["Commands (aligndistil rows):", "", "```"]
        lines += [f"aligndistil {c}" for c in r["commands"]]
        lines += ["```", ""]
    return "\n".join(lines)


def _table(title: str, rows: dict, base: dict) -> list[str]:
    out = [f"### {title}", "",
           "| system | s / step | speed-up vs TRL | response tokens / s | peak RSS (MiB) | "
           "vs TRL | steps |",
           "|---|---|---|---|---|---|---|"]
    for name in ROWS:
        if name not in rows:
            continue
        r = rows[name]
        out.append(f"| {name} | {r['step_s_median']:.3f} | "
                   f"{base['step_s_median'] / r['step_s_median']:.2f}x | "
                   f"{r['response_tokens_per_s']:.0f} | {r['peak_rss_mib']:.0f} | "
                   f"{r['peak_rss_mib'] / base['peak_rss_mib']:.2f}x | {r['steps']} |")
    return out + [""]


# --------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--grammar-workdir",
                   help="build (or reuse) the grammar world here: student = its SFT model, "
                        "teachers = its dpo/reverse models, data = its preference pairs' chosen "
                        "responses")
    p.add_argument("--name", help="the world's name in the results (default: grammar or the "
                                  "student folder's name)")
    p.add_argument("--student")
    p.add_argument("--dpo")
    p.add_argument("--reverse")
    p.add_argument("--data")
    p.add_argument("--response-field", default=None,
                   help="for preference rows: chosen or rejected")
    p.add_argument("--limit", type=int, default=0, help="only the first N rows (0: all)")
    p.add_argument("--batch", type=int, default=32, help="sequences per optimizer step")
    p.add_argument("--off-steps", type=int, default=0, help="off-policy steps (0: one epoch)")
    p.add_argument("--on-steps", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--max-seq-len", type=int, default=None)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--beta0", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trl-defaults", action="store_true",
                   help="one more off-policy row: TRL with GKDConfig's own defaults (bf16 "
                        "autocast, gradient checkpointing, fused AdamW)")
    p.add_argument("--rollout-backend", choices=["hf", "vllm"], default="hf",
                   help="aligndistil on-policy: its sampler (vllm: run this script in an "
                        "environment with the vllm extra)")
    p.add_argument("--max-staleness", type=int, default=0,
                   help="aligndistil on-policy: train --max-staleness")
    p.add_argument("--workdir", help="scratch folder (default: work/vs_trl/NAME)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "vs_trl"))
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        spec = json.loads(Path(args.spec).read_text(encoding="utf-8"))
        result = WORKERS[args.worker](spec)
        Path(spec["result"]).write_text(json.dumps(result), encoding="utf-8")
        return 0
    try:
        import trl  # noqa: F401
    except ImportError:
        raise SystemExit("vs_trl needs TRL: pip install -e '.[bench]'") from None
    if args.grammar_workdir:
        w = Path(args.grammar_workdir).resolve()
        from aligndistil.demo import GRAMMAR_SIZES, Runner, build_teachers

        build_teachers(Runner(w), w, GRAMMAR_SIZES["small"], seed=args.seed, world="grammar",
                       device="cpu")
        args.student, args.dpo, args.reverse = (str(w / n) for n in ("sft", "dpo", "reverse"))
        args.data = args.data or str(w / "pairs.jsonl")
        args.response_field = args.response_field or "chosen"
        args.name = args.name or "grammar"
    missing = [f"--{k}" for k in ("student", "dpo", "reverse", "data") if not getattr(args, k)]
    if missing:
        raise SystemExit(f"give --grammar-workdir, or all of {', '.join(missing)}")
    args.name = args.name or Path(args.student).name
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.workdir = args.workdir or str(Path("work") / "vs_trl" / args.name)
    result = run_world(args)
    results_file = out / "vs_trl.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    results[args.name] = result
    results_file.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    report = format_report(results)
    (out / "vs_trl.md").write_text(report, encoding="utf-8")
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
