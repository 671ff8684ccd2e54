"""Two-process DDP on CPU (gloo) under torchrun: each rank streams its own half of the store.

With the global batch equal to the whole store, every step of the 2-rank run sees the same 16
sequences as a 1-process run (8 per rank, disjoint halves), and the loss is the mean over the
global batch either way: the two runs must end at the same weights (up to float summation
order). Ranks reading the same half, or gradients not averaged, would break that.
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from live_server import REPO, free_port
from tiny_models import build_tokenizer, save_model_dir, save_teacher_pair
from trainer_support import dense_records, random_sequences, write_store
from student_trainer.metrics import read_jsonl


def _train_args(store, student, out):
    return ["train", "--mode", "off-policy", "--store", str(store), "--model", str(student),
            "--out", str(out), "--global-batch-size", "16", "--max-tokens", "96", "--epochs", "3",
            "--lr", "3e-3", "--save-every", "2", "--no-progress", "--report-to", "none",
            "--device", "cpu", "--log-level", "warning"]


def test_two_rank_ddp_matches_one_process(tmp_path):
    dpo_dir, rev_dir = save_teacher_pair(tmp_path / "pair")
    student = save_model_dir(tmp_path / "student", seed=7)
    tok = build_tokenizer()
    records, _ = dense_records(dpo_dir, rev_dir, random_sequences(len(tok), 16, seed=2))
    store = write_store(tmp_path / "store", records, tok)

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
         "-m", "aligndistil.cli", *_train_args(store, student, tmp_path / "ddp")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = subprocess.run(
        [sys.executable, "-m", "aligndistil.cli", *_train_args(store, student, tmp_path / "one")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]

    ddp_rows = read_jsonl(tmp_path / "ddp" / "metrics.jsonl")
    one_rows = read_jsonl(tmp_path / "one" / "metrics.jsonl")
    assert [r["step"] for r in ddp_rows] == [1, 2, 3]
    assert all(r["sequences"] == 16 for r in ddp_rows)  # reduced over both ranks
    for a, b in zip(ddp_rows, one_rows):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(b["loss"])
        assert a["response_tokens"] == b["response_tokens"]
    got = load_file(tmp_path / "ddp" / "final" / "model.safetensors")
    want = load_file(tmp_path / "one" / "final" / "model.safetensors")
    initial = load_file(student / "model.safetensors")
    for name in want:
        moved = (want[name] - initial[name]).abs().max()
        assert moved > 0, name
        assert torch.allclose(got[name], want[name], atol=1e-5 * max(1.0, float(moved)),
                              rtol=1e-4), name
    # rank 0 wrote the checkpoints, with both ranks' RNG states
    state = torch.load(tmp_path / "ddp" / "checkpoint-00000002" / "trainer_state.pt",
                       weights_only=True)
    assert state["step"] == 2 and len(state["rng"]) == 2 and state["run"]["world_size"] == 2
