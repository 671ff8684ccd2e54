"""Target stores on object storage, on every backend the README claims, each against a real
server on loopback configured as users configure that cloud's tools (by its standard
environment variables): ``s3://`` on moto's standalone server (``s3_server.py``), ``gs://`` on
fake-gcs-server (``gcs_server.py``: a small shim in front of it routes GCS's XML-API upload,
which obstore writes with and fake-gcs-server lacks; the generation check is the emulator's),
``az://`` on Azurite (``azure_server.py``).

On each: precompute -> inspect --verify -> train; a precompute SIGKILLed twice (each time while
it is still writing) and rerun gives the store an uninterrupted run gives; a damaged or deleted
object is named by ``--verify`` and refused by the reader; the server itself refuses a
duplicate or stale manifest write (what the lease sends is what that cloud checks); of two
writers of one worker only one ever commits, and the one that lost the worker writes nothing
more (no shard, no manifest, on close and on precompute's error path as well).

A missing emulator is an error, not a skip: the ``dev`` extra brings moto and
fake-gcs-server, and Azurite comes from npm (see ``azure_server.py``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from aligndistil.cli import main
from azure_server import AzureServer
from gcs_server import GCSServer
from live_server import REPO
from s3_server import S3Server
from storage.store import StoreCorruptionError, TargetStore, TargetStoreWriter
from storage.store.errors import StoreLockedError
from test_precompute import _write_data
from tiny_models import save_model_dir

COMMON = ["--top-k", "4", "--device", "cpu", "--group-size", "4", "--shard-tokens", "1",
          "--no-progress"]
SERVERS = {"s3": S3Server, "gs": GCSServer, "az": AzureServer}
BUCKET = "targets"
EXAMPLES = 24


@pytest.fixture(scope="module", params=list(SERVERS))
def server(request, tmp_path_factory):
    """One emulator per backend, its bucket made, its environment variables set (a missing
    emulator fails here, with what to install)."""
    server = SERVERS[request.param](tmp_path_factory.mktemp(f"{request.param}-server"))
    try:
        server.make_bucket(BUCKET)
        with pytest.MonkeyPatch.context() as env:
            for key, value in server.env.items():
                env.setenv(key, value)
            yield server
    finally:
        server.stop()


def url(server, name: str) -> str:
    return f"{server.scheme}://{BUCKET}/{name}"


@pytest.fixture(scope="module")
def world(tmp_path_factory, teacher_pair):
    root = tmp_path_factory.mktemp("objstore")
    return {"root": root, "teachers": ["--dpo-model", str(teacher_pair[0]), "--reverse-model",
                                       str(teacher_pair[1])],
            "data": _write_data(root / "train.jsonl", EXAMPLES, seed=3),
            "student": save_model_dir(root / "student", seed=7)}


def _precompute(world, out: str, *extra: str) -> list[str]:
    return ["precompute", *world["teachers"], "--data", str(world["data"]), *COMMON,
            "--out", out, *extra]


def _records(store) -> dict:
    return {store[i].example_index: store[i] for i in range(len(store))}


@pytest.fixture(scope="module")
def local(world):
    """The reference: the same precompute into a local folder."""
    assert main(_precompute(world, str(world["root"] / "local"))) == 0
    return TargetStore.open(world["root"] / "local")


@pytest.fixture(scope="module")
def remote(server, world):
    assert main(_precompute(world, url(server, "run"))) == 0
    return url(server, "run")


def test_precompute_equals_the_local_store_and_verifies(server, remote, local, capsys):
    keys = server.objects(BUCKET, "run/")
    assert "run/zarr.json" in keys and "run/manifest-w0000.json" in keys
    assert "run/precompute-w0000.config.yaml" in keys
    assert not any("/locks/" in k for k in keys)  # no lock files: ownership is in the manifest
    store = TargetStore.open(remote)
    a, b = _records(local), _records(store)
    assert sorted(a) == sorted(b) == list(range(EXAMPLES))
    assert all(a[i].equals(b[i]) for i in a)
    assert store.metadata == local.metadata
    assert len(store.shards) == len(local.shards) > 3  # several commits, each conditional
    # the manifest carries its writer's owner token, and each shard name that token's prefix
    manifest = json.loads(server.read(BUCKET, "run/manifest-w0000.json"))
    token = manifest["owner"]["token"]
    assert manifest["finished"] and all(s["name"].endswith("-" + token[:8])
                                        for s in manifest["shards"])
    capsys.readouterr()
    assert main(["inspect", remote, "--verify"]) == 0
    assert "ok:" in capsys.readouterr().out
    assert main(["inspect", remote, "--stats"]) == 0


def test_any_zarr_reader_opens_a_shard(remote):
    """The store is a zarr v3 hierarchy on object storage as well: zarr's own obstore-backed
    store reads a shard's arrays."""
    import zarr
    from obstore.store import from_url

    store = TargetStore.open(remote)
    group = zarr.open_group(zarr.storage.ObjectStore(from_url(remote), read_only=True),
                            mode="r")
    shard = group[f"shards/{store.shards[0].name}"]
    assert shard["example_index"][:].tolist() == \
        [r.example_index for r in [store[i] for i in range(store.shards[0].num_examples)]]


