"""AlignDistil student training: the loop (off-policy from a store, on-policy through the
teacher server) and the one step function both share.

Read top to bottom: :func:`train_step` (one optimizer step over token-budgeted micro-batches),
:class:`Run` (what a run holds, built by :func:`setup`), :func:`save` (a checkpoint),
:func:`train` (the loop) and :func:`run_train` (set-up, the loop, the end). The options are
:class:`~student_trainer.recipes.configs.TrainConfig`. The components it assembles live in their
own modules: ``losses`` (the math), ``collate`` (records -> tensors), ``sources`` (which records
each step gets), ``modeling`` (the student's forward), ``optim``, ``checkpoint``, ``metrics``.

Batch semantics follow the paper: an optimizer step consumes ``global_batch_size`` sequences
(128), split evenly over the ranks and, within a rank, into micro-batches of at most
``max_tokens`` padded tokens (gradient accumulation). The loss of a step is the mean over its
sequences of ``(1/T) sum_t beta_t KL_t``, exactly, however it is split: each micro-batch's
mean is weighted by its share of the rank's sequences, and DDP averages equal-sized ranks.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from causal_lm.loading import load_model_and_tokenizer, pad_token_id, resolve_device
from causal_lm.packed import choose_packing
from storage.datasets import data_source
from storage.fsio import atomic_write_text
from storage.hub import is_hub_id
from storage.store.location import is_object_url
from storage.outputs import clear_folder
from storage.tokenization import tokenizer_sha256
from student_trainer import fsdp, losses, reinforce
from student_trainer.checkpoint import (
    CheckpointError, capture_rng_state, checkpoint_name,
    load_state, prune_checkpoints, resolve_resume, restore_rng_state, save_checkpoint)
from student_trainer.client import (TARGET_DEFAULTS, TARGET_FIELDS, TeacherUnavailable,
                                    pool_differences, teacher_models)
from student_trainer.collate import Batch, micro_batches
from student_trainer.distributed import (
    DistEnv, all_reduce_max, all_reduce_sum, barrier, finish, gather_objects, init_distributed,
    shutdown)
from student_trainer.errors import ConfigError
from student_trainer.metrics import JSONL_NAME, PNG_NAME, MetricsLogger, plot_curves
from student_trainer.modeling import StudentForward
from student_trainer.optim import build_optimizer, build_scheduler, clip_grad_norm, warmup_steps_for
from student_trainer.recipes.configs import SAVED_CONFIG, TrainConfig, public_values
from student_trainer.sources.plan import BatchSource
from student_trainer.trackers import parse_report_to

log = logging.getLogger(__name__)


# ============================================================================ the step
@dataclass
class StepStats:
    """Sums over a step's response positions / sequences, reduced over ranks."""
    values: torch.Tensor = field(default_factory=lambda: torch.zeros(12, dtype=torch.float64))
    KEYS = ("loss_x_seqs", "kl", "beta", "alpha", "reward", "tail", "positions", "tokens",
            "sequences", "kl_topk", "student_outside", "parts_positions")

    def add(self, **kw: float) -> None:
        for key, v in kw.items():
            self.values[self.KEYS.index(key)] += float(v)

    def as_dict(self) -> dict[str, float]:
        v = dict(zip(self.KEYS, self.values.tolist()))
        positions, seqs = max(v["positions"], 1.0), max(v["sequences"], 1.0)
        return {"loss": v["loss_x_seqs"] / seqs, "kl": v["kl"] / positions,
                "beta_mean": v["beta"] / positions, "alpha_mean": v["alpha"] / positions,
                "reward_token_mean": v["reward"] / positions,
                "tail_mass_mean": v["tail"] / positions,
                "response_tokens": v["positions"], "tokens": v["tokens"],
                "sequences": v["sequences"]} | self._parts(v)

    @staticmethod
    def _parts(v: dict[str, float]) -> dict[str, float]:
        """The KL split into the teacher's kept ids and its tail, and the student's mass
        outside the kept ids (per position), when the step measured them."""
        n = v["parts_positions"]
        if not n:
            return {}
        return {"kl_topk": v["kl_topk"] / n, "kl_tail": (v["kl"] - v["kl_topk"]) / n,
                "student_mass_outside_topk": v["student_outside"] / n}


