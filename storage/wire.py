"""The REST wire codec: a list of :class:`~storage.record.TargetRecord` as JSON or Arrow IPC.

Both encodings carry the same fields under the same names (``WIRE_FIELDS``, DESIGN §4), and
both round-trip EXACTLY: decoding what was encoded gives records whose arrays are bitwise equal
to the originals, in the record dtypes (int32 ids, float16 ``topk_logprobs``, float32 for the
per-position scalars). The store and the server agree bit for bit, so the wire must not round.

JSON
    ``{"results": [{"input_ids": [..], "prompt_len": P, "alpha": [..], "topk_ids": [[..]],
    "topk_logprobs": [[..]], "tail_logmass": [..], "dpo_logprobs": [..],
    "reverse_logprobs": [..]}, ...]}``. JSON has no infinities, so a ``-inf`` tail (k = V) is
    ``null``. Exactness of the numbers:

    - float32 values are written as the shortest decimal that parses back to the *same
      float64* (Python's ``repr`` of the value widened to float64, exact); a parser that reads
      it as float64 and narrows to float32 gets the identical float32.
    - float16 values (the bulk: ``T * k`` of them) come from a table of all 2**16 bit
      patterns, each the shortest ``%g`` decimal whose float64 parse narrows back to the same
      float16 bits (checked once, when the table is built). ``-0.0`` is written as ``-0.0``
      (``-0`` would parse as the integer 0 and lose the sign). This keeps the payload about
      half the size of float64 reprs (``-0.001`` instead of ``-0.0010004043579101562``).

    Cost, measured on this project's shared 2-core CPU machine (8 records, T = 512, k = 64,
    i.e. 262k float16 values): ``encode_json`` ~35 ms (3.2 MB; a plain ``json.dumps`` of
    ``to_dict()`` takes ~110 ms for 5.3 MB), ``decode_json`` ~55 ms; ``encode_arrow`` ~1 ms
    (1.7 MB), ``decode_arrow`` ~2 ms. The float16 table is built on first use (~90 ms, once
    per process). Clients that care about speed should ask for Arrow.

Arrow IPC stream (media type :data:`ARROW_STREAM_MEDIA_TYPE`)
    One row per record. Columns, in ``WIRE_FIELDS`` order: ``input_ids`` list<int32>,
    ``prompt_len`` int32, ``alpha`` list<float>, ``topk_ids`` list<list<int32>>,
    ``topk_logprobs`` list<list<halffloat>>, ``tail_logmass`` / ``dpo_logprobs`` /
    ``reverse_logprobs`` list<float>; plus ``example_index`` int64 when asked for. ``-inf`` is
    stored as itself. The schema metadata holds ``aligndistil.wire_version``; a decoder refuses
    a stream without it, with an unknown version, or with a missing or mistyped column. The
    inner lists of the ``topk_*`` columns may also be ``fixed_size_list`` on input. Columns this
    version does not know are ignored (as are unknown keys in JSON results), so that a newer
    writer's additions do not break an older reader.

Ragged records (a teacher with a tail budget)
    A position keeps ``k_t`` ids, so the inner lists of ``topk_ids`` and ``topk_logprobs`` have
    ``k_t`` entries each, in JSON and in Arrow alike; there is no ``topk_count`` field, the
    lengths are the counts. A decoder pads each record to its widest position
    (:meth:`~storage.record.TargetRecord.create`). Readers older than the tail budget refuse
    such lists (they want rectangular ``[T, k]`` fields), so a client checks ``/v1/info``'s
    ``tail_budget`` before it asks.

Named ids (``POST /v1/score`` with ``extra_ids``)
    A request that names ids per response position gets, per result, ``extra_logprobs``: log pi*
    at those ids, ``[T, m]`` with ``m`` the longest row the request named, shorter rows padded
    with ``-inf`` (JSON: lists of float32 reprs, ``null`` for ``-inf``; Arrow: a
    ``list<list<float>>`` column after the record's, ``-inf`` as itself). It is not part of
    :class:`~storage.record.TargetRecord` (a store never holds it): :func:`encode_json` /
    :func:`encode_arrow` take it beside the records, and :func:`decode_arrow_named` reads it
    back. Readers that do not know the column ignore it.

Encoding builds every Arrow column from one concatenated numpy buffer plus offsets, no
per-element Python.
"""

from __future__ import annotations

import functools
import json
import math
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa

from storage.errors import UserError
from storage.ragged import offsets_from_lengths, padded_index
from storage.record import FIELD_DTYPES, WIRE_FIELDS, RecordError, TargetRecord

