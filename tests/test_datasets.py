"""Input readers: every row shape from real JSONL and Parquet files, errors, skipping, shards."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage import datasets
from storage.datasets import DataError, Example, ReadStats, read_examples, source_fingerprint

USER = {"role": "user", "content": "sort 3 1 2"}
ANSWER = {"role": "assistant", "content": "1 2 3"}
WRONG = {"role": "assistant", "content": "3 2 1"}

ROWS = [
    {"prompt": "copy 4 5", "response": "4 5"},
    {"messages": [{"role": "system", "content": "answer"}, USER, ANSWER]},
    {"prompt": "sort 3 1 2", "chosen": [USER, ANSWER], "rejected": [USER, WRONG]},
    {"input_ids": [2, 7, 8, 9], "prompt_len": 2},
    {"prompt": "sort 3 1 2", "chosen": [ANSWER], "rejected": [WRONG]},  # answer-only lists
    {"messages": [USER, WRONG, {"role": "user", "content": "again"}, ANSWER]},
]


def write_jsonl(path: Path, rows: list, *, raw_lines: dict[int, str] | None = None) -> Path:
    lines = [json.dumps(r) for r in rows]
    for i, text in (raw_lines or {}).items():
        lines[i] = text
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    """Columns are the union of the rows' keys; a row lacking one holds null there."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows]), path)
    return path


@pytest.fixture(params=["jsonl", "parquet"])
def fmt(request) -> str:
    return request.param


def write(fmt: str, tmp_path: Path, rows: list[dict], name: str = "data") -> Path:
    if fmt == "jsonl":
        return write_jsonl(tmp_path / f"{name}.jsonl", rows)
    return write_parquet(tmp_path / f"{name}.parquet", rows)


def test_every_row_shape(fmt, tmp_path):
    # Parquet gets the union of all columns, with nulls where a row lacks one.
    path = write(fmt, tmp_path, ROWS)
    stats = ReadStats()
    got = list(read_examples(path, stats=stats))
    assert (stats.rows, stats.examples, stats.skipped) == (6, 6, 0)
    assert [e.index for e in got] == list(range(6))
    plain, chat, uf, pretok, uf_answer_only, multi = got
    assert plain.prompt_messages == [{"role": "user", "content": "copy 4 5"}]
    assert plain.response == "4 5" and not plain.is_pretokenized
    assert chat.prompt_messages == [{"role": "system", "content": "answer"}, USER]
    assert chat.response == "1 2 3"
    assert uf.prompt_messages == [USER] and uf.response == "1 2 3"
    assert pretok.is_pretokenized and pretok.input_ids == [2, 7, 8, 9] and pretok.prompt_len == 2
    assert pretok.prompt_messages is None and pretok.response is None
    assert uf_answer_only.prompt_messages == [{"role": "user", "content": "sort 3 1 2"}]
    assert multi.prompt_messages == [USER, WRONG, {"role": "user", "content": "again"}]
    assert multi.response == "1 2 3"
    where = f"{path}:{3}" if fmt == "jsonl" else f"{path}:row 2"
    assert uf.source == where


def test_response_field_rejected(fmt, tmp_path):
    path = write(fmt, tmp_path, [ROWS[2], ROWS[4]])
    got = list(read_examples(path, response_field="rejected"))
    assert [e.response for e in got] == ["3 2 1", "3 2 1"]
    assert got[0].prompt_messages == [USER]
    assert got[1].prompt_messages == [{"role": "user", "content": "sort 3 1 2"}]
    chosen = list(read_examples(path))  # "chosen" is the default for preference rows
    assert [e.response for e in chosen] == ["1 2 3", "1 2 3"]
    # string-valued chosen/rejected (a common DPO layout): `prompt` is the prompt
    strings = write(fmt, tmp_path, [{"prompt": "hi", "chosen": "a", "rejected": "b"}], "s")
    (e,) = read_examples(strings, response_field="rejected")
    assert e.response == "b" and e.prompt_messages == [{"role": "user", "content": "hi"}]


