"""AlignDistil student training: the loop (off-policy from a store, on-policy through the
teacher server) and the one step function both share.

Read top to bottom: :class:`TrainConfig` (plain data), :func:`train_step` (one optimizer step
over token-budgeted micro-batches), :func:`run_train` (set-up, the loop, checkpoints, the end).
The components it assembles live in their own modules: ``losses`` (the math), ``data``
(records -> tensors), ``batches`` (which records each step gets), ``modeling`` (the student's
forward), ``optim``, ``checkpoint``, ``metrics``, ``client``, ``rollout``.

Batch semantics follow the paper: an optimizer step consumes ``global_batch_size`` sequences
(128), split evenly over the ranks and, within a rank, into micro-batches of at most
``max_tokens`` padded tokens (gradient accumulation). The loss of a step is the mean over its
sequences of ``(1/T) sum_t beta_t KL_t``, exactly, however it is split: each micro-batch's
mean is weighted by its share of the rank's sequences, and DDP averages equal-sized ranks.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from student_trainer import losses
from student_trainer.batches import BatchSource
from student_trainer.checkpoint import (
    CheckpointError, capture_rng_state, checkpoint_name, latest_checkpoint, load_state,
    prune_checkpoints, restore_rng_state, save_checkpoint)
from student_trainer.data import Batch, micro_batches
from student_trainer.errors import ConfigError
from student_trainer.distributed import (
    DistEnv, all_reduce_sum, barrier, gather_objects, init_distributed, shutdown)
from student_trainer.metrics import JSONL_NAME, PNG_NAME, MetricsLogger, plot_curves
from student_trainer.modeling import StudentForward, load_student, pad_token_id, resolve_device
from student_trainer.optim import build_optimizer, build_scheduler, clip_grad_norm, warmup_steps_for

log = logging.getLogger(__name__)

MODES = ("off-policy", "on-policy")


@dataclass
class TrainConfig:
    mode: str
    model: str
    out: str
    # data: off-policy
    store: str | None = None
    # data: on-policy
    teacher_url: str | None = None
    prompts: str | None = None
    api_key: str | None = None
    top_k: int | None = None
    max_new_tokens: int = 256
    rollout_batch_size: int = 32
    rollout_backend: str = "hf"
    async_rollouts: bool = False
    max_seq_len: int | None = None
    request_timeout: float = 300.0
    max_retries: int = 6
    # the loss
    tail: str = "uniform"
    beta0: float = 0.1
    weighting: str = "alpha"
    loss_chunk_size: int | None = None
    # optimisation (defaults: the paper's)
    lr: float = 1e-6
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.95)
    warmup_ratio: float = 0.1
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    global_batch_size: int = 128
    max_tokens: int = 8192
    epochs: int = 1
    max_steps: int | None = None
    max_grad_norm: float | None = 1.0
    seed: int = 42
    # runtime
    device: str = "auto"
    bf16: bool | None = None            #: None: on for CUDA, off on CPU
    gradient_checkpointing: bool = False
    save_every: int = 100               #: steps; 0 = only at the end
    save_total_limit: int | None = 2
    resume: str | None = None           #: "latest" or a checkpoint folder
    progress: bool = True
    tensorboard: bool = True
    trust_remote_code: bool = False

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"--mode: expected one of {MODES}, got {self.mode!r}")
        if self.mode == "off-policy" and not self.store:
            raise ConfigError("--mode off-policy needs --store")
        if self.mode == "on-policy" and not (self.teacher_url and self.prompts):
            raise ConfigError("--mode on-policy needs --teacher-url and --prompts")
        if self.tail not in losses.TAILS:
            raise ConfigError(f"--tail: expected one of {losses.TAILS}, got {self.tail!r}")
        if self.weighting not in losses.WEIGHTINGS:
            raise ConfigError(f"--weighting: expected one of {losses.WEIGHTINGS}")
        if self.rollout_backend not in ("hf", "vllm"):
            raise ConfigError(f"--rollout-backend: expected 'hf' or 'vllm', got "
                             f"{self.rollout_backend!r}")
        for name in ("global_batch_size", "max_tokens", "epochs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError("--max-steps must be >= 1")


# ============================================================================ the step
@dataclass
class StepStats:
    """Sums over a step's response positions / sequences, reduced over ranks."""
    values: torch.Tensor = field(default_factory=lambda: torch.zeros(8, dtype=torch.float64))
    KEYS = ("loss_x_seqs", "kl", "beta", "alpha", "reward", "positions", "tokens", "sequences")

    def add(self, **kw: float) -> None:
        for key, v in kw.items():
            self.values[self.KEYS.index(key)] += float(v)

    def as_dict(self) -> dict[str, float]:
        v = dict(zip(self.KEYS, self.values.tolist()))
        positions, seqs = max(v["positions"], 1.0), max(v["sequences"], 1.0)
        return {"loss": v["loss_x_seqs"] / seqs, "kl": v["kl"] / positions,
                "beta_mean": v["beta"] / positions, "alpha_mean": v["alpha"] / positions,
                "reward_token_mean": v["reward"] / positions,
                "response_tokens": v["positions"], "tokens": v["tokens"],
                "sequences": v["sequences"]}


