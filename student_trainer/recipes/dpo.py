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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from storage.packing import pack_by_token_budget
from causal_lm.loading import load_model_and_tokenizer, pad_token_id, resolve_device
from student_trainer.collate import Batch, collate_sequences
from student_trainer.metrics import JSONL_NAME, PNG_NAME, MetricsLogger, plot_curves
from student_trainer.modeling import StudentForward
from student_trainer.recipes.configs import DPOConfig
from student_trainer.optim import build_optimizer, build_scheduler, clip_grad_norm, warmup_steps_for

log = logging.getLogger(__name__)

Sequence_ = tuple[list[int], int]  # (input_ids, prompt_len)


@dataclass(frozen=True)
class PreferencePair:
    index: int           #: row in the source file
    chosen: Sequence_    #: the preferred sequence (after --reverse: the source's rejected one)
    rejected: Sequence_


# ---------------------------------------------------------------------------- the math
def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor,
             ref_rejected: Tensor, beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair sigmoid DPO loss and the implicit rewards ``beta * (log pi - log ref)`` of the
    chosen and rejected responses (all ``[n]``; inputs are summed sequence log-probs)."""
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    loss = -F.logsigmoid(chosen_reward - rejected_reward)
    return loss, chosen_reward.detach(), rejected_reward.detach()


def sequence_logprobs(forward: StudentForward, batch: Batch) -> Tensor:
    """Summed log-prob of each sequence's response tokens: ``[B]`` (differentiable)."""
    token_logp = forward(batch.input_ids, batch.attention_mask, batch.row_idx, batch.col_idx,
                         mode="logprobs", target_ids=batch.target_ids)
    out = torch.zeros(batch.num_sequences, dtype=token_logp.dtype, device=token_logp.device)
    return out.index_add(0, batch.row_idx, token_logp)


# ---------------------------------------------------------------------------- data
def load_pairs(path: str | Path, tokenizer, *, max_seq_len: int | None, reverse: bool = False
               ) -> list[PreferencePair]:
    """Tokenised (chosen, rejected) pairs of a preference file; swapped when ``reverse``."""
    from storage.datasets import DataError, read_examples
    from storage.tokenization import tokenize_example

    chosen = read_examples(path, response_field="chosen")
    rejected = read_examples(path, response_field="rejected")
    pairs = []
    for c, r in zip(chosen, rejected, strict=True):
        c_seq = tokenize_example(tokenizer, c, max_seq_len, truncation="response")
        r_seq = tokenize_example(tokenizer, r, max_seq_len, truncation="response")
        if reverse:
            c_seq, r_seq = r_seq, c_seq
        pairs.append(PreferencePair(c.index, (list(c_seq[0]), c_seq[1]),
                                    (list(r_seq[0]), r_seq[1])))
    if not pairs:
        raise DataError(f"{path}: no preference pairs")
    return pairs


def pair_micro_batches(pairs: Sequence[PreferencePair], max_tokens: int) -> list[list[int]]:
    """Indices of pairs per micro-batch; a micro-batch holds chosen AND rejected sequences, so
    each pair costs twice its longer sequence."""
    lengths = [2 * max(len(p.chosen[0]), len(p.rejected[0])) for p in pairs]
    return pack_by_token_budget(lengths, max_tokens)


def collate_pairs(pairs: Sequence[PreferencePair], pad_id: int) -> Batch:
    """Chosen sequences first (rows 0..n-1), then rejected (rows n..2n-1)."""
    return collate_sequences([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)


@torch.no_grad()
def pair_logprobs(forward: StudentForward, pairs: Sequence[PreferencePair], *, pad_id: int,
                  max_tokens: int, device: torch.device, desc: str | None = None
                  ) -> tuple[Tensor, Tensor]:
    """Summed response log-probs ``(chosen [n], rejected [n])`` under ``forward``'s model, in
    float64 on the CPU (eval mode, no gradients)."""
    from tqdm.auto import tqdm

    was_training = forward.training
    forward.eval()
    chosen = torch.zeros(len(pairs), dtype=torch.float64)
    rejected = torch.zeros(len(pairs), dtype=torch.float64)
    groups = pair_micro_batches(pairs, max_tokens)
    try:
        for group in tqdm(groups, desc=desc, disable=desc is None, unit="batch"):
            batch = collate_pairs([pairs[i] for i in group], pad_id).to(device)
            logp = sequence_logprobs(forward, batch).double().cpu()
            n = len(group)
            chosen[group] = logp[:n]
            rejected[group] = logp[n:]
    finally:
        forward.train(was_training)
    return chosen, rejected


# ---------------------------------------------------------------------------- the loop
def run_dpo(config: DPOConfig) -> dict:
    """Train, save the model into ``config.out`` (a Hugging Face folder), return a summary."""
    from tqdm.auto import tqdm

    torch.manual_seed(config.seed)
    random.seed(config.seed)
    device = resolve_device(config.device)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model_and_tokenizer(config.model, device=device, train=True,
                                                trust_remote_code=config.trust_remote_code)
    pad_id = pad_token_id(tokenizer)
    forward = StudentForward(model, len(tokenizer))
    pairs = load_pairs(config.data, tokenizer, max_seq_len=config.max_seq_len,
                       reverse=config.reverse)
    log.info("%d preference pairs from %s%s", len(pairs), config.data,
             " (reversed: chosen and rejected swapped)" if config.reverse else "")

    ref_chosen, ref_rejected = pair_logprobs(
        forward, pairs, pad_id=pad_id, max_tokens=config.max_tokens, device=device,
        desc="reference log-probs" if config.progress else None)

    steps_per_epoch = math.ceil(len(pairs) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    optimizer = build_optimizer(model, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = build_scheduler(optimizer, warmup_steps=warmup_steps_for(total_steps,
                                                                         config.warmup_ratio),
                                total_steps=total_steps, schedule=config.lr_schedule,
                                min_lr_ratio=config.min_lr_ratio)
    metrics = MetricsLogger(out)
    rng = random.Random(config.seed)
    order: list[int] = []
    bar = tqdm(range(total_steps), desc="dpo" + (" (reverse)" if config.reverse else ""),
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
    metrics.close()

    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    final_chosen, final_rejected = pair_logprobs(
        forward, pairs, pad_id=pad_id, max_tokens=config.max_tokens, device=device,
        desc="final log-probs" if config.progress else None)
    summary = {
        "pairs": len(pairs), "steps": total_steps, "reverse": config.reverse,
        "beta": config.beta,
        # implicit-reward accuracy: beta * (log pi - log ref) higher for chosen than rejected
        "preference_accuracy": float(((final_chosen - ref_chosen)
                                      > (final_rejected - ref_rejected)).double().mean()),
        # plain likelihood ranking, before and after
        "logprob_accuracy_before": float((ref_chosen > ref_rejected).double().mean()),
        "logprob_accuracy_after": float((final_chosen > final_rejected).double().mean()),
        "config": asdict(config),
    }
    (out / "dpo_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
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
