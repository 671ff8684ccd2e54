"""Two processes on CPU (gloo) under torchrun, DDP and FSDP2: each rank streams its own half of
the store.

With the global batch equal to the whole store, every step of a 2-rank run sees the same 16
sequences as a 1-process run (8 per rank, disjoint halves), and the loss is the mean over the
global batch either way: the runs must end at the same weights (up to float summation order).
Ranks reading the same half, gradients not averaged, or shards not gathered would break that.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
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


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _torchrun(args: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
         "-m", "aligndistil.cli", *args], cwd=REPO, env=ENV, capture_output=True, text=True,
        timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("ranks")
    dpo_dir, rev_dir = save_teacher_pair(root / "pair")
    student = save_model_dir(root / "student", seed=7)
    tok = build_tokenizer()
    records, _ = dense_records(dpo_dir, rev_dir, random_sequences(len(tok), 16, seed=2))
    store = write_store(root / "store", records, tok)
    single = subprocess.run(
        [sys.executable, "-m", "aligndistil.cli", *_train_args(store, student, root / "one")],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    return {"root": root, "store": store, "student": student, "one": root / "one"}


def _same_run(world, out) -> None:
    rows = read_jsonl(out / "metrics.jsonl")
    one_rows = read_jsonl(world["one"] / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["sequences"] == 16 for r in rows)  # reduced over both ranks
    for a, b in zip(rows, one_rows):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(b["loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * abs(b["grad_norm"])
        assert a["response_tokens"] == b["response_tokens"]
    got = load_file(out / "final" / "model.safetensors")
    want = load_file(world["one"] / "final" / "model.safetensors")
    initial = load_file(world["student"] / "model.safetensors")
    assert got.keys() == want.keys()
    for name in want:
        moved = (want[name] - initial[name]).abs().max()
        assert moved > 0, name
        assert torch.allclose(got[name], want[name], atol=1e-5 * max(1.0, float(moved)),
                              rtol=1e-4), name


def test_two_rank_ddp_matches_one_process(world):
    out = world["root"] / "ddp"
    _torchrun(_train_args(world["store"], world["student"], out))
    _same_run(world, out)
    # rank 0 wrote the checkpoints, with both ranks' RNG states
    state = torch.load(out / "checkpoint-00000002" / "trainer_state.pt", weights_only=True)
    assert state["step"] == 2 and len(state["rng"]) == 2 and state["run"]["world_size"] == 2


def test_two_rank_fsdp_matches_one_process_and_resumes_from_sharded_checkpoints(world, tmp_path):
    """--strategy fsdp: the same losses, gradient norms and final weights as one process; its
    checkpoints are sharded (each rank's part of the model and AdamW), final/ is a consolidated
    Hugging Face folder, and a run resumed from step 2's shards ends at the same weights."""
    out = world["root"] / "fsdp"
    _torchrun([*_train_args(world["store"], world["student"], out), "--strategy", "fsdp"])
    _same_run(world, out)
    checkpoint = out / "checkpoint-00000002"
    shards = sorted(p.name for p in (checkpoint / "distributed").iterdir())
    assert "__0_0.distcp" in shards and "__1_0.distcp" in shards and ".metadata" in shards
    assert not (checkpoint / "model.safetensors").exists()  # weights only as shards
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=True)
    assert state["strategy"] == "fsdp" and "optimizer" not in state and len(state["rng"]) == 2

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(checkpoint, resumed / checkpoint.name)
    _torchrun([*_train_args(world["store"], world["student"], resumed), "--strategy", "fsdp",
               "--resume"])
    want = load_file(out / "final" / "model.safetensors")
    got = load_file(resumed / "final" / "model.safetensors")
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-6, rtol=1e-5), name
    rows = read_jsonl(resumed / "metrics.jsonl")
    assert [r["step"] for r in rows] == [3]

    # any checkpoint consolidates in one process, without torchrun
    from aligndistil.cli import main

    assert main(["consolidate", "--checkpoint", str(checkpoint), "--out",
                 str(tmp_path / "step2")]) == 0
    weights = load_file(tmp_path / "step2" / "model.safetensors")
    assert (tmp_path / "step2" / "tokenizer.json").is_file()
    step2 = load_file(world["one"] / "checkpoint-00000002" / "model.safetensors")
    initial = load_file(world["student"] / "model.safetensors")
    for name in step2:  # the one-process run's weights at step 2
        moved = float((step2[name] - initial[name]).abs().max())
        assert moved > 0 and torch.allclose(weights[name], step2[name],
                                            atol=1e-5 * max(1.0, moved), rtol=1e-4), name


def test_fsdp_needs_torchrun_and_no_async_rollouts(world, tmp_path, capsys):
    from aligndistil.cli import main

    args = _train_args(world["store"], world["student"], tmp_path / "x")
    assert main([*args, "--strategy", "fsdp"]) == 2
    assert "--strategy fsdp shards the student over torchrun" in capsys.readouterr().err
    assert main(["train", "--mode", "on-policy", "--teacher-url", "http://127.0.0.1:9",
                 "--prompts", str(world["store"] / "zarr.json"), "--model",
                 str(world["student"]), "--out", str(tmp_path / "y"), "--strategy",
                 "fsdp", "--async-rollouts"]) == 2
    assert "--strategy fsdp keeps only shards" in capsys.readouterr().err
