"""Crash and resume of ``aligndistil train`` with real processes, real signals, real files.

Each run is the real console command in its own process (CPU, fixed seed, tiny models, a small
Zarr store). A run is SIGKILLed in the middle, then the same command with ``--resume`` finishes
it; the resumed run's ``final/model.safetensors`` must equal, bit for bit, that of a run that
was never interrupted, and its ``metrics.jsonl`` must hold every step exactly once.

Bitwise equality across processes holds on the CPU when the processes use the same number of
intra-op threads (the children here all run with ``OMP_NUM_THREADS=1``). Measured on a shared
2-core CPU machine: two uninterrupted runs with the same thread count give identical
bytes; a 1-thread run and a 2-thread run of the same 24 steps differ by up to 6.5e-5 in a
weight, because the matmul reductions are split differently. So resume on the same kind of
machine with the same thread settings to get the very same model; one thread also avoids
OpenMP spin-waits that make steps 100x slower when the 2 cores are shared.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from student_trainer.checkpoint import (STATE_FILE, CheckpointError, checkpoint_name,
                                        list_checkpoints, load_state, read_step)
from tiny_models import build_tokenizer, save_model_dir
from trainer_support import dense_records, random_sequences, write_store

REPO = Path(__file__).resolve().parent.parent
STALL_SCRIPT = Path(__file__).resolve().parent / "stall_checkpoint_write.py"
RECORDS, BATCH, EPOCHS, SAVE_EVERY = 16, 4, 20, 5
STEPS = RECORDS // BATCH * EPOCHS          # 80 steps: ~1 s of training, a wide window to kill in
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
TIMEOUT = 180


def _cli() -> list[str]:
    """The installed console script ``aligndistil`` (or the module, if not installed)."""
    script = Path(sys.executable).with_name("aligndistil")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "aligndistil.cli"]


def _train_argv(world, out: Path, *extra: str) -> list[str]:
    return ["train", "--mode", "off-policy", "--store", str(world["store"]), "--model",
            str(world["student"]), "--out", str(out), "--global-batch-size", str(BATCH),
            "--max-tokens", "64", "--lr", "3e-3", "--epochs", str(EPOCHS), "--seed", "3",
            "--save-every", str(SAVE_EVERY), "--device", "cpu", "--no-progress",
            "--report-to", "none", "--log-level", "info", *extra]


def _spawn(argv: list[str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as fh:
        return subprocess.Popen(argv, cwd=REPO, env=CHILD_ENV, stdout=fh,
                                stderr=subprocess.STDOUT)


def _reap(proc: subprocess.Popen) -> None:
    """Kill a child a failed test left running."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _finish(proc: subprocess.Popen, log: Path) -> str:
    proc.wait(TIMEOUT)
    text = log.read_text(errors="replace")
    assert proc.returncode == 0, text[-3000:]
    return text


def _logged_steps(out: Path) -> list[int]:
    """Steps in metrics.jsonl; a line still being written (no newline yet) is skipped."""
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").split("\n")[:-1]
    return [json.loads(line)["step"] for line in lines if line.strip()]


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def _assert_same_weights(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert torch.equal(got[name], want[name]), (
            name, float((got[name] - want[name]).abs().max()))


def _kill_between_checkpoints(proc: subprocess.Popen, out: Path, log: Path, *,
                              steps: int = STEPS, save_every: int = SAVE_EVERY
                              ) -> tuple[int, int]:
    """SIGKILL ``proc`` once it has a complete checkpoint and has logged steps after it.

    The process is frozen with SIGSTOP while its output folder is inspected, so what is seen is
    what is on disk when SIGKILL lands. Returns (step of the newest complete checkpoint, last
    logged step) at the kill.
    """
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before it could be killed; "
                        f"make it longer. Log: {log.read_text(errors='replace')[-2000:]}")
        logged = _logged_steps(out)
        if logged and logged[-1] >= save_every + 2 and list_checkpoints(out):
            os.kill(proc.pid, signal.SIGSTOP)
            logged, ckpts = _logged_steps(out), list_checkpoints(out)
            saved = read_step(ckpts[-1]) if ckpts else None
            if saved is not None and saved < logged[-1] < steps:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(TIMEOUT)
                return saved, logged[-1]
            os.kill(proc.pid, signal.SIGCONT)
        time.sleep(0.005)
    proc.kill()
    pytest.fail("timed out waiting for a checkpoint")