#: What ``Accept`` / ``Content-Type`` say for the Arrow encoding.
ARROW_STREAM_MEDIA_TYPE = "application/vnd.apache.arrow.stream"
JSON_MEDIA_TYPE = "application/json"

#: Version of the Arrow layout, kept in the schema metadata under :data:`WIRE_VERSION_KEY`.
WIRE_VERSION = 1
WIRE_VERSION_KEY = b"aligndistil.wire_version"

#: Fields whose wire value is a list per record, and how deep (1 = [T] or [L], 2 = [T, k]).
_LIST_DEPTH: dict[str, int] = {
    "input_ids": 1, "alpha": 1, "topk_ids": 2, "topk_logprobs": 2,
    "tail_logmass": 1, "dpo_logprobs": 1, "reverse_logprobs": 1,
}
_SCALAR_FIELDS = ("example_index", "prompt_len")


class WireError(UserError, ValueError):
    """A payload that does not decode to valid records; the message names the field."""


# ====================================================================== JSON
def encode_json(records: Sequence[TargetRecord], *, include_example_index: bool = False,
                extra_logprobs: Sequence[np.ndarray] | None = None) -> bytes:
    """``{"results": [...]}`` as UTF-8 bytes; see the module docstring for number formats.
    ``extra_logprobs``: one ``[T, m]`` float32 array per record (named ids)."""
    parts = [_record_json(r, include_example_index) for r in records]
    if extra_logprobs is not None:
        parts = [part[:-1] + ',"extra_logprobs":' + _json_f32_rows(named) + "}"
                 for part, named in zip(parts, extra_logprobs)]
    return ('{"results":[' + ",".join(parts) + "]}").encode("utf-8")


def decode_json(payload: bytes | str | Mapping[str, Any], *, vocab_size: int | None = None
                ) -> list[TargetRecord]:
    """Parse a ``{"results": [...]}`` payload (bytes, text, or an already-parsed dict).

    ``example_index`` is optional per result (-1 when absent). ``NaN``/``Infinity`` literals are
    refused; a ``-inf`` tail is ``null`` (or the string ``"-inf"``). Raises :class:`WireError`
    naming ``results[i].field``.
    """
    if isinstance(payload, Mapping):
        doc: Any = payload
    else:
        try:
            doc = json.loads(payload, parse_constant=_refuse_constant)
        except (ValueError, UnicodeDecodeError) as exc:
            raise WireError(f"invalid JSON: {exc}") from None
    if isinstance(doc, Mapping) and "results" not in doc and "error" in doc:
        raise WireError(f"the payload is an error response, not results: {doc['error']}")
    if not isinstance(doc, Mapping) or "results" not in doc:
        raise WireError("expected a JSON object with a 'results' list")
    results = doc["results"]
    if not isinstance(results, list):
        raise WireError(f"results: expected a list, got {type(results).__name__}")
    records = []
    for i, item in enumerate(results):
        if not isinstance(item, Mapping):
            raise WireError(f"results[{i}]: expected an object, got {type(item).__name__}")
        missing = [f for f in WIRE_FIELDS if f not in item]
        if missing:
            raise WireError(f"results[{i}]: missing field(s) {', '.join(map(repr, missing))}")
        values = {f: item[f] for f in FIELD_DTYPES if f in item}
        if values.get("example_index", 0) is None:
            del values["example_index"]
        try:
            records.append(TargetRecord.from_dict(values, vocab_size=vocab_size))
        except RecordError as exc:
            raise WireError(f"results[{i}].{exc}") from None
    return records


def _record_json(r: TargetRecord, include_example_index: bool) -> str:
    head = f'"example_index":{int(r.example_index)},' if include_example_index else ""
    return (
        "{" + head
        + '"input_ids":' + _json_ints(r.input_ids)
        + ',"prompt_len":' + str(int(r.prompt_len))
        + ',"alpha":' + _json_f32(r.alpha)
        + ',"topk_ids":' + _json_id_rows(r)
        + ',"topk_logprobs":' + _json_f16_rows(r.topk_logprobs, r.topk_count if r.ragged
                                               else None)
        + ',"tail_logmass":' + _json_f32(r.tail_logmass, neg_inf_as_null=True)
        + ',"dpo_logprobs":' + _json_f32(r.dpo_logprobs)
        + ',"reverse_logprobs":' + _json_f32(r.reverse_logprobs)
        + "}"
    )


def _json_ints(arr: np.ndarray) -> str:
    return json.dumps(arr.tolist(), separators=(",", ":"))