def train_step(module: torch.nn.Module, batches: list[Batch], *, optimizer, scheduler,
               params: list[torch.nn.Parameter], config: TrainConfig, step_sequences: int,
               env: DistEnv, device: torch.device, amp: bool, filler: bool = False
               ) -> dict[str, float]:
    """One optimizer step over ``batches`` (this rank's micro-batches of the step).

    ``module`` is the :class:`StudentForward`, DDP-wrapped or FSDP-sharded when distributed:
    gradients are synchronised only on the last micro-batch's backward. ``step_sequences``
    counts the step's sequences over all ranks: each micro-batch's mean loss is weighted by its
    share of them (times the number of ranks, which DDP and FSDP divide the gradients by), so
    the step's gradient is the mean over its sequences however they are split over ranks and
    micro-batches. ``filler``: ``batches`` hold a record run with weight 0 only (this rank has
    none in this step). With ``--objective reinforce-*`` the loss is the policy-gradient
    surrogate of :mod:`student_trainer.reinforce` instead of the AlignDistil loss, and ``kl``
    is the sampled estimate of KL(pi_theta || pi_dpo) per token.
    """
    stats = StepStats()
    real = 0 if filler else len(batches)
    adv = None if config.objective == "aligndistil" else \
        reinforce_advantages(module, batches, config, env, device, amp, real=real)
    # FSDP gathers each layer's shards in every forward and backward: all ranks must run as many
    # micro-batches. A rank with fewer repeats its last one with weight 0 (no gradient, no
    # stats), which leaves the step's loss and gradients exactly as they were.
    passes = all_reduce_max(env, len(batches)) if fsdp.is_sharded(module) else len(batches)
    scale = env.world_size / max(step_sequences, 1)
    for i in range(passes):
        at = min(i, len(batches) - 1)
        padding = i >= real
        batch = batches[at].to(device)
        last = i == passes - 1
        with fsdp.gradient_sync(module, last):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                if adv is None:
                    kl, kl_top, outside = module(
                        batch.input_ids, batch.attention_mask, batch.row_idx, batch.col_idx,
                        topk_ids=batch.topk_ids, topk_logprobs=batch.topk_logprobs,
                        tail_logmass=batch.tail_logmass, position_ids=batch.position_ids,
                        parts=True, topk_count=batch.topk_count)
                else:
                    logp = module(batch.input_ids, batch.attention_mask, batch.row_idx,
                                  batch.col_idx, mode="logprobs", target_ids=batch.target_ids,
                                  position_ids=batch.position_ids)
            if adv is None:
                loss = losses.aligndistil_loss(
                    batch.unflatten(kl.float()), batch.unflatten(batch.alpha, 1.0),
                    batch.response_mask, beta0=config.beta0, weighting=config.weighting)
            else:
                loss = reinforce.policy_gradient_loss(batch.unflatten(logp.float()), adv[at],
                                                      batch.response_mask)
                kl = logp.detach().float() - batch.dpo_logprobs  # sampled KL to pi_dpo
                kl_top = outside = None
            (loss * (0.0 if padding else batch.num_sequences * scale)).backward()
        if padding:
            continue
        with torch.no_grad():
            beta = losses.sequence_weights(batch.alpha, config.beta0, config.weighting)
            reward = losses.token_contrastive_reward(batch.dpo_logprobs, batch.reverse_logprobs,
                                                     config.beta0)
            stats.add(loss_x_seqs=float(loss) * batch.num_sequences, kl=kl.float().sum(),
                      beta=beta.sum(), alpha=batch.alpha.sum(), reward=reward.sum(),
                      tail=batch.tail_logmass.float().exp().sum(),
                      positions=batch.num_response_tokens, tokens=batch.num_tokens,
                      sequences=batch.num_sequences)
            if kl_top is not None:
                stats.add(kl_topk=kl_top.float().sum(), student_outside=outside.float().sum(),
                          parts_positions=batch.num_response_tokens)
    lr = optimizer.param_groups[0]["lr"]
    grad_norm = clip_grad_norm(params, config.max_grad_norm or None)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    stats.values = all_reduce_sum(env, stats.values)
    return {**stats.as_dict(), "lr": lr, "grad_norm": grad_norm,
            "micro_batches": real}