BAD_ROWS = [
    ('{"prompt": "a", "response": ', None, "invalid JSON"),
    ('[1, 2]', None, "expected an object"),
    ({"messages": "hello"}, "messages", "expected a list of messages"),
    ({"messages": [USER, {"role": "assistant"}]}, "messages", "message 1 has no 'content'"),
    ({"messages": [USER, {"role": "assistant", "content": 5}]}, "messages",
     "'content' must be a string"),
    ({"messages": [USER]}, "messages", "last message must be the assistant"),
    ({"messages": [USER, ANSWER, USER]}, "messages", "last message must be the assistant"),
    ({"messages": [ANSWER]}, "messages", "no turn before"),
    ({"messages": [USER, {"role": "assistant", "content": "  "}]}, "messages", "empty response"),
    ({"prompt": "a", "response": ""}, "response", "empty response"),
    ({"response": "x"}, "prompt", "missing"),
    ({"prompt": 3, "response": "x"}, "prompt", "expected a string or a list"),
    ({"prompt": "a", "chosen": [ANSWER]}, "chosen", None),  # passes: fallback to prompt
    ({"chosen": [ANSWER], "rejected": [WRONG]}, "chosen", "no turn before"),
    ({"input_ids": [1, 2, 3], "prompt_len": 0}, "prompt_len", "1 <= prompt_len < len"),
    ({"input_ids": [1, 2, 3], "prompt_len": 3}, "prompt_len", "1 <= prompt_len < len"),
    ({"input_ids": [1, "2", 3], "prompt_len": 1}, "input_ids", "list of integers"),
    ({"input_ids": [1, True], "prompt_len": 1}, "input_ids", "list of integers"),
    ({"input_ids": [1, 2, 3]}, "prompt_len", "missing"),
    ({"input_ids": [1, 2, 3], "prompt_len": 1.0}, "prompt_len", "expected an integer"),
    ({"text": "no shape"}, "response", "none of"),
]


@pytest.mark.parametrize("bad, field, message", BAD_ROWS)
def test_malformed_jsonl_row_names_file_line_and_field(tmp_path, bad, field, message):
    good = {"prompt": "a", "response": "b"}
    raw = bad if isinstance(bad, str) else json.dumps(bad)
    path = write_jsonl(tmp_path / "data.jsonl", [good] * 20, raw_lines={16: raw})
    if message is None:
        assert len(list(read_examples(path))) == 20
        return
    with pytest.raises(DataError) as err:
        list(read_examples(path))
    text = str(err.value)
    assert text.startswith(f"{path}:17: ")
    assert "data.jsonl:17" in text
    if field is not None:
        assert f"field '{field}'" in text
    assert message in text


def test_malformed_parquet_row_names_file_row_and_field(tmp_path):
    rows = [{"messages": [USER, ANSWER]} for _ in range(5)]
    rows[3] = {"messages": [USER, {"role": "user", "content": "x"}]}
    path = write_parquet(tmp_path / "data.parquet", rows)
    with pytest.raises(DataError, match=r"data\.parquet:row 3: field 'messages': the last "
                                        r"message must be the assistant"):
        list(read_examples(path))


def test_skip_mode_counts_and_keeps_indices(fmt, tmp_path):
    rows = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(10)]
    rows[2] = {"prompt": "p2", "response": ""}
    rows[7] = {"messages": [USER]}
    path = write(fmt, tmp_path, rows)
    stats = ReadStats()
    got = list(read_examples(path, on_error="skip", stats=stats))
    assert [e.index for e in got] == [0, 1, 3, 4, 5, 6, 8, 9]
    assert [e.response for e in got] == [f"r{i}" for i in (0, 1, 3, 4, 5, 6, 8, 9)]
    assert (stats.rows, stats.examples, stats.skipped) == (10, 8, 2)
    assert len(stats.errors) == 2 and "field 'response'" in stats.errors[0]
    assert "2 skipped" in stats.summary()


