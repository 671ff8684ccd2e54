"""Loading the teacher pair: two local Hugging Face causal LMs that must share one vocabulary.

``dpo`` is always the first model. The second is the ``reverse`` model (modes ``adaptive`` and
``constant``) or the reference model (mode ``vanilla``). Both are loaded from local folders,
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
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from storage.tokenization import tokenizer_sha256

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")

#: Bytes of each weight file hashed into a teacher's identity (plus name and size): hashing a
#: 15 GB checkpoint in full would cost a minute at every start for little extra safety.
_IDENTITY_SAMPLE_BYTES = 8 << 20


class TeacherLoadError(ValueError):
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


def resolve_device(device: str) -> torch.device:
    if device not in DEVICES:
        raise TeacherLoadError(f"--device: expected one of {DEVICES}, got {device!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise TeacherLoadError("--device cuda: no CUDA device is available on this machine")
        # Under torchrun every worker sees every GPU: each takes the one of its LOCAL_RANK
        # (without torchrun LOCAL_RANK is unset and this is cuda:0, or CUDA_VISIBLE_DEVICES's).
        return torch.device("cuda", local_cuda_index(torch.cuda.device_count()))
    return torch.device(device)


def local_cuda_index(device_count: int) -> int:
    """The GPU of this process: ``LOCAL_RANK`` modulo the visible devices, else 0."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return local_rank % max(1, device_count)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype not in DTYPES:
        raise TeacherLoadError(f"--dtype: expected one of {DTYPES}, got {dtype!r}")
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def model_identity(path: str | Path) -> dict[str, str]:
    """A teacher's identity for the store's metadata: its path and a fingerprint of its config
    and weight files (name, size, sha256 of the first 8 MiB of each)."""
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
    return {"path": str(path.resolve()), "fingerprint": digest.hexdigest()}


def _check_model_dir(path: Path, flag: str) -> None:
    if not path.is_dir():
        raise TeacherLoadError(f"{flag} {path}: not a directory (expected a Hugging Face model "
                               f"folder with config.json and *.safetensors)")
    if not (path / "config.json").is_file():
        raise TeacherLoadError(f"{flag} {path}: no config.json")
    if not any(path.glob("*.safetensors")):
        found = sorted(p.name for p in path.glob("*.bin")) or ["no weight files"]
        raise TeacherLoadError(f"{flag} {path}: no *.safetensors weights (found {', '.join(found)}); "
                               f"only safetensors are loaded (pickle-based .bin can run code)")


def load_causal_lm(path: str | Path, *, device: torch.device, dtype: torch.dtype,
                   trust_remote_code: bool = False, flag: str = "--model"):
    """One local causal LM, safetensors only, in eval mode on ``device``."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    _check_model_dir(path, flag)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code,
        local_files_only=True,
    )
    return model.to(device).eval().requires_grad_(False)


def load_tokenizer(path: str | Path, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(path), trust_remote_code=trust_remote_code,
                                         local_files_only=True)


def load_teacher_pair(dpo_path: str | Path, other_path: str | Path, *, mode: str = "adaptive",
                      device: str = "auto", dtype: str = "auto",
                      trust_remote_code: bool = False) -> TeacherPair:
    """Load both teachers and their tokenizer(s); refuse a pair that does not share a vocabulary."""
    other_role = "reference" if mode == "vanilla" else "reverse"
    other_flag = "--reference-model" if mode == "vanilla" else "--reverse-model"
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    dpo_path, other_path = Path(dpo_path), Path(other_path)
    _check_model_dir(dpo_path, "--dpo-model")
    _check_model_dir(other_path, other_flag)

    tok_dpo = load_tokenizer(dpo_path, trust_remote_code=trust_remote_code)
    tok_other = load_tokenizer(other_path, trust_remote_code=trust_remote_code)
    sha_dpo, sha_other = tokenizer_sha256(tok_dpo), tokenizer_sha256(tok_other)
    if len(tok_dpo) != len(tok_other) or sha_dpo != sha_other:
        raise TeacherLoadError(
            f"the teachers do not share a tokenizer: dpo {dpo_path} has {len(tok_dpo)} tokens "
            f"(tokenizer_sha256 {sha_dpo[:12]}), {other_role} {other_path} has "
            f"{len(tok_other)} tokens (tokenizer_sha256 {sha_other[:12]})")

    dpo = load_causal_lm(dpo_path, device=dev, dtype=dt, trust_remote_code=trust_remote_code,
                         flag="--dpo-model")
    other = load_causal_lm(other_path, device=dev, dtype=dt,
                           trust_remote_code=trust_remote_code, flag=other_flag)
    rows_dpo = dpo.get_output_embeddings().weight.shape[0]
    rows_other = other.get_output_embeddings().weight.shape[0]
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