def _json_id_rows(r: TargetRecord) -> str:
    if not r.ragged:
        return _json_ints(r.topk_ids)
    return json.dumps([row.tolist() for row in r.kept_rows("topk_ids")], separators=(",", ":"))


def _json_f32(arr: np.ndarray, *, neg_inf_as_null: bool = False) -> str:
    # float32 -> Python float is exact; json writes float.__repr__, which round-trips float64.
    values: list[Any] = arr.tolist()
    if neg_inf_as_null:
        values = [None if v == -math.inf else v for v in values]
    return json.dumps(values, separators=(",", ":"), allow_nan=False)


def _json_f32_rows(arr: np.ndarray) -> str:
    return "[" + ",".join(_json_f32(row, neg_inf_as_null=True) for row in arr) + "]"


def _json_f16_rows(arr: np.ndarray, counts: np.ndarray | None = None) -> str:
    """Rows of float16 values; with ``counts``, row t holds its first ``counts[t]`` only."""
    table = _float16_strings()
    strings = table[np.ascontiguousarray(arr, dtype=np.float16).view(np.uint16)]
    if not all(strings.flat):  # only non-finite entries are empty; records never hold them
        raise WireError("topk_logprobs: non-finite float16 value cannot be written as JSON")
    rows = strings.tolist()
    if counts is not None:
        rows = [row[:c] for row, c in zip(rows, counts.tolist())]
    return "[[" + "],[".join(",".join(row) for row in rows) + "]]"


@functools.cache
def _float16_strings() -> np.ndarray:
    """Object array indexed by float16 bit pattern: the shortest exact JSON number for it.

    For each precision p = 1..17 the ``%.{p}g`` text is parsed as float64 (as every JSON parser
    does), narrowed to float16 and compared bitwise; the first p that survives wins. Every
    finite value succeeds by p = 17 (float64 repr is exact). Non-finite entries stay ``""``.
    """
    bits = np.arange(1 << 16, dtype=np.uint16)
    values = bits.view(np.float16).astype(np.float64)
    out = np.full(bits.shape, "", dtype=object)
    todo = np.flatnonzero(np.isfinite(values))
    for precision in range(1, 18):
        if todo.size == 0:
            break
        fmt = f"%.{precision}g"
        texts = [_as_float_literal(fmt % v) for v in values[todo].tolist()]
        with np.errstate(over="ignore"):
            back = np.array([float(t) for t in texts]).astype(np.float16).view(np.uint16)
        ok = back == bits[todo]
        for j, text in zip(todo[ok].tolist(), np.asarray(texts, dtype=object)[ok].tolist()):
            out[j] = text
        todo = todo[~ok]
    assert todo.size == 0, "every finite float16 has an exact float64 decimal"
    return out


def _as_float_literal(text: str) -> str:
    """``-0`` parses as the integer 0 (sign lost); give integral texts a ``.0``."""
    return text if ("." in text or "e" in text) else text + ".0"


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a valid JSON number")


# ====================================================================== Arrow
def arrow_schema(*, include_example_index: bool = False) -> pa.Schema:
    """The Arrow schema of wire version :data:`WIRE_VERSION` (with its version metadata)."""
    names = (("example_index",) if include_example_index else ()) + WIRE_FIELDS
    return pa.schema([pa.field(n, _arrow_type(n)) for n in names],
                     metadata={WIRE_VERSION_KEY: str(WIRE_VERSION).encode()})


def encode_arrow(records: Sequence[TargetRecord], *, include_example_index: bool = False,
                 extra_logprobs: Sequence[np.ndarray] | None = None) -> bytes:
    """An Arrow IPC stream with one row per record (one record batch); ``extra_logprobs``
    (one ``[T, m]`` float32 array per record) adds that column."""
    schema = arrow_schema(include_example_index=include_example_index)
    columns = [_encode_column(name, records) for name in schema.names]
    if extra_logprobs is not None:
        columns.append(_named_column(extra_logprobs))
        schema = schema.append(pa.field(NAMED_COLUMN, _NAMED_TYPE))
    batch = pa.RecordBatch.from_arrays(columns, schema=schema)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema) as writer:
        writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


