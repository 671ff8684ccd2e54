"""The REST wire codec: exact JSON and Arrow round trips, the JSON shape, refusals."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pyarrow as pa
import pytest

from storage import wire
from storage.record import FIELD_DTYPES, TargetRecord
from storage.wire import WireError

#: DESIGN §4, written out here rather than imported, so a renamed field fails the test.
DESIGN_RESULT_FIELDS = ["input_ids", "prompt_len", "alpha", "topk_ids", "topk_logprobs",
                        "tail_logmass", "dpo_logprobs", "reverse_logprobs"]

F16_EXTREMES = np.array([0.0, -0.0, -2.0 ** -24, -3 * 2.0 ** -24, -2.0 ** -14 + 2.0 ** -24,
                         -2.0 ** -14, -1e-3, -0.1, -1.0, -np.pi, -1000.0, -65504.0],
                        dtype=np.float16)


def make_record(rng: np.random.Generator, *, L: int, P: int, k: int, V: int = 500,
                index: int = -1, extremes: bool = True) -> TargetRecord:
    T = L - P
    logprobs = (-rng.exponential(4.0, size=(T, k))).astype(np.float16)
    if extremes:
        flat = logprobs.reshape(-1)
        n = min(flat.size, F16_EXTREMES.size)
        flat[:n] = F16_EXTREMES[:n]
        logprobs = flat.reshape(T, k)
    # descending per row; sorting float16 keeps each value's bits (incl. -0.0 vs 0.0 order)
    logprobs = -np.sort(-logprobs, axis=1, kind="stable")
    f32 = lambda size: (-rng.exponential(2.0, size=size)).astype(np.float32)  # noqa: E731
    tail = f32(T)
    tail[0] = -np.inf if k == V else np.float32(-1e-45)  # -inf when k == V; else a subnormal
    dpo = f32(T)
    dpo[-1] = np.float32(-3.4028235e38)
    return TargetRecord.create(
        example_index=index, input_ids=rng.integers(0, V, size=L), prompt_len=P,
        alpha=rng.random(T).astype(np.float32) * 20 + np.float32(1e-3),
        topk_ids=rng.integers(0, V, size=(T, k)), topk_logprobs=logprobs,
        tail_logmass=tail if k != V else np.full(T, -np.inf, np.float32),
        dpo_logprobs=dpo, reverse_logprobs=f32(T))


def bitwise_equal(a: TargetRecord, b: TargetRecord, *, example_index: bool = True) -> bool:
    for name, dtype in FIELD_DTYPES.items():
        x, y = getattr(a, name), getattr(b, name)
        if name == "example_index" and not example_index:
            continue
        if isinstance(x, np.ndarray):
            if not (x.dtype == y.dtype == dtype and x.shape == y.shape
                    and x.tobytes() == y.tobytes()):
                return False
        elif x != y:
            return False
    return True


@pytest.fixture
def records() -> list[TargetRecord]:
    rng = np.random.default_rng(1234)
    return [
        make_record(rng, L=12, P=5, k=8, index=0),
        make_record(rng, L=2, P=1, k=4, index=7),            # T = 1
        make_record(rng, L=9, P=3, k=50, V=50, index=3),      # k == V: -inf tails
        make_record(rng, L=30, P=29, k=1, index=11),          # T = 1, k = 1
        make_record(rng, L=40, P=2, k=16, index=2),
    ]


# ---------------------------------------------------------------------- JSON
def test_json_round_trip_is_bitwise_exact(records):
    decoded = wire.decode_json(wire.encode_json(records))
    assert len(decoded) == len(records)
    for a, b in zip(records, decoded):
        assert bitwise_equal(a, b, example_index=False)
        assert b.example_index == -1  # omitted on the wire
    assert np.signbit(decoded[0].topk_logprobs.reshape(-1)[1])  # -0.0 kept its sign
    assert decoded[2].tail_logmass.tolist() == [-math.inf] * decoded[2].response_len


def test_json_round_trip_with_example_index(records):
    decoded = wire.decode_json(wire.encode_json(records, include_example_index=True))
    assert [r.example_index for r in decoded] == [0, 7, 3, 11, 2]
    assert all(bitwise_equal(a, b) for a, b in zip(records, decoded))


def test_json_every_nonpositive_float16_round_trips():
    """All 31745 finite float16 values <= 0 (each a possible top-k log-prob), in one record."""
    bits = np.arange(1 << 16, dtype=np.uint16)
    values = bits.view(np.float16)
    keep = np.isfinite(values) & ~(values > 0)
    values = values[keep]
    values = values[np.argsort(-values.astype(np.float64), kind="stable")]  # +0 then -0 ...
    k = values.size
    record = TargetRecord.create(
        example_index=-1, input_ids=[1, 2], prompt_len=1, alpha=[1.0],
        topk_ids=np.arange(k).reshape(1, k), topk_logprobs=values.reshape(1, k),
        tail_logmass=[-np.inf], dpo_logprobs=[-1.0], reverse_logprobs=[-2.0])
    (back,) = wire.decode_json(wire.encode_json([record]))
    assert back.topk_logprobs.dtype == np.float16
    np.testing.assert_array_equal(back.topk_logprobs.view(np.uint16),
                                  record.topk_logprobs.view(np.uint16))


def test_json_float16_table_is_exact_and_short_for_all_finite_values():
    table = wire._float16_strings()
    bits = np.arange(1 << 16, dtype=np.uint16)
    finite = np.isfinite(bits.view(np.float16))
    parsed = np.array([json.loads(s) if s else np.nan for s in table.tolist()], dtype=np.float64)
    assert all(isinstance(json.loads(s), float) for s in table[finite].tolist()[::97])
    np.testing.assert_array_equal(parsed[finite].astype(np.float16).view(np.uint16),
                                  bits[finite])
    assert table[np.float16(-0.001).view(np.uint16)] == "-0.001"
    assert table[np.float16(-0.0).view(np.uint16)] == "-0.0"


def test_json_float32_values_round_trip_through_float64_text():
    rng = np.random.default_rng(5)
    rec = make_record(rng, L=200, P=1, k=2)
    raw = (-np.abs(rng.standard_normal(199) * 10.0 ** rng.integers(-40, 38, 199))
           ).astype(np.float32)
    rec = dataclasses.replace(rec, dpo_logprobs=raw)
    (back,) = wire.decode_json(wire.encode_json([rec]))
    assert back.dpo_logprobs.dtype == np.float32
    assert back.dpo_logprobs.tobytes() == raw.tobytes()


def test_json_shape_matches_design(records):
    doc = json.loads(wire.encode_json(records))
    assert list(doc) == ["results"]
    assert len(doc["results"]) == len(records)
    for item, rec in zip(doc["results"], records):
        assert list(item) == DESIGN_RESULT_FIELDS
        assert item["input_ids"] == rec.input_ids.tolist()
        assert item["prompt_len"] == rec.prompt_len
        assert len(item["topk_ids"]) == rec.response_len
        assert all(len(row) == rec.top_k for row in item["topk_logprobs"])
    # JSON has no infinity: the k == V record's tails are null
    assert doc["results"][2]["tail_logmass"] == [None] * records[2].response_len
    assert b"Infinity" not in wire.encode_json(records)


def test_decode_json_accepts_parsed_dict_and_text(records):
    payload = wire.encode_json(records[:2])
    from_dict = wire.decode_json(json.loads(payload))
    from_text = wire.decode_json(payload.decode())
    for a, b, c in zip(records, from_dict, from_text):
        assert bitwise_equal(a, b, example_index=False)
        assert bitwise_equal(a, c, example_index=False)


def _doc(records):
    return json.loads(wire.encode_json(records))


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d["results"][1].pop("alpha"), "results[1]: missing field(s) 'alpha'"),
    (lambda d: d["results"][0].__setitem__("topk_ids", [["a"] * 8] * 7), "results[0].topk_ids"),
    (lambda d: d["results"][0].__setitem__("prompt_len", 2.5), "results[0].prompt_len"),
    (lambda d: d["results"][0].__setitem__("prompt_len", 12), "results[0].prompt_len"),
    (lambda d: d["results"][1].__setitem__("dpo_logprobs", [-1.0, -2.0]),
     "results[1].dpo_logprobs"),
    (lambda d: d["results"][0]["topk_logprobs"][0].reverse(), "results[0].topk_logprobs"),
    (lambda d: d["results"][0].__setitem__("alpha", [True] * 7), "results[0].alpha"),
    (lambda d: d.pop("results"), "'results'"),
    (lambda d: d.__setitem__("results", {"a": 1}), "results: expected a list"),
    (lambda d: d["results"].__setitem__(0, [1, 2]), "results[0]: expected an object"),
])
def test_decode_json_errors_name_the_field(records, mutate, expected):
    doc = _doc(records[:2])
    mutate(doc)
    with pytest.raises(WireError) as err:
        wire.decode_json(json.dumps(doc).encode())
    assert expected in str(err.value)


def test_decode_json_refuses_nan_and_bad_bytes(records):
    text = wire.encode_json(records[:1]).decode()
    first_alpha = json.loads(text)["results"][0]["alpha"][0]
    with pytest.raises(WireError, match="NaN"):
        wire.decode_json(text.replace(repr(first_alpha), "NaN", 1))
    with pytest.raises(WireError, match="invalid JSON"):
        wire.decode_json(b'{"results": [')
    with pytest.raises(WireError, match="error response, not results: .*overloaded"):
        wire.decode_json(b'{"error": {"type": "overloaded", "message": "busy"}}')


def test_decode_json_checks_vocab_size(records):
    with pytest.raises(WireError, match=r"results\[0\]\.(input_ids|topk_ids): id >= vocab_size"):
        wire.decode_json(wire.encode_json(records[:1]), vocab_size=3)


def test_decode_json_ignores_unknown_keys(records):
    doc = _doc(records[:1])
    doc["results"][0]["future_field"] = [1, 2]
    doc["server_time_ms"] = 3
    (back,) = wire.decode_json(doc)
    assert bitwise_equal(records[0], back, example_index=False)


# ---------------------------------------------------------------------- Arrow
def test_arrow_round_trip_is_bitwise_exact(records):
    for with_index in (False, True):
        payload = wire.encode_arrow(records, include_example_index=with_index)
        decoded = wire.decode_arrow(payload)
        assert len(decoded) == len(records)
        for a, b in zip(records, decoded):
            assert bitwise_equal(a, b, example_index=with_index)
            assert b.topk_logprobs.flags.writeable
        if not with_index:
            assert all(r.example_index == -1 for r in decoded)


def test_arrow_schema_keeps_record_dtypes_and_version(records):
    table = pa.ipc.open_stream(wire.encode_arrow(records)).read_all()
    assert table.num_rows == len(records)
    assert table.schema.names == DESIGN_RESULT_FIELDS
    types = {f.name: f.type for f in table.schema}
    assert types["topk_logprobs"].value_type.value_type == pa.float16()
    assert types["topk_ids"].value_type.value_type == pa.int32()
    assert types["input_ids"].value_type == pa.int32()
    assert types["alpha"].value_type == pa.float32()
    assert types["prompt_len"] == pa.int32()
    assert table.schema.metadata[b"aligndistil.wire_version"] == b"1"
    # -inf is stored as itself in Arrow
    assert table.column("tail_logmass")[2].as_py()[0] == -math.inf
    assert table.column("topk_logprobs")[1].as_py()[0][0] == 0.0


def _rewrite(payload: bytes, change) -> bytes:
    table = pa.ipc.open_stream(payload).read_all()
    table = change(table)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=2)  # several batches
    return sink.getvalue().to_pybytes()


def test_arrow_multiple_batches_decode(records):
    payload = _rewrite(wire.encode_arrow(records), lambda t: t)
    assert len(list(pa.ipc.open_stream(payload))) == 3
    assert all(bitwise_equal(a, b, example_index=False)
               for a, b in zip(records, wire.decode_arrow(payload)))


def test_arrow_refuses_unknown_or_missing_version(records):
    payload = wire.encode_arrow(records)
    newer = _rewrite(payload, lambda t: t.replace_schema_metadata(
        {b"aligndistil.wire_version": b"2"}))
    with pytest.raises(WireError, match="unsupported wire format version '2'"):
        wire.decode_arrow(newer)
    bare = _rewrite(payload, lambda t: t.replace_schema_metadata(None))
    with pytest.raises(WireError, match="wire_version"):
        wire.decode_arrow(bare)


def test_arrow_refuses_missing_and_mistyped_columns(records):
    payload = wire.encode_arrow(records)
    meta = {b"aligndistil.wire_version": b"1"}
    dropped = _rewrite(payload, lambda t: t.drop_columns(["dpo_logprobs"]))
    with pytest.raises(WireError, match="column 'dpo_logprobs': missing"):
        wire.decode_arrow(dropped)

    def widen(t):
        i = t.schema.get_field_index("topk_logprobs")
        col = t.column(i).cast(pa.list_(pa.list_(pa.float32())))
        return t.set_column(i, "topk_logprobs", col).replace_schema_metadata(meta)
    with pytest.raises(WireError, match=r"column 'topk_logprobs': expected type "
                                        r"list<item: list<item: halffloat>>"):
        wire.decode_arrow(_rewrite(payload, widen))

    def int64_ids(t):
        i = t.schema.get_field_index("input_ids")
        return t.set_column(i, "input_ids", t.column(i).cast(pa.list_(pa.int64()))
                            ).replace_schema_metadata(meta)
    with pytest.raises(WireError, match="column 'input_ids'"):
        wire.decode_arrow(_rewrite(payload, int64_ids))


def test_arrow_refuses_nulls_garbage_and_ragged_rows(records):
    payload = wire.encode_arrow(records)
    meta = {b"aligndistil.wire_version": b"1"}

    def null_alpha(t):
        i = t.schema.get_field_index("alpha")
        values = t.column(i).to_pylist()
        values[1] = None
        return t.set_column(i, "alpha", pa.array(values, pa.list_(pa.float32()))
                            ).replace_schema_metadata(meta)
    with pytest.raises(WireError, match="column 'alpha': 1 null"):
        wire.decode_arrow(_rewrite(payload, null_alpha))

    def ragged(t):
        i = t.schema.get_field_index("topk_ids")
        values = t.column(i).to_pylist()
        values[0][1] = values[0][1][:-1]
        return t.set_column(i, "topk_ids", pa.array(values, pa.list_(pa.list_(pa.int32())))
                            ).replace_schema_metadata(meta)
    # ragged rows are the tail budget's form, but topk_ids and topk_logprobs must agree
    with pytest.raises(WireError, match="arrow row 0: topk_logprobs: per-position lengths"):
        wire.decode_arrow(_rewrite(payload, ragged))

    with pytest.raises(WireError, match="not a readable Arrow IPC stream"):
        wire.decode_arrow(b"definitely not arrow")
    with pytest.raises(WireError, match=r"arrow row 1: prompt_len"):
        wire.decode_arrow(_rewrite(payload, lambda t: t.set_column(
            1, "prompt_len", pa.array([5, 2, 3, 29, 2], pa.int32()))))


def test_arrow_accepts_fixed_size_inner_lists(records):
    same_k = [r for r in records if r.top_k == 8] + [make_record(np.random.default_rng(9), L=6,
                                                                 P=2, k=8)]
    payload = wire.encode_arrow(same_k)

    def to_fixed(t):
        for name, leaf in (("topk_ids", pa.int32()), ("topk_logprobs", pa.float16())):
            i = t.schema.get_field_index(name)
            col = t.column(i).cast(pa.list_(pa.list_(leaf, 8)))
            t = t.set_column(i, name, col)
        return t
    fixed = _rewrite(payload, to_fixed)
    assert pa.types.is_fixed_size_list(
        pa.ipc.open_stream(fixed).schema.field("topk_ids").type.value_type)
    decoded = wire.decode_arrow(fixed)
    assert all(bitwise_equal(a, b, example_index=False) for a, b in zip(same_k, decoded))


def test_empty_record_lists_round_trip():
    assert wire.decode_arrow(wire.encode_arrow([])) == []
    assert wire.decode_json(wire.encode_json([])) == []
    assert json.loads(wire.encode_json([])) == {"results": []}