def test_train_from_an_object_store(remote, world, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--mode", "off-policy", "--store", remote, "--model",
                 str(world["student"]), "--out", str(out), "--global-batch-size", "8",
                 "--max-tokens", "64", "--max-steps", "3", "--save-every", "0", "--device",
                 "cpu", "--no-progress", "--report-to", "none", "--log-level", "warning"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["sequences"] == 8 for r in rows)


def _committed_shards(server, name: str) -> int:
    try:
        return len(json.loads(server.read(BUCKET, f"{name}/manifest-w0000.json"))["shards"])
    except FileNotFoundError:
        return 0


def _kill_once_grown(server, name: str, cmd: list[str], past: int) -> int:
    """Start ``cmd``, SIGKILL it as soon as the worker has committed more than ``past`` shards,
    and check the kill landed while it was still working; returns the shards committed. The
    process runs in short bursts the test grants (test_crash_precompute's ``_burst``) and is
    stopped whenever the test reads the store, so a slow look cannot let it run to the end."""
    from process_control import burst

    with tempfile.TemporaryFile("w+") as err:  # a file, not a pipe: never fills up
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 180
        while proc.poll() is None and _committed_shards(server, name) <= past:
            assert time.monotonic() < deadline, "no new shard committed within 180 s"
            burst(proc)
        err.seek(0)
        assert proc.poll() is None, f"precompute ended before the kill: {err.read()}"
    os.kill(proc.pid, signal.SIGKILL)  # it is stopped: it dies where it stands
    assert proc.wait() == -signal.SIGKILL
    store = TargetStore.open(url(server, name))
    manifest = json.loads(server.read(BUCKET, f"{name}/manifest-w0000.json"))
    assert not manifest["finished"] and 0 < store.num_examples < EXAMPLES, \
        "the kill came after the work was done: it proves nothing"
    return len(manifest["shards"])


@pytest.mark.parametrize("server", ["s3", pytest.param("gs", marks=pytest.mark.slow),
                                    pytest.param("az", marks=pytest.mark.slow)], indirect=True)
def test_sigkilled_twice_then_resumed_equals_uninterrupted(server, world, local):
    name = "crashed"
    cmd = [sys.executable, "-m", "aligndistil.cli", *_precompute(world, url(server, name))]
    first = _kill_once_grown(server, name, cmd, past=0)
    second = _kill_once_grown(server, name, cmd, past=first)  # the rerun resumed and wrote
    assert second > first
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"({second * 4} already committed)" in done.stdout, done.stdout
    store = TargetStore.open(url(server, name))
    a, b = _records(local), _records(store)
    assert sorted(a) == sorted(b) == list(range(EXAMPLES))
    assert all(a[i].equals(b[i]) for i in a)
    # the killed runs' half-written shards were discarded: every shard object is listed
    listed = {s.name for s in store.shards}
    stored = {k.split("/")[2] for k in server.objects(BUCKET, f"{name}/shards/")
              if k.count("/") >= 3}  # (not shards/zarr.json, the group's own)
    assert stored == listed


