"""``aligndistil precompute``: dataset -> teacher engine -> Zarr store, resumable, multi-worker.

Worker ``I`` of ``N`` owns the examples whose index is ``I mod N`` and writes its own shards
(one writer per shard, ever). Rerunning the same command resumes: examples already in committed
shards are skipped; a shard that was being written when the process died was never committed
and is rewritten. The store's metadata pins everything that shapes the targets (teachers,
tokenizer, k, r, eps, norm, mode, source data), so a resume with different settings is refused.

Read top to bottom: :func:`store_metadata` (what the store records), :func:`example_groups`
(this worker's examples, tokenised, in fixed groups), :func:`run_precompute` (the loop).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from storage.datasets import (DataError, DatasetSource, ReadStats, count_rows, data_source,
                              read_examples, source_fingerprint)
from storage.hub import snapshot_ref
from storage.store import StoreMetadata, TargetStore, TargetStoreWriter, summarize
from storage.store.errors import StoreMetadataMismatchError
from storage.store.location import open_location
from storage.tokenization import TokenizationError, tokenize_example
from teacher_service.config import SAVED_CONFIG, PrecomputeConfig
from teacher_service.engine import ScoreRequest, TeacherEngine, build_engine

log = logging.getLogger(__name__)


def teacher_identities(engine: TeacherEngine) -> dict[str, str]:
    """Role -> 'folder-name@sha256:fingerprint', or 'owner/name@commit@sha256:fingerprint' for a
    model from the Hub cache (no absolute path: workers on different machines mount the same
    teachers at different places)."""
    out = {}
    for role, ident in engine.pair.identities.items():
        ref = snapshot_ref(ident["path"])
        name = str(ref) if ref is not None else Path(ident["path"]).name
        out[role] = f"{name}@sha256:{ident['fingerprint']}"
    return out


def store_metadata(engine: TeacherEngine, config: PrecomputeConfig, num_workers: int,
                   source: Path | DatasetSource) -> StoreMetadata:
    """Everything that shapes the targets, recorded once in the store."""
    target = engine.config
    return StoreMetadata(
        teachers=teacher_identities(engine), tokenizer_sha256=engine.pair.tokenizer_sha256,
        vocab_size=engine.pair.vocab_size, top_k=target.top_k, r=float(target.r),
        eps=float(target.eps), tvd_norm=target.tvd_norm, mode=target.mode,
        source_fingerprint=source_fingerprint(source), num_workers=num_workers,
        layout=config.layout, dpo_top=target.dpo_top, tail_budget=float(target.tail_budget),
        min_k=target.min_k if target.tail_budget else 1,
        extra={"beta0": target.beta0, "beta": target.beta, "max_seq_len": engine.max_seq_len,
               "response_field": config.response_field},
    )


@dataclass
class SkipCounts:
    """Rows left out with ``--skip-bad-rows``, by reason, and rows cut to ``max_seq_len``."""
    read: ReadStats = field(default_factory=ReadStats)
    untokenisable: int = 0
    truncated: int = 0

    def count_truncated(self, original_length: int) -> None:
        self.truncated += 1


def example_groups(config: PrecomputeConfig, source: Path | DatasetSource, tokenizer,
                   max_seq_len: int, *, worker: int,
                   workers: int, done: set[int], skips: SkipCounts
                   ) -> Iterator[tuple[int, list[ScoreRequest]]]:
    """``(rows consumed, requests)`` for this worker's examples in fixed groups of
    ``group_size`` (by position in its stream), tokenised, with committed examples dropped.

    Shards are committed only at group ends, so a resumed run forms exactly the groups (and
    batches) of an uninterrupted one and writes bit-identical records.
    """
    group: list[ScoreRequest] = []
    consumed = 0
    for example in read_examples(source, response_field=config.response_field,
                                 on_error="skip" if config.skip_bad_rows else "raise",
                                 worker_index=worker, num_workers=workers, stats=skips.read):
        if config.limit is not None and example.index >= config.limit:
            break
        consumed += 1
        if example.index not in done:
            try:
                # Over-long examples are cut in the response, keeping its EOS (the released
                # code's truncation), and counted.
                ids, prompt_len = tokenize_example(tokenizer, example, max_seq_len,
                                                   truncation="response-keep-eos",
                                                   on_truncate=skips.count_truncated)
                group.append(ScoreRequest(ids, prompt_len, example_index=example.index))
            except TokenizationError as exc:
                if not config.skip_bad_rows:
                    raise
                skips.untokenisable += 1
                log.warning("skipped: %s", exc)
        if consumed % config.group_size == 0:
            yield consumed, group
            consumed, group = 0, []
    if consumed:
        yield consumed, group


def run_precompute(config: PrecomputeConfig) -> dict:
    """Score this worker's part of ``config.data`` into the store ``config.out``; returns a
    summary (what was written, the store's totals, the skipped rows)."""
    config.validate()
    worker, workers = config.placement(os.environ)
    started = time.perf_counter()
    source = data_source(config.data, split=config.split, config_name=config.data_config)
    total_rows = count_rows(source, worker=worker, workers=workers,
                            limit=config.limit)
    engine = build_engine(config)
    if config.overwrite:  # delete the store, keeping the saved configs
        location = open_location(config.out)
        for name in location.list_names(""):
            if not SAVED_CONFIG.match(name):
                location.remove_tree(name)
    # Shard boundaries are placed here (at group ends), not by the writer's token count.
    try:
        writer = TargetStoreWriter(config.out, store_metadata(engine, config, workers, source),
                                   worker_index=worker, shard_tokens=sys.maxsize)
    except StoreMetadataMismatchError as exc:
        raise StoreMetadataMismatchError(
            exc.key, f"{str(exc).rstrip('.')}. To start this store over with the new data or "
                     f"settings, pass --overwrite (one worker) or delete {config.out}; or "
                     f"choose another --out."
        ) from None
    done = set(writer.committed_example_indices().tolist())
    skips = SkipCounts()
    tokens = response_tokens = examples = buffered = 0
    bar = tqdm(desc=f"precompute w{worker}/{workers}", unit="ex", dynamic_ncols=True,
               file=sys.stderr, disable=not config.progress, total=total_rows)
    try:
        for consumed, group in example_groups(config, source, engine.pair.tokenizer,
                                              engine.max_seq_len, worker=worker,
                                              workers=workers, done=done, skips=skips):
            for record in engine.score(group) if group else []:
                writer.write(record)
                examples += 1
                tokens += record.seq_len
                response_tokens += record.response_len
                buffered += record.response_len
            if buffered >= config.shard_tokens:
                writer.flush()
                buffered = 0
            bar.update(consumed)
            bar.set_postfix(tok_s=f"{tokens / max(time.perf_counter() - started, 1e-9):.0f}",
                            refresh=False)
        writer.record_skipped({"malformed": skips.read.skipped,
                               "untokenisable": skips.untokenisable})
        if not examples and not done:
            raise DataError(f"--data {config.data}: nothing to precompute for worker {worker} of "
                            f"{workers}: {skips.read.rows} rows read, {skips.read.skipped} "
                            f"malformed and {skips.untokenisable} untokenisable rows skipped"
                            + (f", --limit {config.limit}" if config.limit else ""))
        writer.close()
    except BaseException:
        # Keep every committed shard; the rerun resumes. A writer that lost its worker to
        # another (StoreLockedError) writes nothing here: no shard, no manifest.
        writer.close(finished=False)
        raise
    finally:
        bar.close()
    wall = time.perf_counter() - started
    return {"worker": worker, "workers": workers, "examples": examples, "resumed": len(done),
            "response_tokens": response_tokens, "tokens": tokens, "seconds": wall,
            "store": str(config.out), "summary": summarize(TargetStore.open(config.out)),
            "skipped_malformed": skips.read.skipped, "skipped_untokenisable": skips.untokenisable,
            "truncated": skips.truncated, "max_seq_len": engine.max_seq_len,
            "skip_errors": skips.read.errors[:3]}