def reinforce_advantages(module: torch.nn.Module, batches: list[Batch], config: TrainConfig,
                         env: DistEnv, device: torch.device, amp: bool, *, real: int
                         ) -> list[torch.Tensor]:
    """The advantages ``[B_i, T_i]`` of each micro-batch for ``--objective reinforce-*``, from
    one pass without gradients over the step's samples. The baseline is the whole step's, over
    every rank's first ``real`` micro-batches (the others run with weight 0). Under FSDP every
    rank makes as many forward passes (a shorter rank repeats its last)."""
    level = config.objective.removeprefix("reinforce-")
    step_returns, masks = [], []
    passes = all_reduce_max(env, len(batches)) if fsdp.is_sharded(module) else len(batches)
    with torch.no_grad():
        for i in range(passes):
            batch = batches[min(i, len(batches) - 1)].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logp = module(batch.input_ids, batch.attention_mask, batch.row_idx,
                              batch.col_idx, mode="logprobs", target_ids=batch.target_ids,
                              position_ids=batch.position_ids)
            if i >= len(batches):
                continue
            rewards = reinforce.token_rewards(logp.float(), batch.dpo_logprobs,
                                              batch.reverse_logprobs, beta0=config.beta0,
                                              beta=config.kl_coef)
            step_returns.append(reinforce.returns(batch.unflatten(rewards), batch.response_mask,
                                                  level))
            masks.append(batch.response_mask)
    length = None
    if level == "token":  # every rank's sums over the same positions
        length = all_reduce_max(env, max((g.shape[1] for g in step_returns[:real]), default=0))
    sums, counts = reinforce.baseline_sums(step_returns[:real], masks[:real], level, length)
    both = all_reduce_sum(env, torch.stack([sums, counts]).double().cpu())
    base = reinforce.baseline_from_sums(both[0], both[1]).to(device)
    return [reinforce.advantages(g, m, base) for g, m in zip(step_returns, masks)]


#: Above this mean teacher mass outside the top-k, the uniform tail changes what is learned.
BROAD_TAIL = 0.05


def warn_broad_tail(tail_mass_mean: float, config: TrainConfig) -> None:
    """The uniform tail spreads pi*'s mass outside the top-k evenly over the other V - k ids.
    When that mass is large, the student learns a visibly different policy from exact
    AlignDistil (benchmarks/results/fidelity.md): say so once, with what to do."""
    if config.objective == "aligndistil" and config.tail == "uniform" \
            and tail_mass_mean > BROAD_TAIL:
        log.warning("the teacher keeps %.1f%% of its mass outside the top-k targets (mean over "
                    "the first step); --tail uniform spreads it evenly over the rest of the "
                    "vocabulary, which changes what the student learns (see "
                    "benchmarks/results/fidelity.md): use a larger top-k, --tail auto or "
                    "--tail bucket",
                    100 * tail_mass_mean)


# ============================================================================ the run
@dataclass
class Run:
    """What a training run holds between set-up and the end (built by :func:`setup`)."""
    config: TrainConfig
    env: DistEnv
    device: torch.device
    out: Path
    model: torch.nn.Module
    tokenizer: Any
    module: torch.nn.Module          #: the StudentForward, DDP-wrapped when distributed
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    source: BatchSource
    metrics: MetricsLogger
    amp: bool
    packing: bool                    #: packed micro-batches (the model passed the probe)
    steps_per_epoch: int
    total_steps: int
    start_step: int
    resumed_from: Path | None
    run_info: dict[str, Any] = field(default_factory=dict)


