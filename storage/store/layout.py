"""Shard layouts: how a batch of records becomes zarr arrays and back.

A *layout* is a named preset (recorded in the store metadata) of a few choices, each measured
in ``benchmarks/bench_store.py`` (results in ``benchmarks/results/store.md``):

- ``narrow_ids``: token ids stored as ``uint16`` when ``vocab_size <= 65536`` (the bytes above
  the 16th bit are always zero), widened back to ``int32`` on read.
- ``ids``: ``freq-dict`` stores each top-k id as its rank by frequency within the shard
  (code 0 = the shard's most frequent id) plus the shard's dictionary of ids in that order
  (``topk_ids_dictionary``, int32). Frequent ids get small codes, whose zero high bytes and
  skewed low bytes the byte-shuffling compressor squeezes; reading is one gather.
- ``logprobs``: ``fp16`` stores ``topk_logprobs`` as is; ``fp16-rowdelta`` stores, per row, the
  first value's float16 bit pattern followed by the differences of consecutive bit patterns
  (``uint16``, modular). Rows are sorted descending and all values are <= 0, so bit patterns
  ascend and the differences are small; the transform is exact on every float16 value
  (``-0.0`` included) because it is integer arithmetic on the bits. ``q8-rowrange`` is the
  optional LOSSY layout: 8-bit codes on a uniform grid between each row's first and last
  value, row-delta coded like the above (order and sign are preserved; the error is reported
  by the benchmark).
- ``transpose_ids`` / ``transpose_logprobs``: store the ``[N, k]`` array as ``[k, N]``
  (rank-major), so values of one rank across tokens are adjacent. That helps the log-prob
  row deltas (alike at one rank) by ~6%, not the frequency-coded ids, and costs a transposing
  copy on read, so only the log-probs are stored rank-major by default.
- compressor: Blosc with ``cname``/``clevel``/``shuffle`` for every array. Byte shuffle beats
  bitshuffle once the values are small integers (frequency codes, row deltas). Blosc's
  zstd level 9 compresses ~2% smaller than level 6 but writes ~15x slower (``compact-max``).

Ragged shards (format version 3, a teacher with a tail budget) keep ``topk_count`` (``[N]``,
the entries of each position) and store ``topk_ids`` and ``topk_logprobs`` FLAT: the kept
entries of every position back to back (``[sum count]``), with no padding. The same encodings
apply to the flat arrays (``fp16-bits-rowdelta`` runs along the flat array, across position
boundaries; ``q8-rowrange`` is not offered for ragged shards), and decoding pads each position
to the shard's widest by repeating its first entry.

``packed`` (LOSSY; ragged shards only, so a fixed-k store in this layout is ragged with every
position at k; format version 4, which version-3 readers refuse) spends the bytes where they matter:

- ``freq-dict-posdelta`` ids: within each position the entries are sorted by frequency code
  and each code is stored as its difference from the position's previous one (the first as
  is). The kept ids of a position are a set; their order by log-prob costs about
  log2(k!)/k bits an id, which the sorted form does not pay.
- ``q8-poslog`` log-probs: per position, 8-bit codes of ``log1p(first - lp) /
  log1p(first - last)`` (``first``/``last``: the position's largest and smallest kept
  log-prob, float16 companions), so the grid is finest at the top of the distribution, where
  the student's mass is, and coarsest deep in the tail. The largest value is exact, and the
  error of a value d nats below it is at most ``(1 + d) * expm1(log1p(range) / 510)`` nats
  (about ``(1 + d) * log1p(range) / 510``) plus half a float16 step at the value.
- the per-position ``tail_logmass``, ``dpo_logprobs`` and ``reverse_logprobs`` as float16
  (``widen-float32``); ``alpha`` stays float32 (``beta0 / alpha`` must not meet a float16
  zero when ``--eps`` is tiny).

Decoding puts each position back in log-prob order (the record contract); entries whose codes
tie keep their frequency-code order.

How an array was encoded is also written into its own zarr attributes (``encoding``,
``transposed``), and decoding follows those attributes, not the preset name, so any shard a
supported preset ever wrote stays readable.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

import numpy as np

from ..ragged import offsets_from_lengths, padded_index

from ..record import FIELD_DTYPES
from .batch import TargetBatch
from .errors import StoreFormatError


@dataclass(frozen=True)
class Layout:
    name: str
    narrow_ids: bool = True
    ids: str = "plain"            # "plain" | "freq-dict" | "freq-dict-posdelta" (top-k ids)
    logprobs: str = "fp16-rowdelta"  # "fp16" | "fp16-rowdelta" | "q8-rowrange" | "q8-poslog"
    scalars: str = "fp32"         # per-position alpha/tail/teacher log-probs: "fp32" | "fp16"
    transpose_ids: bool = False
    transpose_logprobs: bool = True
    cname: str = "zstd"
    clevel: int = 5
    shuffle: str = "bitshuffle"            # "bitshuffle" | "shuffle" | "noshuffle"
    chunk_tokens: int = 16384              # response tokens per chunk of a per-position array

    @property
    def lossless(self) -> bool:
        return self.logprobs not in ("q8-rowrange", "q8-poslog") and self.scalars == "fp32"

    @property
    def ragged_only(self) -> bool:
        """Its encodings exist for ragged shards only (format version 4, even at a fixed k)."""
        return self.ids == "freq-dict-posdelta" or self.logprobs == "q8-poslog"

    @property
    def ragged_capable(self) -> bool:
        return self.logprobs != "q8-rowrange"

    def describe(self) -> dict[str, Any]:
        return asdict(self)


#: Presets by name, each one step from the previous (the benchmark measures every step).
#: ``baseline`` is the reference point (contract dtypes, Blosc-zstd + bitshuffle, as is);
#: ``compact`` is the default, chosen by benchmark (benchmarks/results/store.md).
LAYOUTS: dict[str, Layout] = {
    "baseline": Layout("baseline", narrow_ids=False, logprobs="fp16", transpose_logprobs=False),
    "narrow": Layout("narrow", logprobs="fp16", transpose_logprobs=False),
    "rowdelta": Layout("rowdelta", transpose_logprobs=False),
    "rankmajor": Layout("rankmajor", transpose_ids=True, clevel=6),
    "byteshuffle": Layout("byteshuffle", transpose_ids=True, clevel=6, shuffle="shuffle"),
    "compact": Layout("compact", ids="freq-dict", clevel=6, shuffle="shuffle"),
    "compact-max": Layout("compact-max", ids="freq-dict", clevel=9, shuffle="shuffle"),
    "compact-lossy8": Layout("compact-lossy8", ids="freq-dict", logprobs="q8-rowrange",
                             clevel=6, shuffle="shuffle"),
    "packed": Layout("packed", ids="freq-dict-posdelta", logprobs="q8-poslog", scalars="fp16",
                     clevel=6, shuffle="shuffle"),
}
DEFAULT_LAYOUT = "compact"


def needs_ragged(name: str) -> bool:
    """Whether the layout ``name`` writes ragged shards only (False for a name not known
    here: the metadata check that calls this must not fail on it first)."""
    layout = LAYOUTS.get(name)
    return bool(layout and layout.ragged_only)

#: Arrays of a v1 shard: per example, then per token of input_ids, then per response position.
PER_EXAMPLE_ARRAYS = ("example_index", "prompt_len", "seq_len")
LOGPROB_COMPANIONS = ("topk_logprobs_first", "topk_logprobs_last")
ID_DICTIONARY = "topk_ids_dictionary"


def get_layout(name: str) -> Layout:
    try:
        return LAYOUTS[name]
    except KeyError:
        raise StoreFormatError(f"unknown layout {name!r}; known layouts: "
                               f"{', '.join(LAYOUTS)}") from None


@dataclass(frozen=True)
class EncodedArray:
    data: np.ndarray
    chunks: tuple[int, ...]
    attributes: dict[str, Any]


def _id_dtype(layout: Layout, vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if layout.narrow_ids and vocab_size <= 65536 else np.dtype(np.int32)


def _chunks(shape: tuple[int, ...], token_axis: int, chunk_tokens: int) -> tuple[int, ...]:
    chunks = list(shape)
    chunks[token_axis] = max(1, min(chunk_tokens, shape[token_axis]))
    return tuple(chunks)


def encode_shard(batch: TargetBatch, layout: Layout, vocab_size: int, *,
                 ragged: bool = False) -> dict[str, EncodedArray]:
    """The arrays (with chunking and encoding attributes) that represent ``batch``; ``ragged``
    (format version 3) stores only each position's kept entries, plus ``topk_count``."""
    if ragged:
        return _encode_ragged(batch, layout, vocab_size)
    if layout.ragged_only:
        raise StoreFormatError(f"layout {layout.name} writes ragged shards only (format version "
                               f"4)")
    if batch.topk_count.size and int(batch.topk_count.min()) < batch.top_k:
        raise StoreFormatError("a batch whose positions keep different numbers of ids needs a "
                               "ragged shard (format version 3, tail_budget > 0)")
    out = _encode_scalars(batch, layout, vocab_size)
    ct = layout.chunk_tokens
    plain = {"encoding": "plain"}
    id_dtype = _id_dtype(layout, vocab_size)
    id_enc = {"encoding": "plain" if id_dtype == np.int32 else "widen-int32"}

    def put_topk(name: str, arr: np.ndarray, attrs: dict[str, Any]) -> None:
        transpose = layout.transpose_ids if name == "topk_ids" else layout.transpose_logprobs
        if transpose:
            arr = np.ascontiguousarray(arr.T)
            out[name] = EncodedArray(arr, _chunks(arr.shape, 1, ct), {**attrs, "transposed": True})
        else:
            out[name] = EncodedArray(arr, _chunks(arr.shape, 0, ct), {**attrs, "transposed": False})

    if layout.ids == "plain":
        put_topk("topk_ids", batch.topk_ids.astype(id_dtype, copy=False), id_enc)
    elif layout.ids == "freq-dict":
        codes, dictionary = freq_dict_encode(batch.topk_ids, vocab_size)
        put_topk("topk_ids", codes, {"encoding": "freq-dict", "companions": [ID_DICTIONARY]})
        out[ID_DICTIONARY] = EncodedArray(dictionary, dictionary.shape, plain)
    else:
        raise StoreFormatError(f"layout {layout.name}: unknown ids encoding {layout.ids!r}")
    lp = batch.topk_logprobs
    if layout.logprobs == "fp16":
        put_topk("topk_logprobs", lp, plain)
    elif layout.logprobs == "fp16-rowdelta":
        put_topk("topk_logprobs", rowdelta_encode(lp), {"encoding": "fp16-bits-rowdelta"})
    elif layout.logprobs == "q8-rowrange":
        q, first, last = q8_encode(lp)
        put_topk("topk_logprobs", q, {"encoding": "q8-rowrange",
                                      "companions": list(LOGPROB_COMPANIONS)})
        out["topk_logprobs_first"] = EncodedArray(first, _chunks(first.shape, 0, ct), plain)
        out["topk_logprobs_last"] = EncodedArray(last, _chunks(last.shape, 0, ct), plain)
    else:
        raise StoreFormatError(f"layout {layout.name}: unknown logprobs encoding "
                               f"{layout.logprobs!r}")
    return out