def test_damaged_and_deleted_objects_are_named_and_refused(server, world, capsys):
    damaged = url(server, "damaged")
    assert main(_precompute(world, damaged, "--limit", "8")) == 0
    store = TargetStore.open(damaged)
    first, second = store.shards[0].name, store.shards[1].name
    chunks = sorted(k for k in server.objects(BUCKET, f"damaged/shards/{first}/alpha/")
                    if "/c/" in k)
    body = bytearray(server.read(BUCKET, chunks[0]))
    body[len(body) // 2] ^= 0xFF
    server.write(BUCKET, chunks[0], bytes(body))
    server.delete(BUCKET, f"damaged/shards/{second}/zarr.json")
    capsys.readouterr()
    assert main(["inspect", damaged, "--verify"]) != 0
    out = capsys.readouterr().out
    assert f"shards/{first}" in out and "alpha/c/" in out and "fails its sha256" in out, out
    assert f"shards/{second}" in out and "zarr.json is missing" in out, out
    fresh = TargetStore.open(damaged)
    with pytest.raises(StoreCorruptionError, match=f"shards/{first}.*alpha/c/"):
        fresh.load_shard(0)
    with pytest.raises(StoreCorruptionError, match=f"shards/{second}.*zarr.json is missing"):
        fresh.load_shard(1)
    # --overwrite starts the store over on object storage too (the saved config stays)
    assert main(_precompute(world, damaged, "--limit", "8", "--overwrite")) == 0
    assert main(["inspect", damaged, "--verify"]) == 0
    assert len(TargetStore.open(damaged)) == 8


def _take_over(target: str, metadata) -> TargetStoreWriter:
    """A new writer of worker 0 while another is committing: its own stamp is refused when
    the other commits between its read of the manifest and its stamp, so it tries again."""
    for _ in range(50):
        try:
            return TargetStoreWriter(target, metadata, shard_tokens=10 ** 9)
        except StoreLockedError:
            continue
    raise AssertionError("could not take the worker over in 50 tries")


@pytest.mark.parametrize("server", ["s3", pytest.param("gs", marks=pytest.mark.slow),
                                    pytest.param("az", marks=pytest.mark.slow)], indirect=True)
def test_a_second_precompute_of_a_worker_stops_the_first_leaving_nothing(server, world, local):
    """A second writer of a running precompute's worker (a second process started by mistake)
    takes the worker over; the first stops at its next commit with one line naming the store,
    and leaves no object behind (its error path writes no shard and no manifest)."""
    name = "duplicate"
    cmd = [sys.executable, "-m", "aligndistil.cli", *_precompute(world, url(server, name))]
    with tempfile.TemporaryFile("w+") as log:  # a file, not a pipe: never fills up
        first = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + 180
        while first.poll() is None and _committed_shards(server, name) < 1:
            assert time.monotonic() < deadline, "no shard committed within 180 s"
            time.sleep(0.02)
        running = first.poll() is None
        if running:
            store = TargetStore.open(url(server, name))
            second = _take_over(url(server, name), store.metadata)
        first.wait(timeout=300)
        log.seek(0)
        err = log.read()
    assert running, f"precompute ended before the takeover: {err}"
    assert first.returncode == 2 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith(
        f"aligndistil: error: {url(server, name)}: worker 0 was taken over"), err
    second.close(finished=False)
    listed = {s.name for s in TargetStore.open(url(server, name)).shards}
    stored = {k.split("/")[2] for k in server.objects(BUCKET, f"{name}/shards/")
              if k.count("/") >= 3}
    assert stored == listed and 1 <= len(listed) < len(local.shards)  # stopped midway


def test_the_server_refuses_a_duplicate_or_stale_manifest_write(server):
    """What the lease sends is what each cloud checks (S3 and Azure the ETag, GCS the
    generation): with no HEAD check first, a create over an existing manifest and an update
    from a stale version are refused by the server itself, and a writer's own successive
    commits go through."""
    from storage.store.location import ObjectLease, open_location

    location = open_location(url(server, "leases"))
    a, b = (ObjectLease(location, 0, "manifest-w0000.json") for _ in range(2))  # none found
    a.commit(b'{"n": 1}')
    with pytest.raises(StoreLockedError):
        b.commit(b'{"n": 1}')
    a.commit(b'{"n": 2}')
    a.commit(b'{"n": 3}')
    c = ObjectLease(location, 0, "manifest-w0000.json")
    c.commit(b'{"n": 4}')
    with pytest.raises(StoreLockedError, match="taken over by another writer"):
        a.commit(b'{"n": 5}')
    found = json.loads(server.read(BUCKET, "leases/manifest-w0000.json"))
    assert found["n"] == 4 and found["owner"]["token"] == c.token


def test_removing_leftovers_that_another_process_removed_first(server, monkeypatch):
    """Two writers may discard the same leftover shard at once (a newer writer at its start,
    the older one when its commit is refused): objects listed and then gone before the
    delete are fine. (GCS and Azure answer such a delete with 404; S3 does not.)"""
    from storage.store.location import open_location

    location = open_location(url(server, "leftovers"))
    for i in range(3):
        location.write(f"shards/w0000-s000000-x/{i}", b"x")
    listed = location.list_files

    def listed_before_the_other_deleted(rel: str) -> list[str]:
        return [*listed(rel), "gone"]

    monkeypatch.setattr(location, "list_files", listed_before_the_other_deleted)
    location.remove_tree("shards/w0000-s000000-x")
    assert server.objects(BUCKET, "leftovers/") == {}


def _owner(server, name: str) -> str:
    return json.loads(server.read(BUCKET, f"{name}/manifest-w0000.json"))["owner"]["token"]


def test_two_writers_of_one_worker_never_both_commit(server):
    """The older writer commits a shard; a newer one takes the worker over; the older one's
    next commit is refused and it writes nothing more, not even when it is closed. What the
    store lists is the older writer's committed shard plus the newer writer's."""
    from test_store import make_meta, make_records

    name = "two-writers"
    records = make_records(8, 40)
    older = TargetStoreWriter(url(server, name), make_meta(), shard_tokens=10 ** 9)
    older.write_many(records[:10])
    older.flush()
    newer = TargetStoreWriter(url(server, name), make_meta(), shard_tokens=10 ** 9)
    assert newer.committed_example_indices().tolist() == [r.example_index for r in records[:10]]
    assert _owner(server, name) == newer._lease.token
    before = server.objects(BUCKET, f"{name}/")
    with pytest.raises(StoreLockedError, match="taken over by another writer"):
        with older:  # as precompute does: the error, then close on the way out
            older.write_many(records[10:20])
            older.flush()
    assert server.objects(BUCKET, f"{name}/") == before  # no shard bytes, no manifest
    newer.write_many(records[10:])
    newer.close()
    store = TargetStore.open(url(server, name))
    assert sorted(_records(store)) == sorted(r.example_index for r in records)
    assert store.unfinished_workers() == []


def test_a_writer_taken_over_while_writing_a_shard_leaves_none_of_it(server):
    """The takeover lands while the older writer is writing a shard's objects (after any check
    it makes first): its commit is refused and it removes the objects it wrote."""
    from test_store import make_meta, make_records

    name = "taken-mid-shard"
    records = make_records(9, 20)
    armed: list[bool] = []
    newer: list[TargetStoreWriter] = []

    def take_over(stage: str, detail: str) -> None:
        if stage == "files" and armed and not newer:  # the shard's data written, uncommitted
            newer.append(TargetStoreWriter(url(server, name), make_meta(),
                                           shard_tokens=10 ** 9))

    older = TargetStoreWriter(url(server, name), make_meta(), shard_tokens=10 ** 9,
                              _hook=take_over)
    older.write_many(records[:10])
    older.flush()
    before = set(server.objects(BUCKET, f"{name}/"))
    armed.append(True)
    older.write_many(records[10:])
    with pytest.raises(StoreLockedError, match="taken over by another writer"):
        older.flush()
    assert newer and _owner(server, name) == newer[0]._lease.token
    assert set(server.objects(BUCKET, f"{name}/")) == before  # none of the refused shard
    older.close()
    assert set(server.objects(BUCKET, f"{name}/")) == before
    newer[0].close()
    store = TargetStore.open(url(server, name))
    assert sorted(_records(store)) == [r.example_index for r in records[:10]]
