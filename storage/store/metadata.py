"""What made a store, recorded once in the root ``zarr.json`` (attribute ``aligndistil``).

A store is only meaningful together with the teachers, tokenizer and target settings that
produced it, so those are written once, by whichever worker creates the store, and every later
writer (another worker, or a restarted one) must present identical metadata: resuming with a
different ``r`` or tokenizer would silently mix two configurations in one store.

Creation is race-free between workers: the root ``zarr.json`` is written to a temporary file and
``os.link``-ed into place, which fails if another worker got there first; the loser then reads
the winner's file and compares.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import StoreFormatError, StoreMetadataMismatchError, StoreNotFoundError
from .layout import DEFAULT_LAYOUT, needs_ragged
from .location import StoreLocation, open_location

#: The on-disk format this code writes and reads (see the package docstring for the layout).
#: Version 1: each position keeps pi*'s top-k ids. Version 2 adds ``dpo_top`` > 0: the kept ids
#: include the dpo model's top ``dpo_top`` (same arrays; a reader of version 1 would take them for
#: pi*'s top-k, so it must refuse them). A store with ``dpo_top`` = 0 is written as version 1.
#: Version 3 adds ``tail_budget`` > 0: each position keeps its own number of ids (ragged
#: ``topk_*`` arrays plus ``topk_count``), which readers of versions 1 and 2 cannot decode.
#: Version 4 is a ragged store in a layout whose encodings version-3 readers do not know
#: (``packed``: ids as sorted per-position sets, 8-bit log-spaced log-probs, float16 scalars),
#: at a fixed k or with a tail budget.
FORMAT_VERSION = 4
SUPPORTED_FORMAT_VERSIONS = (1, 2, 3, 4)


def format_version_for(dpo_top: int, tail_budget: float = 0.0, layout: str = "") -> int:
    """The lowest format version that can hold a store with these settings."""
    if needs_ragged(layout):
        return 4
    if tail_budget:
        return 3
    return 2 if dpo_top else 1

#: Key of the root group's attributes that holds the store metadata.
ATTRIBUTE_KEY = "aligndistil"

#: Metadata keys that are informational and may differ between writers of one store.
NOT_COMPARED = ("created_with",)


@dataclass(frozen=True)
class StoreMetadata:
    """Identity of a store: who made the targets, from what, with which settings.

    ``teachers`` maps role to identity, e.g. ``{"dpo": "...", "reverse": "..."}`` (in mode
    ``vanilla`` the second role is the reference model). ``layout`` names the preset of
    :mod:`storage.store.layout` the shards are encoded with. ``dpo_top`` > 0: the kept ids of
    each position include the dpo model's top ``dpo_top`` (format version 2). ``extra`` holds
    further settings a producer wants pinned (e.g. ``max_seq_len``); it is compared like
    everything else. ``format_version`` is derived from ``dpo_top`` when not given.
    """

    teachers: dict[str, str]
    tokenizer_sha256: str
    vocab_size: int
    top_k: int
    r: float
    eps: float
    tvd_norm: str
    mode: str
    source_fingerprint: str
    num_workers: int = 1
    layout: str = DEFAULT_LAYOUT
    dpo_top: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    format_version: int = 0  #: 0: derived from dpo_top and tail_budget
    tail_budget: float = 0.0
    min_k: int = 1
    created_with: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.vocab_size, int) or self.vocab_size < 1:
            raise ValueError(f"vocab_size: must be a positive integer, got {self.vocab_size!r}")
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= self.vocab_size:
            raise ValueError(f"top_k: must satisfy 1 <= top_k <= vocab_size, got {self.top_k!r}")
        if not isinstance(self.num_workers, int) or self.num_workers < 1:
            raise ValueError(f"num_workers: must be >= 1, got {self.num_workers!r}")
        if not isinstance(self.teachers, dict):
            raise ValueError("teachers: must be a dict of role -> identity")
        if not isinstance(self.dpo_top, int) or not 0 <= self.dpo_top <= self.top_k:
            raise ValueError(f"dpo_top: must satisfy 0 <= dpo_top <= top_k, got {self.dpo_top!r}")
        if isinstance(self.tail_budget, bool) or not isinstance(self.tail_budget, (int, float)) \
                or not 0 <= self.tail_budget < 1:
            raise ValueError(f"tail_budget: must be in [0, 1), got {self.tail_budget!r}")
        if not isinstance(self.min_k, int) or not 1 <= self.min_k <= self.top_k:
            raise ValueError(f"min_k: must satisfy 1 <= min_k <= top_k, got {self.min_k!r}")
        needed = format_version_for(self.dpo_top, self.tail_budget, self.layout)
        if self.format_version == 0:
            object.__setattr__(self, "format_version", needed)
        elif self.format_version != needed:
            raise ValueError(f"format_version {self.format_version} does not match dpo_top "
                             f"{self.dpo_top}, tail_budget {self.tail_budget}, layout "
                             f"{self.layout} (format_version {needed})")

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["r"] = float(self.r)
        data["eps"] = float(self.eps)
        data["tail_budget"] = float(self.tail_budget)
        if self.format_version < 3:  # byte-for-byte what versions 1 and 2 wrote
            data.pop("tail_budget")
            data.pop("min_k")
        return data

    @classmethod
    def from_json(cls, data: Any, *, where: str) -> "StoreMetadata":
        """Parse and check the stored form; ``where`` (a path) goes into error messages."""
        if not isinstance(data, dict):
            raise StoreFormatError(f"{where}: aligndistil metadata is not a JSON object")
        version = data.get("format_version")
        if version not in SUPPORTED_FORMAT_VERSIONS:
            raise StoreFormatError(
                f"{where}: store format_version {version!r} is not supported; this aligndistil "
                f"reads format_version {', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))} "
                f"(a newer aligndistil may have written it)")
        known = {f for f in cls.__dataclass_fields__}
        # dpo_top: version 2 on; tail_budget, min_k: version 3 on
        optional = ("extra", "created_with", "dpo_top", "tail_budget", "min_k")
        missing = [k for k in known if k not in data and k not in optional]
        if missing:
            raise StoreFormatError(f"{where}: store metadata lacks key(s) {', '.join(missing)}")
        values = {k: v for k, v in data.items() if k in known}
        try:
            return cls(**values)
        except (TypeError, ValueError) as exc:
            raise StoreFormatError(f"{where}: invalid store metadata: {exc}") from None


def differing_keys(ours: StoreMetadata, theirs: StoreMetadata) -> list[str]:
    """Keys (dotted for nested dicts) whose values differ, ignoring :data:`NOT_COMPARED`."""
    a, b = ours.to_json(), theirs.to_json()
    out: list[str] = []
    for key in a:
        if key in NOT_COMPARED:
            continue
        if isinstance(a[key], dict) and isinstance(b.get(key), dict):
            for sub in sorted(set(a[key]) | set(b[key])):
                if a[key].get(sub, _MISSING) != b[key].get(sub, _MISSING):
                    out.append(f"{key}.{sub}")
        elif a[key] != b.get(key):
            out.append(key)
    return out


_MISSING = object()


def root_metadata_path(store: Path) -> Path:
    return Path(store) / "zarr.json"


def read_metadata(store: "str | os.PathLike | StoreLocation") -> StoreMetadata:
    """Read a store's metadata; raise :class:`StoreNotFoundError` / :class:`StoreFormatError`."""
    location = open_location(store)
    path = f"{location}/zarr.json"
    if location.is_local and not location.root.is_dir():
        raise StoreNotFoundError(f"{store}: no such store (not a directory)")
    try:
        text = location.read("zarr.json")
    except FileNotFoundError:
        if not location.is_local and not location.exists(""):
            raise StoreNotFoundError(f"{store}: no such store (nothing under that "
                                     f"prefix)") from None
        raise StoreNotFoundError(f"{store}: not a target store (no zarr.json)") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StoreFormatError(f"{path}: not valid JSON ({exc})") from None
    attrs = doc.get("attributes") if isinstance(doc, dict) else None
    if not isinstance(attrs, dict) or ATTRIBUTE_KEY not in attrs:
        raise StoreNotFoundError(f"{store}: a zarr group but not an aligndistil target store "
                                 f"(no '{ATTRIBUTE_KEY}' attributes in zarr.json)")
    return StoreMetadata.from_json(attrs[ATTRIBUTE_KEY], where=str(path))


