"""Safe loading of Hugging Face model folders, and where a model runs.

A model flag takes a local folder or a Hub id (``owner/name[@revision]``, resolved into the
Hugging Face cache by :mod:`storage.hub`); the loaders then read local files only.
Safetensors only (pickle-based ``.bin`` weights can run code when loaded), ``trust_remote_code``
off unless asked. Every failure is a :class:`ModelLoadError` naming the flag and the folder.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from storage.errors import UserError
from storage.hub import MODEL_FILES, is_hub_id, resolve_snapshot

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")


class ModelLoadError(UserError, ValueError):
    """A model or tokenizer folder that cannot be used; the message names it and what is wrong."""


def check_model_dir(path: str | Path, flag: str = "--model", *,
                    trust_remote_code: bool = False) -> Path:
    """The model's local folder (a Hub id resolved to its cached snapshot); refuse anything but
    a folder with ``config.json`` and ``*.safetensors``."""
    path = local_folder(path, flag, trust_remote_code=trust_remote_code)
    if not path.is_dir():
        raise ModelLoadError(f"{flag} {path}: not a directory (expected a Hugging Face model "
                             f"folder with config.json and *.safetensors)")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{flag} {path}: no config.json")
    if not any(path.glob("*.safetensors")):
        found = sorted(p.name for p in path.glob("*.bin")) or ["no weight files"]
        raise ModelLoadError(f"{flag} {path}: no *.safetensors weights (found "
                             f"{', '.join(found)}); only safetensors are loaded (pickle-based "
                             f".bin can run code)")
    return path


def local_folder(path: str | Path, flag: str, *, trust_remote_code: bool = False) -> Path:
    """``path`` itself, or a Hub id's snapshot in the Hugging Face cache."""
    if is_hub_id(path):
        patterns = MODEL_FILES + (["*.py"] if trust_remote_code else [])
        return resolve_snapshot(str(path), repo_type="model", flag=flag,
                                allow_patterns=patterns).path
    return Path(path)


#: Files one of which a Hugging Face tokenizer folder has.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(path: str | Path, *, trust_remote_code: bool = False, flag: str = "--model"):
    from transformers import AutoTokenizer

    path = local_folder(path, flag, trust_remote_code=trust_remote_code)
    if not any((Path(path) / name).is_file() for name in TOKENIZER_FILES):
        raise ModelLoadError(f"{flag} {path}: no tokenizer ({', '.join(TOKENIZER_FILES)}); save "
                             f"the tokenizer beside the model (tokenizer.save_pretrained)")

    return AutoTokenizer.from_pretrained(Path(path), trust_remote_code=trust_remote_code,
                                         local_files_only=True)


def load_causal_lm(path: str | Path, *, device: torch.device, dtype: torch.dtype = torch.float32,
                   trust_remote_code: bool = False, flag: str = "--model", train: bool = False,
                   device_map: dict[str, str] | str | None = None,
                   attn_implementation: str | None = None):
    """One local causal LM on ``device`` (or split by ``device_map``,
    :mod:`causal_lm.placement`): in train mode, or frozen in eval mode. ``attn_implementation``
    (None: transformers' default) is checked when the model loads."""
    from transformers import AutoModelForCausalLM

    path = check_model_dir(path, flag, trust_remote_code=trust_remote_code)
    placed = {"device_map": device_map} if device_map is not None else {}
    if attn_implementation is not None:
        placed["attn_implementation"] = attn_implementation
        if "flash" in attn_implementation and not train and dtype == torch.float32 \
                and device.type == "cuda":
            # FlashAttention kernels take half precision only; a frozen model has no float32
            # master weights to keep (a trained one runs its forwards under bf16 autocast)
            log.info("%s: --attn-implementation %s runs in half precision: loading %s in "
                     "bfloat16", flag, attn_implementation, path)
            dtype = torch.bfloat16
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code,
            local_files_only=True, **placed)
    except (ImportError, ValueError) as exc:
        message = str(exc).lower()
        if attn_implementation is None or not ("attn" in message or "attention" in message):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"--attn-implementation {attn_implementation}: {flag} {path} "
                             f"cannot use it: {first}") from None
    if device_map is None:
        model = model.to(device)
    return model.train() if train else model.eval().requires_grad_(False)


def output_rows(model) -> int:
    """How many logits the model emits (rows of its output embedding)."""
    return int(model.get_output_embeddings().weight.shape[0])


def check_vocab(model, tokenizer, flag: str, path: str | Path) -> None:
    """A model must emit a logit for every token id its tokenizer can produce."""
    rows, vocab = output_rows(model), len(tokenizer)
    if rows < vocab:
        raise ModelLoadError(f"{flag} {path}: the model emits {rows} logits but its tokenizer "
                             f"has {vocab} tokens: ids {rows}..{vocab - 1} would have no logit")


def load_model_and_tokenizer(path: str | Path, *, device: torch.device,
                             dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
                             flag: str = "--model", train: bool = False,
                             attn_implementation: str | None = None):
    """``(model, tokenizer)`` from one folder, checked to agree on the vocabulary."""
    path = check_model_dir(path, flag, trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code, flag=flag)
    model = load_causal_lm(path, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                           flag=flag, train=train, attn_implementation=attn_implementation)
    check_vocab(model, tokenizer, flag, path)
    return model, tokenizer


def pad_token_id(tokenizer) -> int:
    """The id used for padding (never attended to, never a target)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def local_cuda_index(device_count: int, local_rank: int | None = None) -> int:
    """This process's GPU: ``local_rank`` (default ``$LOCAL_RANK``, set by torchrun) modulo the
    visible devices; 0 without torchrun."""
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return local_rank % max(1, device_count)


def resolve_device(device: str = "auto", local_rank: int | None = None) -> torch.device:
    """``auto``: this process's GPU when CUDA is available, else the CPU."""
    if device not in DEVICES:
        raise ModelLoadError(f"--device: expected one of {DEVICES}, got {device!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError("--device cuda: no CUDA device is available on this machine")
        return torch.device("cuda", local_cuda_index(torch.cuda.device_count(), local_rank))
    return torch.device("cpu")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on a GPU, float32 on the CPU."""
    if dtype not in DTYPES:
        raise ModelLoadError(f"--dtype: expected one of {DTYPES}, got {dtype!r}")
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)
