"""Supervised fine-tuning on chat demonstrations: cross-entropy on the assistant's response.

Rows are anything :func:`storage.datasets.read_examples` reads (``{"messages": [...]}``,
``{"prompt", "response"}``, ...), tokenised with the model's chat template exactly as the
teachers' store tokenises them. The loss is the mean next-token cross-entropy over response
tokens (prompt tokens are context only). Seeded and deterministic on a CPU.
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path

import torch

from storage.datasets import data_source
from storage.fsio import atomic_write_text
from storage.outputs import clear_folder
from student_trainer.recipes.configs import SAVED_CONFIG, SFTConfig, public_values
from student_trainer.trackers import parse_report_to

log = logging.getLogger(__name__)


def load_sequences(path, tokenizer, max_seq_len: int) -> list[tuple[list[int], int]]:
    from storage.datasets import DataError, read_examples
    from storage.tokenization import tokenize_example

    seqs = [tokenize_example(tokenizer, ex, max_seq_len, truncation="response")
            for ex in read_examples(path)]
    if not seqs:
        raise DataError(f"{path}: no examples")
    return [(list(ids), p) for ids, p in seqs]


def collate(seqs: list[tuple[list[int], int]], pad_id: int):
    """``(input_ids, attention_mask, labels)``; labels are -100 on the prompt and padding."""
    width = max(len(ids) for ids, _ in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, (seq, p) in enumerate(seqs):
        row = torch.tensor(seq, dtype=torch.long)
        ids[i, :len(seq)] = row
        mask[i, :len(seq)] = 1
        labels[i, p:len(seq)] = row[p:]
    return ids, mask, labels


def run_sft(config: SFTConfig) -> dict:
    from tqdm.auto import tqdm

    from causal_lm.loading import load_model_and_tokenizer, pad_token_id, resolve_device
    from causal_lm.packed import flash_precision
    from student_trainer.metrics import MetricsLogger, plot_curves
    from student_trainer.optim import (build_optimizer, build_scheduler, clip_grad_norm,
                                       warmup_steps_for)

    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    device = resolve_device(config.device)
    out = Path(config.out)
    if config.overwrite:
        clear_folder(out, keep=(SAVED_CONFIG["sft"],))
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model_and_tokenizer(config.model, device=device, train=True,
                                                attn_implementation=config.attn_implementation)
    pad_id = pad_token_id(tokenizer)
    seqs = load_sequences(data_source(config.data, split=config.split,
                                      config_name=config.data_config),
                          tokenizer, config.max_seq_len)
    per_epoch = max(1, len(seqs) // config.batch_size)
    total = per_epoch * config.epochs
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    optimizer = build_optimizer(model, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = build_scheduler(optimizer, warmup_steps=warmup_steps_for(total,
                                config.warmup_ratio), total_steps=total,
                                schedule=config.lr_schedule)
    metrics = MetricsLogger(out, report_to=parse_report_to(config.report_to),
                            config=public_values(config))
    log.info("SFT on %d examples: %d steps of %d", len(seqs), total, config.batch_size)
    started, step, last = time.perf_counter(), 0, {}
    bar = tqdm(total=total, disable=not config.progress, unit="step", desc="sft")
    model.train()
    while step < total:
        order = list(range(len(seqs)))
        rng.shuffle(order)
        for start in range(0, per_epoch * config.batch_size, config.batch_size):
            if step >= total:
                break
            batch = collate([seqs[i] for i in order[start:start + config.batch_size]], pad_id)
            ids, mask, labels = (t.to(device) for t in batch)
            with flash_precision(model):  # a FlashAttention kernel needs half precision
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = clip_grad_norm(model.parameters(), config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            last = {"loss": loss.item(), "grad_norm": float(grad_norm),
                    "lr": scheduler.get_last_lr()[0]}
            metrics.log(step + 1, last)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{last['loss']:.3f}")
    bar.close()
    metrics.close()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    plot_curves(out / "metrics.jsonl", out / "training_curves.png", title="SFT")
    summary = {"steps": step, "examples": len(seqs), "final": str(out), "last": last,
               "seconds": round(time.perf_counter() - started, 1)}
    atomic_write_text(out / "sft_summary.json", json.dumps(summary, indent=2) + "\n")
    return summary
