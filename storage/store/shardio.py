"""Zarr I/O of one shard: write a batch as a zarr v3 group, load one back from checked bytes.

Each shard is its own zarr group, encoded by zarr into an in-memory store and then written file
by file under the shard's own prefix (:meth:`.location.StoreLocation.write_files`), so writing
it can never touch another shard or the store root, and its checksums are taken from the very
bytes written. Loading reads each file once: the bytes are checked against the shard's checksums
and then handed to zarr through an in-memory store, so what is decoded is exactly what was
verified. Both work the same on a local folder and on object storage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from .batch import TargetBatch
from .errors import StoreCorruptionError, StoreFormatError
from .layout import Layout, decode_shard, encode_shard
from .location import StoreLocation, open_location
from .manifest import ShardEntry, read_shard_files

#: Attribute key of a shard group's own description.
SHARD_ATTRIBUTE_KEY = "aligndistil_shard"

#: Optional test hook called as ``hook(stage, detail)`` while a shard is written; the stages
#: are ``"array"`` (after each array's data) and ``"files"`` (all data written, not committed).
WriteHook = Callable[[str, str], None]


def write_shard(location: Path | StoreLocation, relpath: str, batch: TargetBatch,
                layout: Layout, vocab_size: int, *, durable: bool = True,
                hook: WriteHook | None = None, ragged: bool = False) -> dict[str, bytes]:
    """Write ``batch`` as a fresh shard at ``relpath`` (anything already there is removed
    first); returns the files written, ``{path within the shard: bytes}``.

    Every chunk is written, even one equal to the fill value, so each chunk of a committed
    shard is in its checksum list and a deleted chunk is noticed (zarr would otherwise read a
    missing chunk as fill values).
    """
    location = open_location(location)
    files = encode_shard_files(batch, layout, vocab_size, ragged=ragged)
    location.remove_tree(relpath)

    def after_group(name: str) -> None:
        if hook is not None and name != "zarr.json":
            hook("array", name)

    location.write_files(relpath, files, durable=durable, after_group=after_group)
    if hook is not None:
        hook("files", relpath.rsplit("/", 1)[-1])
    return files


def encode_shard_files(batch: TargetBatch, layout: Layout, vocab_size: int, *,
                       ragged: bool = False) -> dict[str, bytes]:
    """The shard's zarr v3 group as files, ``{path within the shard: bytes}``, in the order
    zarr wrote them (the group's ``zarr.json``, then each array's metadata and chunks)."""
    import zarr
    from zarr.codecs import BloscCodec

    arrays = encode_shard(batch, layout, vocab_size, ragged=ragged)
    written: dict = {}
    store = zarr.storage.MemoryStore(written)
    group = zarr.create_group(store, attributes={SHARD_ATTRIBUTE_KEY: {
        "layout": layout.describe(), "num_examples": len(batch),
        "num_tokens": batch.num_tokens, "top_k": batch.top_k}})
    compressor = BloscCodec(cname=layout.cname, clevel=layout.clevel, shuffle=layout.shuffle)
    for name, enc in arrays.items():
        arr = group.create_array(name, shape=enc.data.shape, chunks=enc.chunks,
                                 dtype=enc.data.dtype, compressors=compressor, fill_value=0,
                                 attributes=enc.attributes,
                                 config={"write_empty_chunks": True})
        arr[...] = enc.data
    return {key: value.to_bytes() for key, value in written.items()}


def load_shard_arrays(store_root: Path | StoreLocation, entry: ShardEntry, *, verify: bool = True,
                      names: set[str] | None = None) -> dict[str, tuple[np.ndarray, dict[str, Any]]]:
    """``{array name: (stored array, attributes)}`` of a committed shard, from checked bytes.

    All arrays are opened and read in one pass of zarr's event loop, so their chunks decode
    concurrently and zarr's per-call overhead is paid once per shard, not once per array.
    """
    import zarr
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    files = read_shard_files(store_root, entry, verify=verify, names=names)
    if names is None:
        names = {rel.split("/", 1)[0] for rel in files
                 if rel.count("/") == 1 and rel.endswith("/zarr.json")}
    proto = default_buffer_prototype()
    memory = zarr.storage.MemoryStore({k: proto.buffer.from_bytes(v) for k, v in files.items()})
    try:
        return sync(_read_arrays(memory, sorted(names)))
    except StoreFormatError:
        raise
    except Exception as exc:  # zarr/codec errors on bytes that passed (or skipped) checks
        raise StoreCorruptionError(entry.relpath, f"cannot decode ({type(exc).__name__}: "
                                                  f"{exc})") from None


async def _read_arrays(memory: Any, names: list[str]) -> dict[str, tuple[np.ndarray, dict]]:
    import asyncio

    from zarr.core.group import AsyncGroup

    group = await AsyncGroup.open(memory, zarr_format=3)
    arrays = await asyncio.gather(*(group.getitem(name) for name in names))
    data = await asyncio.gather(*(arr.getitem(...) for arr in arrays))
    return {name: (np.asarray(d), dict(arr.attrs)) for name, arr, d in zip(names, arrays, data)}


def load_shard(store_root: Path | StoreLocation, entry: ShardEntry, *, verify: bool = True) -> TargetBatch:
    """A committed shard, verified and decoded. Arrays are read-only views of the cache."""
    arrays = load_shard_arrays(store_root, entry, verify=verify)
    try:
        batch = decode_shard(arrays)
    except StoreFormatError as exc:
        raise StoreFormatError(f"{entry.relpath}: {exc}") from None
    except (KeyError, ValueError, IndexError) as exc:
        raise StoreCorruptionError(entry.relpath, f"inconsistent arrays ({exc})") from None
    if len(batch) != entry.num_examples or batch.num_tokens != entry.num_tokens:
        raise StoreCorruptionError(entry.relpath, f"holds {len(batch)} examples / "
                                                  f"{batch.num_tokens} tokens, the manifest says "
                                                  f"{entry.num_examples} / {entry.num_tokens}")
    for name in batch.__dataclass_fields__:
        getattr(batch, name).flags.writeable = False
    return batch