def decode_arrow(payload: bytes | pa.Buffer, *, vocab_size: int | None = None
                 ) -> list[TargetRecord]:
    """Read an IPC stream written by :func:`encode_arrow` (any number of batches).

    Raises :class:`WireError` for a stream that is not Arrow, has no or an unknown wire
    version, misses a column, has a column of the wrong type, holds nulls, or whose rows are
    not valid records (the message names the column and, for the latter, the row).
    """
    try:
        reader = pa.ipc.open_stream(payload)
        table = reader.read_all()
    except (pa.ArrowInvalid, OSError) as exc:
        raise WireError(f"not a readable Arrow IPC stream: {exc}") from None
    _check_version(table.schema)
    n = table.num_rows
    cols: dict[str, Any] = {}
    for name in ("example_index",) + WIRE_FIELDS:
        if name not in table.schema.names:
            if name == "example_index":
                continue
            raise WireError(f"arrow column '{name}': missing")
        column = table.column(name)
        _check_type(name, column.type)
        array = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
        cols[name] = _decode_column(name, array)
    records = []
    for i in range(n):
        values = {name: _row(name, cols[name], i) for name in cols}
        values.setdefault("example_index", -1)
        ragged = {name: v for name, v in values.items() if isinstance(v, _Ragged)}
        if ragged:  # padded already; the lengths are the counts (and must agree)
            counts = {name: v.counts.tolist() for name, v in ragged.items()}
            if len(ragged) != 2 or counts["topk_ids"] != counts["topk_logprobs"]:
                raise WireError(f"arrow row {i}: topk_logprobs: per-position lengths differ "
                                f"from topk_ids'")
            values.update({name: v.padded for name, v in ragged.items()},
                          topk_count=ragged["topk_ids"].counts)
        try:
            records.append(TargetRecord.create(vocab_size=vocab_size, **values))
        except RecordError as exc:
            raise WireError(f"arrow row {i}: {exc}") from None
    return records


#: The column of log pi* at the ids a request named (see the module docstring).
NAMED_COLUMN = "extra_logprobs"
_NAMED_TYPE = pa.list_(pa.list_(pa.float32()))


def decode_arrow_named(payload: bytes | pa.Buffer) -> list[np.ndarray]:
    """The ``extra_logprobs`` column of a stream from :func:`encode_arrow`: one float32
    ``[T, m]`` array per row. Raises :class:`WireError` when it is missing or mistyped."""
    try:
        table = pa.ipc.open_stream(payload).read_all()
    except (pa.ArrowInvalid, OSError) as exc:
        raise WireError(f"not a readable Arrow IPC stream: {exc}") from None
    if NAMED_COLUMN not in table.schema.names:
        raise WireError(f"arrow column '{NAMED_COLUMN}': missing (the request named no ids?)")
    column = table.column(NAMED_COLUMN)
    if column.type != _NAMED_TYPE:
        raise WireError(f"arrow column '{NAMED_COLUMN}': expected {_NAMED_TYPE}, got "
                        f"{column.type}")
    out = []
    for row in column.to_pylist():
        width = max((len(r) for r in row), default=0)
        out.append(np.array([r for r in row], dtype=np.float32).reshape(len(row), width))
    return out


def _named_column(arrays: Sequence[np.ndarray]) -> pa.Array:
    return pa.array([np.asarray(a, dtype=np.float32).tolist() for a in arrays], type=_NAMED_TYPE)


# ---------------------------------------------------------------- Arrow encode helpers
def _arrow_type(name: str) -> pa.DataType:
    leaf = pa.from_numpy_dtype(FIELD_DTYPES[name])
    for _ in range(_LIST_DEPTH.get(name, 0)):
        leaf = pa.list_(leaf)
    return leaf


def _encode_column(name: str, records: Sequence[TargetRecord]) -> pa.Array:
    dtype = FIELD_DTYPES[name]
    leaf_type = pa.from_numpy_dtype(dtype)
    if name in _SCALAR_FIELDS:
        return pa.array(np.fromiter((getattr(r, name) for r in records), dtype=dtype,
                                    count=len(records)), type=leaf_type)
    arrays = [getattr(r, name) for r in records]
    flat = (np.concatenate([a.reshape(-1) for a in arrays]) if arrays
            else np.empty(0, dtype=dtype)).astype(dtype, copy=False)
    outer_lengths = np.fromiter((a.shape[0] for a in arrays), dtype=np.int64, count=len(arrays))
    if _LIST_DEPTH[name] == 2:  # each position's kept entries (ragged records: k_t of them)
        kept = [a[np.arange(a.shape[1]) < r.topk_count[:, None]] if r.ragged else a.reshape(-1)
                for a, r in zip(arrays, records)]
        flat = (np.concatenate(kept) if kept else np.empty(0, dtype=dtype)).astype(dtype,
                                                                                  copy=False)
        row_lengths = (np.concatenate([r.topk_count for r in records]).astype(np.int64)
                       if records else np.zeros(0, np.int64))
        values = pa.ListArray.from_arrays(_arrow_offsets(name, row_lengths),
                                          pa.array(flat, type=leaf_type))
    else:
        values = pa.array(flat, type=leaf_type)
    return pa.ListArray.from_arrays(_arrow_offsets(name, outer_lengths), values)


