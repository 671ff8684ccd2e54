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
from student_trainer.checkpoint import (CheckpointError, capture_rng_state, checkpoint_name,
                                        load_state, prune_checkpoints, resolve_resume,
                                        restore_rng_state, save_checkpoint)
from student_trainer.metrics import JSONL_NAME, PNG_NAME, MetricsLogger, plot_curves
from student_trainer.modeling import StudentForward
from student_trainer.optim import build_optimizer, build_scheduler, clip_grad_norm, warmup_steps_for
from student_trainer.preferences import (collate_pairs, load_pairs, pair_logprobs,
                                         pair_micro_batches, sequence_logprobs)
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
    """Train, save the model into ``config.out`` (a Hugging Face folder), return a summary."""
    from tqdm.auto import tqdm

    torch.manual_seed(config.seed)
    random.seed(config.seed)
    device = resolve_device(config.device)
    out = Path(config.out)
    if config.overwrite:
        clear_folder(out, keep=(SAVED_CONFIG["dpo"],))
    out.mkdir(parents=True, exist_ok=True)
    resume_from = resolve_resume(config.resume, out)
    state = load_state(resume_from) if resume_from else None
    model, tokenizer = load_model_and_tokenizer(resume_from or config.model, device=device,
                                                train=True,
                                                trust_remote_code=config.trust_remote_code)
    pad_id = pad_token_id(tokenizer)
    forward = StudentForward(model, len(tokenizer))
    truncated: list[int] = []
    data = data_source(config.data, split=config.split, config_name=config.data_config)
    pairs = load_pairs(data, tokenizer, max_seq_len=config.max_seq_len,
                       reverse=config.reverse, truncated=truncated)
    log.info("%d preference pairs from %s%s", len(pairs), data,
             " (reversed: chosen and rejected swapped)" if config.reverse else "")
    if truncated:
        log.warning("%d of %d sequences were longer than --max-seq-len %d and were cut in the "
                    "response (keeping its EOS); the longest had %d tokens", len(truncated),
                    2 * len(pairs), config.max_seq_len, max(truncated))

    if state is None:
        ref_chosen, ref_rejected = pair_logprobs(
            forward, pairs, pad_id=pad_id, max_tokens=config.max_tokens, device=device,
            desc="reference log-probs" if config.progress else None)
    else:  # the initial model's, as the checkpoint kept them (the model has moved since)
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
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        restore_rng_state(state["rng"])
        start_step = int(state["step"])
        log.info("resumed from %s at step %d of %d", resume_from, start_step, total_steps)
    metrics = MetricsLogger(out, report_to=parse_report_to(config.report_to),
                            config=public_values(config),
                            resume_step=start_step if state is not None else None)
    # The data order: one shuffle per epoch from one seeded generator, replayed up to the
    # epoch a resumed run is in.
    rng = random.Random(config.seed)
    order: list[int] = []
    for _ in range(-(-start_step // steps_per_epoch)):
        order = list(range(len(pairs)))
        rng.shuffle(order)
    bar = tqdm(range(start_step, total_steps), initial=start_step, total=total_steps,
               desc="dpo" + (" (reverse)" if config.reverse else ""),
               disable=not config.progress, unit="step")
    for step in bar:
        if step % steps_per_epoch == 0:
            order = list(range(len(pairs)))
            rng.shuffle(order)
        begin = (step % steps_per_epoch) * config.batch_size
        chosen_ids = order[begin:begin + config.batch_size]
        started = time.perf_counter()
        stats = _dpo_step(forward, [pairs[i] for i in chosen_ids], ref_chosen[chosen_ids],
                          ref_rejected[chosen_ids], config, pad_id, device)
        stats["grad_norm"] = clip_grad_norm(model.parameters(), config.max_grad_norm or None)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        stats.update(lr=scheduler.get_last_lr()[0], epoch=step // steps_per_epoch,
                     step_time_s=time.perf_counter() - started)
        metrics.log(step + 1, stats)
        bar.set_postfix(loss=f"{stats['loss']:.4f}", acc=f"{stats['preference_accuracy']:.2f}")
        if config.save_every and (step + 1) % config.save_every == 0 and step + 1 < total_steps:
            save_checkpoint(out / checkpoint_name(step + 1), model=model, tokenizer=tokenizer,
                            state={"step": step + 1, "optimizer": optimizer.state_dict(),
                                   "scheduler": scheduler.state_dict(),
                                   "rng": capture_rng_state(), "ref_chosen": ref_chosen,
                                   "ref_rejected": ref_rejected})
            prune_checkpoints(out, config.save_total_limit)
    metrics.close()

    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    final_chosen, final_rejected = pair_logprobs(
        forward, pairs, pad_id=pad_id, max_tokens=config.max_tokens, device=device,
        desc="final log-probs" if config.progress else None)
    summary = {
        "pairs": len(pairs), "steps": total_steps, "reverse": config.reverse,
        "truncated_sequences": len(truncated),
        "beta": config.beta,
        # implicit-reward accuracy: beta * (log pi - log ref) higher for chosen than rejected
        "preference_accuracy": float(((final_chosen - ref_chosen)
                                      > (final_rejected - ref_rejected)).double().mean()),
        # plain likelihood ranking, before and after
        "logprob_accuracy_before": float((ref_chosen > ref_rejected).double().mean()),
        "logprob_accuracy_after": float((final_chosen > final_rejected).double().mean()),
        "config": asdict(config),
    }
    atomic_write_text(out / "dpo_summary.json", json.dumps(summary, indent=2) + "\n")
    plot_curves(out / JSONL_NAME, out / PNG_NAME,
                title="DPO" + (" (reverse)" if config.reverse else ""))
    return summary


def _dpo_step(forward, pairs, ref_chosen, ref_rejected, config, pad_id, device) -> dict:
    """Forward/backward over the step's pairs in token-budgeted micro-batches (gradient
    accumulation: each micro-batch's summed loss is divided by the step's pair count)."""
    n_total = len(pairs)
    sums = {"loss": 0.0, "correct": 0.0, "margin": 0.0, "chosen": 0.0, "rejected": 0.0}
    for group in pair_micro_batches(pairs, config.max_tokens):
        batch = collate_pairs([pairs[i] for i in group], pad_id).to(device)
        logp = sequence_logprobs(forward, batch)
        n = len(group)
        loss, r_c, r_r = dpo_loss(logp[:n], logp[n:], ref_chosen[group].to(logp),
                                  ref_rejected[group].to(logp), config.beta)
        (loss.sum() / n_total).backward()
        sums["loss"] += float(loss.detach().sum())
        sums["correct"] += float((r_c > r_r).float().sum())
        sums["margin"] += float((r_c - r_r).sum())
        sums["chosen"] += float(r_c.sum())
        sums["rejected"] += float(r_r.sum())
    return {"loss": sums["loss"] / n_total,
            "preference_accuracy": sums["correct"] / n_total,
            "reward_margin": sums["margin"] / n_total,
            "reward_chosen": sums["chosen"] / n_total,
            "reward_rejected": sums["rejected"] / n_total}
