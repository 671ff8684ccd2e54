"""Crash-resume of ``aligndistil precompute``, with a reader watching the store the whole time.

The real CLI runs as a subprocess over a tiny teacher pair and is killed with SIGKILL at
several seeded-random points (after a random number of committed shards, plus a random
fraction of a shard's write time, so the kill lands anywhere in scoring, array writes, fsyncs,
the checksum file or the manifest rename), then resumed with the very same command. The
process runs only in short bursts the harness grants it (SIGCONT, 10 ms, SIGSTOP) while the
harness watches for its kill point, so a busy machine that starves the harness cannot let the
process run past that point: each kill is checked to land before the work is done. The
finished store must equal one written without interruption: every record, the store metadata
and the manifest (shard names, sizes and per-shard checksums, hence every byte of every
shard). Meanwhile a reader thread keeps opening the store and reading every committed record:
it must never see a partial shard, every record it reads must equal the uninterrupted store's
record, and the set of examples it sees may only grow.

``tests/test_precompute.py::test_sigkill_then_resume_equals_uninterrupted`` is the basic
two-kill case; this file adds random kill points, the concurrent reader, the byte-level
comparison and the checks of each intermediate state. The long soak is marked ``slow``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import numpy as np
import pytest

from live_server import REPO
from process_control import burst, run_for
from storage.store import StoreNotFoundError, TargetStore, read_metadata, summarize, verify_store

#: One torch thread per process: the machines running the tests are small and shared, and the
#: clean and the crashed runs must do the same arithmetic (they do: same command, same env).
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _write_data(path: Path, n: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    with path.open("w") as fh:
        for i in range(n):
            nums = rng.integers(0, 100, size=int(rng.integers(2, 7))).tolist()
            prompt = "sort " + " ".join(map(str, nums))
            answer = " ".join(map(str, sorted(nums)))
            if i % 2:
                row = {"messages": [{"role": "user", "content": prompt},
                                    {"role": "assistant", "content": answer}]}
            else:
                row = {"prompt": prompt, "response": answer}
            fh.write(json.dumps(row) + "\n")
    return path


def _precompute_cmd(pair_dirs, data: Path, out: Path, group_size: int) -> list[str]:
    # --shard-tokens 1: a shard per group, so there are many shards and many commit points.
    return [sys.executable, "-m", "aligndistil.cli", "precompute",
            "--dpo-model", str(pair_dirs[0]), "--reverse-model", str(pair_dirs[1]),
            "--data", str(data), "--out", str(out), "--top-k", "4", "--device", "cpu",
            "--group-size", str(group_size), "--shard-tokens", "1"]


def _manifest(store: Path) -> dict:
    return json.loads((store / "manifest-w0000.json").read_text())


def _committed(store: Path) -> int:
    """Shards listed in worker 0's manifest (0 before the first commit)."""
    try:
        return len(_manifest(store)["shards"])
    except FileNotFoundError:
        return 0


def _records_by_index(store: TargetStore) -> dict:
    return {rec.example_index: rec for i in range(len(store)) for rec in (store[i],)}


class ConcurrentReader(threading.Thread):
    """Polls ``TargetStore.open(path)`` and reads every committed record, again and again.

    A committed shard never changes, so each poll reads in full every shard it has not read
    yet (by name and checksum) and re-reads one it has, at random, to keep checking that
    committed data stays intact while later shards are written, killed and rewritten.
    Collects every problem instead of raising (a thread's exception would be lost): a read
    that fails, a record that differs from the uninterrupted store's, an example that
    disappears from view.
    """

    def __init__(self, path: Path, expected: dict, seed: int):
        super().__init__(daemon=True, name="concurrent-store-reader")
        self.path = path
        self.expected = expected
        self.rng = np.random.default_rng(seed)
        self.stop = threading.Event()
        self.problems: list[str] = []
        self.snapshot_sizes: list[int] = []   # examples visible at each completed poll
        self.records_read = 0
        self.attempts = 0                     # polls completed, failed ones included
        self._visible: set[int] = set()
        self._read: dict[tuple[str, str], set[int]] = {}   # (shard, checksum) -> examples

    def wait_for_polls(self, n: int, timeout: float = 60) -> None:
        """Return once ``n`` more polls have completed (or failed)."""
        goal = self.attempts + n
        deadline = time.monotonic() + timeout
        while self.attempts < goal and time.monotonic() < deadline and self.is_alive():
            time.sleep(0.01)

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.poll()
            except StoreNotFoundError:
                pass                              # the first run has not created the store yet
            except Exception as exc:
                where = traceback.extract_tb(exc.__traceback__)[-1]
                self.problems.append(f"poll {self.attempts} failed: "
                                     f"{type(exc).__name__}: {exc} (at {where.filename}:"
                                     f"{where.lineno})")
            self.attempts += 1
            self.stop.wait(0.05)

    def poll(self) -> None:
        store = TargetStore.open(self.path, cache_shards=1)
        keys = [(e.name, e.checksums_sha256) for e in store.shards]
        known = [n for n, key in enumerate(keys) if key in self._read]
        again = {int(self.rng.choice(known))} if known else set()
        starts = np.cumsum([0] + [e.num_examples for e in store.shards]).tolist()
        for n, key in enumerate(keys):
            if key in self._read and n not in again:
                continue
            examples = set()
            for position in range(starts[n], starts[n + 1]):
                record = store[position]   # random access, through the shard's checksums
                self.records_read += 1
                want = self.expected.get(record.example_index)
                if want is None or not record.equals(want):
                    self.problems.append(
                        f"position {position} (example_index {record.example_index}, shard "
                        f"{key[0]}) differs from the uninterrupted store's record")
                examples.add(record.example_index)
            if key in self._read and examples != self._read[key]:
                self.problems.append(f"committed shard {key[0]} changed its examples")
            self._read[key] = examples
        visible = set().union(*(self._read[key] for key in keys))
        if len(visible) != len(store):
            self.problems.append(f"{len(store)} positions but {len(visible)} distinct examples")
        lost = self._visible - visible
        if lost:
            self.problems.append(f"examples {sorted(lost)[:10]} were visible and then vanished "
                                 f"({len(self._visible)} -> {len(visible)} visible)")
        self._visible = visible
        self.snapshot_sizes.append(len(visible))


