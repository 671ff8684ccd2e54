"""What every benchmark's results file records about the machine it ran on."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine(torch_threads: int) -> dict:
    """The machine record of a results file: CPU model, cores, torch threads and version, and
    the load average when the run ended (a busy machine skews timings)."""
    import os

    import torch

    return {"cpu": cpu_model(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "torch_threads": torch_threads, "torch": torch.__version__,
            "load_average": os.getloadavg()}