def run_train(config: TrainConfig) -> dict[str, Any]:
    """Train the student; returns a summary (rank 0's view). See the module docstring."""
    config.validate()
    device = resolve_device(config.device)  # under torchrun: the GPU of $LOCAL_RANK
    env = init_distributed(device, group_of_one=config.strategy == "fsdp")
    try:
        run = setup(config, env, device)
        try:
            summary = train(run)
        finally:
            run.source.close()
            run.metrics.close()
        del run  # the wrapped student goes while the group is whole
        finish(env)
        return summary
    finally:
        shutdown(env)


def _data_identity(config: TrainConfig) -> str:
    """What the run trains on, as its checkpoints record it (a resume must match): the store's
    or prompt file's absolute path or URL, or a Hub dataset's id, commit, config and split."""
    if config.store and is_object_url(config.store):
        return config.store.rstrip("/")
    if config.store or not is_hub_id(config.prompts):
        return str(Path(config.store or config.prompts).resolve())
    return str(data_source(config.prompts, split=config.split, config_name=config.data_config,
                           flag="--prompts"))


def setup(config: TrainConfig, env: DistEnv, device: torch.device) -> Run:
    """Model, data source, optimizer and schedule, restored from a checkpoint on --resume."""
    out = Path(config.out)
    if config.overwrite and env.is_main:
        clear_folder(out, keep=(SAVED_CONFIG["train"],))  # start over, as asked
    barrier(env)
    resume_from = resolve_resume(config.resume, out)
    state = load_state(resume_from) if resume_from else None
    _seed_everything(config.seed + env.rank)

    sharded = config.strategy == "fsdp"  # on one process too: a world of one
    if state is not None:
        _check_same_strategy(state, config.strategy, resume_from)
    # FSDP: rank 0 loads --model on the CPU, the other ranks build it on the meta device, and
    # each rank gets its shards once the model is sharded (a checkpoint's shards replace them
    # on --resume). DDP: every rank loads the whole model, from the checkpoint on --resume.
    full_weights = None
    if sharded:
        model, tokenizer, full_weights = fsdp.load_for_sharding(
            config.model, rank=env.rank, trust_remote_code=config.trust_remote_code,
            attn_implementation=config.attn_implementation)
    else:
        model, tokenizer = load_model_and_tokenizer(
            resume_from or config.model, device=device, train=True,
            trust_remote_code=config.trust_remote_code,
            attn_implementation=config.attn_implementation)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # the packing probe runs forwards: under FSDP on rank 0's whole model, its answer for all
    packing = choose_packing(config.packing, model) if not sharded or env.is_main else False
    if sharded:
        packing = gather_objects(env, packing)[0]
    forward = StudentForward(model, len(tokenizer), tail=config.tail,
                             loss_chunk_size=config.loss_chunk_size)
    module: torch.nn.Module = forward
    amp = {"on": True, "off": False, "auto": device.type == "cuda"}[config.bf16]
    if sharded:
        module = fsdp.shard(forward, model, device=device, bf16=amp)
        fsdp.broadcast_weights(model, full_weights, device)
        del full_weights
        if config.mode == "on-policy":
            fsdp.settle_root(module, device)
    elif env.enabled:
        module = torch.nn.parallel.DistributedDataParallel(
            forward, device_ids=[device.index] if device.type == "cuda" else None)
    source = open_source(config, env, model, tokenizer,
                         sharded_root=module if sharded else None)
    try:
        _check_same_teacher(source, out, resuming=resume_from is not None, env=env)
        forward.tail = losses.resolve_tail(config.tail)
        if forward.tail != config.tail and env.is_main:
            log.info("--tail auto: the bucket tail at every position (docs/training.md)")
        if config.global_batch_size < env.world_size:
            raise ConfigError(f"--global-batch-size {config.global_batch_size} is smaller than "
                              f"the {env.world_size} ranks: each rank needs a sequence per step")
        steps_per_epoch = source.steps_per_epoch(config.global_batch_size)
        total_steps = steps_per_epoch * config.epochs
        if config.max_steps is not None:
            total_steps = min(total_steps, config.max_steps)
        # What a resumed run must share (not the number of ranks: the steps are the same
        # records on any number, and the weights reshard).
        run_info = {"mode": config.mode, "global_batch_size": config.global_batch_size,
                    "seed": config.seed,
                    "total_steps": total_steps, "steps_per_epoch": steps_per_epoch,
                    "data": _data_identity(config)}

        optimizer = build_optimizer(model, lr=config.lr, weight_decay=config.weight_decay,
                                    betas=tuple(config.adam_betas))
        scheduler = build_scheduler(
            optimizer, warmup_steps=warmup_steps_for(total_steps, config.warmup_ratio),
            total_steps=total_steps, schedule=config.lr_schedule,
            min_lr_ratio=config.min_lr_ratio)
        start_step = 0
        if state is not None:
            _check_resumable(state, run_info, resume_from)
            if sharded:
                fsdp.load_sharded(resume_from / fsdp.DCP_DIR, model, optimizer)
            else:
                optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            _restore_rng(state["rng"], env, config.seed, start_step=int(state["step"]))
            start_step = int(state["step"])
            if state.get("rollouts_in_flight"):
                source.restore_in_flight(state["rollouts_in_flight"], config.global_batch_size)
            if env.is_main:
                log.info("resumed from %s at step %d of %d", resume_from, start_step,
                         total_steps)
        metrics = MetricsLogger(out, enabled=env.is_main,
                                resume_step=start_step if state is not None else None,
                                report_to=parse_report_to(config.report_to),
                                config=public_values(config))
    except BaseException:
        source.close()
        raise
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
    return Run(config=config, env=env, device=device, out=out, model=model,
               tokenizer=tokenizer, module=module,
               params=[p for p in model.parameters() if p.requires_grad], optimizer=optimizer,
               scheduler=scheduler, source=source, metrics=metrics, amp=amp, packing=packing,
               steps_per_epoch=steps_per_epoch, total_steps=total_steps, start_step=start_step,
               resumed_from=resume_from, run_info=run_info)


