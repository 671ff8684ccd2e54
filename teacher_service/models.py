"""Loading the teacher pair: two local Hugging Face causal LMs that must share one vocabulary.

``dpo`` is always the first model. The second is the ``reverse`` model (modes ``adaptive`` and
``constant``) or the reference model (modes ``vanilla`` and ``vanilla-adaptive``). Both are loaded from local folders,
safetensors only, with ``trust_remote_code`` off unless asked.

Vocabulary: the target math runs over the tokenizer's vocabulary ``V = len(tokenizer)``. Some
models pad their embedding matrix past the tokenizer (Qwen2.5: 151936 rows for 151665 tokens);
those rows are never valid token ids, so the engine drops their logits. That is done explicitly:
:class:`TeacherPair` records both sizes and :func:`load_teacher_pair` logs the decision. A model
with FEWER output rows than the tokenizer has tokens is refused.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from causal_lm.loading import (ModelLoadError, check_model_dir, load_causal_lm, load_tokenizer,
                               output_rows, resolve_device, resolve_dtype)
from causal_lm.placement import layer_device_map, parse_devices
from storage.hub import snapshot_ref
from storage.tokenization import tokenizer_sha256
from teacher_service.targets import REFERENCE_MODES

log = logging.getLogger(__name__)

#: Bytes of each weight file hashed into a teacher's identity (plus name and size): hashing a
#: 15 GB checkpoint in full would cost a minute at every start for little extra safety.
_IDENTITY_SAMPLE_BYTES = 8 << 20


class TeacherLoadError(ModelLoadError):
    """The teacher models cannot be used together; the message says what differs."""


@dataclass
class TeacherPair:
    dpo: Any
    other: Any
    tokenizer: Any
    other_role: str  # "reverse" or "reference"
    vocab_size: int  # len(tokenizer): the vocabulary the targets range over
    model_vocab_size: int  # rows of the models' output embedding (>= vocab_size)
    device: torch.device
    dtype: torch.dtype
    tokenizer_sha256: str
    identities: dict[str, dict[str, str]] = field(default_factory=dict)


def model_identity(path: str | Path) -> dict[str, str]:
    """A teacher's identity for the store's metadata and ``/v1/info``: its path, a fingerprint of
    its config and weight files (name, size, sha256 of the first 8 MiB of each) and, for a Hub
    snapshot, ``revision`` (``owner/name@commit``). The path says where this machine keeps the
    weights; the fingerprint and revision say which weights they are (what clients compare)."""
    path = Path(path)
    digest = hashlib.sha256()
    config = path / "config.json"
    if config.is_file():
        digest.update(config.read_bytes())
    for weights in sorted(path.glob("*.safetensors")):
        digest.update(weights.name.encode())
        digest.update(str(weights.stat().st_size).encode())
        with weights.open("rb") as fh:
            digest.update(fh.read(_IDENTITY_SAMPLE_BYTES))
    identity = {"path": str(path.resolve()), "fingerprint": digest.hexdigest()}
    ref = snapshot_ref(path)
    if ref is not None:
        identity["revision"] = str(ref)
    return identity


def _device_map(path: Path, devices: str | None, flag: str, trust_remote_code: bool):
    """None (the whole model on --device), an accelerate strategy, or a layer-split map."""
    if devices is None:
        return None
    parsed = parse_devices(devices, flag)
    return parsed if isinstance(parsed, str) else layer_device_map(
        path, parsed, trust_remote_code=trust_remote_code)


def load_teacher_pair(dpo_path: str | Path, other_path: str | Path, *, mode: str = "adaptive",
                      device: str = "auto", dtype: str = "auto",
                      trust_remote_code: bool = False, dpo_devices: str | None = None,
                      other_devices: str | None = None,
                      attn_implementation: str | None = None) -> TeacherPair:
    """Load both teachers and their tokenizer(s); refuse a pair that does not share a vocabulary."""
    other_role = "reference" if mode in REFERENCE_MODES else "reverse"
    other_flag = "--reference-model" if mode in REFERENCE_MODES else "--reverse-model"
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    # local folders: a Hub id becomes its cached snapshot (its folder name is the commit)
    dpo_path = check_model_dir(dpo_path, "--dpo-model", trust_remote_code=trust_remote_code)
    other_path = check_model_dir(other_path, other_flag, trust_remote_code=trust_remote_code)

    tok_dpo = load_tokenizer(dpo_path, trust_remote_code=trust_remote_code, flag="--dpo-model")
    tok_other = load_tokenizer(other_path, trust_remote_code=trust_remote_code, flag=other_flag)
    sha_dpo, sha_other = tokenizer_sha256(tok_dpo), tokenizer_sha256(tok_other)
    if len(tok_dpo) != len(tok_other) or sha_dpo != sha_other:
        raise TeacherLoadError(
            f"the teachers do not share a tokenizer: dpo {dpo_path} has {len(tok_dpo)} tokens "
            f"(tokenizer_sha256 {sha_dpo[:12]}), {other_role} {other_path} has "
            f"{len(tok_other)} tokens (tokenizer_sha256 {sha_other[:12]})")

    dpo = load_causal_lm(dpo_path, device=dev, dtype=dt, trust_remote_code=trust_remote_code,
                         flag="--dpo-model", device_map=_device_map(
                             dpo_path, dpo_devices, "--dpo-devices", trust_remote_code),
                         attn_implementation=attn_implementation)
    other = load_causal_lm(other_path, device=dev, dtype=dt,
                           trust_remote_code=trust_remote_code, flag=other_flag,
                           device_map=_device_map(other_path, other_devices,
                                                  "--reverse-devices", trust_remote_code),
                           attn_implementation=attn_implementation)
    rows_dpo = output_rows(dpo)
    rows_other = output_rows(other)
    if rows_dpo != rows_other:
        raise TeacherLoadError(f"the teachers' output vocabularies differ: dpo emits {rows_dpo} "
                               f"logits, {other_role} emits {rows_other}")
    vocab = len(tok_dpo)
    if rows_dpo < vocab:
        raise TeacherLoadError(f"the models emit {rows_dpo} logits but the tokenizer has {vocab} "
                               f"tokens: ids {rows_dpo}..{vocab - 1} would have no logit")
    if rows_dpo > vocab:
        log.warning("models emit %d logits, the tokenizer has %d tokens: the %d padding rows "
                    "past the tokenizer are never valid ids and are dropped before the target "
                    "math", rows_dpo, vocab, rows_dpo - vocab)
    return TeacherPair(
        dpo=dpo, other=other, tokenizer=tok_dpo, other_role=other_role, vocab_size=vocab,
        model_vocab_size=rows_dpo, device=dev, dtype=dt, tokenizer_sha256=sha_dpo,
        identities={"dpo": model_identity(dpo_path), other_role: model_identity(other_path)},
    )


def describe(pair: TeacherPair) -> dict[str, Any]:
    """What ``/v1/info`` and the store's metadata say about the models."""
    return {
        "models": pair.identities,
        "vocab_size": pair.vocab_size,
        "model_vocab_size": pair.model_vocab_size,
        "tokenizer_sha256": pair.tokenizer_sha256,
        "device": str(pair.device),
        "dtype": str(pair.dtype).removeprefix("torch."),
    }
