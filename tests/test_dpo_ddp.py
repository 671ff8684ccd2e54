"""``aligndistil dpo`` under torchrun: two CPU processes (gloo), DDP and FSDP2.

Each rank takes every other pair of a step's batch, so the ranks' micro-batches differ from one
process's, and with 11 pairs in batches of 5 the last step of each epoch leaves rank 1 without a
pair at all. The loss is the mean over the whole batch either way: both strategies must log the
losses of one process and end at its weights (up to float summation order). A sharded
checkpoint resumed with --resume must end where the uninterrupted sharded run ended.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from live_server import REPO, free_port
from test_dpo import _write_prefs
from tiny_models import save_model_dir
from student_trainer.metrics import read_jsonl

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _args(model, prefs, out) -> list[str]:
    return ["dpo", "--model", str(model), "--data", str(prefs), "--out", str(out),
            "--batch-size", "5", "--max-tokens", "96", "--epochs", "2", "--lr", "2e-3",
            "--seed", "3", "--save-every", "3", "--save-total-limit", "3", "--no-progress",
            "--report-to", "none", "--device", "cpu", "--log-level", "warning"]


def _run(args: list[str], ranks: int) -> None:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
                "--master-addr", "127.0.0.1", "--master-port", str(free_port())] \
        if ranks > 1 else [sys.executable]
    done = subprocess.run([*launcher, "-m", "aligndistil.cli", *args], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo_ranks")
    model = save_model_dir(root / "base", seed=3)
    prefs = _write_prefs(root / "prefs.jsonl", n=11)
    _run(_args(model, prefs, root / "one"), ranks=1)
    return {"root": root, "model": model, "prefs": prefs, "out": root / "one"}


def _same_as_one_process(one, out) -> None:
    rows, want_rows = read_jsonl(out / "metrics.jsonl"), read_jsonl(one["out"] / "metrics.jsonl")
    assert [r["step"] for r in rows] == [r["step"] for r in want_rows] == [1, 2, 3, 4, 5, 6]
    for got, want in zip(rows, want_rows):
        # float32 sums of log-probs over other micro-batches: about 1e-7 of a sum near 50
        for key, tol in (("loss", 1e-5), ("reward_margin", 2e-5), ("grad_norm", 1e-4)):
            assert abs(got[key] - want[key]) <= tol * max(abs(want[key]), 1.0), (key, got)
        assert got["preference_accuracy"] == want["preference_accuracy"]
    # the reference log-probs, scored half on each rank, kept in the checkpoints
    state = torch.load(out / "checkpoint-00000003" / "trainer_state.pt", weights_only=True)
    want_state = torch.load(one["out"] / "checkpoint-00000003" / "trainer_state.pt",
                            weights_only=True)
    assert len(state["rng"]) == 2
    for key in ("ref_chosen", "ref_rejected"):
        assert torch.allclose(state[key], want_state[key], atol=1e-5, rtol=0), key
    got, want = load_file(out / "model.safetensors"), load_file(one["out"] / "model.safetensors")
    initial = load_file(one["model"] / "model.safetensors")
    assert got.keys() == want.keys()
    for name in want:
        moved = float((want[name] - initial[name]).abs().max())
        assert moved > 0, name
        assert torch.allclose(got[name], want[name], atol=1e-5 * max(1.0, moved), rtol=1e-4), name
    summary = json.loads((out / "dpo_summary.json").read_text())
    want_summary = json.loads((one["out"] / "dpo_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["pairs"] == 11
    for key in ("preference_accuracy", "logprob_accuracy_before", "logprob_accuracy_after"):
        assert summary[key] == want_summary[key], key


def test_two_rank_ddp_dpo_matches_one_process(one):
    out = one["root"] / "ddp"
    _run(_args(one["model"], one["prefs"], out), ranks=2)
    _same_as_one_process(one, out)
    assert (out / "checkpoint-00000003" / "model.safetensors").is_file()


def test_two_rank_fsdp_dpo_matches_one_process_and_resumes(one, tmp_path):
    out = one["root"] / "fsdp"
    _run([*_args(one["model"], one["prefs"], out), "--strategy", "fsdp"], ranks=2)
    _same_as_one_process(one, out)
    checkpoint = out / "checkpoint-00000003"
    assert (checkpoint / "distributed" / ".metadata").is_file()
    assert not (checkpoint / "model.safetensors").exists()  # weights only as shards

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(checkpoint, resumed / checkpoint.name)
    shutil.copy(out / "dpo_config.yaml", resumed / "dpo_config.yaml")
    _run([*_args(one["model"], one["prefs"], resumed), "--strategy", "fsdp", "--resume"],
         ranks=2)
    want, got = load_file(out / "model.safetensors"), load_file(resumed / "model.safetensors")
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-6, rtol=1e-5), name
    assert [r["step"] for r in read_jsonl(resumed / "metrics.jsonl")] == [4, 5, 6]


def test_dpo_fsdp_on_one_process_and_resume_keeps_the_strategy(one, tmp_path, capsys):
    """--strategy fsdp on one process is a world of one (as for train): the same weights as
    the DDP run; a resume under the other strategy is refused."""
    from aligndistil.cli import main

    import torch.distributed as dist

    assert main([*_args(one["model"], one["prefs"], tmp_path / "x"), "--strategy", "fsdp"]) == 0
    assert not dist.is_initialized()  # its own group, torn down
    want, got = load_file(one["out"] / "model.safetensors"), \
        load_file(tmp_path / "x" / "model.safetensors")
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-5, rtol=1e-4), name
    capsys.readouterr()
    assert main([*_args(one["model"], one["prefs"], one["out"]), "--resume", "--strategy",
                 "fsdp"]) == 2
    assert "--strategy 'ddp' -> 'fsdp'" in capsys.readouterr().err
