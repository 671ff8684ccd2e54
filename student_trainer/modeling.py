"""The student model: loading it, and a forward that yields only what the losses need.

The AlignDistil loss needs the student's logits at the response positions only (rows
``P-1 .. L-2``), never at the prompt. :class:`StudentForward` runs the decoder over the padded
batch, gathers the hidden states of those rows (``[N, H]`` for N response tokens) and applies
the LM head to them alone, so the largest vocabulary-sized tensor is ``[N, V]`` instead of
``[B, L, V]`` (and with ``loss_chunk_size`` only ``[chunk, V]``: the loss is computed from
hidden states a chunk of rows at a time, see ``losses.chunked_sparse_reverse_kl``).

The whole computation, loss included, happens inside ``forward`` so the module can be wrapped
in DistributedDataParallel as is: DDP only sees parameters used inside the wrapped forward.

Logits are cut to the tokenizer's vocabulary: models often pad their embedding matrix past
it, and those rows are never valid ids (the teacher engine drops them the same way).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor, nn

from student_trainer import losses

log = logging.getLogger(__name__)


class ModelLoadError(ValueError):
    """A --model folder that cannot be loaded; the message names it and what is missing."""


def load_student(path: str | Path, *, device: torch.device, dtype: torch.dtype = torch.float32,
                 trust_remote_code: bool = False):
    """``(model, tokenizer)`` from a local Hugging Face folder (safetensors only), in train mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ModelLoadError(f"--model {path}: not a Hugging Face model folder (expected "
                             f"config.json and *.safetensors)")
    if not any(path.glob("*.safetensors")):
        raise ModelLoadError(f"--model {path}: no *.safetensors weights; only safetensors are "
                             f"loaded (pickle-based .bin files can run code)")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True,
                                              trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True,
                                                 use_safetensors=True,
                                                 trust_remote_code=trust_remote_code)
    rows = model.get_output_embeddings().weight.shape[0]
    if rows < len(tokenizer):
        raise ModelLoadError(f"--model {path}: the model emits {rows} logits but its tokenizer "
                             f"has {len(tokenizer)} tokens")
    return model.to(device).train(), tokenizer


def pad_token_id(tokenizer) -> int:
    """The id used for padding (never attended to, never a target)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def _head_postprocess(model) -> tuple[float | None, float | None]:
    config = model.config
    return getattr(config, "logit_scale", None) or None, \
        getattr(config, "final_logit_softcapping", None) or None


class StudentForward(nn.Module):
    """Response-position log-likelihood terms of a causal LM, computed inside ``forward``.

    ``mode="kl"``: per-position reverse KL to sparse teacher targets (``[N]``).
    ``mode="logprobs"``: log-probability of the given next tokens (``[N]``; DPO).
    """

    def __init__(self, model: nn.Module, vocab_size: int, *, tail: str = "uniform",
                 loss_chunk_size: int | None = None):
        super().__init__()
        self.model = model
        self.vocab_size = int(vocab_size)
        self.tail = tail
        self.loss_chunk_size = loss_chunk_size or None
        scale, cap = _head_postprocess(model)
        if self.loss_chunk_size and (scale or cap):
            raise ValueError("--loss-chunk-size needs a plain linear LM head; this model "
                             "scales or soft-caps its logits (use the unchunked loss)")

    def response_hidden(self, input_ids: Tensor, attention_mask: Tensor, row_idx: Tensor,
                        col_idx: Tensor) -> Tensor:
        decoder = self.model.get_decoder()
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask,
                         use_cache=False).last_hidden_state
        return hidden[row_idx, col_idx]

    def head(self, hidden: Tensor) -> Tensor:
        logits = self.model.get_output_embeddings()(hidden)
        scale, cap = _head_postprocess(self.model)
        if scale:
            logits = logits * scale
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits[..., :self.vocab_size]

    def forward(self, input_ids: Tensor, attention_mask: Tensor, row_idx: Tensor,
                col_idx: Tensor, *, mode: str = "kl", topk_ids: Tensor | None = None,
                topk_logprobs: Tensor | None = None, tail_logmass: Tensor | None = None,
                target_ids: Tensor | None = None) -> Tensor:
        hidden = self.response_hidden(input_ids, attention_mask, row_idx, col_idx)
        if mode == "logprobs":
            logits = self.head(hidden)
            logp = torch.log_softmax(logits.float(), dim=-1)
            return logp.gather(-1, target_ids.unsqueeze(-1)).squeeze(-1)
        if mode != "kl":
            raise ValueError(f"mode must be 'kl' or 'logprobs', got {mode!r}")
        if self.loss_chunk_size:
            head = self.model.get_output_embeddings()
            weight = head.weight[:self.vocab_size]
            bias = head.bias[:self.vocab_size] if getattr(head, "bias", None) is not None else None
            if weight.dtype != hidden.dtype:  # autocast: bf16 hidden states, fp32 master weight
                weight = weight.to(hidden.dtype)
                bias = bias.to(hidden.dtype) if bias is not None else None
            return losses.chunked_sparse_reverse_kl(
                hidden, weight, topk_ids, topk_logprobs, tail_logmass, self.tail,
                lm_head_bias=bias, chunk_size=self.loss_chunk_size)
        return losses.sparse_reverse_kl(self.head(hidden), topk_ids, topk_logprobs,
                                        tail_logmass, tail=self.tail)


def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto``: this process's GPU when CUDA is available, else the CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError("--device cuda: no CUDA device is available on this machine")
        return torch.device("cuda", local_rank)
    if device != "cpu":
        raise ModelLoadError(f"--device: expected auto, cpu or cuda, got {device!r}")
    return torch.device("cpu")