def _arrow_offsets(name: str, lengths: np.ndarray) -> pa.Array:
    offsets = offsets_from_lengths(lengths)
    if offsets[-1] > np.iinfo(np.int32).max:
        raise WireError(f"{name}: {offsets[-1]} values exceed one Arrow list column's int32 "
                        "offsets; send fewer records per response")
    return pa.array(offsets.astype(np.int32))


# ---------------------------------------------------------------- Arrow decode helpers
def _check_version(schema: pa.Schema) -> None:
    meta = schema.metadata or {}
    if WIRE_VERSION_KEY not in meta:
        raise WireError("Arrow stream has no 'aligndistil.wire_version' in its schema metadata; "
                        "it was not written by this wire codec")
    version = meta[WIRE_VERSION_KEY].decode(errors="replace")
    if version != str(WIRE_VERSION):
        raise WireError(f"unsupported wire format version {version!r}; this reader understands "
                        f"version {WIRE_VERSION}")


def _check_type(name: str, actual: pa.DataType) -> None:
    want = _arrow_type(name)
    typ = actual
    for depth in range(_LIST_DEPTH.get(name, 0)):
        inner_ok = depth > 0 and pa.types.is_fixed_size_list(typ)
        if not (pa.types.is_list(typ) or inner_ok):
            break
        typ = typ.value_type
    else:
        if typ == pa.from_numpy_dtype(FIELD_DTYPES[name]):
            return
    raise WireError(f"arrow column '{name}': expected type {want}, got {actual}")


class _Flat:
    """A decoded column: a numpy buffer plus row offsets (and per-row inner widths)."""

    def __init__(self, values: np.ndarray, offsets: np.ndarray | None,
                 inner: np.ndarray | None = None) -> None:
        self.values, self.offsets, self.inner = values, offsets, inner


def _decode_column(name: str, array: pa.Array) -> _Flat:
    if array.null_count:
        raise WireError(f"arrow column '{name}': {array.null_count} null row(s)")
    dtype = FIELD_DTYPES[name]
    if name in _SCALAR_FIELDS:
        return _Flat(array.to_numpy(zero_copy_only=False).astype(dtype), None)
    outer = _list_offsets(array)
    child = array.values
    inner = None
    if _LIST_DEPTH[name] == 2:
        if child.null_count:
            raise WireError(f"arrow column '{name}': null inner list(s)")
        # rows of record i are child[outer[i]:outer[i+1]], its values child.values[inner[..]]
        inner = _list_offsets(child)
        child = child.values
    if child.null_count:
        raise WireError(f"arrow column '{name}': null value(s)")
    # One copy of the whole leaf buffer: records then own writable memory.
    values = np.array(child.to_numpy(zero_copy_only=False), dtype=dtype, copy=True)
    return _Flat(values, outer, inner)


def _list_offsets(array: pa.Array) -> np.ndarray:
    """Offsets of ``array``'s rows into ``array.values`` (handles slices and fixed-size)."""
    if pa.types.is_fixed_size_list(array.type):
        size = array.type.list_size
        return (array.offset + np.arange(len(array) + 1, dtype=np.int64)) * size
    return array.offsets.to_numpy().astype(np.int64)


def _row(name: str, col: _Flat, i: int) -> Any:
    if col.offsets is None:
        return int(col.values[i])
    lo, hi = int(col.offsets[i]), int(col.offsets[i + 1])
    if col.inner is None:
        return col.values[lo:hi]
    starts, ends = col.inner[lo:hi], col.inner[lo + 1:hi + 1]
    widths = ends - starts
    if widths.size == 0:
        return col.values[0:0].reshape(0, 0)
    k = int(widths[0])
    if (widths != k).any():  # a ragged record: pad each row by repeating its first entry
        if widths.min() < 1:
            raise WireError(f"arrow row {i}: {name}: a position with no entries")
        return _Ragged(col.values[padded_index(starts, widths)], widths.astype(np.int32))
    return col.values[int(starts[0]):int(ends[-1])].reshape(hi - lo, k)


class _Ragged:
    """A ragged ``[T, k_t]`` field of one Arrow row, padded to its widest position."""

    def __init__(self, padded: np.ndarray, counts: np.ndarray) -> None:
        self.padded, self.counts = padded, counts

