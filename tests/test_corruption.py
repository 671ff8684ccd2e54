"""Real damage on disk to a store written by the real ``aligndistil precompute`` CLI, seen
end to end: ``aligndistil inspect --verify``, the reader, and ``aligndistil train``.

Each case damages a copy of one pristine store (24 examples, 6 shards of 4): a flipped byte
inside a chunk file, a truncated chunk file, a deleted chunk file (zarr alone would read fill
values there), a deleted shard directory, and the manifest replaced by the manifest of another
store (same examples and shard names and sizes, other targets, metadata and checksums).
For every case:

- ``inspect --verify`` exits 1 and names exactly the damaged shard(s); ``inspect --example``
  on a damaged record exits 2 naming the shard;
- the reader (``store[i]``, ``iter_records``, ``iter_batches``) raises
  ``StoreCorruptionError`` naming the shard, and every record it returned before (and every
  record of the other shards) equals the pristine store's: it never returns garbage;
- ``aligndistil train --mode off-policy`` exits 2 naming the shard, after exactly the steps
  whose data lie wholly before the damaged shard in the epoch order: no step ever runs on
  damaged data. The damaged shard is placed first, second, third or fourth in that order, so
  the run stops before step 1 as well as mid-epoch after good steps. (The trainer streams
  the store shard by shard and the reader checks a shard's bytes against its checksums
  before decoding any record of it, so there is no separate up-front pass over the store.)

``tests/test_store.py`` covers the same damage on the reader and ``verify_store`` with a
synthetic store; this file covers the command-line paths, the trainer and the foreign manifest.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from aligndistil.cli import main
from live_server import REPO

from storage.store import StoreCorruptionError, TargetStore, TargetStoreWriter
from student_trainer.metrics import read_jsonl

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
N_EXAMPLES, GROUP, SEED, BATCH = 24, 4, 42, 4


def _write_data(path: Path, n: int) -> Path:
    rng = np.random.default_rng(5)
    with path.open("w") as fh:
        for _ in range(n):
            nums = rng.integers(0, 100, size=int(rng.integers(3, 8))).tolist()
            fh.write(json.dumps({"prompt": "sort " + " ".join(map(str, nums)),
                                 "response": " ".join(map(str, sorted(nums)))}) + "\n")
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory, teacher_pair):
    """A teacher pair, a pristine store (precompute CLI) and another store of the same
    examples with other targets and other metadata (TargetStoreWriter, ``r = 7``)."""
    root = tmp_path_factory.mktemp("corruption")
    pair = teacher_pair
    data = _write_data(root / "data.jsonl", N_EXAMPLES)
    stores = {"pristine": root / "pristine", "other": root / "other"}
    res = subprocess.run(
        [sys.executable, "-m", "aligndistil.cli", "precompute", "--dpo-model", str(pair[0]),
         "--reverse-model", str(pair[1]), "--data", str(data), "--top-k", "4",
         "--device", "cpu", "--group-size", str(GROUP), "--shard-tokens", "1",
         "--out", str(stores["pristine"])],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    pristine = TargetStore.open(stores["pristine"])
    assert len(pristine.shards) == N_EXAMPLES // GROUP
    assert all(s.num_examples == GROUP for s in pristine.shards)

    # The other store: one shard per pristine shard (same names and sizes), other values.
    meta = replace(pristine.metadata, r=7.0, created_with="")
    with TargetStoreWriter(stores["other"], meta, shard_tokens=1 << 30) as writer:
        for n in range(len(pristine.shards)):
            for rec in pristine.load_shard(n).records():
                writer.write(replace(rec, alpha=rec.alpha * np.float32(0.35)))
            writer.flush()
    other = TargetStore.open(stores["other"])
    assert other.metadata.r != pristine.metadata.r
    assert [(s.name, s.num_examples, s.num_tokens) for s in other.shards] == \
        [(s.name, s.num_examples, s.num_tokens) for s in pristine.shards]
    assert all(a.checksums_sha256 != b.checksums_sha256
               for a, b in zip(other.shards, pristine.shards))
    ok = _inspect(stores["pristine"], "--verify")
    assert ok.returncode == 0 and ok.stdout.startswith("ok: 6 shard(s) checked"), ok.stdout
    # The order in which an epoch (seed 42, one rank) reads the shards.
    order = [shard for shard, _ in pristine.epoch_plan(epoch=0, seed=SEED, shuffle=True)]
    shard_examples = {entry.relpath: set(pristine.load_shard(n).example_index.tolist())
                      for n, entry in enumerate(pristine.shards)}
    return {"pair": pair, "stores": stores, "order": order, "shard_examples": shard_examples,
            "records": {pristine[i].example_index: pristine[i] for i in range(len(pristine))}}


# ---------------------------------------------------------------------- the damage
#: damage -> the damaged shard's slot in the epoch order (None: every shard is damaged)
DAMAGES = {"flip_chunk_byte": 2, "truncate_chunk": 0, "delete_chunk": 1,
           "delete_shard_dir": 3, "foreign_manifest": None}


def _damage(world, tmp_path: Path, how: str) -> tuple[Path, list[str]]:
    """A damaged copy of the pristine store and the damaged shards' relative paths, in the
    order the store lists them."""
    path = tmp_path / "store"
    shutil.copytree(world["stores"]["pristine"], path)
    shards = TargetStore.open(path).shards
    if how == "foreign_manifest":
        shutil.copyfile(world["stores"]["other"] / "manifest-w0000.json",
                        path / "manifest-w0000.json")
        return path, [s.relpath for s in shards]
    entry = shards[world["order"][DAMAGES[how]]]
    shard_dir = path / entry.relpath
    if how == "flip_chunk_byte":
        chunk = shard_dir / "alpha" / "c" / "0"
        data = bytearray(chunk.read_bytes())
        data[-3] ^= 0x10                     # in the payload, not the Blosc header
        chunk.write_bytes(bytes(data))
    elif how == "truncate_chunk":
        chunk = shard_dir / "topk_logprobs" / "c" / "0" / "0"
        chunk.write_bytes(chunk.read_bytes()[:-7])
    elif how == "delete_chunk":
        (shard_dir / "input_ids" / "c" / "0").unlink()
    elif how == "delete_shard_dir":
        shutil.rmtree(shard_dir)
    return path, [entry.relpath]


def _first_position(store: TargetStore, relpath: str) -> int:
    """The store position of the first record of shard ``relpath``."""
    names = [s.relpath for s in store.shards]
    return sum(s.num_examples for s in store.shards[:names.index(relpath)])


def _inspect(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aligndistil.cli", "inspect", *map(str, args)],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)


# ---------------------------------------------------------------------- inspect --verify
@pytest.mark.parametrize("how", list(DAMAGES))
def test_inspect_verify_fails_naming_the_damaged_shard(world, tmp_path, how):
    path, bad = _damage(world, tmp_path, how)

    res = _inspect(path, "--verify")
    assert res.returncode == 1, f"inspect --verify exited {res.returncode} on {how}:\n{res.stdout}"
    named = sorted({line.split()[1].rstrip(":") for line in res.stdout.splitlines()
                    if line.startswith("BAD ")})
    assert named == sorted(bad), f"{how}: inspect named {named}, damaged {bad}\n{res.stdout}"
    assert f"FAILED: 6 shard(s) checked, {len(bad)} bad" in res.stdout, res.stdout

    report = json.loads(_inspect(path, "--verify", "--json").stdout)
    assert report["ok"] is False and sorted(report["bad"]) == sorted(bad), report

    # Printing one damaged record is refused too, naming the shard, without a traceback.
    store = TargetStore.open(path)
    position = _first_position(store, bad[0])
    one = _inspect(path, "--example", position, "--json")
    assert one.returncode == 2 and bad[0] in one.stderr, (one.returncode, one.stderr)
    assert one.stdout == "" and "Traceback" not in one.stderr


# ---------------------------------------------------------------------- the reader
def _drain(iterator) -> tuple[list, StoreCorruptionError]:
    """Everything ``iterator`` yields until it raises StoreCorruptionError (which it must)."""
    got = []
    with pytest.raises(StoreCorruptionError) as err:
        for item in iterator:
            got.append(item)
    return got, err.value


@pytest.mark.parametrize("how", list(DAMAGES))
def test_reader_raises_naming_the_shard_and_never_returns_garbage(world, tmp_path, how):
    path, bad = _damage(world, tmp_path, how)
    pristine = world["records"]
    store = TargetStore.open(path)            # opening reads only the manifests: fine
    assert len(store) == N_EXAMPLES
    if how in ("flip_chunk_byte", "truncate_chunk"):
        # The damage is real: without the checksum pass these bytes would be read (today they
        # decode silently to wrong values, NaN included); only the checksums catch them.
        unchecked = TargetStore.open(path, verify=False)
        n = [s.relpath for s in store.shards].index(bad[0])
        try:
            intact = all(rec.equals(pristine[rec.example_index])
                         for rec in unchecked.load_shard(n).records())
        except StoreCorruptionError:
            intact = False
        assert not intact, f"{how}: the damaged shard still decodes to the pristine values, " \
                           f"so this case would prove nothing"

    # Random access: every position of a damaged shard raises naming it; the others read back
    # exactly the pristine records.
    for position in range(len(store)):
        shard = store.shards[store.shard_of(position)[0]].relpath
        if shard in bad:
            with pytest.raises(StoreCorruptionError, match=shard) as err:
                store[position]
            assert err.value.shard == shard
        else:
            record = store[position]
            assert record.equals(pristine[record.example_index]), \
                f"{how}: intact position {position} differs from the pristine store"

    def check_before_error(records, err, first_bad):
        assert err.shard == first_bad and first_bad in str(err), (how, str(err))
        bad_examples = set().union(*(world["shard_examples"][rel] for rel in bad))
        for record in records:
            assert record.example_index not in bad_examples, \
                f"{how}: a record of a damaged shard was returned"
            assert record.equals(pristine[record.example_index]), \
                f"{how}: returned a record that differs from the pristine one (garbage)"

    # Streaming in store order: the records of the shards before the damage, then the error.
    records, err = _drain(TargetStore.open(path).iter_records(shuffle=False, prefetch=2))
    first_bad = bad[0]
    assert len(records) == _first_position(store, first_bad)
    check_before_error(records, err, first_bad)

    # Shuffled batches (the trainer's order): stops at the damaged shard's turn.
    batches, err = _drain(TargetStore.open(path).iter_batches(BATCH, seed=SEED, prefetch=2))
    slot = DAMAGES[how] or 0
    assert len(batches) == slot, f"{how}: {len(batches)} batches before the error, want {slot}"
    first_bad = store.shards[world["order"][slot]].relpath
    check_before_error([r for b in batches for r in b.records()], err, first_bad)


# ---------------------------------------------------------------------- the trainer
@pytest.mark.parametrize("how", list(DAMAGES))
def test_train_stops_naming_the_shard_before_any_step_on_damaged_data(world, tmp_path, how,
                                                                       capsys):
    path, bad = _damage(world, tmp_path, how)
    out = tmp_path / "run"
    rc = main(["train", "--mode", "off-policy", "--store", str(path),
               "--model", str(world["pair"][0]), "--out", str(out), "--epochs", "1",
               "--global-batch-size", str(BATCH), "--max-tokens", "256", "--lr", "1e-3",
               "--seed", str(SEED), "--save-every", "1", "--save-total-limit", "100",
               "--no-progress", "--report-to", "none", "--device", "cpu",
               "--log-level", "warning"])
    err = capsys.readouterr().err
    # Shards hold 4 examples and a step takes 4: step s reads the shard in epoch slot s.
    slot = DAMAGES[how] or 0
    first_bad = TargetStore.open(path).shards[world["order"][slot]].relpath
    assert rc == 2, f"{how}: train exited {rc}\n{err[-2000:]}"
    assert f"aligndistil: error: {first_bad}: " in err and "Traceback" not in err, err[-2000:]

    rows = read_jsonl(out / "metrics.jsonl") if (out / "metrics.jsonl").exists() else []
    assert [r["step"] for r in rows] == list(range(1, slot + 1)), \
        f"{how}: steps {[r['step'] for r in rows]} ran; only steps 1..{slot} have intact data"
    checkpoints = sorted(p.name for p in out.glob("checkpoint-*")) if out.exists() else []
    assert checkpoints == [f"checkpoint-{s:08d}" for s in range(1, slot + 1)], checkpoints
    assert not (out / "final").exists(), f"{how}: a final model was saved from damaged data"