@pytest.fixture(scope="module")
def models(tmp_path_factory, teacher_pair):
    """A teacher pair and an initial student (tiny Llamas, one tokenizer)."""
    root = tmp_path_factory.mktemp("crash_resume")
    return {"root": root, "pair": teacher_pair,
            "student": save_model_dir(root / "student", seed=7)}


@pytest.fixture(scope="module")
def world(models):
    """``models`` plus a store of the teachers' targets for 16 random sequences."""
    tok = build_tokenizer()
    records, _ = dense_records(*models["pair"], random_sequences(len(tok), RECORDS, seed=1))
    return {**models, "store": write_store(models["root"] / "store", records, tok)}


class Uninterrupted:
    """A run started now, in the background (so it overlaps the crash runs), waited for on
    first use."""

    def __init__(self, argv: list[str], out: Path, log: Path, steps: int, student: Path):
        self.out, self.log, self.steps, self.student = out, log, steps, student
        self.proc = _spawn(argv, log)
        self.checked = False

    def result(self) -> Path:
        if not self.checked:
            _finish(self.proc, self.log)
            assert _logged_steps(self.out) == list(range(1, self.steps + 1))
            assert read_step(self.out / "final") == self.steps
            assert not torch.equal(_weights(self.out / "final")["lm_head.weight"],
                                   _weights(self.student)["lm_head.weight"])  # it trained
            self.checked = True
        return self.out

    def stop(self) -> None:
        _reap(self.proc)


@pytest.fixture(scope="module")
def reference(world):
    out = world["root"] / "uninterrupted"
    run = Uninterrupted(_cli() + _train_argv(world, out), out, world["root"] / "uninterrupted.log",
                        STEPS, world["student"])
    yield run
    run.stop()


def _check_resumed_run(out: Path, reference: Path, resume_log: str, from_step: int,
                       steps: int = STEPS) -> None:
    assert f"resumed from {out / checkpoint_name(from_step)} at step {from_step} of {steps}" \
        in resume_log, resume_log[-3000:]
    # Every step exactly once, and each step's loss is the uninterrupted run's, bit for bit.
    rows = _rows(out)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    want = {r["step"]: (r["loss"], r["grad_norm"]) for r in _rows(reference)}
    assert [(r["loss"], r["grad_norm"]) for r in rows] == [want[s] for s in range(1, steps + 1)]
    _assert_same_weights(_weights(out / "final"), _weights(reference / "final"))
    assert read_step(out / "final") == steps
    assert not list(out.glob(".tmp-*")), "temporary folders left behind"


def test_sigkill_mid_run_then_resume_gives_the_uninterrupted_weights(world, reference,
                                                                     tmp_path):
    out, log = tmp_path / "run", tmp_path / "killed.log"
    proc = _spawn(_cli() + _train_argv(world, out), log)
    try:
        saved, logged = _kill_between_checkpoints(proc, out, log)
    finally:
        _reap(proc)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "final").exists()
    assert saved < logged < STEPS  # steps after the checkpoint were logged, then lost

    resumed_log = tmp_path / "resumed.log"
    text = _finish(_spawn(_cli() + _train_argv(world, out, "--resume"), resumed_log),
                   resumed_log)
    _check_resumed_run(out, reference.result(), text, saved)


def test_sigkill_during_a_checkpoint_write_keeps_the_previous_checkpoint(world, reference,
                                                                         tmp_path):
    """The trainer state of checkpoint 10 is half on disk when the process is killed: the
    torn write stays in a temporary folder, checkpoint 5 is the one --resume uses, and the
    run still ends with the uninterrupted run's weights."""
    out, log, marker = tmp_path / "run", tmp_path / "stalled.log", tmp_path / "stalled"
    stall_at = 2 * SAVE_EVERY
    proc = _spawn([sys.executable, str(STALL_SCRIPT), str(stall_at), str(marker),
                   *_train_argv(world, out)], log)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not marker.exists():
            assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "the checkpoint write never started"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(TIMEOUT)
    finally:
        _reap(proc)
    assert proc.returncode == -signal.SIGKILL

    # On disk: checkpoint 5 complete, checkpoint 10 only as a torn temporary folder.
    assert [p.name for p in list_checkpoints(out)] == [checkpoint_name(SAVE_EVERY)]
    assert load_state(out / checkpoint_name(SAVE_EVERY))["step"] == SAVE_EVERY
    assert not (out / checkpoint_name(stall_at)).exists()
    (torn,) = out.glob(f".tmp-{checkpoint_name(stall_at)}-*")
    assert Path(marker.read_text()) == torn / STATE_FILE
    assert (torn / "model.safetensors").is_file()
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_state(torn)  # the half-written file really is unreadable
    assert _logged_steps(out)[-1] == stall_at

    resumed_log = tmp_path / "resumed.log"
    text = _finish(_spawn(_cli() + _train_argv(world, out, "--resume"), resumed_log),
                   resumed_log)
    _check_resumed_run(out, reference.result(), text, SAVE_EVERY)


