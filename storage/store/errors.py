"""Errors of the target store. Every message names the store, shard, file or key at fault."""

from __future__ import annotations

from ..errors import UserError


class StoreError(UserError):
    """Base class: something about a target store is wrong (the message says what and where)."""


class StoreNotFoundError(StoreError):
    """The path holds no target store (no root ``zarr.json`` with aligndistil metadata)."""


class StoreFormatError(StoreError):
    """The store (or one of its arrays) uses a format version or encoding this code can't read."""


class StoreCorruptionError(StoreError):
    """A committed shard's bytes don't match its checksums, or can't be decoded.

    ``shard`` is the shard's path relative to the store root (e.g. ``shards/w0000-s000003``),
    or the manifest file when the manifest itself is unreadable.
    """

    def __init__(self, shard: str, message: str):
        super().__init__(f"{shard}: {message}")
        self.shard = shard


class StoreMetadataMismatchError(StoreError):
    """A writer opened an existing store with metadata that differs from what the store records.

    ``key`` names the first differing metadata key.
    """

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


class StoreLockedError(StoreError):
    """Another live process is writing the same worker's shards of this store."""