def _encode_scalars(batch: TargetBatch, layout: Layout, vocab_size: int
                    ) -> dict[str, EncodedArray]:
    """Every array but the topk ones (the same in fixed-width and ragged shards)."""
    out: dict[str, EncodedArray] = {}
    ct = layout.chunk_tokens
    plain = {"encoding": "plain"}
    out["example_index"] = EncodedArray(batch.example_index, batch.example_index.shape, plain)
    out["prompt_len"] = EncodedArray(batch.prompt_len, batch.prompt_len.shape, plain)
    seq_len = np.diff(batch.seq_offsets).astype(np.int32)
    out["seq_len"] = EncodedArray(seq_len, seq_len.shape, plain)

    id_dtype = _id_dtype(layout, vocab_size)
    id_enc = {"encoding": "plain" if id_dtype == np.int32 else "widen-int32"}
    ids = batch.input_ids.astype(id_dtype, copy=False)
    out["input_ids"] = EncodedArray(ids, _chunks(ids.shape, 0, 2 * ct), id_enc)
    for name in ("alpha", "tail_logmass", "dpo_logprobs", "reverse_logprobs"):
        arr, attrs = getattr(batch, name), plain
        if layout.scalars == "fp16" and name != "alpha":
            arr, attrs = arr.astype(np.float16), {"encoding": "widen-float32"}
        out[name] = EncodedArray(arr, _chunks(arr.shape, 0, ct), attrs)
    return out


