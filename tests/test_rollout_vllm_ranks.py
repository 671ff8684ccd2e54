"""``--rollout-backend vllm`` under torchrun: one vLLM engine per rank in torchrun's process group
(``external_launcher``), DDP on gloo, two real processes on this CPU.

- Two ranks sample the student's own distribution, as the HF backend does: 1,024 first tokens
  from each backend pass a chi-square test against the student's softmax, and the vLLM ones
  fail it against another model's (the test can see a wrong distribution).
- A two-rank run with ``--max-staleness 1 --student-top 4`` (the candidates from vLLM's
  logprobs) is SIGKILLed after its second checkpoint and resumed: it samples and ends exactly as
  the uninterrupted run.

Opt-in (``-m vllm``, the vllm extra): about 2 minutes here.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from live_server import REPO, free_port, start_server, stop_server
from tiny_models import save_model_dir, save_teacher_pair
from test_rollout_vllm import CPU_ENV, _chi_square_p

pytestmark = pytest.mark.vllm

PROMPT = "sort 3 1 2"
PROMPTS = ["sort 3 1 2", "copy 5 6", "reverse the list 7 8 9", "hello how are you ?",
           "what is 4 and 5 ?", "sort 9 8", "copy the numbers 1 2 3", "answer yes or no"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1",
       **({} if torch.cuda.is_available() else CPU_ENV)}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    pytest.importorskip("vllm")
    root = tmp_path_factory.mktemp("vllm_ranks")
    dpo_dir, rev_dir = save_teacher_pair(root / "pair")
    student = save_model_dir(root / "student", seed=7)
    one = root / "one_prompt.jsonl"
    one.write_text(json.dumps({"prompt": PROMPT}) + "\n")
    many = root / "prompts.jsonl"
    many.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    proc, url = start_server(dpo_dir, rev_dir, "--top-k", "8", "--max-seq-len", "64",
                             log_path=root / "server.log")
    try:
        yield {"root": root, "student": student, "one": one, "many": many, "url": url,
               "pair": (dpo_dir, rev_dir)}
    finally:
        stop_server(proc)


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
            "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
            "-m", "aligndistil.cli", "train", "--mode", "on-policy", *args]


def _args(world, out, prompts, *extra) -> list[str]:
    return ["--teacher-url", world["url"], "--prompts", str(prompts), "--model",
            str(world["student"]), "--out", str(out), "--no-progress", "--report-to", "none",
            "--device", "cpu", "--log-level", "warning", "--save-samples", *extra]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "terminate called" not in done.stderr, done.stderr[-3000:]
    return done


def _samples(out: Path) -> dict[tuple[int, int, int], list[int]]:
    """(step, rank, index) -> ids over both ranks' files; a later line wins (a resume)."""
    found = {}
    for path in sorted((out / "samples").glob("rank-*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            found[row["step"], row["rank"], row["index"]] = row["ids"]
    return found


def _first_token_probs(model_dir, prompt_ids) -> np.ndarray:
    from student_trainer.modeling import load_student

    model, _ = load_student(model_dir, device=torch.device("cpu"))
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids])).logits[0, -1].double()
    return torch.softmax(logits, -1).numpy()


def test_two_ranks_sample_the_students_distribution_as_hf_does(world):
    from student_trainer.modeling import load_student
    from student_trainer.prompts import load_prompts

    n = 1024
    prompts = world["root"] / "repeated.jsonl"
    prompts.write_text((json.dumps({"prompt": PROMPT}) + "\n") * n)
    _, tok = load_student(world["student"], device=torch.device("cpu"))
    prompt = load_prompts(prompts, tok, max_prompt_len=63)[0]  # as the trainer reads it
    probs = _first_token_probs(world["student"], prompt)
    counts = {}
    for backend in ("vllm", "hf"):
        out = world["root"] / f"first-{backend}"
        _run(_torchrun(*_args(world, out, prompts, "--rollout-backend", backend,
                              "--global-batch-size", str(n), "--max-steps", "1",
                              "--max-new-tokens", "1", "--lr", "1e-3",
                              "--rollout-batch-size", "128", "--save-every", "0")))
        samples = _samples(out)
        assert len(samples) == n
        assert {rank for _, rank, _ in samples} == {0, 1}  # both ranks sampled their halves
        first = [ids[len(prompt)] for ids in samples.values()]
        counts[backend] = np.bincount(first, minlength=len(probs))[:len(probs)]
        p = _chi_square_p(counts[backend], probs)
        assert p > 1e-3, f"{backend}: the first tokens do not follow the student (p = {p:.2g})"
    other = _first_token_probs(world["pair"][0], prompt)
    assert _chi_square_p(counts["vllm"], other) < 1e-6  # the control: another model's fails


