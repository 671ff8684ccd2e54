"""Kill points that stay ahead of the work on a busy machine.

A test that waits for a child to reach some state and then kills it races the child: if the
test is starved of CPU between its last look and the kill (another suite on the same cores),
the child may run on, even to the end, and the kill proves nothing. Here the child runs only in
short bursts the test grants (SIGCONT, ``BURST`` seconds, SIGSTOP), and every look happens
while it is stopped, so it cannot get more than about one burst past the state the test saw.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Callable

BURST = 0.01  #: seconds the child runs between two looks of the test


def burst(proc: subprocess.Popen) -> float:
    """Let the (stopped) child run for one burst, then stop it; returns the seconds it ran
    (more than ``BURST`` when the test itself was kept waiting)."""
    started = time.monotonic()
    os.kill(proc.pid, signal.SIGCONT)
    time.sleep(BURST)
    os.kill(proc.pid, signal.SIGSTOP)
    return time.monotonic() - started


def run_for(proc: subprocess.Popen, seconds: float) -> None:
    """Let the child run for about ``seconds`` in bursts; it is stopped on return."""
    ran = 0.0
    while ran < seconds and proc.poll() is None:
        ran += burst(proc)


def run_until(proc: subprocess.Popen, reached: Callable[[], bool], *, timeout: float = 300,
              what: str = "the state the test waits for") -> None:
    """Run the child in bursts until ``reached()`` (asked while it is stopped) holds; it is
    stopped on return, still running. Fails if it ends or times out first."""
    deadline = time.monotonic() + timeout
    while not reached():
        if proc.poll() is not None:
            raise AssertionError(f"the process ended (rc {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout:.0f} s")
        burst(proc)
    if proc.poll() is not None:
        raise AssertionError(f"the process ended (rc {proc.returncode}) at {what}")


def resume(proc: subprocess.Popen) -> None:
    """Let a child stopped by this module run freely again."""
    os.kill(proc.pid, signal.SIGCONT)
