"""DPO for the two teachers: ``dpo`` on (chosen, rejected) pairs, ``reverse`` on the same pairs
swapped (Rafailov et al. 2023, the sigmoid loss; AlignDistil §3 builds its teacher from both).

    loss = -log sigmoid(beta * ((log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))))

The reference is the initial model. Its log-probabilities of every chosen and rejected
response are computed ONCE, before training, and kept as two numbers per pair: no second copy
of the model lives in memory during training.

Data: UltraFeedback-style rows ``{"prompt", "chosen": [messages], "rejected": [messages]}``
(JSONL or Parquet; see ``storage.datasets``), tokenised through the model's chat template
(``storage.tokenization``). A response longer than ``max_seq_len`` is cut from its end.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from causal_lm.loading import load_model_and_tokenizer, pad_token_id, resolve_device
from storage.datasets import data_source
from storage.fsio import atomic_write_text
from storage.outputs import clear_folder
from student_trainer import fsdp
from student_trainer.checkpoint import (CheckpointError, capture_rng_state, checkpoint_name,
                                        load_state, prune_checkpoints, resolve_resume,
                                        restore_rng_state, save_checkpoint)
from student_trainer.distributed import (DistEnv, all_reduce_max, all_reduce_sum, barrier,
                                         finish, gather_objects, init_distributed, shutdown)
from student_trainer.errors import ConfigError
from student_trainer.metrics import JSONL_NAME, PNG_NAME, MetricsLogger, plot_curves
from student_trainer.modeling import StudentForward
from student_trainer.optim import build_optimizer, build_scheduler, clip_grad_norm, warmup_steps_for
from student_trainer.preferences import (PreferencePair, collate_pairs, load_pairs,
                                         pair_logprobs, pair_micro_batches, sequence_logprobs)
from student_trainer.recipes.configs import SAVED_CONFIG, DPOConfig, public_values
from student_trainer.trackers import parse_report_to

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- the math
def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor,
             ref_rejected: Tensor, beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair sigmoid DPO loss and the implicit rewards ``beta * (log pi - log ref)`` of the
    chosen and rejected responses (all ``[n]``; inputs are summed sequence log-probs)."""
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    loss = -F.logsigmoid(chosen_reward - rejected_reward)
    return loss, chosen_reward.detach(), rejected_reward.detach()


# ---------------------------------------------------------------------------- the loop
def run_dpo(config: DPOConfig) -> dict:
    """Train, save the model into ``config.out`` (a Hugging Face folder), return a summary.

    Under torchrun (``--strategy ddp|fsdp``) each rank takes every ``world_size``-th pair of
    the step's batch, its loss is scaled so that the ranks' averaged gradients are those of the
    whole batch, and the reference and final log-probs are split over the ranks the same way.
    """
    device = resolve_device(config.device)  # under torchrun: the GPU of $LOCAL_RANK
    env = init_distributed(device, group_of_one=config.strategy == "fsdp")
    try:
        summary = _run_dpo(config, env, device)  # its models are gone once it returns
        finish(env)
        return summary
    finally:
        shutdown(env)