def crash_resume_harness(pair_dirs, tmp_path: Path, *, n_examples: int, group_size: int,
                         kill_windows: list[tuple[int, int]], seed: int,
                         time_kills: int = 0) -> dict:
    """Write the store once cleanly, then again with SIGKILLs at seeded-random points.

    ``kill_windows``: for each kill, the range of committed-shard counts to pick its target
    from; the kill follows that commit after a random 0-1.5 shard-write intervals.
    ``time_kills``: extra kills, before those, at a random time after the process started
    (they may land in model loading, store creation or the first shards).
    Returns timings and counters for the caller's assertions.
    """
    rng = np.random.default_rng(seed)
    data = _write_data(tmp_path / "data.jsonl", n_examples, seed=seed)
    clean, crashed = tmp_path / "clean", tmp_path / "crashed"

    started = time.monotonic()
    res = subprocess.run(_precompute_cmd(pair_dirs, data, clean, group_size), cwd=REPO,
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"uninterrupted precompute failed:\n{res.stderr[-3000:]}"
    clean_seconds = time.monotonic() - started
    clean_store = TargetStore.open(clean)
    expected = _records_by_index(clean_store)
    clean_manifest = _manifest(clean)
    n_shards = len(clean_manifest["shards"])
    assert sorted(expected) == list(range(n_examples))
    assert n_shards >= max(hi for _, hi in kill_windows) + 3, \
        f"only {n_shards} shards: too few for the kill windows {kill_windows}"

    cmd = _precompute_cmd(pair_dirs, data, crashed, group_size)
    reader = ConcurrentReader(crashed, expected, seed)
    reader.start()
    kills: list[dict] = []
    try:
        plan = [("time", None)] * time_kills + [("shards", w) for w in kill_windows]
        for kind, window in plan:
            before = _committed(crashed)
            log = tmp_path / f"precompute-{len(kills) + 1}.log"
            with log.open("wb") as fh:   # a file, not a pipe: a full pipe would stall it
                proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=fh, stderr=fh)
            try:
                if kind == "time":
                    delay = float(rng.uniform(0.5, 8.0))
                    target = None
                    run_for(proc, delay)
                else:
                    target = max(int(rng.integers(window[0], window[1] + 1)), before + 2)
                    delay = _wait_for_commit(crashed, proc, target, rng)
                assert proc.poll() is None, (
                    f"precompute exited (rc {proc.returncode}) before kill {len(kills) + 1} "
                    f"(target {target} shards, {_committed(crashed)} committed):\n"
                    f"{log.read_text()[-3000:]}")
                at_kill = _manifest(crashed) if _committed(crashed) else {"shards": []}
                os.kill(proc.pid, signal.SIGKILL)  # it is stopped: it dies where it stands
                proc.wait(timeout=60)
                assert not at_kill.get("finished") and len(at_kill["shards"]) < n_shards, (
                    f"kill {len(kills) + 1} landed after the work was done "
                    f"({len(at_kill['shards'])} of {n_shards} shards committed)")
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            assert proc.returncode == -signal.SIGKILL
            after = _committed(crashed)
            kills.append({"kind": kind, "target": target, "delay": round(delay, 3),
                          "committed": after})
            if after:
                _check_crashed_state(crashed, clean_manifest, expected)

        res = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True,
                             timeout=300)
        assert res.returncode == 0, f"resumed precompute failed:\n{res.stderr[-3000:]}"
        assert f"({kills[-1]['committed'] * group_size} already committed)" in res.stdout, \
            res.stdout
        reader.wait_for_polls(2)  # at least one full look at the finished store
    finally:
        reader.stop.set()
        reader.join(timeout=60)

    assert not reader.problems, (f"the concurrent reader saw {len(reader.problems)} "
                                 f"problem(s):\n" + "\n".join(reader.problems[:5]))
    # The reader really watched the store being built: many snapshots, growing, complete.
    sizes = reader.snapshot_sizes
    assert len(set(sizes)) >= len(kills) + 1, f"reader saw too few distinct states: {sizes}"
    assert sizes[-1] == n_examples, f"reader's last snapshot has {sizes[-1]} examples"

    # The finished store equals the uninterrupted one: metadata, manifest, every record.
    assert read_metadata(crashed).to_json() == read_metadata(clean).to_json()
    assert _manifest(crashed) == clean_manifest, \
        "manifests differ (shard names, sizes, checksums or the finished flag)"
    resumed = TargetStore.open(crashed)
    assert len(resumed) == len(clean_store) == n_examples
    for position in range(n_examples):
        got, want = resumed[position], clean_store[position]
        assert got.equals(want), (f"position {position} (example_index {want.example_index}) "
                                  f"differs from the uninterrupted store")
    report = verify_store(crashed)
    assert report.ok and report.checked_shards == n_shards, report.bad
    summary = summarize(resumed)
    assert summary["complete"] and summary["workers"][0]["uncommitted_shard_dirs"] == 0, summary
    assert not [p.name for p in crashed.iterdir() if p.name.endswith(".tmp")], \
        "temporary manifest files were left behind"
    return {"kills": kills, "clean_seconds": clean_seconds, "n_shards": n_shards,
            "reader_polls": len(sizes), "reader_records": reader.records_read}


