"""AlignDistil through Hugging Face's ``Trainer``: a subclass whose ``compute_loss`` is the
AlignDistil loss of a store's batches (``student_trainer.api``).

    python examples/hf_trainer.py --store work/targets.zarr --model work/sft --out work/hf_run \\
        --max-steps 100 --batch-size 8 --lr 1e-6

Everything else (optimizer, schedule, logging, checkpoints, devices) is the ``Trainer``'s. The
store's records arrive as :class:`student_trainer.collate.Batch` objects inside a dict, so the
``Trainer`` passes them through untouched; ``compute_loss`` moves them to the model's device.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from student_trainer.api import (StoreDataset, StudentForward,  # noqa: E402
                                 aligndistil_batch_loss)
from student_trainer.collate import collate_records  # noqa: E402


class AlignDistilTrainer(Trainer):
    """``Trainer`` with the AlignDistil loss; ``beta0`` and ``weighting`` as in ``train``."""

    def __init__(self, *args, vocab_size: int, beta0: float = 0.1, weighting: str = "alpha",
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.vocab_size, self.beta0, self.weighting = vocab_size, beta0, weighting

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        device = next(model.parameters()).device
        loss = aligndistil_batch_loss(StudentForward(model, self.vocab_size),
                                      inputs["batch"].to(device), beta0=self.beta0,
                                      weighting=self.weighting)
        return (loss, {"loss": loss}) if return_outputs else loss


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--max-steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    trainer = AlignDistilTrainer(
        model=model,
        args=TrainingArguments(output_dir=args.out, per_device_train_batch_size=args.batch_size,
                               max_steps=args.max_steps, learning_rate=args.lr,
                               logging_steps=1, save_strategy="no", report_to="none",
                               remove_unused_columns=False, seed=args.seed,
                               use_cpu=not torch.cuda.is_available(),
                               dataloader_num_workers=0, disable_tqdm=True),
        train_dataset=StoreDataset(args.store),
        data_collator=lambda records: {"batch": collate_records(records, pad_id)},
        vocab_size=len(tokenizer))
    trainer.train()
    trainer.save_model(args.out)
    tokenizer.save_pretrained(args.out)
    for row in trainer.state.log_history:
        if "loss" in row:
            print(f"step {row['step']}: loss {row['loss']:.6g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