def _encode_ragged(batch: TargetBatch, layout: Layout, vocab_size: int
                   ) -> dict[str, EncodedArray]:
    if layout.logprobs == "q8-rowrange":
        raise StoreFormatError(f"layout {layout.name}: q8-rowrange is not offered for ragged "
                               f"shards (tail_budget > 0); pick compact or packed")
    out = _encode_scalars(batch, layout, vocab_size)
    counts = batch.topk_count
    width = batch.top_k
    keep = np.arange(width) < counts[:, None]
    ids = batch.topk_ids[keep]                    # [sum count], position-major
    logprobs = batch.topk_logprobs[keep]
    flat_chunks = (max(1, min(layout.chunk_tokens * 8, ids.shape[0])),)
    if layout.ids == "freq-dict-posdelta":
        codes, dictionary = freq_dict_encode(ids, vocab_size)
        position = np.repeat(np.arange(counts.size), counts)
        order = np.lexsort((codes, position))     # by position, then by code
        ids, logprobs, codes = ids[order], logprobs[order], codes[order]
        out["topk_ids"] = EncodedArray(position_deltas(codes, counts), flat_chunks, {
            "encoding": "freq-dict-posdelta", "companions": [ID_DICTIONARY, "topk_count"],
            "ragged": True, "position_order": "code"})
        out[ID_DICTIONARY] = EncodedArray(dictionary, dictionary.shape, {"encoding": "plain"})
    elif layout.ids == "freq-dict":
        codes, dictionary = freq_dict_encode(ids, vocab_size)
        out["topk_ids"] = EncodedArray(codes, flat_chunks, {
            "encoding": "freq-dict", "companions": [ID_DICTIONARY], "ragged": True})
        out[ID_DICTIONARY] = EncodedArray(dictionary, dictionary.shape, {"encoding": "plain"})
    else:
        id_dtype = _id_dtype(layout, vocab_size)
        out["topk_ids"] = EncodedArray(ids.astype(id_dtype), flat_chunks, {
            "encoding": "plain" if id_dtype == np.int32 else "widen-int32", "ragged": True})
    if layout.logprobs == "fp16":
        lp, attrs = logprobs, {"encoding": "plain"}
    elif layout.logprobs == "q8-poslog":
        lp, first, last = poslog_encode(logprobs, counts)
        attrs = {"encoding": "q8-poslog", "companions": [*LOGPROB_COMPANIONS, "topk_count"]}
        pos_chunks = _chunks(first.shape, 0, layout.chunk_tokens)
        out["topk_logprobs_first"] = EncodedArray(first, pos_chunks, {"encoding": "plain"})
        out["topk_logprobs_last"] = EncodedArray(last, pos_chunks, {"encoding": "plain"})
    else:  # one long row: the first entry of a position is a delta from the previous one's last
        lp, attrs = rowdelta_encode(logprobs[None, :])[0], {"encoding": "fp16-bits-rowdelta"}
    out["topk_logprobs"] = EncodedArray(lp, flat_chunks, {**attrs, "ragged": True})
    count_dtype = np.uint8 if width <= 255 else (np.uint16 if width <= 65535 else np.int32)
    out["topk_count"] = EncodedArray(counts.astype(count_dtype),
                                     _chunks(counts.shape, 0, layout.chunk_tokens),
                                     {"encoding": "widen-int32" if count_dtype != np.int32
                                      else "plain"})
    return out