def _run_dpo(config: DPOConfig, env: DistEnv, device: torch.device) -> dict:
    from tqdm.auto import tqdm

    torch.manual_seed(config.seed)
    random.seed(config.seed)
    sharded = config.strategy == "fsdp"  # on one process too: a world of one
    out = Path(config.out)
    if config.overwrite and env.is_main:
        clear_folder(out, keep=(SAVED_CONFIG["dpo"],))
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
    barrier(env)
    resume_from = resolve_resume(config.resume, out)
    state = load_state(resume_from) if resume_from else None
    # FSDP: rank 0 loads --model on the CPU, the other ranks build it on the meta device, and
    # each rank gets its shards once the model is sharded (a checkpoint's shards replace them
    # on --resume). Otherwise every rank loads the whole model, from the checkpoint on --resume.
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
    pad_id = pad_token_id(tokenizer)
    forward = StudentForward(model, len(tokenizer))
    truncated: list[int] = []
    data = data_source(config.data, split=config.split, config_name=config.data_config)
    pairs = load_pairs(data, tokenizer, max_seq_len=config.max_seq_len,
                       reverse=config.reverse, truncated=truncated)
    if env.is_main:
        log.info("%d preference pairs from %s%s", len(pairs), data,
                 " (reversed: chosen and rejected swapped)" if config.reverse else "")
        if truncated:
            log.warning("%d of %d sequences were longer than --max-seq-len %d and were cut in "
                        "the response (keeping its EOS); the longest had %d tokens",
                        len(truncated), 2 * len(pairs), config.max_seq_len, max(truncated))

    amp = {"on": True, "off": False, "auto": device.type == "cuda"}[config.bf16]
    module: torch.nn.Module = forward
    if sharded:
        module = fsdp.shard(forward, model, device=device, bf16=amp)
        fsdp.broadcast_weights(model, full_weights, device)
        del full_weights
    elif env.enabled:
        module = torch.nn.parallel.DistributedDataParallel(
            forward, device_ids=[device.index] if device.type == "cuda" else None)
    if state is None:  # the initial model's, scored once
        ref_chosen, ref_rejected = pair_logprobs(
            module, pairs, pad_id=pad_id, max_tokens=config.max_tokens, device=device,
            desc="reference log-probs" if config.progress else None, env=env,
            lockstep=env.enabled, amp=amp)
        if sharded:  # FSDP's root stays gathered after a forward: the optimizer wants shards
            module.reshard()
    else:  # as the checkpoint kept them (the model has moved since)
        ref_chosen, ref_rejected = state["ref_chosen"], state["ref_rejected"]
        if len(ref_chosen) != len(pairs):
            raise CheckpointError(f"--resume {resume_from}: it was made on {len(ref_chosen)} "
                                  f"pairs, --data has {len(pairs)}")
    steps_per_epoch = math.ceil(len(pairs) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    optimizer = build_optimizer(model, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = build_scheduler(optimizer, warmup_steps=warmup_steps_for(total_steps,
                                                                         config.warmup_ratio),
                                total_steps=total_steps, schedule=config.lr_schedule,
                                min_lr_ratio=config.min_lr_ratio)
    start_step = 0
    if state is not None:
        if sharded:
            fsdp.load_sharded(resume_from / fsdp.DCP_DIR, model, optimizer)
        else:
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        rng = state["rng"]  # one per rank (a single dict: written by one process)
        restore_rng_state(rng[env.rank % len(rng)] if isinstance(rng, list) else rng)
        start_step = int(state["step"])
        if env.is_main:
            log.info("resumed from %s at step %d of %d", resume_from, start_step, total_steps)
    metrics = MetricsLogger(out, enabled=env.is_main, report_to=parse_report_to(config.report_to),
                            config=public_values(config),
                            resume_step=start_step if state is not None else None)

    def save(dest: Path, step: int) -> None:
        rng_states = gather_objects(env, capture_rng_state())
        saved = {"step": step, "scheduler": scheduler.state_dict(), "rng": rng_states,
                 "ref_chosen": ref_chosen, "ref_rejected": ref_rejected}
        if sharded:
            fsdp.save_sharded_checkpoint(dest, model=model, optimizer=optimizer,
                                         tokenizer=tokenizer, state=saved, rank=env.rank)
        elif env.is_main:
            save_checkpoint(dest, model=model, tokenizer=tokenizer,
                            state={**saved, "optimizer": optimizer.state_dict()})
        if env.is_main:
            prune_checkpoints(out, config.save_total_limit)
        barrier(env)

    # The data order: one shuffle per epoch from one seeded generator, replayed up to the
    # epoch a resumed run is in.
    rng = random.Random(config.seed)
    order: list[int] = []
    for _ in range(-(-start_step // steps_per_epoch)):
        order = list(range(len(pairs)))
        rng.shuffle(order)
    bar = tqdm(range(start_step, total_steps), initial=start_step, total=total_steps,
               desc="dpo" + (" (reverse)" if config.reverse else ""),
               disable=not (config.progress and env.is_main), unit="step")
    try:
        for step in bar:
            if step % steps_per_epoch == 0:
                order = list(range(len(pairs)))
                rng.shuffle(order)
            begin = (step % steps_per_epoch) * config.batch_size
            batch_ids = order[begin:begin + config.batch_size]
            mine = batch_ids[env.rank::env.world_size]
            started = time.perf_counter()
            stats = dpo_step(module, [pairs[i] for i in mine], ref_chosen[mine],
                             ref_rejected[mine], batch_pairs=len(batch_ids),
                             filler=pairs[batch_ids[0]], beta=config.beta,
                             max_tokens=config.max_tokens, pad_id=pad_id, env=env,
                             device=device, amp=amp)
            stats["grad_norm"] = clip_grad_norm(model.parameters(), config.max_grad_norm or None)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            stats.update(lr=scheduler.get_last_lr()[0], epoch=step // steps_per_epoch,
                         step_time_s=time.perf_counter() - started)
            metrics.log(step + 1, stats)
            bar.set_postfix(loss=f"{stats['loss']:.4f}",
                            acc=f"{stats['preference_accuracy']:.2f}")
            if config.save_every and (step + 1) % config.save_every == 0 \
                    and step + 1 < total_steps:
                save(out / checkpoint_name(step + 1), step + 1)
    finally:
        bar.close()
        metrics.close()

    full = fsdp.full_model_state(model) if sharded else None  # collective
    if env.is_main:
        model.save_pretrained(out, safe_serialization=True,
                              **({"state_dict": full} if sharded else {}))
        tokenizer.save_pretrained(out)
    final_chosen, final_rejected = pair_logprobs(
        module, pairs, pad_id=pad_id, max_tokens=config.max_tokens, device=device,
        desc="final log-probs" if config.progress else None, env=env, lockstep=env.enabled,
        amp=amp)
    summary = {
        "pairs": len(pairs), "steps": total_steps, "reverse": config.reverse,
        "truncated_sequences": len(truncated),
        "beta": config.beta, "world_size": env.world_size, "strategy": config.strategy,
        # implicit-reward accuracy: beta * (log pi - log ref) higher for chosen than rejected
        "preference_accuracy": float(((final_chosen - ref_chosen)
                                      > (final_rejected - ref_rejected)).double().mean()),
        # plain likelihood ranking, before and after
        "logprob_accuracy_before": float((ref_chosen > ref_rejected).double().mean()),
        "logprob_accuracy_after": float((final_chosen > final_rejected).double().mean()),
        "config": asdict(config),
    }
    if env.is_main:
        atomic_write_text(out / "dpo_summary.json", json.dumps(summary, indent=2) + "\n")
        plot_curves(out / JSONL_NAME, out / PNG_NAME,
                    title="DPO" + (" (reverse)" if config.reverse else ""))
    barrier(env)
    return summary


def dpo_step(module: torch.nn.Module, pairs: list[PreferencePair], ref_chosen: Tensor,
             ref_rejected: Tensor, *, batch_pairs: int, filler: PreferencePair, beta: float,
             max_tokens: int, pad_id: int, env: DistEnv, device: torch.device,
             amp: bool = False) -> dict:
    """Forward/backward over this rank's pairs of the step in token-budgeted micro-batches.

    Each micro-batch's summed loss is divided by the step's pair count over all ranks and
    multiplied by the rank count, because DDP and FSDP average the ranks' gradients: the result
    is the gradient of the batch's mean loss, however the pairs fell. Under torchrun every rank
    makes as many passes (a rank short of micro-batches, or with no pair at all, runs ``filler``
    with weight 0), since DDP's and FSDP's backward passes are collectives."""
    sums = torch.zeros(5, dtype=torch.float64)  # loss, correct, margin, chosen, rejected
    groups = pair_micro_batches(pairs, max_tokens) if pairs else []
    passes = all_reduce_max(env, len(groups)) if env.enabled else len(groups)
    for i in range(passes):
        padding = i >= len(groups)
        group = groups[min(i, len(groups) - 1)] if groups else []
        batch = collate_pairs([pairs[j] for j in group] if group else [filler], pad_id)
        with fsdp.gradient_sync(module, i == passes - 1):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logp = sequence_logprobs(module, batch.to(device))
            n = batch.num_sequences // 2
            ref_c = ref_chosen[group] if group else torch.zeros(1, dtype=torch.float64)
            ref_r = ref_rejected[group] if group else torch.zeros(1, dtype=torch.float64)
            loss, r_c, r_r = dpo_loss(logp[:n], logp[n:], ref_c.to(logp), ref_r.to(logp), beta)
            weight = 0.0 if padding else env.world_size / batch_pairs
            (loss.sum() * weight).backward()
        if not padding:
            sums += torch.tensor([float(loss.detach().sum()), float((r_c > r_r).sum()),
                                  float((r_c - r_r).sum()), float(r_c.sum()),
                                  float(r_r.sum())], dtype=torch.float64)
    sums = all_reduce_sum(env, sums) / batch_pairs
    return dict(zip(("loss", "preference_accuracy", "reward_margin", "reward_chosen",
                     "reward_rejected"), sums.tolist()))
