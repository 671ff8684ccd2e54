"""Where a store's files live: a local folder, or a prefix on object storage.

Everything the store reads and writes goes through a :class:`StoreLocation`, by paths relative
to the store's root (``"manifest-w0000.json"``, ``"shards/w0000-s000000/zarr.json"``):

- :class:`LocalLocation` (a folder): atomic writes by temp file + rename, fsync for
  durability, an exclusive ``flock`` per worker for the writer's lifetime;
- :class:`ObjectLocation` (``s3://bucket/prefix``, ``gs://bucket/prefix``,
  ``az://container/prefix``): objects through ``obstore``, configured by each cloud's standard
  environment variables (S3: ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
  ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, ``AWS_ALLOW_HTTP=true`` for a plain-http
  endpoint; GCS: ``GOOGLE_APPLICATION_CREDENTIALS`` or ``GOOGLE_SERVICE_ACCOUNT``; Azure:
  ``AZURE_STORAGE_ACCOUNT_NAME``, ``AZURE_STORAGE_ACCOUNT_KEY``, ``AZURE_STORAGE_ENDPOINT``,
  ``AZURE_ALLOW_HTTP``). A PUT replaces an object atomically, so there is no rename; a worker's
  ownership is an owner token in its manifest, and every manifest write is conditional on the
  manifest's version as this writer last wrote it (:class:`ObjectLease`), so two writers of
  one worker can never both commit.

The commit protocol is the same on both (see :mod:`.manifest`): a shard's files, then its
``checksums.json``, then one write of its worker's manifest, which makes it visible.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Callable

from ..fsio import atomic_write, fsync_dir, write_new_file
from .errors import StoreError, StoreLockedError

#: The URL schemes read as object storage.
OBJECT_SCHEMES = ("s3", "gs", "az", "abfs", "azure")
_URL = re.compile(r"^(?P<scheme>[a-z0-9]+)://")


class StoreIOError(StoreError, OSError):
    """Object storage that cannot be reached or refuses a request; names the store."""


def is_object_url(path: str | os.PathLike | None) -> bool:
    """Whether ``path`` names object storage (``s3://...`` etc.) rather than a local folder."""
    match = _URL.match(str(path)) if path is not None else None
    return bool(match) and match["scheme"] in OBJECT_SCHEMES


def open_location(path: "str | os.PathLike | StoreLocation") -> "StoreLocation":
    if isinstance(path, StoreLocation):
        return path
    if is_object_url(path):
        return ObjectLocation(str(path))
    if _URL.match(str(path)):
        raise StoreError(f"{path}: unknown storage scheme (local folders, or "
                         f"{', '.join(s + '://' for s in OBJECT_SCHEMES)})")
    return LocalLocation(Path(path))


class StoreLocation:
    """The root of a store; paths are relative posix paths. See the module docstring."""

    url: str
    is_local: bool

    def __str__(self) -> str:
        return self.url

    def read(self, rel: str) -> bytes:
        """The file's bytes; :class:`FileNotFoundError` when it does not exist."""
        raise NotImplementedError

    def exists(self, rel: str = "") -> bool:
        raise NotImplementedError

    def list_names(self, rel: str = "") -> list[str]:
        """Names directly under ``rel`` (files and folders / common prefixes), sorted."""
        raise NotImplementedError

    def list_files(self, rel: str) -> list[str]:
        """Every file under ``rel``, as paths relative to ``rel``, sorted."""
        raise NotImplementedError

    def total_bytes(self, rel: str = "") -> int:
        """Bytes of every file under ``rel`` (the whole store for ``""``)."""
        raise NotImplementedError

    def write(self, rel: str, data: bytes, *, durable: bool = True) -> None:
        """Replace the file atomically."""
        raise NotImplementedError

    def write_new(self, rel: str, data: bytes) -> bool:
        """Create the file atomically unless it exists; False when it did."""
        raise NotImplementedError

    def write_files(self, rel: str, files: dict[str, bytes], *, durable: bool = True,
                    after_group: Callable[[str], None] | None = None) -> None:
        """Write many new files under ``rel`` (a shard), grouped by their first path
        component; ``after_group(name)`` is called once a group is written."""
        raise NotImplementedError

    def remove_tree(self, rel: str) -> None:
        raise NotImplementedError

    def acquire(self, worker: int, manifest_rel: str) -> "Lease":
        """This process's ownership of ``worker``, held until :meth:`Lease.release`."""
        raise NotImplementedError


class Lease:
    """A writer's hold on one worker; all its manifest writes go through :meth:`commit`."""

    def check(self) -> None:
        """Raise :class:`StoreLockedError` if this writer no longer holds the worker."""

    def commit(self, data: bytes, *, durable: bool = True) -> None:
        raise NotImplementedError

    def release(self) -> None:
        raise NotImplementedError


def _groups(files: dict[str, bytes]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for rel in files:
        out.setdefault(rel.split("/", 1)[0], []).append(rel)
    return out


# ------------------------------------------------------------------------------ local folders
class LocalLocation(StoreLocation):
    is_local = True

    def __init__(self, root: Path):
        self.root = Path(root)
        self.url = str(root)

    def path(self, rel: str = "") -> Path:
        return self.root / rel if rel else self.root

    def read(self, rel: str) -> bytes:
        return self.path(rel).read_bytes()

    def exists(self, rel: str = "") -> bool:
        return self.path(rel).exists()

    def list_names(self, rel: str = "") -> list[str]:
        try:
            return sorted(os.listdir(self.path(rel)))
        except FileNotFoundError:
            return []

    def list_files(self, rel: str) -> list[str]:
        base = self.path(rel)
        out = []
        for root, _dirs, files in os.walk(base):
            for f in files:
                out.append(os.path.relpath(os.path.join(root, f), base).replace(os.sep, "/"))
        return sorted(out)

    def total_bytes(self, rel: str = "") -> int:
        total = 0
        for root, _dirs, files in os.walk(self.path(rel)):
            for f in files:
                try:
                    total += os.lstat(os.path.join(root, f)).st_size
                except FileNotFoundError:
                    pass
        return total

    def write(self, rel: str, data: bytes, *, durable: bool = True) -> None:
        path = self.path(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, data, durable=durable)

    def write_new(self, rel: str, data: bytes) -> bool:
        path = self.path(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_new_file(path, data)

    def write_files(self, rel: str, files: dict[str, bytes], *, durable: bool = True,
                    after_group: Callable[[str], None] | None = None) -> None:
        base = self.path(rel)
        folders = {base}
        for group, names in _groups(files).items():
            for name in names:
                path = base / name
                path.parent.mkdir(parents=True, exist_ok=True)
                folders.add(path.parent)
                with open(path, "wb") as fh:
                    fh.write(files[name])
                    if durable:
                        fh.flush()
                        os.fsync(fh.fileno())
            if after_group is not None:
                after_group(group)
        if durable:
            for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
                fsync_dir(folder)
            fsync_dir(base.parent)

    def remove_tree(self, rel: str) -> None:
        path = self.path(rel)
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()

    def acquire(self, worker: int, manifest_rel: str) -> "Lease":
        return FlockLease(self, worker, manifest_rel)


class FlockLease(Lease):
    """An exclusive ``flock`` on ``locks/w<worker>.lock``: the kernel drops it when the process
    dies, even by SIGKILL, so a second live process for the same worker is refused."""

    def __init__(self, location: LocalLocation, worker: int, manifest_rel: str):
        self.location, self.manifest_rel = location, manifest_rel
        locks = location.path("locks")
        locks.mkdir(exist_ok=True)
        fd = os.open(locks / f"w{worker:04d}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StoreLockedError(f"{location}: worker {worker} is being written by another "
                                   f"live process (pid {holder}); one writer per worker") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd: int | None = fd

    def commit(self, data: bytes, *, durable: bool = True) -> None:
        self.location.write(self.manifest_rel, data, durable=durable)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# ------------------------------------------------------------------------------ object storage
class ObjectLocation(StoreLocation):
    is_local = False
    #: Parallel requests for a shard's files (object storage rewards concurrency).
    CONCURRENCY = 16

    def __init__(self, url: str):
        try:
            from obstore.store import from_url
        except ImportError:
            raise StoreError(f"{url}: object storage needs the obstore package (pip install "
                             f"'aligndistil[s3]')") from None
        self.url = url.rstrip("/")
        try:
            self.store = from_url(self.url)
        except Exception as exc:  # bad URL or configuration
            raise StoreIOError(f"{url}: cannot open ({type(exc).__name__}: {exc})") from None

    def _call(self, what: str, fn, *args, **kwargs):
        """One request; errors other than not-found/precondition become :class:`StoreIOError`
        naming the store and the object."""
        from obstore.exceptions import (AlreadyExistsError, NotFoundError, PreconditionError)

        try:
            return fn(*args, **kwargs)
        except (NotFoundError, FileNotFoundError):
            raise FileNotFoundError(f"{self.url}/{what}") from None
        except (AlreadyExistsError, PreconditionError):
            raise
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise StoreIOError(f"{self.url}/{what}: {type(exc).__name__}: {first}") from None

    def read(self, rel: str) -> bytes:
        import obstore

        return bytes(self._call(rel, lambda: obstore.get(self.store, rel).bytes()))

    def read_many(self, rels: list[str]) -> dict[str, bytes | None]:
        """Several objects at once (None for a missing one)."""
        from concurrent.futures import ThreadPoolExecutor

        def one(rel: str) -> bytes | None:
            try:
                return self.read(rel)
            except FileNotFoundError:
                return None

        with ThreadPoolExecutor(self.CONCURRENCY) as pool:
            return dict(zip(rels, pool.map(one, rels)))

    def exists(self, rel: str = "") -> bool:
        import obstore

        if rel == "":
            return bool(self.list_names(""))
        try:
            self._call(rel, obstore.head, self.store, rel)
            return True
        except FileNotFoundError:
            return bool(self.list_names(rel))  # a "folder": a prefix with objects under it

    def list_names(self, rel: str = "") -> list[str]:
        import obstore

        prefix = f"{rel.rstrip('/')}/" if rel else None
        found = self._call(rel or ".", obstore.list_with_delimiter, self.store, prefix=prefix)
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in found["common_prefixes"]]
        names += [o["path"].rsplit("/", 1)[-1] for o in found["objects"]]
        return sorted(names)

    def list_files(self, rel: str) -> list[str]:
        import obstore

        prefix = f"{rel.rstrip('/')}/"
        out = []
        for chunk in self._call(rel, lambda: list(obstore.list(self.store, prefix=prefix))):
            out.extend(o["path"][len(prefix):] for o in chunk)
        return sorted(out)

    def total_bytes(self, rel: str = "") -> int:
        import obstore

        prefix = f"{rel.rstrip('/')}/" if rel else None
        chunks = self._call(rel or ".", lambda: list(obstore.list(self.store, prefix=prefix)))
        return sum(o["size"] for chunk in chunks for o in chunk)

    def write(self, rel: str, data: bytes, *, durable: bool = True) -> None:
        import obstore

        self._call(rel, obstore.put, self.store, rel, data)

    def write_new(self, rel: str, data: bytes) -> bool:
        import obstore
        from obstore.exceptions import AlreadyExistsError, PreconditionError

        try:
            self._call(rel, obstore.put, self.store, rel, data, mode="create")
            return True
        except (AlreadyExistsError, PreconditionError):
            return False

    def write_files(self, rel: str, files: dict[str, bytes], *, durable: bool = True,
                    after_group: Callable[[str], None] | None = None) -> None:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(self.CONCURRENCY) as pool:
            for group, names in _groups(files).items():
                list(pool.map(lambda n: self.write(f"{rel}/{n}", files[n]), names))
                if after_group is not None:
                    after_group(group)

    def remove_tree(self, rel: str) -> None:
        """Delete the object ``rel`` and every object under ``rel/``. An object that is gone
        already is fine (another process may be deleting the same leftovers): S3 deletes a
        missing key quietly, but GCS and Azure answer 404, which fails the whole batch."""
        import obstore

        paths = [f"{rel}/{name}" for name in self.list_files(rel)]
        try:
            self._call(rel, obstore.head, self.store, rel)
            paths.append(rel)
        except FileNotFoundError:
            pass
        for start in range(0, len(paths), 1000):
            batch = paths[start:start + 1000]
            try:
                self._call(rel, obstore.delete, self.store, batch)
            except FileNotFoundError:
                for path in batch:
                    with contextlib.suppress(FileNotFoundError):
                        self._call(path, obstore.delete, self.store, path)

    def acquire(self, worker: int, manifest_rel: str) -> "Lease":
        return ObjectLease(self, worker, manifest_rel)


#: Key of the owner token in an object store's manifest.
OWNER_KEY = "owner"


class ObjectLease(Lease):
    """Ownership of a worker on object storage, without locks: the writer stamps an owner token
    into the worker's manifest, and each later manifest write is conditional on the version of
    the writer's own previous write. A newer writer for the same worker (a restart after a
    crash, or a second process by mistake) takes over by its own stamp; the older one's next
    commit then fails its condition and stops with :class:`StoreLockedError`, so two writers
    never both commit. (Unlike ``flock``, object storage cannot tell a live writer from a dead
    one, so the newer writer wins.)

    The condition names the object's version in every form obstore knows, because each cloud
    checks a different one: S3 and Azure compare the ETag, GCS the object generation (obstore's
    ``version``; with an ETag alone it refuses a conditional GCS write outright).
    """

    def __init__(self, location: ObjectLocation, worker: int, manifest_rel: str):
        import obstore

        self.location, self.worker, self.manifest_rel = location, worker, manifest_rel
        self.token = uuid.uuid4().hex
        self.owner = {"token": self.token, "host": socket.gethostname(), "pid": os.getpid(),
                      "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        #: the manifest as this writer found it (None: the worker has none yet)
        self.initial: bytes | None = None
        #: the manifest's version as this writer last saw or wrote it ({}: none yet)
        self.version: dict[str, str] = {}
        try:
            got = location._call(manifest_rel, obstore.get, location.store, manifest_rel)
            self.initial, self.version = bytes(got.bytes()), _version_of(got.meta)
        except FileNotFoundError:
            pass

    def stamp(self, document: dict) -> bytes:
        import json

        return json.dumps({**document, OWNER_KEY: self.owner}, indent=1).encode()

    def check(self) -> None:
        """One HEAD of the manifest: refuse before a shard is written, rather than after, when
        a newer writer has taken the worker over."""
        import obstore

        try:
            meta = self.location._call(self.manifest_rel, obstore.head, self.location.store,
                                       self.manifest_rel)
        except FileNotFoundError:
            meta = None
        if not _same_version(self.version, _version_of(meta) if meta is not None else {}):
            raise self._taken_over()

    def commit(self, data: bytes, *, durable: bool = True) -> None:
        import json

        import obstore
        from obstore.exceptions import AlreadyExistsError, PreconditionError

        body = self.stamp(json.loads(data))
        mode = dict(self.version) if self.version else "create"
        try:
            result = self.location._call(self.manifest_rel, obstore.put, self.location.store,
                                         self.manifest_rel, body, mode=mode)
        except (AlreadyExistsError, PreconditionError):
            raise self._taken_over() from None
        self.version = _version_of(result)

    def _taken_over(self) -> StoreLockedError:
        return StoreLockedError(
            f"{self.location}: worker {self.worker} was taken over by another writer since "
            f"this one started (its manifest changed under it); one writer per worker: this "
            f"writer stops and writes nothing more")

    def release(self) -> None:
        pass


def _version_of(meta) -> dict[str, str]:
    """An object's version as obstore's conditional put takes it (``e_tag`` and/or
    ``version``), from a get's ``meta``, a head or a put's result; absent fields left out
    (obstore refuses ``None`` there)."""
    return {key: meta[key] for key in ("e_tag", "version") if meta.get(key) is not None}


def _same_version(mine: dict[str, str], found: dict[str, str]) -> bool:
    """Whether two versions name the same object state, by the fields both carry (a field that
    only one side reports can't tell; the conditional commit then decides)."""
    if not mine or not found:
        return mine == found
    return all(mine[k].strip('"') == found[k].strip('"') for k in mine.keys() & found.keys())