def decode_shard(arrays: Mapping[str, tuple[np.ndarray, Mapping[str, Any]]]) -> TargetBatch:
    """Rebuild the batch from ``{name: (stored array, its attributes)}``.

    Raises :class:`StoreFormatError` for an encoding this code doesn't know and
    ``KeyError`` naming a missing array.
    """
    def get(name: str) -> np.ndarray:
        if name not in arrays:
            raise KeyError(f"array {name!r} is missing")
        data, attrs = arrays[name]
        return _decode_array(name, data, attrs, arrays)

    seq_len = get("seq_len").astype(np.int64)
    prompt_len = get("prompt_len")
    pos_offsets = offsets_from_lengths(seq_len - prompt_len)
    seq_offsets = offsets_from_lengths(seq_len)
    topk_ids, topk_logprobs = get("topk_ids"), get("topk_logprobs")
    if "topk_count" in arrays:  # ragged (format version 3): pad each position to the widest
        counts = get("topk_count")
        if arrays["topk_ids"][1].get("position_order") == "code":
            topk_ids, topk_logprobs = _by_logprob(counts, topk_ids, topk_logprobs)
        topk_ids, topk_logprobs = _pad_flat(counts, topk_ids, topk_logprobs)
    else:
        counts = np.full(topk_ids.shape[0], topk_ids.shape[1] if topk_ids.ndim == 2 else 0,
                         dtype=np.int32)
    batch = TargetBatch(
        example_index=get("example_index"), prompt_len=prompt_len, seq_offsets=seq_offsets,
        input_ids=get("input_ids"), pos_offsets=pos_offsets, alpha=get("alpha"),
        topk_ids=topk_ids, topk_logprobs=topk_logprobs,
        tail_logmass=get("tail_logmass"), dpo_logprobs=get("dpo_logprobs"),
        reverse_logprobs=get("reverse_logprobs"), topk_count=counts)
    for name in FIELD_DTYPES:
        if name != "prompt_len" and getattr(batch, name).dtype != FIELD_DTYPES[name]:
            raise ValueError(f"{name}: decoded dtype {getattr(batch, name).dtype}, expected "
                             f"{FIELD_DTYPES[name]}")
    batch.check()
    return batch