def _kill_tree(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def test_two_rank_sigkill_and_resume_samples_and_trains_as_the_uninterrupted_run(world):
    args = ("--rollout-backend", "vllm", "--global-batch-size", "4", "--epochs", "5",
            "--max-steps", "10", "--max-new-tokens", "6", "--lr", "3e-3", "--save-every", "1",
            "--max-staleness", "1", "--student-top", "4")
    full = world["root"] / "full"
    _run(_torchrun(*_args(world, full, world["many"], *args)))
    rows = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    assert [r["staleness"] for r in rows] == [0] + [1] * 9
    assert all(r["weight_sync_s"] > 0 and r["rollout_s"] > 0 for r in rows)

    part = world["root"] / "part"
    log = open(world["root"] / "killed.log", "wb")
    proc = subprocess.Popen(_torchrun(*_args(world, part, world["many"], *args)), cwd=REPO,
                            env=ENV, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + 400
    try:
        while not (part / "checkpoint-00000003" / "model.safetensors").is_file():
            assert proc.poll() is None, (world["root"] / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint 3 within 400 s"
            time.sleep(0.05)
    finally:
        _kill_tree(proc)
    assert not (part / "final").exists(), "the run finished before the kill"
    _run(_torchrun(*_args(world, part, world["many"], *args, "--resume")))
    assert _samples(part) == _samples(full)
    # The same samples and the same steps; the weights agree to float rounding, not bit for
    # bit: the server batches the two ranks' concurrent requests as they arrive, and a
    # teacher's forward over another batch rounds its last bits differently (measured: 1e-8
    # here, against 2e-2 of training movement).
    a = load_file(full / "final" / "model.safetensors")
    b = load_file(part / "final" / "model.safetensors")
    start = load_file(world["student"] / "model.safetensors")
    for k in a:
        moved = float((a[k] - start[k]).abs().max())
        assert moved > 0 and float((a[k] - b[k]).abs().max()) <= 1e-4 * moved, k


def test_fsdp_ranks_feed_their_engines_the_gathered_weights(world):
    """Under FSDP each rank's engine gets whole tensors gathered from the shards. DDP and FSDP
    train the same steps (here to the bit), so with the same seeds their engines sample the
    same responses at every step, synchronously and one step stale; an engine fed wrong or
    partial weights after the first update would not."""
    args = ("--rollout-backend", "vllm", "--global-batch-size", "4", "--epochs", "2",
            "--max-new-tokens", "6", "--lr", "3e-3", "--save-every", "0")
    for stale in ("0", "1"):
        runs = {}
        for strategy in ("ddp", "fsdp"):
            out = world["root"] / f"{strategy}-{stale}"
            _run(_torchrun(*_args(world, out, world["many"], *args, "--strategy", strategy,
                                  "--max-staleness", stale)))
            runs[strategy] = _samples(out)
        assert len(runs["ddp"]) == 2 * len(PROMPTS)
        assert runs["ddp"] == runs["fsdp"], f"--max-staleness {stale}"


def test_one_process_fsdp_runs_its_engine_in_its_group_of_one(world):
    """FSDP without torchrun makes a process group of one: the engine joins it (no torchrun
    environment to launch from) and leaves it whole, and samples what a plain run samples."""
    args = ("--rollout-backend", "vllm", "--global-batch-size", "4", "--max-steps", "3",
            "--epochs", "2", "--max-new-tokens", "6", "--lr", "3e-3", "--save-every", "0")
    runs = {}
    for strategy in ("ddp", "fsdp"):
        out = world["root"] / f"single-{strategy}"
        _run([sys.executable, "-m", "aligndistil.cli", "train", "--mode", "on-policy",
              *_args(world, out, world["many"], *args, "--strategy", strategy)])
        runs[strategy] = _samples(out)
        assert (out / "final").is_dir()
    assert len(runs["ddp"]) == 12 and runs["ddp"] == runs["fsdp"]
