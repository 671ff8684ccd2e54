"""``student_trainer.api`` for users with their own loop, and ``examples/hf_trainer.py``:
AlignDistil through Hugging Face's ``Trainer`` on tiny real models and a real store."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from tiny_models import build_tokenizer, save_model_dir
from trainer_support import dense_records, random_sequences, write_store
from live_server import REPO
from student_trainer.api import (StoreDataset, StudentForward, aligndistil_batch_loss,
                                 store_dataloader)
from student_trainer.collate import micro_batches
from student_trainer.distributed import DistEnv
from student_trainer.modeling import load_student
from student_trainer.optim import build_optimizer, build_scheduler
from student_trainer.recipes.configs import TrainConfig
from student_trainer.recipes.train import train_step


@pytest.fixture(scope="module")
def world(tmp_path_factory, teacher_pair):
    root = tmp_path_factory.mktemp("api")
    tok = build_tokenizer()
    records, _ = dense_records(*teacher_pair, random_sequences(len(tok), 12, seed=4))
    return {"root": root, "store": write_store(root / "store", records, tok),
            "records": records, "student": save_model_dir(root / "student", seed=7)}


def test_the_store_as_a_dataloader_yields_every_record_once(world):
    loader = store_dataloader(world["store"], batch_size=5, pad_id=0, seed=1)
    seen = []
    for batch in loader:
        assert batch.num_sequences <= 5 and batch.topk_ids is not None
        for ids, mask in zip(batch.input_ids, batch.attention_mask):
            seen.append(tuple(ids[mask.bool()].tolist()))
    want = sorted(tuple(r.input_ids.tolist()) for r in world["records"])
    assert len(StoreDataset(world["store"])) == 12 and sorted(seen) == want
    # the same seed gives the same order; another seed another
    first = [b.input_ids[:, 0].tolist() for b in store_dataloader(world["store"], 5, pad_id=0,
                                                                   seed=1)]
    again = [b.input_ids[:, 0].tolist() for b in store_dataloader(world["store"], 5, pad_id=0,
                                                                   seed=1)]
    assert first == again


def test_the_batch_loss_is_the_trainers_loss(world):
    """aligndistil_batch_loss on one batch = the loss train_step reports for the same batch."""
    records = world["records"][:6]
    model, tok = load_student(world["student"], device=torch.device("cpu"))
    forward = StudentForward(model, len(tok))
    batches = micro_batches(records, max_tokens=10_000, pad_id=0)
    assert len(batches) == 1
    with torch.no_grad():
        ours = float(aligndistil_batch_loss(forward, batches[0]))
    opt = build_optimizer(model, lr=1e-9, weight_decay=0.0, betas=(0.9, 0.95))
    sched = build_scheduler(opt, warmup_steps=0, total_steps=1, schedule="constant",
                            min_lr_ratio=0.0)
    config = TrainConfig(mode="off-policy", model="m", out="o", store="s")
    stats = train_step(forward, batches, optimizer=opt, scheduler=sched,
                       params=list(model.parameters()), config=config, step_sequences=6,
                       env=DistEnv(), device=torch.device("cpu"), amp=False)
    assert ours == pytest.approx(stats["loss"], rel=1e-6)


def test_hugging_face_trainer_example_trains_on_the_store(world, tmp_path):
    out = tmp_path / "hf"
    r = subprocess.run([sys.executable, str(REPO / "examples" / "hf_trainer.py"), "--store",
                        str(world["store"]), "--model", str(world["student"]), "--out", str(out),
                        "--max-steps", "6", "--batch-size", "4", "--lr", "3e-3"],
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    losses = [float(line.split("loss ")[1]) for line in r.stdout.splitlines()
              if line.startswith("step ")]
    assert len(losses) == 6 and all(np.isfinite(losses))
    assert np.mean(losses[3:]) < np.mean(losses[:3])  # it learns (3 passes over 12 records)
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
