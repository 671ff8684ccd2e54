"""The pipeline on a tiny offline model pair, driven through the ``aligndistil`` subcommands.

Interim main job until the toy-world demo exists: it builds a tiny randomly initialised
Llama-architecture teacher pair and a small chat dataset offline, then runs exactly what a user
would type — ``precompute``, ``inspect --verify``, ``serve`` (a real server on loopback),
``train --mode off-policy`` and ``train --mode on-policy`` — printing each command first. The
teachers are random, so the point is the machinery (real models, store, HTTP), not alignment.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from live_server import start_server, stop_server  # noqa: E402
from tiny_models import save_model_dir, save_teacher_pair  # noqa: E402


def run(*args) -> None:
    cmd = ["aligndistil", *map(str, args)]
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    subprocess.run([sys.executable, "-m", "aligndistil.cli", *cmd[1:]], cwd=REPO, check=True)


def write_data(path: Path, n: int) -> None:
    import random

    rng = random.Random(0)
    with path.open("w") as fh:
        for _ in range(n):
            nums = [rng.randrange(100) for _ in range(rng.randrange(2, 7))]
            prompt = "sort " + " ".join(map(str, nums))
            fh.write(json.dumps({"messages": [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": " ".join(map(str, sorted(nums)))}]}) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", default=str(REPO / "demo_work"))
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    print("== building a tiny teacher pair, a student and a dataset (offline)")
    dpo, reverse = save_teacher_pair(work / "teachers")
    student = save_model_dir(work / "student", seed=3)
    data = work / "train.jsonl"
    write_data(data, 64)
    prompts = work / "prompts.jsonl"
    write_data(prompts, 16)

    store = work / "store"
    run("precompute", "--dpo-model", dpo, "--reverse-model", reverse, "--data", data,
        "--out", store, "--top-k", 16, "--device", "cpu")
    run("inspect", store, "--verify")
    run("train", "--mode", "off-policy", "--store", store, "--model", student,
        "--out", work / "student-offpolicy", "--lr", 1e-3, "--global-batch-size", 8,
        "--epochs", 1, "--device", "cpu", "--no-progress")

    print("\n$ aligndistil serve --dpo-model ... --reverse-model ... --top-k 16  (background)")
    proc, url = start_server(dpo, reverse, "--top-k", "16", log_path=work / "serve.log")
    try:
        run("train", "--mode", "on-policy", "--teacher-url", url, "--prompts", prompts,
            "--model", student, "--out", work / "student-onpolicy", "--lr", 1e-3,
            "--global-batch-size", 8, "--max-steps", 2, "--max-new-tokens", 12,
            "--device", "cpu", "--no-progress")
    finally:
        stop_server(proc)
    print(f"\nDone in {time.perf_counter() - started:.0f} s. Outputs under {work}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
