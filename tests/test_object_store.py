"""Target stores on object storage, against a real S3-compatible server on loopback (moto's
standalone server, ``s3_server.py``), configured as users configure any S3 tool: by the
``AWS_*`` environment variables.

precompute -> inspect --verify -> train from ``s3://``; a precompute SIGKILLed twice and resumed
gives the store an uninterrupted run gives; a damaged or deleted object is named by
``--verify`` and refused by the reader; two writers of one worker never both commit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from aligndistil.cli import main
from live_server import REPO
from s3_server import S3Server
from storage.store import StoreCorruptionError, TargetStore, TargetStoreWriter
from storage.store.errors import StoreLockedError
from test_precompute import _write_data
from tiny_models import save_model_dir

COMMON = ["--top-k", "4", "--device", "cpu", "--group-size", "4", "--shard-tokens", "1",
          "--no-progress"]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = S3Server(tmp_path_factory.mktemp("moto"))
    server.make_bucket("targets")
    with pytest.MonkeyPatch.context() as env:
        for key, value in server.env.items():
            env.setenv(key, value)
        yield server
    server.stop()


@pytest.fixture(scope="module")
def world(tmp_path_factory, teacher_pair):
    root = tmp_path_factory.mktemp("objstore")
    return {"root": root, "teachers": ["--dpo-model", str(teacher_pair[0]), "--reverse-model",
                                       str(teacher_pair[1])],
            "data": _write_data(root / "train.jsonl", 24, seed=3),
            "student": save_model_dir(root / "student", seed=7)}


def _records(store) -> dict:
    return {store[i].example_index: store[i] for i in range(len(store))}


def _objects(s3: S3Server, prefix: str) -> dict[str, int]:
    pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket="targets",
                                                                   Prefix=prefix)
    return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", [])}


@pytest.fixture(scope="module")
def stores(s3, world):
    """The same precompute into a local folder and into s3://targets/run."""
    local = world["root"] / "local"
    argv = ["precompute", *world["teachers"], "--data", str(world["data"]), *COMMON]
    assert main([*argv, "--out", str(local)]) == 0
    assert main([*argv, "--out", "s3://targets/run"]) == 0
    return {"local": local, "s3": "s3://targets/run"}


def test_precompute_to_s3_equals_the_local_store_and_verifies(s3, stores, capsys):
    keys = _objects(s3, "run/")
    assert "run/zarr.json" in keys and "run/manifest-w0000.json" in keys
    assert "run/precompute-w0000.config.yaml" in keys
    assert not any("/locks/" in k for k in keys)  # no lock files: ownership is in the manifest
    remote, local = TargetStore.open(stores["s3"]), TargetStore.open(stores["local"])
    a, b = _records(local), _records(remote)
    assert sorted(a) == sorted(b) == list(range(24))
    assert all(a[i].equals(b[i]) for i in a)
    assert remote.metadata == local.metadata
    assert len(remote.shards) == len(local.shards) > 3
    # the manifest carries its writer's owner token, and each shard name that token's prefix
    manifest = json.loads(s3.client().get_object(Bucket="targets",
                                                 Key="run/manifest-w0000.json")["Body"].read())
    token = manifest["owner"]["token"]
    assert manifest["finished"] and all(s["name"].endswith("-" + token[:8])
                                        for s in manifest["shards"])
    capsys.readouterr()
    assert main(["inspect", stores["s3"], "--verify"]) == 0
    assert "ok:" in capsys.readouterr().out
    assert main(["inspect", stores["s3"], "--stats"]) == 0


def test_any_zarr_reader_opens_a_shard_on_s3(stores):
    """The store is a zarr v3 hierarchy on S3 as well: zarr's own obstore-backed store reads a
    shard's arrays."""
    import zarr
    from obstore.store import from_url

    remote = TargetStore.open(stores["s3"])
    group = zarr.open_group(zarr.storage.ObjectStore(from_url(stores["s3"]), read_only=True),
                            mode="r")
    shard = group[f"shards/{remote.shards[0].name}"]
    assert shard["example_index"][:].tolist() == \
        [r.example_index for r in [remote[i] for i in range(remote.shards[0].num_examples)]]