def train(run: Run) -> dict[str, Any]:
    """The loop: one :func:`train_step` per planned step, checkpoints every ``save_every``
    steps, the final model at the end. If the teacher server gives up mid-run, the finished
    steps are saved first (one process only), so ``--resume`` continues from there."""
    from tqdm.auto import tqdm

    config, env = run.config, run.env
    pad_id = pad_token_id(run.tokenizer)
    bar = tqdm(total=run.total_steps, initial=run.start_step, desc=f"train {config.mode}",
               disable=not (config.progress and env.is_main), unit="step")
    last: dict[str, float] = {}
    epoch = run.start_step // max(run.steps_per_epoch, 1)
    completed = saved = run.start_step
    steps = run.source.iterate(run.start_step, run.total_steps, config.global_batch_size)
    try:
        waited = time.perf_counter()
        for data in steps:
            wait_s = time.perf_counter() - waited
            started = time.perf_counter()
            epoch = data.epoch
            batches = micro_batches(data.records or [data.filler], max_tokens=config.max_tokens,
                                    pad_id=pad_id, packing=run.packing)
            stats = train_step(run.module, batches, optimizer=run.optimizer,
                               scheduler=run.scheduler, params=run.params, config=config,
                               step_sequences=data.step_sequences, env=env, device=run.device,
                               amp=run.amp, filler=not data.records)
            elapsed = time.perf_counter() - started
            completed = data.step + 1
            stats.update(epoch=epoch, step_s=elapsed, train_s=elapsed, data_wait_s=wait_s,
                         tokens_per_s=stats["tokens"] / max(elapsed + wait_s, 1e-9),
                         **data.timings, **sum_over_ranks(env, data.counts))
            if config.mode == "on-policy":
                stats["staleness"] = float(data.staleness)
                if config.save_samples and data.rollout is not None:
                    write_samples(run.out, env.rank, data.rollout)
            run.metrics.log(completed, stats)
            if not last:  # the first step of this process
                warn_broad_tail(stats["tail_mass_mean"], config)
            last = stats
            bar.update(1)
            bar.set_postfix(step_postfix(stats))
            if config.save_every and completed % config.save_every == 0 \
                    and completed < run.total_steps:
                save(run, run.out / checkpoint_name(completed), completed, epoch)
                saved = completed
            waited = time.perf_counter()
    except TeacherUnavailable:
        # Other ranks may be blocked in a collective, and a save needs them: one process only.
        if completed > saved and not env.enabled:
            dest = run.out / checkpoint_name(completed)
            save(run, dest, completed, epoch)
            log.error("teacher server unavailable after step %d; saved %s: rerun the same "
                      "command with --resume to continue", completed, dest)
        raise
    finally:
        bar.close()
    save(run, run.out / "final", run.total_steps, epoch)
    if env.is_main:
        plot_curves(run.out / JSONL_NAME, run.out / PNG_NAME,
                    title=f"{config.objective} {config.mode}")
    return {"steps": run.total_steps, "start_step": run.start_step,
            "final": str(run.out / "final"), "last": last,
            "prompts_truncated": getattr(run.source, "prompts_truncated", 0)}


