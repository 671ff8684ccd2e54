"""Several teacher servers behind one trainer (``--teacher-url A,B``), against real
``aligndistil serve`` processes on loopback: a server SIGKILLed in the middle of on-policy
training is routed around, and a set of servers whose settings differ is refused."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest
from safetensors.torch import load_file

from live_server import REPO, start_server, stop_server
from tiny_models import save_model_dir

STEPS = 6
PROMPTS = ["sort 3 1 2", "copy 5 6", "reverse the list 7 8 9", "hello how are you ?",
           "what is 4 and 5 ?", "sort 9 8", "copy the numbers 1 2 3", "answer yes or no"]


@pytest.fixture(scope="module")
def world(tmp_path_factory, teacher_pair):
    root = tmp_path_factory.mktemp("servers")
    student = save_model_dir(root / "student", seed=7)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return {"root": root, "student": student, "prompts": prompts, "pair": teacher_pair}


def _train_argv(world, urls: str, out) -> list[str]:
    return [sys.executable, "-m", "aligndistil.cli", "train", "--mode", "on-policy",
            "--teacher-url", urls, "--prompts", str(world["prompts"]), "--model",
            str(world["student"]), "--out", str(out), "--global-batch-size", "4",
            "--epochs", "5", "--max-steps", str(STEPS), "--max-new-tokens", "6", "--lr", "1e-3",
            "--save-every", "0", "--no-progress", "--report-to", "none", "--device", "cpu",
            "--log-level", "warning", "--max-retries", "3"]


def _scored(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    m = re.search(r'aligndistil_requests_total\{path="/v1/score",status="200"\} (\S+)', text)
    return float(m.group(1)) if m else 0.0


def _steps(out) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _start_two(dpo, rev, tmp_path, env):
    """Two servers started together (their loading overlaps)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda name: start_server(
            dpo, rev, "--top-k", "8", "--max-seq-len", "64", env=env,
            log_path=tmp_path / f"{name}.log"), ("a", "b")))


def test_a_server_killed_mid_run_is_routed_around(world, tmp_path):
    dpo, rev = world["pair"]
    env = {"OMP_NUM_THREADS": "1"}
    (a, url_a), (b, url_b) = _start_two(dpo, rev, tmp_path, env)
    try:
        single = tmp_path / "single"
        r = subprocess.run(_train_argv(world, url_a, single), cwd=REPO, capture_output=True,
                           text=True, timeout=600, env={**os.environ, **env})
        assert r.returncode == 0, r.stderr[-3000:]

        both = tmp_path / "both"
        log = open(tmp_path / "train.log", "w")
        train = subprocess.Popen(_train_argv(world, f"{url_a},{url_b}", both), cwd=REPO,
                                 stdout=log, stderr=subprocess.STDOUT,
                                 env={**os.environ, **env})
        deadline = time.monotonic() + 300
        while len(_steps(both)) < 2 and train.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        served_by_b = _scored(url_b)
        steps_at_kill = len(_steps(both))
        b.send_signal(signal.SIGKILL)
        b.wait(30)
        rc = train.wait(600)
        log.close()
    finally:
        stop_server(a)
        if b.poll() is None:
            stop_server(b)
    train_log = (tmp_path / "train.log").read_text()
    assert rc == 0, train_log[-3000:]
    assert 2 <= steps_at_kill < STEPS, f"B was killed after step {steps_at_kill} of {STEPS}"
    assert served_by_b > 0, "the second server never got a request before it was killed"
    assert "out of rotation" in train_log, train_log[-2000:]
    rows = _steps(both)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # every step once
    assert all(r["sequences"] == 4 for r in rows)  # each batch scored once, in full
    # The same run as with one server, up to float rounding: the servers batch requests
    # differently (micro-batching), so targets may differ in their last bits.
    ref = _steps(single)
    for x, y in zip(ref, rows):
        assert x["response_tokens"] == y["response_tokens"], (x["step"], x, y)
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-3, abs=1e-6), x["step"]
    w1 = load_file(str(single / "final" / "model.safetensors"))
    w2 = load_file(str(both / "final" / "model.safetensors"))
    worst = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
    assert worst < 1e-4, f"weights differ by up to {worst:.2g} from the one-server run"


def test_a_set_of_servers_with_different_settings_is_refused(world, tmp_path, capsys):
    """Two real uvicorn servers on loopback (in threads), the second with another r: the run is
    refused before its first step, naming both URLs and the difference."""
    from aligndistil.cli import main
    from trainer_support import ThreadedServer, teacher_app

    dpo, rev = world["pair"]
    with ThreadedServer(teacher_app(dpo, rev, r=30.0)) as a, \
            ThreadedServer(teacher_app(dpo, rev, r=7.0)) as b:
        argv = _train_argv(world, a.url, tmp_path / "out")[3:]  # without "python -m ..."
        i = argv.index("--teacher-url")
        argv[i + 2:i + 2] = ["--teacher-url", b.url]  # the flag repeated
        rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err[-2000:]
    assert "disagree" in err and a.url in err and b.url in err
    assert "r: 30.0 vs 7.0" in err, err[-2000:]
    assert "Traceback" not in err
    assert not (tmp_path / "out" / "final").exists()