def _by_logprob(counts: np.ndarray, ids: np.ndarray, logprobs: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """Flat entries stored in another order -> each position's entries by log-prob, descending
    (a stable sort: ties keep their stored order)."""
    if ids.shape != logprobs.shape or int(counts.sum()) != ids.shape[0]:
        raise ValueError(f"topk_ids: a ragged shard holds {ids.shape} entries for counts "
                         f"summing to {int(counts.sum())}")
    position = np.repeat(np.arange(counts.size), counts)
    order = np.lexsort((-logprobs.astype(np.float32), position))
    return ids[order], logprobs[order]


def _pad_flat(counts: np.ndarray, ids: np.ndarray, logprobs: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray]:
    """Flat ``[sum count]`` entries -> ``[N, widest]``, columns past a count repeating column 0."""
    if ids.ndim != 1 or logprobs.shape != ids.shape or int(counts.sum()) != ids.shape[0]:
        raise ValueError(f"topk_ids: a ragged shard holds {ids.shape} entries for counts "
                         f"summing to {int(counts.sum())}")
    if counts.size and int(counts.min()) < 1:
        raise ValueError("topk_count: a position keeps no id")
    index = padded_index(offsets_from_lengths(counts)[:-1], counts)
    return ids[index], logprobs[index]


def _decode_array(name: str, data: np.ndarray, attrs: Mapping[str, Any],
                  arrays: Mapping[str, tuple[np.ndarray, Mapping[str, Any]]]) -> np.ndarray:
    encoding = attrs.get("encoding")
    transposed = bool(attrs.get("transposed", False))
    target = FIELD_DTYPES.get(name, np.dtype(np.int32))
    if encoding == "plain":
        out = data.T if transposed else data
        return np.ascontiguousarray(out, dtype=data.dtype)
    if encoding == "widen-float32":
        return np.ascontiguousarray(data, dtype=np.float32)
    if encoding == "widen-int32":
        out = np.empty(data.T.shape if transposed else data.shape, dtype=np.int32)
        out[...] = data.T if transposed else data
        return out
    if encoding == "freq-dict":
        dictionary = arrays[ID_DICTIONARY][0]
        if transposed:
            return np.ascontiguousarray(dictionary[data].T)
        return dictionary[data]
    if encoding == "freq-dict-posdelta":
        dictionary = arrays[ID_DICTIONARY][0]
        counts = _decode_array("topk_count", *arrays["topk_count"], arrays)
        return dictionary[position_sums(data, counts)]
    if encoding == "q8-poslog":
        counts = _decode_array("topk_count", *arrays["topk_count"], arrays)
        return poslog_decode(data, arrays["topk_logprobs_first"][0],
                             arrays["topk_logprobs_last"][0], counts)
    if encoding == "fp16-bits-rowdelta":
        if attrs.get("ragged"):
            return np.cumsum(data, dtype=np.uint16).view(np.float16)
        if transposed:
            return np.ascontiguousarray(_cumsum_axis0(data).T).view(np.float16)
        return np.cumsum(data, axis=1, dtype=np.uint16).view(np.float16)
    if encoding == "q8-rowrange":
        first = arrays["topk_logprobs_first"][0]
        last = arrays["topk_logprobs_last"][0]
        q = data.T if transposed else data
        return q8_decode(q, first, last)
    raise StoreFormatError(f"array {name}: unknown encoding {encoding!r} (written by a newer "
                           f"aligndistil?)")


# ---------------------------------------------------------------------- transforms
def rowdelta_encode(logprobs: np.ndarray) -> np.ndarray:
    """float16 ``[N, k]`` -> uint16 ``[N, k]``: first bit pattern, then modular differences."""
    bits = logprobs.view(np.uint16)
    out = np.empty_like(bits)
    out[:, :1] = bits[:, :1]
    np.subtract(bits[:, 1:], bits[:, :-1], out=out[:, 1:])
    return out


def freq_dict_encode(ids: np.ndarray, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Ids -> (codes, dictionary) with ``dictionary[codes] == ids``; code 0 is the shard's
    most frequent id, code 1 the next, and so on, so frequent ids get small codes (whose high
    bytes are zero: a poor man's entropy coder that the byte-shuffling compressor finishes)."""
    counts = np.bincount(ids.ravel(), minlength=vocab_size)
    order = np.argsort(-counts, kind="stable")
    used = int(np.count_nonzero(counts))
    code_of = np.empty(order.size, dtype=np.int64)
    code_of[order] = np.arange(order.size)
    code_dtype = np.uint16 if used <= 65536 else np.uint32
    return code_of[ids].astype(code_dtype), order[:used].astype(np.int32)


def position_deltas(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Flat per-position runs of unsigned integers -> each value minus the previous one of its
    position (a position's first value as is); same dtype, modular, so exact for any order
    (the encoder sorts each position first, which keeps the differences small)."""
    out = values.copy()
    if values.size:
        out[1:] = values[1:] - values[:-1]
        starts = offsets_from_lengths(counts)[:-1]
        starts = starts[counts > 0]
        out[starts] = values[starts]
    return out


def position_sums(deltas: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Inverse of :func:`position_deltas`, in the same modular arithmetic (int64 out)."""
    if int(counts.sum()) != deltas.shape[0]:
        raise ValueError(f"topk_ids: a ragged shard holds {deltas.shape[0]} entries for counts "
                         f"summing to {int(counts.sum())}")
    running = np.cumsum(deltas, dtype=deltas.dtype)  # wraps like the encoder's differences
    before = offsets_from_lengths(counts)[:-1]
    # the running sum just before each position's first entry, repeated over the position
    base = np.zeros(counts.shape, dtype=deltas.dtype)
    if running.size:
        base = np.where(before > 0, running[np.maximum(before - 1, 0)], base).astype(
            deltas.dtype)
    return (running - np.repeat(base, counts)).astype(np.int64)


def poslog_encode(logprobs: np.ndarray, counts: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lossy: flat float16 log-probs -> (uint8 codes of ``log1p(first - lp) / log1p(first -
    last)``, first, last) with ``first``/``last`` each position's largest/smallest (float16)."""
    lp = logprobs.astype(np.float32)
    starts = offsets_from_lengths(counts)[:-1]
    first = np.maximum.reduceat(lp, starts) if lp.size else np.zeros(0, np.float32)
    last = np.minimum.reduceat(lp, starts) if lp.size else np.zeros(0, np.float32)
    first, last = first.astype(np.float16), last.astype(np.float16)
    scale = np.log1p(first.astype(np.float32) - last.astype(np.float32))
    scale = np.repeat(np.where(scale > 0, scale, 1.0), counts)
    depth = np.log1p(np.repeat(first.astype(np.float32), counts) - lp)
    q = np.clip(np.rint(255.0 * depth / scale), 0, 255).astype(np.uint8)
    return q, first, last


def poslog_decode(q: np.ndarray, first: np.ndarray, last: np.ndarray,
                  counts: np.ndarray) -> np.ndarray:
    """Inverse of :func:`poslog_encode` (up to the quantisation), flat float16."""
    if first.shape != counts.shape or last.shape != counts.shape \
            or int(counts.sum()) != q.shape[0]:
        raise ValueError(f"topk_logprobs: {q.shape[0]} codes and {first.shape[0]} positions do "
                         f"not match the counts ({counts.shape[0]} positions)")
    f = np.repeat(first.astype(np.float32), counts)
    scale = np.repeat(np.log1p(first.astype(np.float32) - last.astype(np.float32)), counts)
    out = f - np.expm1(q.astype(np.float32) * scale / 255.0)
    return np.minimum(out, 0.0).astype(np.float16)


def _cumsum_axis0(data: np.ndarray) -> np.ndarray:
    """Modular running sum down axis 0 of a ``[k, N]`` array, one vector add per rank
    (``np.cumsum(axis=0)`` walks the long axis in the inner loop and is ~20x slower)."""
    out = np.empty_like(data)
    out[0] = data[0]
    for j in range(1, data.shape[0]):
        np.add(out[j - 1], data[j], out=out[j])
    return out


def q8_encode(logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lossy: 8-bit codes on a uniform grid from each row's first (max) to last (min) value,
    returned row-delta coded (codes ascend along a row; the first is always 0)."""
    lp = logprobs.astype(np.float32)
    first, last = logprobs[:, 0].copy(), logprobs[:, -1].copy()
    step = (first.astype(np.float32) - last.astype(np.float32)) / 255.0
    safe = np.where(step > 0, step, 1.0)[:, None]
    q = np.rint((first.astype(np.float32)[:, None] - lp) / safe)
    q = np.clip(np.where(step[:, None] > 0, q, 0), 0, 255).astype(np.uint8)
    dq = np.empty_like(q)
    dq[:, :1] = q[:, :1]
    np.subtract(q[:, 1:], q[:, :-1], out=dq[:, 1:])
    return dq, first, last


def q8_decode(dq: np.ndarray, first: np.ndarray, last: np.ndarray) -> np.ndarray:
    """Inverse of :func:`q8_encode` (up to the quantisation), float16 ``[N, k]``."""
    q = np.cumsum(dq, axis=1, dtype=np.uint8)
    f = first.astype(np.float32)
    step = (f - last.astype(np.float32)) / 255.0
    out = f[:, None] - q.astype(np.float32) * step[:, None]
    return np.minimum(out, 0.0).astype(np.float16)
