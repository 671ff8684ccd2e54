"""Hugging Face Hub ids beside local paths: ``owner/name`` or ``owner/name@REVISION``.

A model or dataset flag takes a local path, or, when no such path exists, a Hub id. The id is
resolved through the Hugging Face cache with ``huggingface_hub.snapshot_download``, honouring
``HF_HOME`` / ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE`` (the cache only) and ``HF_TOKEN``, read when
the flag is resolved. ``@REVISION`` (a branch, tag or commit) follows the id in the same value,
so a command with two or three models (``--dpo-model``, ``--reverse-model``, ...) can pin each;
``--revision`` (:class:`HubOptions`) pins every model id that carries no ``@REVISION`` of its own.

What comes back is the local snapshot folder, whose name is the resolved commit: runs and stores
record ``owner/name@commit``, so a resume against other weights or other data is refused.
Models fetch only safetensors, JSON, tokenizer and template files (never pickle-based ``.bin``),
and ``*.py`` only when remote code is allowed.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated, ClassVar

from storage.errors import ConfigError, UserError

#: ``owner/name`` with an optional ``@revision``: the only shape taken as a Hub id.
HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<rev>[\w./-]+))?$")

#: Files a model snapshot needs: weights (safetensors only), configs, tokenizer, chat template.
MODEL_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja"]


class HubError(UserError, ValueError):
    """A Hub id that cannot be resolved; names the flag, the id and what to do."""


@dataclass(frozen=True)
class HubRef:
    """A resolved Hub snapshot: where it is on disk and which commit it is."""
    repo_id: str
    commit: str
    path: Path

    def __str__(self) -> str:
        return f"{self.repo_id}@{self.commit}"


def parse_hub_id(spec: str | Path) -> tuple[str, str | None] | None:
    """``("owner/name", revision or None)`` when ``spec`` is not an existing path and has the
    shape of a Hub id; otherwise None (a local path, or neither)."""
    text = str(spec)
    if Path(text).exists():
        return None
    match = HUB_ID.match(text)
    if match is None:
        return None
    return match["repo"], match["rev"]


def is_hub_id(spec: str | Path | None) -> bool:
    return spec is not None and parse_hub_id(spec) is not None


#: A revision on its own: a branch, tag or commit (the ``@REVISION`` part of :data:`HUB_ID`).
REVISION = re.compile(r"^[\w./-]+$")


@dataclass(kw_only=True)
class HubOptions:
    """``--revision``: the Hub revision of every model flag given as an id without its own
    ``@REVISION``. A command's config inherits it and names its model fields in
    ``MODEL_FIELDS``; the config then holds each such id pinned (``owner/name@REV``), so what is
    saved, resumed and recorded is the same as if ``@REV`` had been typed."""
    revision: Annotated[str | None, "the Hub revision (branch, tag or commit) of every model "
                        "flag given as a Hub id without its own @REVISION (none: main); "
                        "datasets take owner/name@REVISION in --data"] = None
    MODEL_FIELDS: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        if self.revision is None:
            return
        if not REVISION.match(self.revision):
            raise ConfigError(f"--revision {self.revision!r}: not a branch, tag or commit name "
                              f"(letters, digits, '_', '.', '-', '/')")
        names = [f.name for f in fields(self) if f.name in self.MODEL_FIELDS]
        pinned = 0
        for name in names:
            parsed = parse_hub_id(getattr(self, name) or "")
            if parsed is None:
                continue
            pinned += 1
            if parsed[1] is None:
                setattr(self, name, f"{parsed[0]}@{self.revision}")
        if not pinned:
            flags = ", ".join("--" + n.replace("_", "-") for n in names)
            raise ConfigError(f"--revision {self.revision}: none of {flags} is a Hub id (local "
                              f"folders have no revision)")


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def hub_cache_dir() -> Path:
    """The hub cache as the environment says now (``HF_HUB_CACHE``, else ``HF_HOME/hub``)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface")
    return Path(home) / "hub"


def resolve_snapshot(spec: str, *, repo_type: str, flag: str,
                     allow_patterns: list[str] | None = None) -> HubRef:
    """The local snapshot of Hub id ``spec`` (downloaded unless ``HF_HUB_OFFLINE`` is set)."""
    parsed = parse_hub_id(spec)
    if parsed is None:
        raise HubError(f"{flag} {spec}: no such file or folder, and not a Hub id (owner/name or "
                       f"owner/name@revision)")
    repo_id, revision = parsed
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, HFValidationError,
                                        LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    offline = _truthy("HF_HUB_OFFLINE")
    cache = hub_cache_dir()
    kind = "dataset" if repo_type == "dataset" else "model"
    where = f"{flag} {spec}"
    try:
        path = snapshot_download(repo_id, repo_type=repo_type, revision=revision,
                                 cache_dir=cache, local_files_only=offline,
                                 allow_patterns=allow_patterns)
    except LocalEntryNotFoundError:
        if offline:
            raise HubError(f"{where}: no local folder of that name, and the {kind} is not in the "
                           f"Hugging Face cache {cache} (HF_HUB_OFFLINE is set): download it "
                           f"first (hf download {repo_id}{_download_flags(kind, revision)}) "
                           f"or unset "
                           f"HF_HUB_OFFLINE") from None
        raise HubError(f"{where}: no local folder of that name, and the Hub cannot be reached "
                       f"and the cache {cache} does not hold it") from None
    except RevisionNotFoundError:
        raise HubError(f"{where}: the {kind} has no revision {revision!r}") from None
    except GatedRepoError:
        raise HubError(f"{where}: a gated {kind}: accept its terms on the Hub and set HF_TOKEN"
                       ) from None
    except RepositoryNotFoundError:
        raise HubError(f"{where}: no local folder of that name, and no such {kind} on the Hub "
                       f"(or it is private: set HF_TOKEN)") from None
    except (HFValidationError, HfHubHTTPError, OSError) as exc:
        raise HubError(f"{where}: cannot fetch it from the Hub ({type(exc).__name__}: "
                       f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    path = Path(path)
    return HubRef(repo_id=repo_id, commit=path.name, path=path)


def _download_flags(kind: str, revision: str | None) -> str:
    return (" --repo-type dataset" if kind == "dataset" else "") + \
        (f" --revision {revision}" if revision else "")


def snapshot_ref(path: str | Path) -> HubRef | None:
    """The Hub id and commit of a folder inside the Hugging Face cache
    (``.../models--owner--name/snapshots/<commit>``), or None for any other folder."""
    path = Path(path).absolute()
    repo_dir = path.parent.parent
    if path.parent.name != "snapshots":
        return None
    for prefix in ("models--", "datasets--", "spaces--"):
        if repo_dir.name.startswith(prefix):
            return HubRef(repo_id=repo_dir.name[len(prefix):].replace("--", "/"),
                          commit=path.name, path=path)
    return None