# ---------------------------------------------------------------------------- on-policy
ON_PROMPTS = ["sort 3 1 2", "copy 5 6", "reverse the list 7 8 9", "hello how are you ?",
              "what is 4 and 5 ?", "sort 9 8", "copy the numbers 1 2 3", "answer yes or no"]
ON_EPOCHS, ON_SAVE_EVERY = 15, 3
ON_STEPS = len(ON_PROMPTS) // BATCH * ON_EPOCHS     # 30 steps


def _on_policy_argv(world, url: str, out: Path, *extra: str) -> list[str]:
    return ["train", "--mode", "on-policy", "--teacher-url", url, "--prompts",
            str(world["prompts"]), "--model", str(world["student"]), "--out", str(out),
            "--global-batch-size", str(BATCH), "--epochs", str(ON_EPOCHS), "--seed", "3",
            "--max-new-tokens", "6", "--lr", "3e-3", "--save-every", str(ON_SAVE_EVERY),
            "--device", "cpu", "--no-progress", "--report-to", "none", "--log-level", "info",
            *extra]


@pytest.mark.slow  # a server and five trainer processes: ~35 s of CPU (35-90 s on a busy box)
def test_on_policy_sigkill_then_resume_gives_the_uninterrupted_weights(models, tmp_path):
    """On-policy with synchronous rollouts resumes exactly: step s samples with a seed derived
    from s, from the weights restored bit for bit, and the teacher server (one client at a
    time, so the same engine batches) scores the same sequences to the same targets.

    With ``--async-rollouts`` (``--max-staleness 1``) step s samples from the weights before
    step s - 1's update, which a checkpoint of step s no longer holds; the checkpoint keeps the
    samples of the step in flight instead, so the resumed run is the uninterrupted one too, bit
    for bit. (Before it kept them, the first step after a resume sampled from the current
    weights and the final weights differed by up to ~5e-2.)
    """
    from live_server import start_server, stop_server

    world = {**models, "prompts": tmp_path / "prompts.jsonl"}
    world["prompts"].write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ON_PROMPTS))
    proc, url = start_server(*world["pair"], "--top-k", "8", "--max-seq-len", "64",
                             env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
                             log_path=tmp_path / "server.log")
    try:
        # Sequential, not overlapping: concurrent clients could share engine passes.
        ref_out = tmp_path / "uninterrupted"
        reference = Uninterrupted(_cli() + _on_policy_argv(world, url, ref_out), ref_out,
                                  tmp_path / "uninterrupted.log", ON_STEPS, world["student"])
        reference.result()

        out, log = tmp_path / "run", tmp_path / "killed.log"
        run = _spawn(_cli() + _on_policy_argv(world, url, out), log)
        try:
            saved, logged = _kill_between_checkpoints(run, out, log, steps=ON_STEPS,
                                                      save_every=ON_SAVE_EVERY)
        finally:
            _reap(run)
        assert run.returncode == -signal.SIGKILL and saved < logged < ON_STEPS
        resumed_log = tmp_path / "resumed.log"
        text = _finish(_spawn(_cli() + _on_policy_argv(world, url, out, "--resume"),
                              resumed_log), resumed_log)
        _check_resumed_run(out, ref_out, text, saved, steps=ON_STEPS)

        async_ref = tmp_path / "async_uninterrupted"
        Uninterrupted(_cli() + _on_policy_argv(world, url, async_ref, "--async-rollouts"),
                      async_ref, tmp_path / "async_uninterrupted.log", ON_STEPS,
                      world["student"]).result()
        out, log = tmp_path / "async", tmp_path / "async_killed.log"
        run = _spawn(_cli() + _on_policy_argv(world, url, out, "--async-rollouts"), log)
        try:
            saved, logged = _kill_between_checkpoints(run, out, log, steps=ON_STEPS,
                                                      save_every=ON_SAVE_EVERY)
        finally:
            _reap(run)
        resumed_log = tmp_path / "async_resumed.log"
        text = _finish(_spawn(_cli() + _on_policy_argv(world, url, out, "--async-rollouts",
                                                       "--resume"), resumed_log), resumed_log)
        _check_resumed_run(out, async_ref, text, saved, steps=ON_STEPS)
    finally:
        assert stop_server(proc) == 0
