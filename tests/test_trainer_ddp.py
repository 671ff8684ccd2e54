"""Two processes on CPU (gloo) under torchrun, DDP and FSDP2, against one process.

41 records, a global batch of 8: six steps per epoch, the last with a single record (so one
rank runs a filler with weight 0), and micro-batch counts that differ between ranks. Step s is
the same 8 records on any number of ranks (each rank its block) and the loss is the mean over
them either way: the runs must end at the same weights (up to float summation order). Ranks
reading other records than one process would, gradients not averaged or weighted by the wrong
share, or shards not gathered would break that. A run checkpointed on 2 ranks and resumed on 1
(DDP; FSDP on a world of one) must end where the uninterrupted runs end.
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


STEPS = 6


def _train_args(store, student, out):
    return ["train", "--mode", "off-policy", "--store", str(store), "--model", str(student),
            "--out", str(out), "--global-batch-size", "8", "--max-tokens", "96", "--epochs", "1",
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
    assert "terminate called" not in done.stderr, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("ranks")
    dpo_dir, rev_dir = save_teacher_pair(root / "pair")
    student = save_model_dir(root / "student", seed=7)
    tok = build_tokenizer()
    records, _ = dense_records(dpo_dir, rev_dir, random_sequences(len(tok), 41, seed=2))
    store = write_store(root / "store", records, tok, shard_tokens=96)
    single = subprocess.run(
        [sys.executable, "-m", "aligndistil.cli", *_train_args(store, student, root / "one")],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    return {"root": root, "store": store, "student": student, "one": root / "one"}


def _same_run(world, out) -> None:
    rows = read_jsonl(out / "metrics.jsonl")
    one_rows = read_jsonl(world["one"] / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["sequences"] for r in rows] == [8] * 5 + [1]  # reduced over both ranks
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


def _resume_alone(world, checkpoint, out, *extra: str) -> None:
    """Continue a 2-rank run's checkpoint in one process (no torchrun)."""
    out.mkdir()
    shutil.copytree(checkpoint, out / checkpoint.name)
    alone = subprocess.run(
        [sys.executable, "-m", "aligndistil.cli",
         *_train_args(world["store"], world["student"], out), *extra, "--resume"],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [3, 4, 5, 6]


def _same_weights(a, b) -> None:
    want, got = load_file(a / "final" / "model.safetensors"), load_file(b / "final" /
                                                                          "model.safetensors")
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-5, rtol=1e-4), name


def test_two_rank_ddp_matches_one_process_and_resumes_on_one(world, tmp_path):
    out = world["root"] / "ddp"
    _torchrun(_train_args(world["store"], world["student"], out))
    _same_run(world, out)
    # rank 0 wrote the checkpoints, with both ranks' RNG states
    checkpoint = out / "checkpoint-00000002"
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=True)
    assert state["step"] == 2 and len(state["rng"]) == 2
    resumed = tmp_path / "resumed-alone"
    _resume_alone(world, checkpoint, resumed)
    _same_weights(world["one"], resumed)


def test_two_rank_fsdp_matches_one_process_and_resumes_from_sharded_checkpoints(world, tmp_path):
    """--strategy fsdp: the same losses, gradient norms and final weights as one process; its
    checkpoints are sharded (each rank's part of the model and AdamW), final/ is a consolidated
    Hugging Face folder, and a run resumed from step 2's shards ends at the same weights, on
    two ranks and on one (the shards resharded to a world of one)."""
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
    assert [r["step"] for r in rows] == [3, 4, 5, 6]
    alone = tmp_path / "resumed-alone"
    _resume_alone(world, checkpoint, alone, "--strategy", "fsdp")
    _same_weights(out, alone)
    _same_weights(world["one"], alone)

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


def test_fsdp_refuses_async_rollouts_and_a_resume_under_the_other_strategy(world, tmp_path,
                                                                            capsys):
    from aligndistil.cli import main

    out = tmp_path / "x"
    out.mkdir()
    shutil.copytree(world["one"] / "checkpoint-00000002", out / "checkpoint-00000002")
    args = _train_args(world["store"], world["student"], out)
    assert main([*args, "--strategy", "fsdp", "--resume"]) == 2
    assert "written with --strategy ddp; resume it with --strategy ddp" in \
        capsys.readouterr().err
    assert main(["train", "--mode", "on-policy", "--teacher-url", "http://127.0.0.1:9",
                 "--prompts", str(world["store"] / "zarr.json"), "--model",
                 str(world["student"]), "--out", str(tmp_path / "y"), "--strategy",
                 "fsdp", "--async-rollouts"]) == 2
    assert "--strategy fsdp keeps only shards" in capsys.readouterr().err


def test_unequal_shares_and_micro_batch_counts_give_the_one_process_step(world, tmp_path):
    """One step with the ranks holding 7 and 3 of its 10 sequences in 4 and 1 micro-batches,
    or 10 and none (a weight-0 filler): under FSDP (weight-0 passes on the shorter rank) and
    DDP, for AlignDistil and both REINFORCE objectives (whose baseline is the whole step's,
    over both ranks), the weights after the step equal one process's over all 10."""
    from dist_train_step import CASES
    worker = str(REPO / "tests" / "dist_train_step.py")
    args = [str(world["store"]), str(world["student"]), str(tmp_path)]
    alone = subprocess.run([sys.executable, worker, *args], cwd=REPO, env=ENV,
                           capture_output=True, text=True, timeout=300)
    assert alone.returncode == 0, alone.stderr[-3000:]
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-addr", "127.0.0.1", "--master-port", str(free_port()), worker, *args],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    initial = load_file(world["student"] / "model.safetensors")
    for strategy, objective, share in CASES:
        want = load_file(tmp_path / f"one-{objective}.safetensors")
        got = load_file(tmp_path / f"{strategy}-{objective}-{share}.safetensors")
        for name in want:  # SGD: the moves are LR times the gradients
            grad_want, grad_got = initial[name] - want[name], initial[name] - got[name]
            scale = float(grad_want.abs().max())
            assert scale > 0, (strategy, objective, name)
            worst = float((grad_got - grad_want).abs().max())
            assert worst <= 1e-4 * scale, (strategy, objective, name, worst, scale)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_finished_two_rank_runs_exit_0_every_time(world, tmp_path, strategy):
    """A scheduler reads a non-zero exit as a failed job: a 2-rank run that finished its work
    must exit 0 every time (no abort while the process group is torn down), train and dpo."""
    from test_dpo import _write_prefs

    prefs = _write_prefs(tmp_path / "prefs.jsonl", n=11)
    for i in range(5):
        _torchrun([*_train_args(world["store"], world["student"], tmp_path / f"train-{i}"),
                   "--strategy", strategy, "--max-steps", "2", "--save-every", "0"])
        _torchrun(["dpo", "--model", str(world["student"]), "--data", str(prefs), "--out",
                   str(tmp_path / f"dpo-{i}"), "--batch-size", "5", "--max-tokens", "96",
                   "--epochs", "1", "--strategy", strategy, "--no-progress", "--report-to",
                   "none", "--device", "cpu", "--log-level", "warning"])
