"""``aligndistil precompute``: dataset -> teacher engine -> Zarr store, resumable, multi-worker.

Worker ``I`` of ``N`` owns the examples whose index is ``I mod N`` and writes its own shards
(one writer per shard, ever). Rerunning the same command resumes: examples already in committed
shards are skipped; a shard that was being written when the process died was never committed
and is rewritten. The store's metadata pins everything that shapes the targets (teachers,
tokenizer, k, r, eps, norm, mode, source data), so a resume with different settings is refused.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from tqdm import tqdm

from storage.datasets import DataError, ReadStats, read_examples, source_fingerprint
from storage.store import StoreError, StoreMetadata, TargetStore, TargetStoreWriter, summarize
from storage.tokenization import TokenizationError, tokenize_example
from teacher_service.cli import build_engine, other_model_path
from teacher_service.engine import ScoreRequest


def worker_placement(args: argparse.Namespace) -> tuple[int, int]:
    """--worker-index/--num-workers, else torchrun's RANK/WORLD_SIZE, else (0, 1)."""
    index = args.worker_index if args.worker_index is not None else int(os.environ.get("RANK", 0))
    count = args.num_workers if args.num_workers is not None else int(os.environ.get("WORLD_SIZE", 1))
    if count < 1 or not 0 <= index < count:
        raise SystemExit(f"aligndistil precompute: need 0 <= --worker-index < --num-workers, "
                         f"got {index} of {count}")
    return index, count


def teacher_identities(engine) -> dict[str, str]:
    """Role -> 'folder-name@sha256:fingerprint' (no absolute path: workers on different machines
    mount the same teachers at different places)."""
    return {role: f"{Path(ident['path']).name}@sha256:{ident['fingerprint']}"
            for role, ident in engine.pair.identities.items()}


def run_precompute(args: argparse.Namespace) -> int:
    worker, workers = worker_placement(args)
    other_model_path(args)  # a missing teacher flag is the first thing to report
    data = Path(args.data)
    if not data.is_file():
        print(f"aligndistil precompute: --data {data}: no such file", file=sys.stderr)
        return 2
    started = time.perf_counter()
    try:
        engine = build_engine(args)
    except ValueError as exc:  # TeacherLoadError and config errors: say what, no traceback
        print(f"aligndistil precompute: {exc}", file=sys.stderr)
        return 2
    config = engine.config
    metadata = StoreMetadata(
        teachers=teacher_identities(engine), tokenizer_sha256=engine.pair.tokenizer_sha256,
        vocab_size=engine.pair.vocab_size, top_k=config.top_k, r=float(config.r),
        eps=float(config.eps), tvd_norm=config.tvd_norm, mode=config.mode,
        source_fingerprint=source_fingerprint(data), num_workers=workers,
        extra={"beta0": config.beta0, "beta": config.beta, "max_seq_len": engine.max_seq_len,
               "response_field": args.response_field},
    )
    try:
        # Shard boundaries are placed by this module (at group ends), not by token count.
        writer = TargetStoreWriter(args.out, metadata, worker_index=worker,
                                   shard_tokens=sys.maxsize)
    except (StoreError, ValueError) as exc:
        print(f"aligndistil precompute: {exc}", file=sys.stderr)
        return 2

    done = set(writer.committed_example_indices().tolist())
    stats = ReadStats()
    skipped_tokenize = 0
    tokenizer = engine.pair.tokenizer

    def groups():
        """This worker's examples in fixed groups of --group-size (by position in its stream),
        tokenised, with already-committed examples dropped. Shards are committed only at group
        ends, so a resumed run forms exactly the groups (and batches) of an uninterrupted one
        and writes bit-identical records."""
        nonlocal skipped_tokenize
        group: list[ScoreRequest] = []
        position = 0
        for example in read_examples(data, response_field=args.response_field,
                                     on_error="skip" if args.skip_bad_rows else "raise",
                                     worker_index=worker, num_workers=workers, stats=stats):
            if args.limit is not None and example.index >= args.limit:
                break
            position += 1
            if example.index not in done:
                try:
                    ids, prompt_len = tokenize_example(tokenizer, example, engine.max_seq_len)
                    group.append(ScoreRequest(ids, prompt_len, example_index=example.index))
                except TokenizationError as exc:
                    if not args.skip_bad_rows:
                        raise
                    skipped_tokenize += 1
                    tqdm.write(f"skipped: {exc}", file=sys.stderr)
            if position % args.group_size == 0:
                yield group
                group = []
        if group:
            yield group

    resumed = len(done)
    tokens = response_tokens = examples = buffered = 0
    bar = tqdm(desc=f"precompute w{worker}/{workers}", unit="ex", dynamic_ncols=True,
               file=sys.stderr)
    try:
        for group in groups():
            if not group:
                continue
            for record in engine.score(group):
                writer.write(record)
                examples += 1
                tokens += record.seq_len
                response_tokens += record.response_len
                buffered += record.response_len
            if buffered >= args.shard_tokens:
                writer.flush()
                buffered = 0
            bar.update(len(group))
            bar.set_postfix(tok_s=f"{tokens / max(time.perf_counter() - started, 1e-9):.0f}",
                            refresh=False)
        writer.close()
    except (DataError, TokenizationError) as exc:
        writer.close(finished=False)  # keep every committed shard; the rerun resumes
        print(f"aligndistil precompute: {exc}", file=sys.stderr)
        print("  (fix the row, or pass --skip-bad-rows to skip and count bad rows)",
              file=sys.stderr)
        return 2
    except BaseException:
        writer.close(finished=False)
        raise
    finally:
        bar.close()

    wall = time.perf_counter() - started
    summary = summarize(TargetStore.open(args.out))
    print(f"precompute worker {worker}/{workers}: {examples} new examples "
          f"({resumed} already committed), {response_tokens} response tokens, "
          f"{tokens} tokens in {wall:.1f} s = {tokens / max(wall, 1e-9):.0f} tokens/s")
    bpt = summary["bytes_per_token"]
    print(f"store {args.out}: {summary['examples']} examples, {summary['response_tokens']} "
          f"response tokens, {summary['bytes_on_disk']} bytes on disk"
          + (f" = {bpt:.1f} B/response token" if bpt else "")
          + ("" if summary["complete"] else " (other workers not finished yet)"))
    if stats.skipped or skipped_tokenize:
        print(f"skipped rows: {stats.skipped} malformed, {skipped_tokenize} untokenisable "
              f"(first errors: {stats.errors[:3]})")
    return 0