def _wait_for_commit(store: Path, proc: subprocess.Popen, target: int, rng) -> float:
    """Run the process in bursts until ``target`` shards are committed, then for a random
    0-1.5 of the running time between two commits, stopping early at the next commit (so the
    kill falls at a random phase of writing the next shard, or just after its commit). Returns
    the drawn time in seconds; the process is stopped."""
    deadline = time.monotonic() + 240
    last_count, ran, last_ran, interval = _committed(store), 0.0, None, 0.2
    while proc.poll() is None and time.monotonic() < deadline:
        count = _committed(store)
        if count != last_count:
            if last_ran is not None:
                interval = (ran - last_ran) / (count - last_count)
            last_count, last_ran = count, ran
            if count >= target:
                # A random phase of writing the next shard, but never past its commit: on a
                # busy machine one burst may run long (the test starved of CPU) and inflate
                # `interval`, and a delay of that size could run the store to its end.
                delay = float(rng.uniform(0.0, 1.5)) * interval
                extra = 0.0
                while extra < delay and proc.poll() is None and _committed(store) <= count:
                    extra += burst(proc)
                return delay
        ran += burst(proc)
    raise AssertionError(f"precompute never reached {target} committed shards "
                         f"(rc {proc.poll()}, {_committed(store)} committed)")


def _check_crashed_state(crashed: Path, clean_manifest: dict, expected: dict) -> None:
    """Right after a SIGKILL: the committed shards are a prefix of the uninterrupted run's,
    byte for byte (same checksums), intact, and hold the right records."""
    shards = _manifest(crashed)["shards"]
    assert shards == clean_manifest["shards"][:len(shards)], \
        "committed shards after a kill are not a prefix of the uninterrupted run's shards"
    report = verify_store(crashed)
    assert report.ok, f"a committed shard is damaged after SIGKILL: {report.bad}"
    store = TargetStore.open(crashed)
    for position in range(len(store)):
        record = store[position]
        assert record.equals(expected[record.example_index]), \
            f"after a kill, position {position} differs from the uninterrupted store"


@pytest.fixture(scope="module")
def pair_dirs(teacher_pair):
    return teacher_pair


def test_random_sigkills_with_concurrent_reader_resume_to_the_uninterrupted_store(
        pair_dirs, tmp_path):
    """3 SIGKILLs at random points of an 18-shard precompute, a reader polling throughout."""
    out = crash_resume_harness(pair_dirs, tmp_path, n_examples=36, group_size=2,
                               kill_windows=[(2, 4), (6, 9), (11, 14)], seed=20240611)
    assert [k["kind"] for k in out["kills"]] == ["shards"] * 3
    committed = [k["committed"] for k in out["kills"]]
    assert committed == sorted(committed) and committed[-1] < out["n_shards"], out


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_soak_many_sigkills_with_concurrent_reader(pair_dirs, tmp_path, seed):
    """Longer soak: 2 kills at random times (start-up included) then 8 after random commits,
    over 80 shards."""
    windows = [(4 + 8 * i, 9 + 8 * i) for i in range(8)]
    crash_resume_harness(pair_dirs, tmp_path, n_examples=160, group_size=2,
                         kill_windows=windows, seed=seed, time_kills=2)
