"""Start a real ``aligndistil serve`` process on loopback for tests, and stop it with SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(dpo_dir, reverse_dir, *extra: str, env: dict | None = None,
                 timeout: float = 120.0, log_path: Path | None = None, port: int | None = None,
                 launcher: tuple[str, ...] = ("-m", "aligndistil.cli", "serve")):
    """Launch the server (on ``port``, or a free one) and wait for /readyz. Returns (process,
    base_url). ``launcher``: what ``python`` runs instead of ``-m aligndistil.cli serve``."""
    port = port or free_port()
    cmd = [sys.executable, *launcher, "--dpo-model", str(dpo_dir),
           *(["--reverse-model", str(reverse_dir)] if reverse_dir is not None else []),
           "--port", str(port), "--device", "cpu", "--log-level", "warning", *extra]
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **(env or {})}, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready"
                               + (f"; log: {log_path.read_text()[-2000:]}" if log_path else ""))
        try:
            if httpx.get(url + "/readyz", timeout=1.0).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not become ready in time")


def stop_server(proc: subprocess.Popen, timeout: float = 30.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode
