"""Input data: JSONL and Parquet rows, normalised into :class:`Example`.

Row shapes understood (a key whose value is ``null`` counts as absent, so Parquet files whose
columns are the union of several shapes work too):

- pre-tokenised ``{"input_ids": [int, ...], "prompt_len": P}`` with ``1 <= P < len``;
- ``{"messages": [{"role", "content"}, ...]}``: the LAST message must be the assistant's and is
  the response; the turns before it are the prompt;
- ``{"prompt": str | messages, "response": str}``: a string prompt is one user turn;
- preference rows (UltraFeedback-binarized) ``{"prompt": str, "chosen": [msgs],
  "rejected": [msgs]}``: ``response_field`` ("chosen" by default, as the precompute CLI's
  ``--response-field``) picks the list; its last (assistant) message is the response and the
  messages before it are the prompt, falling back to ``prompt`` as one user turn when the list
  holds only the answer. ``chosen``/``rejected`` may also be plain strings (then ``prompt``
  is the prompt).

``response_field`` given explicitly always wins over the other shapes (except pre-tokenised
rows); without it the shape is detected in the order above.

A bad row raises :class:`DataError` naming where it is and which field is wrong, e.g.
``data.jsonl:17: field 'messages': message 2 has no 'content'`` (JSONL: 1-based line number;
Parquet: ``data.parquet:row 17``, 0-based row index). With ``on_error="skip"`` bad rows are
counted in a :class:`ReadStats` instead.

``Example.index`` is the row's position among the file's data rows (0-based; blank JSONL lines
are not rows), bad rows included, so the index of an example never depends on which other rows
were skipped or which worker read it: it is the ``example_index`` a store record carries.
Workers split by ``index % num_workers == worker_index`` (:func:`belongs_to_worker`); a worker
parses only its own rows, so it reports only its own bad rows.

Files are streamed: JSONL line by line, Parquet by row batches.

Besides files, a data flag takes a Hub dataset id (``owner/name[@revision]``, resolved into
the Hugging Face cache by :mod:`storage.hub`) or a local dataset folder, read through the
``datasets`` library in streaming mode (bounded memory at any size), with ``--split`` and
``--data-config`` (:func:`data_source`). Their rows take the same shapes; ``where`` reads
``owner/name@commit[config/split]:row N``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Iterator, Literal, Mapping

from storage.errors import ConfigError, UserError
from storage.hub import HubRef, is_hub_id, resolve_snapshot, snapshot_ref

#: File suffixes read as JSON Lines and as Parquet.
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")
PARQUET_BATCH_ROWS = 1024
#: How many bad-row messages a :class:`ReadStats` keeps (the count is always complete).
MAX_KEPT_ERRORS = 20


class DataError(UserError, ValueError):
    """A malformed input row or unreadable file; the message starts with ``file:line``."""


@dataclass(frozen=True)
class Example:
    """One normalised input row: either chat messages + response text, or token ids.

    ``source`` says where the example came from, e.g. ``"data.jsonl:17"`` (or ``"request"``
    for a REST request); tokenisation errors quote it.
    """

    index: int
    source: str
    prompt_messages: list[dict[str, str]] | None = None
    response: str | None = None
    input_ids: list[int] | None = None
    prompt_len: int | None = None

    @property
    def is_pretokenized(self) -> bool:
        return self.input_ids is not None


@dataclass
class ReadStats:
    """Counts for one pass over a file (this worker's share of it)."""

    rows: int = 0        #: data rows this worker owned (good and bad)
    examples: int = 0    #: examples yielded
    skipped: int = 0     #: bad rows skipped (``on_error="skip"``)
    errors: list[str] = field(default_factory=list)  #: first ``MAX_KEPT_ERRORS`` messages

    def summary(self) -> str:
        text = f"{self.rows} rows, {self.examples} examples, {self.skipped} skipped"
        if self.errors:
            text += f" (first error: {self.errors[0]})"
        return text


@dataclass(frozen=True)
class DatasetSource:
    """A dataset read through the ``datasets`` library: a Hub snapshot or a local folder."""
    path: Path                   #: the local folder (a Hub id's cached snapshot)
    split: str
    config_name: str | None = None
    hub: HubRef | None = None    #: the Hub id and commit, when it came from the Hub

    def __str__(self) -> str:
        name = str(self.hub) if self.hub is not None else str(self.path)
        return f"{name}[{self.config_name + '/' if self.config_name else ''}{self.split}]"


@dataclass(kw_only=True)
class DatasetOptions:
    """The split and config of a dataset named by a data flag (a Hub id or a dataset folder);
    a command's config inherits these fields."""
    split: Annotated[str | None, "the split of a Hub dataset or dataset folder, e.g. "
                     "train_prefs (none: train)"] = None
    data_config: Annotated[str | None, "the config (subset) of a Hub dataset or dataset folder "
                           "(none: its default)"] = None


def data_source(spec: str | Path, *, split: str | None = None, config_name: str | None = None,
                flag: str = "--data") -> Path | DatasetSource:
    """A data flag's value as something the readers take: a file stays a path; a folder or a Hub
    id (``owner/name[@revision]``) becomes a :class:`DatasetSource` of ``split`` (default
    ``train``) and ``config_name``."""
    if isinstance(spec, DatasetSource):
        return spec
    path = Path(spec)
    if path.is_file():
        if split is not None or config_name is not None:
            raise ConfigError(f"{flag} {spec} is a file: --split and --data-config only apply to "
                              f"a dataset (a Hub id or a dataset folder)")
        return path
    if path.is_dir():
        hub = snapshot_ref(path)
    elif is_hub_id(spec):
        hub = resolve_snapshot(str(spec), repo_type="dataset", flag=flag)
        path = hub.path
    else:
        raise DataError(f"{flag} {spec}: no such file or folder, and not a Hub dataset id "
                        f"(owner/name or owner/name@revision)")
    source = DatasetSource(path=path, split=split or "train", config_name=config_name, hub=hub)
    _open_dataset(source)  # an unknown split or config, or no data files: refused now
    return source


def require_data(spec: str | None, flag: str) -> None:
    """Config-time check of a data flag: an existing file or folder, or a Hub id's shape (the
    id itself is resolved when the data is read)."""
    if spec and not Path(spec).exists() and not is_hub_id(spec):
        raise ConfigError(f"{flag} {spec}: no such file or folder, and not a Hub dataset id "
                          f"(owner/name or owner/name@revision)")


def belongs_to_worker(index: int, worker_index: int = 0, num_workers: int = 1) -> bool:
    """Whether example ``index`` is this worker's (deterministic round-robin by index)."""
    return index % num_workers == worker_index


def read_examples(path: str | Path, *, response_field: str | None = None,
                  on_error: Literal["raise", "skip"] = "raise", worker_index: int = 0,
                  num_workers: int = 1, stats: ReadStats | None = None) -> Iterator[Example]:
    """Stream the examples of a JSONL or Parquet file (chosen by suffix).

    Pass a :class:`ReadStats` to learn how many rows were read and skipped; it is updated as
    the iterator advances and complete once it is exhausted.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if num_workers < 1 or not 0 <= worker_index < num_workers:
        raise ValueError(f"need 0 <= worker_index < num_workers, got worker_index={worker_index}"
                         f", num_workers={num_workers}")
    stats = stats if stats is not None else ReadStats()
    for index, where, row in _rows(path, worker_index, num_workers):
        stats.rows += 1
        try:
            if isinstance(row, _BadRow):
                raise DataError(f"{where}: {row.message}")
            example = parse_row(row, index=index, source=where, response_field=response_field)
        except DataError as exc:
            if on_error == "raise":
                raise
            stats.skipped += 1
            if len(stats.errors) < MAX_KEPT_ERRORS:
                stats.errors.append(str(exc))
            continue
        stats.examples += 1
        yield example


def source_fingerprint(path: str | Path | DatasetSource, *, chunk_bytes: int = 1 << 20) -> str:
    """``"sha256:<hex>;bytes=<size>"`` of the file's bytes (streamed), for a store's metadata.

    It identifies the content, not the name: a renamed copy has the same fingerprint. A Hub
    dataset is ``"hub:owner/name@commit;config=...;split=..."``; a dataset folder, the digest of
    its files' names and bytes with its config and split.
    """
    if isinstance(path, DatasetSource):
        where = f"config={path.config_name or ''};split={path.split}"
        if path.hub is not None:
            return f"hub:{path.hub};{where}"
        digest = hashlib.sha256()
        for file in sorted(p for p in path.path.rglob("*") if p.is_file()):
            digest.update(str(file.relative_to(path.path)).encode() + b"\0")
            digest.update(source_fingerprint(file, chunk_bytes=chunk_bytes).encode())
        return f"folder:sha256:{digest.hexdigest()};{where}"
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_bytes):
            digest.update(chunk)
            size += len(chunk)
    return f"sha256:{digest.hexdigest()};bytes={size}"


# ====================================================================== row parsing
def parse_row(row: Any, *, index: int, source: str, response_field: str | None = None
              ) -> Example:
    """Normalise one row (a mapping) into an :class:`Example`; :class:`DataError` if bad."""
    if not isinstance(row, Mapping):
        raise DataError(f"{source}: expected an object, got {type(row).__name__}")
    row = {k: v for k, v in row.items() if v is not None}
    try:
        return _parse(row, index, source, response_field)
    except _FieldError as exc:
        raise DataError(f"{source}: field '{exc.field}': {exc.message}") from None


class _FieldError(Exception):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


def _parse(row: dict[str, Any], index: int, source: str, response_field: str | None
           ) -> Example:
    if "input_ids" in row:
        ids, prompt_len = _pretokenized(row)
        return Example(index=index, source=source, input_ids=ids, prompt_len=prompt_len)
    if response_field is None:
        for name in ("messages", "response", "chosen"):
            if name in row:
                response_field = name
                break
        else:
            raise _FieldError("response", "row has none of 'input_ids', 'messages', "
                                          "'response' or 'chosen'")
    if response_field not in row:
        raise _FieldError(response_field, "missing")
    value = row[response_field]
    if isinstance(value, str):
        if response_field == "messages":
            raise _FieldError("messages", "expected a list of messages, got a string")
        if not value.strip():
            raise _FieldError(response_field, "empty response")
        return Example(index=index, source=source, prompt_messages=_prompt_of(row),
                       response=value)
    if not isinstance(value, list):
        raise _FieldError(response_field, f"expected a string or a list of messages, got "
                                          f"{type(value).__name__}")
    messages = _messages(response_field, value)
    if not messages or messages[-1]["role"] != "assistant":
        raise _FieldError(response_field, "the last message must be the assistant's response"
                          if messages else "no messages")
    response = messages[-1]["content"]
    if not response.strip():
        raise _FieldError(response_field, "empty response in the last assistant message")
    prompt = messages[:-1]
    if not prompt:
        if response_field == "messages" or "prompt" not in row:
            raise _FieldError(response_field, "no turn before the assistant's response")
        prompt = _prompt_of(row)
    return Example(index=index, source=source, prompt_messages=prompt, response=response)


def _prompt_of(row: dict[str, Any]) -> list[dict[str, str]]:
    if "prompt" not in row:
        raise _FieldError("prompt", "missing")
    prompt = row["prompt"]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise _FieldError("prompt", "empty")
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list):
        messages = _messages("prompt", prompt)
        if not messages:
            raise _FieldError("prompt", "no messages")
        return messages
    raise _FieldError("prompt", f"expected a string or a list of messages, got "
                                f"{type(prompt).__name__}")


def _messages(name: str, value: list[Any]) -> list[dict[str, str]]:
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, Mapping):
            raise _FieldError(name, f"message {i} is a {type(msg).__name__}, not an object")
        for key in ("role", "content"):
            if key not in msg or msg[key] is None:
                raise _FieldError(name, f"message {i} has no '{key}'")
            if not isinstance(msg[key], str):
                raise _FieldError(name, f"message {i}: '{key}' must be a string, got "
                                        f"{type(msg[key]).__name__}")
        out.append({"role": msg["role"], "content": msg["content"]})
    return out


def _pretokenized(row: dict[str, Any]) -> tuple[list[int], int]:
    ids = row["input_ids"]
    if not isinstance(ids, list) or not all(_is_int(t) for t in ids):
        raise _FieldError("input_ids", "expected a list of integers")
    if any(t < 0 for t in ids):
        raise _FieldError("input_ids", "negative token id")
    if "prompt_len" not in row:
        raise _FieldError("prompt_len", "missing (needed with input_ids)")
    prompt_len = row["prompt_len"]
    if not _is_int(prompt_len):
        raise _FieldError("prompt_len", f"expected an integer, got {type(prompt_len).__name__}")
    if not 1 <= prompt_len < len(ids):
        raise _FieldError("prompt_len", f"must satisfy 1 <= prompt_len < len(input_ids) = "
                                        f"{len(ids)}, got {prompt_len}")
    return [int(t) for t in ids], int(prompt_len)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ====================================================================== file readers
def read_rows(path: str | Path, *, worker_index: int = 0, num_workers: int = 1
              ) -> Iterator[tuple[int, str, Any]]:
    """``(index, where, row)`` for every data row of a JSONL or Parquet file (by suffix), before
    any parsing into examples (prompt files use this too). ``where`` is ``FILE:LINE`` or
    ``FILE:row N``; a line that is not UTF-8 JSON raises :class:`DataError` naming it."""
    for index, where, row in _rows(path, worker_index, num_workers):
        if isinstance(row, _BadRow):
            raise DataError(f"{where}: {row.message}")
        yield index, where, row


def count_rows(path: str | Path, *, worker: int = 0, workers: int = 1,
               limit: int | None = None) -> int | None:
    """How many rows of the file a worker will read (for a progress bar's total), without
    parsing them: non-empty lines of a JSONL file, the row count of a Parquet file's footer.
    ``None`` when the format is unknown, and for a dataset (counting would stream it all)."""
    if isinstance(path, DatasetSource):
        return None
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        with open(path, "rb") as fh:
            n = sum(1 for line in fh if line.strip())
    elif suffix in PARQUET_SUFFIXES:
        import pyarrow.parquet as pq

        try:
            n = pq.ParquetFile(path).metadata.num_rows
        except Exception:  # a broken file is reported by the reader, with its name
            return None
    else:
        return None
    if limit is not None:
        n = min(n, limit)
    return len(range(worker, n, workers))


@dataclass(frozen=True)
class _BadRow:
    message: str


def _rows(path: str | Path | DatasetSource, worker_index: int, num_workers: int
          ) -> Iterator[tuple[int, str, Any]]:
    if isinstance(path, DatasetSource):
        return _dataset_rows(path, worker_index, num_workers)
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return _jsonl_rows(path, worker_index, num_workers)
    if suffix in PARQUET_SUFFIXES:
        return _parquet_rows(path, worker_index, num_workers)
    raise DataError(f"{path}: unknown data format {suffix!r}; expected one of "
                    f"{', '.join(JSONL_SUFFIXES + PARQUET_SUFFIXES)}")


def _jsonl_rows(path: Path, worker_index: int, num_workers: int
                ) -> Iterator[tuple[int, str, Any]]:
    index = -1
    with open(path, "rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            index += 1
            if not belongs_to_worker(index, worker_index, num_workers):
                continue
            where = f"{path}:{line_no}"
            try:
                yield index, where, json.loads(raw)
            except UnicodeDecodeError as exc:
                yield index, where, _BadRow(f"not UTF-8 text ({exc.reason} at byte {exc.start})")
            except json.JSONDecodeError as exc:
                yield index, where, _BadRow(f"invalid JSON: {exc.msg} at column {exc.colno}")


def _parquet_rows(path: Path, worker_index: int, num_workers: int
                  ) -> Iterator[tuple[int, str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file: {exc}") from None
    index = 0
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS):
        first = index
        index += batch.num_rows
        mine = [i for i in range(first, index) if belongs_to_worker(i, worker_index, num_workers)]
        if not mine:
            continue
        if num_workers > 1:
            batch = batch.take(pa.array([i - first for i in mine]))
        for i, row in zip(mine, batch.to_pylist()):
            yield i, f"{path}:row {i}", row


def _dataset_rows(source: DatasetSource, worker_index: int, num_workers: int
                  ) -> Iterator[tuple[int, str, Any]]:
    """Stream one split of a dataset folder with the ``datasets`` library."""
    for index, row in enumerate(_open_dataset(source)):
        if belongs_to_worker(index, worker_index, num_workers):
            yield index, f"{source}:row {index}", row


def _open_dataset(source: DatasetSource):
    """The split as a streaming ``datasets.IterableDataset`` (nothing is read yet)."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"{source}: reading a dataset folder or Hub dataset needs the datasets "
                        f"package (pip install datasets)") from None
    try:
        return datasets.load_dataset(str(source.path), name=source.config_name,
                                     split=source.split, streaming=True)
    except (ValueError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as exc:
        # an unknown split or config (the library's message lists what there is), no data files
        raise DataError(f"{source}: {str(exc).splitlines()[0]}") from None