def train_step(module: torch.nn.Module, batches: list[Batch], *, optimizer, scheduler,
               params: list[torch.nn.Parameter], config: TrainConfig, rank_sequences: int,
               env: DistEnv, device: torch.device, amp: bool) -> dict[str, float]:
    """One optimizer step over ``batches`` (this rank's micro-batches of the step).

    ``module`` is the :class:`StudentForward`, DDP-wrapped when distributed: gradients are
    synchronised only on the last micro-batch's backward.
    """
    stats = StepStats()
    ddp = isinstance(module, torch.nn.parallel.DistributedDataParallel)
    for i, batch in enumerate(batches):
        batch = batch.to(device)
        last = i == len(batches) - 1
        sync = contextlib.nullcontext() if (last or not ddp) else module.no_sync()
        with sync:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                kl = module(batch.input_ids, batch.attention_mask, batch.row_idx, batch.col_idx,
                            topk_ids=batch.topk_ids, topk_logprobs=batch.topk_logprobs,
                            tail_logmass=batch.tail_logmass)
            loss = losses.aligndistil_loss(
                batch.unflatten(kl.float()), batch.unflatten(batch.alpha, 1.0),
                batch.response_mask, beta0=config.beta0, weighting=config.weighting)
            (loss * (batch.num_sequences / rank_sequences)).backward()
        with torch.no_grad():
            beta = losses.sequence_weights(batch.alpha, config.beta0, config.weighting)
            reward = losses.token_contrastive_reward(batch.dpo_logprobs, batch.reverse_logprobs,
                                                     config.beta0)
            stats.add(loss_x_seqs=float(loss) * batch.num_sequences, kl=kl.float().sum(),
                      beta=beta.sum(), alpha=batch.alpha.sum(), reward=reward.sum(),
                      positions=batch.num_response_tokens, tokens=batch.num_tokens,
                      sequences=batch.num_sequences)
    lr = optimizer.param_groups[0]["lr"]
    grad_norm = clip_grad_norm(params, config.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    stats.values = all_reduce_sum(env, stats.values)
    return {**stats.as_dict(), "lr": lr, "grad_norm": grad_norm,
            "micro_batches": len(batches)}


# ============================================================================ the run
def run_train(config: TrainConfig) -> dict[str, Any]:
    """Train the student; returns a summary (rank 0's view). See the module docstring."""
    from tqdm.auto import tqdm

    config.validate()
    device = resolve_device(config.device, local_rank=_local_rank())
    env = init_distributed(device.type)
    try:
        return _run(config, env, device, tqdm)
    finally:
        shutdown(env)


def _local_rank() -> int:
    import os

    return int(os.environ.get("LOCAL_RANK", "0"))


def _run(config: TrainConfig, env: DistEnv, device: torch.device, tqdm) -> dict[str, Any]:
    out = Path(config.out)
    resume_from = _resolve_resume(config, out)
    state = load_state(resume_from) if resume_from else None
    _seed_everything(config.seed + env.rank)

    model_path = resume_from or config.model
    model, tokenizer = load_student(model_path, device=device,
                                    trust_remote_code=config.trust_remote_code)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    pad_id = pad_token_id(tokenizer)
    source = _build_source(config, env, model, tokenizer, device)

    if config.global_batch_size % env.world_size:
        raise ConfigError(f"--global-batch-size {config.global_batch_size} is not divisible by "
                         f"the {env.world_size} ranks")
    per_rank = config.global_batch_size // env.world_size
    steps_per_epoch = source.steps_per_epoch(per_rank)
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    run_info = {"mode": config.mode, "global_batch_size": config.global_batch_size,
                "world_size": env.world_size, "seed": config.seed, "total_steps": total_steps,
                "steps_per_epoch": steps_per_epoch,
                "data": str(Path(config.store or config.prompts).resolve())}

    forward = StudentForward(model, len(tokenizer), tail=config.tail,
                             loss_chunk_size=config.loss_chunk_size)
    module: torch.nn.Module = forward
    if env.enabled:
        module = torch.nn.parallel.DistributedDataParallel(
            forward, device_ids=[device.index] if device.type == "cuda" else None)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, lr=config.lr, weight_decay=config.weight_decay,
                                betas=tuple(config.adam_betas))
    scheduler = build_scheduler(optimizer, warmup_steps=warmup_steps_for(total_steps,
                                                                         config.warmup_ratio),
                                total_steps=total_steps, schedule=config.schedule,
                                min_lr_ratio=config.min_lr_ratio)
    start_step = 0
    if state is not None:
        _check_resumable(state, run_info, resume_from)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        restore_rng_state(state["rng"][env.rank])
        start_step = int(state["step"])
        if env.is_main:
            log.info("resumed from %s at step %d of %d", resume_from, start_step, total_steps)

    amp = config.bf16 if config.bf16 is not None else device.type == "cuda"
    metrics = MetricsLogger(out, enabled=env.is_main,
                            resume_step=start_step if state is not None else None,
                            tensorboard=config.tensorboard)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(
            {**asdict(config), "run": run_info}, indent=2, default=str) + "\n")

    def save(dest: Path, step: int, epoch: int) -> None:
        rng_states = gather_objects(env, capture_rng_state())
        if env.is_main:
            save_checkpoint(dest, model=model, tokenizer=tokenizer, state={
                "step": step, "epoch": epoch, "data_position": {"step": step, "epoch": epoch},
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": rng_states, "run": run_info})
            prune_checkpoints(out, config.save_total_limit)
        barrier(env)

    def _emergency_save(completed: int, saved: int, epoch: int) -> None:
        """The teacher server gave up on us: keep the finished steps for --resume. Only in a
        single process (other ranks may be blocked in a collective, and a save needs them)."""
        if completed > saved and not env.enabled:
            dest = out / checkpoint_name(completed)
            save(dest, completed, epoch)
            log.error("teacher server unavailable after step %d; saved %s: rerun the same "
                      "command with --resume to continue", completed, dest)

    bar = tqdm(total=total_steps, initial=start_step, desc=f"train {config.mode}",
               disable=not (config.progress and env.is_main), unit="step")
    last: dict[str, float] = {}
    epoch = start_step // max(steps_per_epoch, 1)
    waited = time.perf_counter()
    completed, saved = start_step, start_step
    try:
        for data in _stop_cleanly(source.iterate(start_step, total_steps, per_rank),
                                  lambda: _emergency_save(completed, saved, epoch)):
            wait_s = time.perf_counter() - waited
            started = time.perf_counter()
            epoch = data.epoch
            batches = micro_batches(data.records, max_tokens=config.max_tokens, pad_id=pad_id)
            stats = train_step(module, batches, optimizer=optimizer, scheduler=scheduler,
                               params=params, config=config, rank_sequences=len(data.records),
                               env=env, device=device, amp=amp)
            elapsed = time.perf_counter() - started
            step = data.step + 1
            stats.update(epoch=epoch, step_s=elapsed, data_wait_s=wait_s,
                         tokens_per_s=stats["tokens"] / max(elapsed + wait_s, 1e-9),
                         **data.timings)
            metrics.log(step, stats)
            last = stats
            bar.update(1)
            bar.set_postfix(loss=f"{stats['loss']:.4g}", kl=f"{stats['kl']:.4g}")
            completed = step
            if config.save_every and step % config.save_every == 0 and step < total_steps:
                save(out / checkpoint_name(step), step, epoch)
                saved = step
            waited = time.perf_counter()
    finally:
        bar.close()
        source.close()
        metrics.close()
    save(out / "final", total_steps, epoch)
    if env.is_main:
        plot_curves(out / JSONL_NAME, out / PNG_NAME, title=f"AlignDistil {config.mode}")
    return {"steps": total_steps, "start_step": start_step, "final": str(out / "final"),
            "last": last}


def _stop_cleanly(iterator, on_unavailable):
    """Pass ``iterator`` through; when it raises TeacherUnavailable, call ``on_unavailable``
    (which saves what was trained) before the error stops the run."""
    from student_trainer.client import TeacherUnavailable

    try:
        yield from iterator
    except TeacherUnavailable:
        on_unavailable()
        raise


def _resolve_resume(config: TrainConfig, out: Path) -> Path | None:
    if not config.resume:
        return None
    if config.resume == "latest":
        found = latest_checkpoint(out)
        if found is None:
            log.warning("--resume: no checkpoint in %s yet; starting from --model", out)
        return found
    path = Path(config.resume)
    load_state(path)  # fails loudly on a folder that is not a checkpoint
    return path


def _check_resumable(state: dict, run_info: dict, path: Path) -> None:
    saved = state.get("run", {})
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, now {v!r}" for k, v in run_info.items()
             if saved.get(k) != v]
    if diffs:
        raise CheckpointError(
            f"{path}: cannot resume a different run ({'; '.join(diffs)}); resume with the same "
            f"data, --global-batch-size, --seed, --epochs/--max-steps and number of processes")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------- sources
def _build_source(config: TrainConfig, env: DistEnv, model, tokenizer, device) -> BatchSource:
    from storage.tokenization import tokenizer_sha256

    sha, vocab = tokenizer_sha256(tokenizer), len(tokenizer)
    if config.mode == "off-policy":
        from student_trainer.store_source import StoreSource

        source = StoreSource(config.store, seed=config.seed, rank=env.rank,
                             world_size=env.world_size)
        source.check_tokenizer(tokenizer_sha256=sha, vocab_size=vocab, model=config.model)
        return source
    return _on_policy_source(config, env, model, tokenizer, sha, vocab)


def _on_policy_source(config, env, model, tokenizer, sha, vocab) -> BatchSource:
    from student_trainer.batches import OnPolicySource
    from student_trainer.client import RetryPolicy, TeacherClient
    from student_trainer.prompts import load_prompts
    from student_trainer.rollout import RolloutConfig, generate_responses

    if config.rollout_backend == "vllm":
        from student_trainer.rollout_vllm import VLLMRollouts, require_vllm

        if env.enabled:
            raise ConfigError("--rollout-backend vllm runs one in-process engine and supports "
                              "a single process only (vLLM creates and tears down the default "
                              "torch.distributed group the DDP ranks share); use "
                              "--rollout-backend hf with torchrun")
        require_vllm()  # a missing extra fails before the first request
    client = TeacherClient(config.teacher_url, api_key=config.api_key,
                           timeout=config.request_timeout,
                           retry=RetryPolicy(max_retries=config.max_retries))
    info = client.check_compatible(tokenizer_sha256=sha, vocab_size=vocab)
    max_seq_len = config.max_seq_len or info.get("max_seq_len")
    prompts = load_prompts(config.prompts, tokenizer,
                           max_prompt_len=(max_seq_len - 1) if max_seq_len else None)
    rollout_cfg = RolloutConfig(max_new_tokens=config.max_new_tokens,
                                batch_size=config.rollout_batch_size)
    pad_id, eos = pad_token_id(tokenizer), tokenizer.eos_token_id

    rollouts = None  # the vLLM engine with --rollout-backend vllm (made below)

    def generate(m, batch_prompts, seed):
        if rollouts is not None:  # vLLM samples from m's weights: the ones HF would use
            rollouts.sync_weights(m)
            return rollouts.generate(batch_prompts, seed)
        return generate_responses(m, batch_prompts, pad_token_id=pad_id, eos_token_id=eos,
                                  config=rollout_cfg, seed=seed, max_seq_len=max_seq_len)

    def score(sequences):
        return client.score(sequences, top_k=config.top_k)

    source = OnPolicySource(prompts, model=model, generate=generate, score=score,
                            seed=config.seed, rank=env.rank, world_size=env.world_size,
                            async_rollouts=config.async_rollouts)
    if config.rollout_backend == "vllm":
        try:
            rollouts = VLLMRollouts(config.model, tokenizer, rollout_cfg,
                                    max_seq_len=max_seq_len, seed=config.seed,
                                    trust_remote_code=config.trust_remote_code)
        except BaseException:
            client.close()
            raise
    closer = source.close

    def close() -> None:
        try:
            closer()
            client.close()
        finally:
            if rollouts is not None:
                rollouts.close()

    source.close = close  # type: ignore[method-assign]
    return source