#: on-policy phases in the progress bar: (short name, metric); seconds of rank 0's step
PHASES = (("roll", "rollout_s"), ("sync", "weight_sync_s"), ("cand", "candidates_s"),
          ("score", "score_s"), ("train", "train_s"), ("wait", "data_wait_s"))


def step_postfix(stats: dict[str, float]) -> dict[str, str]:
    """The progress bar's postfix: loss and KL; on-policy also where the step's time went
    (with ``--max-staleness`` rollout and scoring overlap training; ``wait`` is what they left
    exposed) and the staleness trained on."""
    out = {"loss": f"{stats['loss']:.4g}", "kl": f"{stats['kl']:.4g}"}
    if "rollout_s" in stats:
        out.update({short: f"{stats[key]:.2f}s" for short, key in PHASES if key in stats})
        out["stale"] = str(int(stats.get("staleness", 0)))
    return out


def write_samples(out: Path, rank: int, rollout) -> None:
    """``--save-samples``: append a step's sampled sequences (this rank's) to
    ``OUT/samples/rank-R.jsonl``, one line each."""
    if rollout.filler:
        return
    folder = out / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"step": rollout.step, "rank": rank, "index": i,
                         "staleness": rollout.staleness, "prompt_len": p, "ids": list(ids)})
             for i, (ids, p) in enumerate(rollout.sequences)]
    with open(folder / f"rank-{rank}.jsonl", "a", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))


def sum_over_ranks(env: DistEnv, counts: dict[str, float]) -> dict[str, float]:
    """A step's counts (e.g. responses without EOS) over all ranks, not rank 0's alone."""
    if not counts or not env.enabled:
        return dict(counts)
    keys = sorted(counts)
    summed = all_reduce_sum(env, torch.tensor([counts[k] for k in keys], dtype=torch.float64))
    return dict(zip(keys, summed.tolist()))


def save(run: Run, dest: Path, step: int, epoch: int) -> None:
    """A checkpoint of the model, optimizer, schedule and every rank's RNG at ``step``."""
    rng_states = gather_objects(run.env, capture_rng_state())
    state = {"step": step, "epoch": epoch, "data_position": {"step": step, "epoch": epoch},
             "scheduler": run.scheduler.state_dict(), "rng": rng_states, "run": run.run_info}
    if hasattr(run.source, "in_flight") and dest.name != "final":
        state["rollouts_in_flight"] = gather_objects(run.env, _in_flight(run.source, step))
    if fsdp.is_sharded(run.module):
        fsdp.save_sharded_checkpoint(dest, model=run.model, optimizer=run.optimizer,
                                     tokenizer=run.tokenizer, state=state, rank=run.env.rank,
                                     consolidated=dest.name == "final")
    elif run.env.is_main:
        save_checkpoint(dest, model=run.model, tokenizer=run.tokenizer,
                        state={**state, "optimizer": run.optimizer.state_dict()})
    if run.env.is_main:
        prune_checkpoints(run.out, run.config.save_total_limit)
    barrier(run.env)