def group_document(attributes: dict[str, Any]) -> dict[str, Any]:
    """A zarr v3 group's ``zarr.json`` document."""
    return {"zarr_format": 3, "node_type": "group", "attributes": attributes}


def create_or_check(store: "str | os.PathLike | StoreLocation",
                    metadata: StoreMetadata) -> StoreMetadata:
    """Create the store with ``metadata``, or check an existing store records the same.

    Raises :class:`StoreMetadataMismatchError` naming the first differing key.
    """
    root = open_location(store)
    if root.is_local:
        root.root.mkdir(parents=True, exist_ok=True)
        (root.root / "shards").mkdir(exist_ok=True)
    doc = group_document({ATTRIBUTE_KEY: metadata.to_json()})
    created = root.write_new("zarr.json", json.dumps(doc, indent=2, sort_keys=True).encode())
    root.write_new("shards/zarr.json", json.dumps(group_document({})).encode())
    if created:
        return metadata
    existing = read_metadata(root)
    diff = differing_keys(metadata, existing)
    if diff:
        key = diff[0]
        ours, theirs = _lookup(metadata.to_json(), key), _lookup(existing.to_json(), key)
        raise StoreMetadataMismatchError(
            key, f"{root}: store was made with {key}={theirs!r} but this writer has "
                 f"{key}={ours!r} (differing keys: {', '.join(diff)}); refusing to mix "
                 f"configurations in one store")
    return existing


def _lookup(data: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        data = data.get(part, None) if isinstance(data, dict) else None
    return data
