"""Several teacher servers behind one trainer (``--teacher-url A,B,...``), as users deploy them:
real ``aligndistil serve`` processes on loopback, each over its own copy of the same teachers
(one folder per "host": same bytes, different paths), and real signals.

- default suite: one server is dead when training starts and another is SIGKILLed mid-run;
- ``-m slow``: a server hung by SIGSTOP and resumed by SIGCONT; one SIGKILLed and restarted on
  its port; one answering 429 for a while. Each of these servers must be back in rotation and
  serving before the run ends.

Every run completes with each step's batch scored once and in full, and ends where a run
against one server ends (losses and weights, up to the float rounding of the servers' own
micro-batching). The in-process variants (fast, no training) are in test_teacher_pool.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from safetensors.torch import load_file

from live_server import REPO, free_port, start_server, stop_server
from process_control import resume, run_until
from tiny_models import save_model_dir

STEPS = 6
LONG_STEPS = 60  # the slow scenarios: long enough for a server to come back and serve
#: The slow scenarios' servers wait this long to batch requests: each step then takes about a
#: quarter second (instead of 0.05 s), so a run outlasts a server's trouble and its return.
PACED = ("--batch-wait-ms", "250")
PROMPTS = ["sort 3 1 2", "copy 5 6", "reverse the list 7 8 9", "hello how are you ?",
           "what is 4 and 5 ?", "sort 9 8", "copy the numbers 1 2 3", "answer yes or no"]
ENV = {"OMP_NUM_THREADS": "1"}
SERVE_FLAGS = ("--top-k", "8", "--max-seq-len", "64")


@pytest.fixture(scope="module")
def world(tmp_path_factory, teacher_pair):
    root = tmp_path_factory.mktemp("servers")
    student = save_model_dir(root / "student", seed=7)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    hosts = {}
    for host in ("host-a", "host-b", "host-c"):
        hosts[host] = tuple(shutil.copytree(src, root / host / "teachers" / src.name)
                            for src in teacher_pair)
    return {"root": root, "student": student, "prompts": prompts, "pair": teacher_pair,
            "hosts": hosts}


def _train_argv(world, urls: str, out, steps: int = STEPS, *extra: str) -> list[str]:
    return [sys.executable, "-m", "aligndistil.cli", "train", "--mode", "on-policy",
            "--teacher-url", urls, "--prompts", str(world["prompts"]), "--model",
            str(world["student"]), "--out", str(out), "--global-batch-size", "4",
            "--epochs", str(steps), "--max-steps", str(steps), "--max-new-tokens", "6",
            "--lr", "1e-3", "--save-every", "0", "--no-progress", "--report-to", "none",
            "--device", "cpu", "--log-level", "warning", "--max-retries", "3", *extra]


def _scored(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    m = re.search(r'aligndistil_requests_total\{path="/v1/score",status="200"\} (\S+)', text)
    return float(m.group(1)) if m else 0.0


def _steps(out) -> list[dict]:
    path = Path(out) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _serve(world, host: str, tmp_path, *flags: str, port: int | None = None, launcher=None):
    kw = {"launcher": launcher} if launcher else {}
    return start_server(*world["hosts"][host], *SERVE_FLAGS, *flags, env=ENV, port=port,
                        log_path=tmp_path / f"{host}.log", **kw)


def _serve_many(world, hosts, tmp_path, *flags: str):
    """Servers started together (their loading overlaps)."""
    with ThreadPoolExecutor(len(hosts)) as pool:
        return list(pool.map(lambda h: _serve(world, h, tmp_path, *flags), hosts))


def _one_server_run(world, tmp_path, steps: int, *flags: str) -> Path:
    proc, url = _serve(world, "host-a", tmp_path, *flags)
    try:
        out = tmp_path / f"single-{steps}"
        r = subprocess.run(_train_argv(world, url, out, steps), cwd=REPO, capture_output=True,
                           text=True, timeout=600, env={**os.environ, **ENV})
        assert r.returncode == 0, r.stderr[-3000:]
    finally:
        stop_server(proc)
    return out


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
    return _one_server_run(world, tmp_path_factory.mktemp("reference"), STEPS)


@pytest.fixture(scope="module")
def long_reference(world, tmp_path_factory):
    return _one_server_run(world, tmp_path_factory.mktemp("long_reference"), LONG_STEPS,
                           *PACED)


def _start_training(world, urls: list[str], out, tmp_path, steps: int, *extra: str):
    log = open(tmp_path / "train.log", "w")
    proc = subprocess.Popen(_train_argv(world, ",".join(urls), out, steps, *extra), cwd=REPO,
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **ENV})
    return proc, log


def _wait_for_step(train, out, step: int, timeout: float = 300) -> int:
    deadline = time.monotonic() + timeout
    while len(_steps(out)) < step and train.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    return len(_steps(out))


def _wait_for_log(train, log_path: Path, text: str, timeout: float = 300) -> bool:
    deadline = time.monotonic() + timeout
    while train.poll() is None and time.monotonic() < deadline:
        if text in log_path.read_text():
            return True
        time.sleep(0.05)
    return text in log_path.read_text()


def _assert_same_as_one_server(reference: Path, out: Path, steps: int) -> None:
    rows = _steps(out)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))  # every step once
    assert all(r["sequences"] == 4 for r in rows)  # each batch scored once, in full
    # The same run as with one server, up to float rounding: the servers batch requests
    # differently (micro-batching), so targets may differ in their last bits.
    for x, y in zip(_steps(reference), rows):
        assert x["response_tokens"] == y["response_tokens"], (x["step"], x, y)
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-3, abs=1e-6), x["step"]
    w1 = load_file(str(reference / "final" / "model.safetensors"))
    w2 = load_file(str(out / "final" / "model.safetensors"))
    worst = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
    assert worst < 1e-4, f"weights differ by up to {worst:.2g} from the one-server run"


def test_a_dead_server_at_the_start_and_one_killed_mid_run(world, reference, tmp_path):
    """Three URLs, one with nothing behind it: the run starts on the two that answer; one of
    those is SIGKILLed after step 2 and the last one finishes the run."""
    (a, url_a), (b, url_b) = _serve_many(world, ("host-a", "host-b"), tmp_path)
    dead = f"http://127.0.0.1:{free_port()}"
    out = tmp_path / "pool"
    try:
        train, log = _start_training(world, [url_a, dead, url_b], out, tmp_path, STEPS)
        # the trainer runs in bursts and is stopped at each look, so B dies after step 2 even
        # when this test is starved of CPU (process_control)
        run_until(train, lambda: len(_steps(out)) >= 2, what="step 2")
        steps_at_kill = len(_steps(out))
        served_by_b = _scored(url_b)
        b.send_signal(signal.SIGKILL)
        b.wait(30)
        resume(train)
        rc = train.wait(600)
        log.close()
    finally:
        stop_server(a)
        stop_server(b)
    train_log = (tmp_path / "train.log").read_text()
    assert rc == 0, train_log[-3000:]
    assert "starting on 2 of 3 teacher servers" in train_log, train_log[-2000:]
    assert 2 <= steps_at_kill < STEPS, f"B was killed after step {steps_at_kill} of {STEPS}"
    assert served_by_b > 0, "the second server never got a request before it was killed"
    assert f"{url_b} out of rotation" in train_log, train_log[-2000:]
    _assert_same_as_one_server(reference, out, STEPS)


def _scenario_run(world, long_reference, tmp_path, disturb, *extra: str) -> str:
    """A LONG_STEPS run on servers A and B; ``disturb(b_proc, url_b, train, out)`` acts on B
    once step 2 is done and returns B's process (it may start a new one). B must be back and
    answer score requests before the run ends. Returns the training log."""
    (a, url_a), (b, url_b) = _serve_many(world, ("host-a", "host-b"), tmp_path, *PACED)
    out = tmp_path / "pool"
    try:
        train, log = _start_training(world, [url_a, url_b], out, tmp_path, LONG_STEPS, *extra)
        assert _wait_for_step(train, out, 2) >= 2
        b = disturb(b, url_b, train, out)
        back = _wait_for_log(train, tmp_path / "train.log", f"{url_b} is back in rotation")
        b_back_at = _scored(url_b)
        steps_when_back = len(_steps(out))
        rc = train.wait(900)
        log.close()
        b_served_after = _scored(url_b) - b_back_at
    finally:
        stop_server(a)
        stop_server(b)
    train_log = (tmp_path / "train.log").read_text()
    assert rc == 0, train_log[-3000:]
    assert len(_steps(out)) == LONG_STEPS
    assert f"{url_b} out of rotation" in train_log, train_log[-2000:]
    assert back, f"B never came back: {train_log[-2000:]}"
    assert steps_when_back < LONG_STEPS, "B came back only after the last step"
    assert b_served_after > 0, "B came back but served nothing before the run ended"
    _assert_same_as_one_server(long_reference, out, LONG_STEPS)
    return train_log


@pytest.mark.slow
def test_a_server_hung_by_sigstop_then_resumed(world, long_reference, tmp_path):
    def hang(b, url_b, train, out):
        b.send_signal(signal.SIGSTOP)
        stopped_at = len(_steps(out))
        time.sleep(6)  # requests to B time out (--request-timeout 2); the run goes on on A
        assert len(_steps(out)) > stopped_at, "the run stalled while B was hung"
        b.send_signal(signal.SIGCONT)
        return b

    _scenario_run(world, long_reference, tmp_path, hang, "--request-timeout", "2")


@pytest.mark.slow
def test_a_server_killed_and_restarted_on_its_port(world, long_reference, tmp_path):
    def restart(b, url_b, train, out):
        b.send_signal(signal.SIGKILL)
        b.wait(30)
        port = int(url_b.rsplit(":", 1)[1])
        new_b, url = _serve(world, "host-b", tmp_path, *PACED, port=port)
        assert url == url_b
        assert train.poll() is None, "the run ended before B was restarted"
        return new_b

    _scenario_run(world, long_reference, tmp_path, restart)


@pytest.mark.slow
def test_a_server_answering_429_for_a_while(world, long_reference, tmp_path):
    (a, url_a), = _serve_many(world, ("host-a",), tmp_path, *PACED)
    b, url_b = _serve(world, "host-b", tmp_path, *PACED,
                      launcher=(str(REPO / "tests" / "serve_shedding.py"), "4"))
    out = tmp_path / "pool"
    try:
        train, log = _start_training(world, [url_a, url_b], out, tmp_path, LONG_STEPS)
        rc = train.wait(900)
        log.close()
        served_by_b = _scored(url_b)
    finally:
        stop_server(a)
        stop_server(b)
    train_log = (tmp_path / "train.log").read_text()
    assert rc == 0, train_log[-3000:]
    assert re.search(rf"{re.escape(url_b)} out of rotation \(429", train_log), train_log[-2000:]
    assert f"{url_b} is back in rotation" in train_log, train_log[-2000:]
    assert served_by_b > 0, "B never served after its 429 period"
    _assert_same_as_one_server(long_reference, out, LONG_STEPS)


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


def test_a_max_seq_len_above_the_servers_is_refused_before_the_first_step(world, tmp_path,
                                                                          capsys):
    """A longer --max-seq-len than the servers allow would end the run at its first long
    sequence (413, never retried): refused up front."""
    from aligndistil.cli import main
    from trainer_support import ThreadedServer, teacher_app

    with ThreadedServer(teacher_app(*world["pair"], max_seq_len=64)) as a:
        rc = main([*_train_argv(world, a.url, tmp_path / "out")[3:], "--max-seq-len", "128"])
    err = capsys.readouterr().err
    assert rc == 2 and "--max-seq-len 128 exceeds the teacher servers' max_seq_len 64" in err
    assert not (tmp_path / "out" / "final").exists()
