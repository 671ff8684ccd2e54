"""Prompts for on-policy training: a JSONL or Parquet file, tokenised once up front.

Row shapes (the first key found wins):

- ``{"prompt": "text"}`` (one user turn) or ``{"prompt": [messages]}``;
- ``{"messages": [messages]}``: a trailing assistant message, if any, is dropped (its answer is
  what the student will sample);
- ``{"input_ids": [ids], "prompt_len": P}``: the first P ids (or all ids without ``prompt_len``).

UltraFeedback-style preference rows have a ``prompt`` and so work as they are. Text prompts go
through the student's chat template with the generation prompt opened, rendered to text and
encoded without extra special tokens (the template places them), exactly as
``storage.tokenization`` renders the prompt part of a training example.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

from storage.datasets import DatasetSource, read_rows
from storage.errors import UserError
from storage.tokenization import TokenizationError, tokenize_prompt


class PromptError(UserError, ValueError):
    """A prompt row that cannot be used; the message names the file and line/row."""


def read_prompt_rows(path: str | Path | DatasetSource) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, row)`` for every data row of a JSONL or Parquet file, or of a dataset
    (:func:`storage.datasets.data_source`)."""
    if isinstance(path, DatasetSource):
        for _, where, row in read_rows(path):
            yield where, row
        return
    path = Path(path)
    if not path.is_file():
        raise PromptError(f"--prompts {path}: no such file"
                          + (" (it is a directory)" if path.is_dir() else ""))
    for _, where, row in read_rows(path):
        yield where, row


def prompt_ids(tokenizer, row: Any, where: str) -> list[int]:
    """The token ids of one row's prompt, generation prompt opened."""
    if not isinstance(row, dict):
        raise PromptError(f"{where}: expected an object, got {type(row).__name__}")
    row = {k: v for k, v in row.items() if v is not None}
    if "input_ids" in row and "prompt" not in row and "messages" not in row:
        ids = row["input_ids"]
        if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
            raise PromptError(f"{where}: field 'input_ids': expected a list of integers")
        p = row.get("prompt_len", len(ids))
        if not isinstance(p, int) or not 1 <= p <= len(ids):
            raise PromptError(f"{where}: field 'prompt_len': must be in [1, {len(ids)}]")
        bad = [t for t in ids[:p] if not 0 <= t < len(tokenizer)]
        if bad:
            raise PromptError(f"{where}: field 'input_ids': id(s) {bad[:5]} outside the "
                              f"student's vocabulary of {len(tokenizer)}")
        return list(ids[:p])
    if "prompt" in row:
        messages = _messages(row["prompt"], "prompt", where)
    elif "messages" in row:
        messages = _messages(row["messages"], "messages", where)
        if messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
    else:
        raise PromptError(f"{where}: row has none of 'prompt', 'messages' or 'input_ids'")
    if not messages:
        raise PromptError(f"{where}: no prompt turns")
    try:
        return tokenize_prompt(tokenizer, messages, where=where)
    except TokenizationError as exc:
        raise PromptError(str(exc)) from None


def load_prompts(path: str | Path, tokenizer, *, max_prompt_len: int | None = None,
                 on_truncate: Callable[[int], None] | None = None) -> list[list[int]]:
    """Every prompt of the file as token ids. A prompt longer than ``max_prompt_len`` keeps its
    last ``max_prompt_len`` tokens (the end of the conversation and the opened assistant turn)
    when ``on_truncate`` is given (called with its original length, to count it); without it,
    it is an error naming the row."""
    prompts = []
    for where, row in read_prompt_rows(path):
        ids = prompt_ids(tokenizer, row, where)
        if max_prompt_len is not None and len(ids) > max_prompt_len:
            if on_truncate is None:
                raise PromptError(f"{where}: prompt of {len(ids)} tokens exceeds "
                                  f"{max_prompt_len} (max_seq_len minus at least one response "
                                  f"token)")
            on_truncate(len(ids))
            ids = ids[len(ids) - max_prompt_len:]
        prompts.append(ids)
    if not prompts:
        raise PromptError(f"--prompts {path}: no prompts")
    return prompts


def _messages(value: Any, name: str, where: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        if not value.strip():
            raise PromptError(f"{where}: field '{name}': empty")
        return [{"role": "user", "content": value}]
    if not isinstance(value, list):
        raise PromptError(f"{where}: field '{name}': expected a string or a list of messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) \
                or not isinstance(m.get("content"), str):
            raise PromptError(f"{where}: field '{name}': message {i} needs string 'role' and "
                              f"'content'")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def prompt_text(row: dict) -> str:
    """The user text of a prompt row (``{"prompt": str | [messages]}`` or ``{"messages"}``): what
    a task's gold reward reads."""
    value = row.get("prompt", row.get("messages"))
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        users = [m["content"] for m in value if isinstance(m, dict) and m.get("role") == "user"]
        if users:
            return users[-1]
    raise PromptError(f"row has no user prompt: {str(row)[:200]}")