def _in_flight(source, step: int) -> dict:
    """The source's samples of the steps queued after ``step`` (``--max-staleness``), or none
    when producing them failed (those steps then sample again on resume, with a warning)."""
    try:
        return source.in_flight()
    except Exception as exc:  # the teacher gave up, say: the checkpoint still saves the weights
        log.warning("checkpoint at step %d keeps no samples of the steps in flight (%s)",
                    step, exc)
        return {}


def open_source(config: TrainConfig, env: DistEnv, model, tokenizer, *,
                sharded_root: torch.nn.Module | None = None) -> BatchSource:
    """The step source of the mode, checked against the student's tokenizer; it owns (and
    closes) whatever it opened. ``sharded_root``: the FSDP root around ``model``."""
    if config.mode == "off-policy":
        from student_trainer.sources.store import StoreSource

        source = StoreSource(config.store, seed=config.seed, rank=env.rank,
                             world_size=env.world_size, allow_incomplete=config.allow_incomplete)
        source.check_tokenizer(tokenizer_sha256=tokenizer_sha256(tokenizer),
                               vocab_size=len(tokenizer), model=config.model)
        return source
    from student_trainer.sources.on_policy import OnPolicySource

    return OnPolicySource.open(config, model=model, tokenizer=tokenizer, rank=env.rank,
                               world_size=env.world_size,
                               sharded_root=sharded_root)


TEACHER_INFO = "teacher_info.json"


def _check_same_teacher(source: BatchSource, out: Path, *, resuming: bool, env: DistEnv) -> None:
    """On-policy: record what decides the server's targets in the run folder; on --resume,
    refuse servers whose teachers or target settings changed since (the loss would change
    mid-run). Teachers compare by fingerprint and revision: the resumed run may use other
    hosts that keep the same weights at other paths."""
    info = getattr(source, "teacher_info", None)
    if not info:
        return
    fixed = {**{k: info.get(k, TARGET_DEFAULTS.get(k)) for k in (*TARGET_FIELDS, "max_seq_len")},
             "models": teacher_models(info)}
    path = out / TEACHER_INFO
    if resuming and path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        # recorded before a setting existed: its default
        saved = {"dpo_top": 0, **TARGET_DEFAULTS, **saved}
        diffs = pool_differences(saved, fixed)
        if diffs:
            raise CheckpointError(f"--resume: the teacher server changed since this run started "
                                  f"({'; '.join(diffs)}; then vs now); resume against the same "
                                  f"teachers and settings, or start a new --out")
        return
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(fixed, indent=2, sort_keys=True) + "\n")


def _check_same_strategy(state: dict, strategy: str, path: Path) -> None:
    saved = state.get("strategy", "ddp")
    if saved != strategy:
        raise CheckpointError(
            f"{path}: written with --strategy {saved}; resume it with --strategy {saved} (on any "
            f"number of processes{', one included' if saved == 'fsdp' else ''})")


def _restore_rng(saved: list, env: DistEnv, seed: int, *, start_step: int) -> None:
    """Each rank's RNG as the checkpoint left it; on another number of ranks than the
    checkpoint's, fresh generators seeded from ``(seed, rank, step)`` (the data and the
    rollout seeds of a step do not depend on these generators)."""
    if len(saved) == env.world_size:
        restore_rng_state(saved[env.rank])
        return
    if env.is_main:
        log.info("resuming %d ranks' run on %d: each rank's random generators start afresh "
                 "at step %d", len(saved), env.world_size, start_step)
    _seed_everything(seed * 1_000_003 + start_step * 1009 + env.rank)


def _check_resumable(state: dict, run_info: dict, path: Path) -> None:
    saved = state.get("run", {})
    if saved.get("world_size", 1) > 1:  # recorded only by versions whose ranks read other data
        raise CheckpointError(
            f"{path}: written on {saved['world_size']} ranks by an older aligndistil, whose "
            f"ranks read other records per step than this version's; it cannot continue the "
            f"same run: start a new --out (or finish it with the older version)")
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, now {v!r}" for k, v in run_info.items()
             if saved.get(k) != v]
    if diffs:
        raise CheckpointError(
            f"{path}: cannot resume a different run ({'; '.join(diffs)}); resume with the same "
            f"data, --global-batch-size, --seed and --epochs/--max-steps")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)