def test_train_from_an_s3_store(stores, world, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--mode", "off-policy", "--store", stores["s3"], "--model",
                 str(world["student"]), "--out", str(out), "--global-batch-size", "8",
                 "--max-tokens", "64", "--max-steps", "3", "--save-every", "0", "--device",
                 "cpu", "--no-progress", "--report-to", "none", "--log-level", "warning"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["sequences"] == 8 for r in rows)


def test_sigkill_then_resume_on_s3_equals_uninterrupted(s3, world, stores):
    crashed = "s3://targets/crashed"
    cmd = [sys.executable, "-m", "aligndistil.cli", "precompute", *world["teachers"], "--data",
           str(world["data"]), *COMMON, "--out", crashed]
    for target in (3,):  # killed once a few shards are committed
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                body = s3.client().get_object(Bucket="targets",
                                              Key="crashed/manifest-w0000.json")["Body"].read()
                if len(json.loads(body)["shards"]) >= target:
                    break
            except s3.client().exceptions.NoSuchKey:
                pass
            time.sleep(0.05)
        assert proc.poll() is None, f"precompute ended before the kill: {proc.stderr.read()}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert 0 < TargetStore.open(crashed).num_examples < 24
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "already committed" in done.stdout
    a, b = _records(TargetStore.open(stores["local"])), _records(TargetStore.open(crashed))
    assert sorted(a) == sorted(b) == list(range(24))
    assert all(a[i].equals(b[i]) for i in a)
    # the killed runs' half-written shards were discarded: every shard object is listed
    listed = {s.name for s in TargetStore.open(crashed).shards}
    on_s3 = {k.split("/")[2] for k in _objects(s3, "crashed/shards/") if k.count("/") >= 3}
    assert on_s3 == listed


def test_damaged_and_deleted_objects_are_named_and_refused(s3, stores, world, capsys):
    client = s3.client()
    assert main(["precompute", *world["teachers"], "--data", str(world["data"]), *COMMON,
                 "--out", "s3://targets/damaged", "--limit", "8"]) == 0
    store = TargetStore.open("s3://targets/damaged")
    first, second = store.shards[0].name, store.shards[1].name
    chunks = sorted(k for k in _objects(s3, f"damaged/shards/{first}/alpha/") if "/c/" in k)
    body = bytearray(client.get_object(Bucket="targets", Key=chunks[0])["Body"].read())
    body[len(body) // 2] ^= 0xFF
    client.put_object(Bucket="targets", Key=chunks[0], Body=bytes(body))
    client.delete_object(Bucket="targets", Key=f"damaged/shards/{second}/zarr.json")
    capsys.readouterr()
    assert main(["inspect", "s3://targets/damaged", "--verify"]) != 0
    out = capsys.readouterr().out
    assert f"shards/{first}" in out and "alpha/c/" in out and "fails its sha256" in out, out
    assert f"shards/{second}" in out and "zarr.json is missing" in out, out
    fresh = TargetStore.open("s3://targets/damaged")
    with pytest.raises(StoreCorruptionError, match=f"shards/{first}.*alpha/c/"):
        fresh.load_shard(0)
    with pytest.raises(StoreCorruptionError, match=f"shards/{second}.*zarr.json is missing"):
        fresh.load_shard(1)
    # --overwrite starts the store over on S3 too (the saved config stays)
    assert main(["precompute", *world["teachers"], "--data", str(world["data"]), *COMMON,
                 "--out", "s3://targets/damaged", "--limit", "8", "--overwrite"]) == 0
    assert main(["inspect", "s3://targets/damaged", "--verify"]) == 0
    assert len(TargetStore.open("s3://targets/damaged")) == 8


def test_two_writers_of_one_worker_never_both_commit(s3):
    """The newer writer takes the worker over; the older one's next commit is refused, and
    what the store lists is the newer writer's."""
    from test_store import make_meta, make_records

    url = "s3://targets/two-writers"
    records = make_records(8, 40)
    older = TargetStoreWriter(url, make_meta(), shard_tokens=10 ** 9)
    older.write_many(records[:4])
    newer = TargetStoreWriter(url, make_meta(), shard_tokens=10 ** 9)
    newer.write_many(records)
    with pytest.raises(StoreLockedError, match="taken over by another writer"):
        older.flush()
    newer.close()
    store = TargetStore.open(url)
    assert sorted(_records(store)) == sorted(r.example_index for r in records)
    assert store.unfinished_workers() == []