def test_skip_mode_keeps_only_the_first_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "MAX_KEPT_ERRORS", 3)
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a"}] * 8)
    stats = ReadStats()
    assert list(read_examples(path, on_error="skip", stats=stats)) == []
    assert stats.skipped == 8 and len(stats.errors) == 3


def test_blank_lines_are_not_rows_but_line_numbers_stay_physical(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n\n   \n{"prompt": "c", "response": ""}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:4: field 'response'"):
        list(read_examples(path))
    got = list(read_examples(path, on_error="skip"))
    assert [e.index for e in got] == [0]


def test_non_utf8_line_is_a_row_error(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "\xff", "response": "b"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: "):
        list(read_examples(path))


@pytest.mark.parametrize("num_workers", [1, 2, 3, 7])
def test_worker_split_is_disjoint_and_covering(fmt, tmp_path, monkeypatch, num_workers):
    monkeypatch.setattr(datasets, "PARQUET_BATCH_ROWS", 4)  # several batches, odd boundaries
    rows = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(23)]
    rows[5] = {"prompt": "bad"}
    path = write(fmt, tmp_path, rows)
    everything = {e.index: e for e in read_examples(path, on_error="skip")}
    seen: list[int] = []
    total = ReadStats()
    for w in range(num_workers):
        stats = ReadStats()
        for e in read_examples(path, on_error="skip", worker_index=w, num_workers=num_workers,
                               stats=stats):
            assert e.index % num_workers == w
            assert e == everything[e.index]  # same example, same index, whoever reads it
            seen.append(e.index)
        total.rows += stats.rows
        total.skipped += stats.skipped
    assert sorted(seen) == sorted(everything) == [i for i in range(23) if i != 5]
    assert len(seen) == len(set(seen))
    assert (total.rows, total.skipped) == (23, 1)
    assert datasets.belongs_to_worker(10, 1, 3) and not datasets.belongs_to_worker(10, 0, 3)


def test_bad_arguments_and_unknown_format(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}])
    with pytest.raises(ValueError, match="worker_index"):
        list(read_examples(path, worker_index=2, num_workers=2))
    with pytest.raises(ValueError, match="on_error"):
        list(read_examples(path, on_error="ignore"))
    csv = tmp_path / "d.csv"
    csv.write_text("a,b\n")
    with pytest.raises(DataError, match=r"d\.csv: unknown data format '\.csv'"):
        list(read_examples(csv))
    not_parquet = tmp_path / "x.parquet"
    not_parquet.write_bytes(b"nope")
    with pytest.raises(DataError, match=r"x\.parquet: not a readable Parquet file"):
        list(read_examples(not_parquet))


def test_jsonl_is_streamed(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}] * 3,
                       raw_lines={2: "{broken"})
    it = read_examples(path)
    assert next(it).index == 0 and next(it).index == 1  # rows before the bad line arrive first
    with pytest.raises(DataError, match=r"d\.jsonl:3: invalid JSON"):
        next(it)


def test_source_fingerprint(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", ROWS)
    fp = source_fingerprint(a)
    assert fp.startswith("sha256:") and fp.endswith(f";bytes={a.stat().st_size}")
    assert source_fingerprint(a, chunk_bytes=7) == fp  # streaming in chunks changes nothing
    b = tmp_path / "renamed.jsonl"
    shutil.copy(a, b)
    assert source_fingerprint(b) == fp
    data = bytearray(a.read_bytes())
    data[10] ^= 1
    b.write_bytes(bytes(data))
    assert source_fingerprint(b) != fp
    b.write_bytes(a.read_bytes() + b"\n")
    assert source_fingerprint(b) != fp


def test_example_is_constructible_by_keyword():
    e = Example(index=0, source="request", prompt_messages=[USER], response="x")
    assert e.input_ids is None and e.prompt_len is None and not e.is_pretokenized
