"""The Zarr v3 target store: sharded, checksummed, resumable; streamed by the trainer.

Public API::

    from storage.store import StoreMetadata, TargetStoreWriter, TargetStore

    meta = StoreMetadata(teachers={"dpo": ..., "reverse": ...}, tokenizer_sha256=...,
                         vocab_size=V, top_k=64, r=20.0, eps=1e-3, tvd_norm="half-l1",
                         mode="adaptive", source_fingerprint=..., num_workers=N)
    with TargetStoreWriter(path, meta, worker_index=I) as w:      # precompute, worker I of N
        done = set(w.committed_example_indices().tolist())       # resume: skip these
        for record in ...: w.write(record)

    store = TargetStore.open(path)                                # trainer
    store[i]                                                      # random access -> TargetRecord
    for batch in store.iter_batches(256, epoch=e, seed=s, rank=r, world_size=W): ...

On-disk layout, format_version 1 to 4
-------------------------------------
::

    STORE/
      zarr.json                zarr v3 group; attributes["aligndistil"] = StoreMetadata
                               (format_version, teachers, tokenizer_sha256, vocab_size, top_k,
                               r, eps, tvd_norm, mode, source_fingerprint, num_workers, layout,
                               extra, created_with; version 2 adds dpo_top > 0: the kept
                               ids include the dpo model's top dpo_top; version 3 adds
                               tail_budget, min_k and ragged shards; version 4 is a ragged
                               store in the packed layout)
      manifest-w0000.json      worker 0's committed shards, replaced atomically on each commit:
                               {"manifest_version": 1, "worker_index": 0, "finished": bool,
                                "shards": [{"name", "num_examples", "num_tokens",
                                            "num_input_tokens", "checksums_sha256"}, ...]}
      manifest-w0001.json      ... one per worker that has committed anything
      locks/w0000.lock         flock held by worker 0's live writer (holds its pid); local
                               stores only
      shards/zarr.json         zarr v3 group
      shards/w0000-s000000/    one shard: a zarr v3 group written by exactly one process (on
                               object storage w0000-s000000-<8 hex>: its writer's token)
        zarr.json              attributes["aligndistil_shard"] = layout, counts, top_k
        checksums.json         {"files": {relative path: {"size", "sha256"}}} of every other
                               file of the shard; its own sha256 is in the manifest
        example_index/         int64 [E]             row of the source dataset
        prompt_len/            int32 [E]
        seq_len/               int32 [E]             L = prompt + response length
        input_ids/             [sum L]               token-major, concatenated over examples
        alpha/ tail_logmass/ dpo_logprobs/ reverse_logprobs/
                               float32 [N]           N = sum (L - prompt_len), concatenated
        topk_ids/              [N, k] or [k, N]      see the array's attributes
                               (ragged, v3 and v4: [sum topk_count], flat)
        topk_count/            [N]                   ragged only: the entries of each position
        topk_ids_dictionary/   int32 [D]             freq-dict encodings only
        topk_logprobs/         [N, k] or [k, N]      see the array's attributes (ragged: flat)
        topk_logprobs_first/   float16 [N]           lossy q8 encodings only (row max)
        topk_logprobs_last/    float16 [N]           lossy q8 encodings only (row min)

Example ``b`` of a shard owns ``input_ids[sum(seq_len[:b]) : sum(seq_len[:b+1])]`` and rows
``sum(T[:b]) : sum(T[:b+1])`` of the per-position arrays, ``T = seq_len - prompt_len``. Each
array's attributes say how it is encoded (``encoding``: ``plain`` | ``widen-int32`` |
``widen-float32`` | ``freq-dict`` | ``freq-dict-posdelta`` | ``fp16-bits-rowdelta`` |
``q8-rowrange`` | ``q8-poslog``; ``transposed``: stored as ``[k, N]``), see
:mod:`storage.store.layout`;
the codecs are in each array's own ``zarr.json`` (Blosc). Any zarr v3 reader can open the
arrays; decoding the encodings gives back the record contract's dtypes exactly.

A shard is visible to readers only once its worker's manifest lists it; the directory of a
shard that no manifest lists is a crash leftover. Readers refuse a format_version they don't
know, and refuse (naming the shard) any shard whose bytes don't match its checksums.

The same layout lives in a local folder or under an object-storage prefix (``s3://bucket/p``;
:mod:`.location`): there a manifest also holds its writer's owner token, and every manifest
write is conditional on the ETag of the writer's previous one instead of a rename under a lock.
"""

from .batch import TargetBatch
from .errors import (StoreCorruptionError, StoreError, StoreFormatError, StoreLockedError,
                     StoreMetadataMismatchError, StoreNotFoundError)
from .layout import DEFAULT_LAYOUT, LAYOUTS, Layout
from .metadata import FORMAT_VERSION, StoreMetadata, read_metadata
from .reader import TargetStore
from .summary import VerifyReport, format_summary, summarize, verify_store
from .writer import DEFAULT_SHARD_TOKENS, TargetStoreWriter

__all__ = [
    "DEFAULT_LAYOUT", "DEFAULT_SHARD_TOKENS", "FORMAT_VERSION", "LAYOUTS", "Layout",
    "StoreCorruptionError", "StoreError", "StoreFormatError", "StoreLockedError",
    "StoreMetadata", "StoreMetadataMismatchError", "StoreNotFoundError", "TargetBatch",
    "TargetStore", "TargetStoreWriter", "VerifyReport", "format_summary", "read_metadata",
    "summarize", "verify_store",
]
