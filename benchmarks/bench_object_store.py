"""A target store on S3-compatible object storage vs on the local disk: write and streaming
read throughput, in one run, on the same records.

Usage::

    .venv/bin/python benchmarks/bench_object_store.py          # ~200k response tokens, 3 repeats

The object store is moto's standalone S3 server (the ``dev`` extra) started on loopback by this
script; it keeps objects in its Python process's memory and answers one request at a time per
connection, so its numbers are the protocol's cost (one PUT/GET per file, checksums, the
conditional manifest writes) over loopback, not what a cloud object store would give (lower
per-request latency here, far lower bandwidth). Records: ``bench_store.realistic_records``
(synthetic, V = 49152, k = 64, the default compact layout), written by one
``TargetStoreWriter`` (local: ``durable`` on, fsync as precompute does; and off) and read by
``TargetStore.iter_batches`` over one shuffled epoch (checksums verified, prefetch 2).

Writes ``benchmarks/results/object_store.md`` and ``.json``. Rates: response tokens/s and
MB/s of the records' raw bytes in the contract dtypes (``bench_store.raw_bytes``); medians.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_store import _meta, raw_bytes, realistic_records  # noqa: E402
from machine_info import machine  # noqa: E402
from storage.store import TargetStore, TargetStoreWriter  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def start_moto(log: Path) -> tuple[subprocess.Popen, dict[str, str]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or "moto_server"
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=log.open("w"),
                            stderr=subprocess.STDOUT)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ALLOW_HTTP": "true"}
    import boto3

    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                          aws_access_key_id="bench", aws_secret_access_key="bench")
    deadline = time.monotonic() + 60
    while True:
        try:
            client.create_bucket(Bucket="bench")
            return proc, env
        except Exception:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"moto_server did not start: see {log}")
            time.sleep(0.2)


def write(records, where: str, vocab: int, k: int, *, durable: bool) -> float:
    t0 = time.perf_counter()
    with TargetStoreWriter(where, _meta(vocab, k, "compact"), shard_tokens=65536,
                           durable=durable) as writer:
        writer.write_many(records)
    return time.perf_counter() - t0


def stream(where: str) -> tuple[float, int]:
    store = TargetStore.open(where, cache_shards=0)
    t0 = time.perf_counter()
    tokens = sum(int(b.num_tokens) for b in store.iter_batches(256, epoch=0, seed=0))
    return time.perf_counter() - t0, tokens


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS / "object_store"))
    args = parser.parse_args(argv)

    vocab, k = 49152, 64
    records = realistic_records(vocab, args.tokens, k=k)
    raw, tokens = raw_bytes(records), sum(r.response_len for r in records)
    work = Path(tempfile.mkdtemp(prefix="bench_object_store_"))
    proc, env = start_moto(work / "moto.log")
    os.environ.update(env)
    rows: dict[str, dict[str, list[float]]] = {}
    try:
        for rep in range(args.repeats):  # interleaved, so drift hits every target alike
            targets = {"local disk, durable (fsync)": (str(work / f"durable-{rep}"), True),
                       "local disk, no fsync": (str(work / f"fast-{rep}"), False),
                       "S3 (moto on loopback)": (f"s3://bench/store-{rep}", True)}
            for name, (where, durable) in targets.items():
                row = rows.setdefault(name, {"write_s": [], "read_s": []})
                row["write_s"].append(write(records, where, vocab, k, durable=durable))
                seconds, streamed = stream(where)
                assert streamed == tokens, (streamed, tokens)
                row["read_s"].append(seconds)
                print(f"{name} rep {rep}: write {row['write_s'][-1]:.2f} s, "
                      f"read {seconds:.2f} s", flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)

    base = "local disk, durable (fsync)"
    summary = {}
    for name, row in rows.items():
        w, r = statistics.median(row["write_s"]), statistics.median(row["read_s"])
        summary[name] = {"write_s": w, "read_s": r, "write_tokens_per_s": tokens / w,
                         "read_tokens_per_s": tokens / r, "write_MBps": raw / w / 1e6,
                         "read_MBps": raw / r / 1e6, "runs": row}
    for name, s in summary.items():
        s["write_vs_local"] = summary[base]["write_s"] / s["write_s"]
        s["read_vs_local"] = summary[base]["read_s"] / s["read_s"]
    info = {"machine": machine(torch_threads=0), "tokens": tokens, "records": len(records),
            "raw_bytes": raw, "repeats": args.repeats, "vocab": vocab, "top_k": k,
            "command": "benchmarks/bench_object_store.py " + " ".join(argv or sys.argv[1:])}
    Path(args.out + ".json").write_text(json.dumps({"info": info, "results": summary},
                                                   indent=1) + "\n")
    lines = ["# Target store on object storage (S3 API) vs local disk", "",
             f"{len(records)} synthetic records, {tokens} response tokens "
             f"({raw / 1e6:.1f} MB raw), V = {vocab}, k = {k}, compact layout, 64k-token "
             f"shards; median of {args.repeats} interleaved runs. Machine: "
             f"{info['machine']['cpu']}, {info['machine']['cpus']} cores, load "
             f"{info['machine']['load_average'][0]:.2f} at the end.", "",
             "The S3 server is moto's, on loopback, in Python: these are the protocol's costs "
             "(a PUT or GET per file, checksums, conditional manifest writes), not a cloud "
             "store's throughput.", "",
             "| store | write tokens/s | write MB/s | vs local | stream tokens/s | "
             "stream MB/s | vs local |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, s in summary.items():
        lines.append(f"| {name} | {s['write_tokens_per_s']:,.0f} | {s['write_MBps']:.1f} | "
                     f"{s['write_vs_local']:.2f}x | {s['read_tokens_per_s']:,.0f} | "
                     f"{s['read_MBps']:.1f} | {s['read_vs_local']:.2f}x |")
    lines += ["", f"Command: `{info['command']}`", ""]
    Path(args.out + ".md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
