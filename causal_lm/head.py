"""The decoder at response rows, and the LM head with the model's own post-processing.

Only the response rows ever need logits (prompt rows never do), so the decoder's last hidden
states are gathered at those rows first (``[N, H]``) and the head is applied to them alone: the
largest vocabulary-sized tensor is ``[N, V]`` (or a chunk of it), never ``[B, L, V]``.

Precision: :class:`Float32Head` runs the head in float32 from the decoder's hidden states, whatever
the decoder's dtype. A bf16 head rounds a logit near 25 by up to ~0.06, and the teacher's
extrapolation ``z* = z_dpo + alpha (z_dpo - z_rev)`` (alpha up to 30) multiplies that error
(DESIGN §2: the LM head and all of the target math run in float32 or better).

Post-processing is part of the model (Gemma-style soft-capping, Cohere-style logit scale), so it
is applied here for both the teachers and the student. Logits are cut to the tokenizer's
vocabulary: models often pad their embedding matrix past it (Qwen2.5: 151,936 rows for 151,665
tokens), and those rows are never valid ids.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from causal_lm.packed import packed_hidden


def response_hidden(model, input_ids: Tensor, attention_mask: Tensor, row_idx: Tensor,
                    col_idx: Tensor, position_ids: Tensor | None = None) -> Tensor:
    """The decoder's last hidden states at ``(row_idx, col_idx)``: ``[N, H]``.

    With ``position_ids`` the rows are packed (:func:`causal_lm.packed.packed_hidden`): the
    positions keep the sequences apart and ``attention_mask`` is not passed to the model."""
    device = model.get_input_embeddings().weight.device  # a split model's first device
    if position_ids is not None:
        hidden = packed_hidden(model, input_ids.to(device), position_ids.to(device))
    else:
        hidden = model.get_decoder()(input_ids=input_ids.to(device), use_cache=False,
                                     attention_mask=attention_mask.to(device)).last_hidden_state
    return hidden[row_idx.to(hidden.device), col_idx.to(hidden.device)]


def logit_postprocess(model) -> tuple[float | None, float | None]:
    """``(logit_scale, final_logit_softcapping)`` from the model's config (None when unused)."""
    config = model.config
    return (getattr(config, "logit_scale", None) or None,
            getattr(config, "final_logit_softcapping", None) or None)


def finish_logits(logits: Tensor, scale: float | None, cap: float | None) -> Tensor:
    """Apply the model's logit scale, then its soft-cap."""
    if scale:
        logits = logits * scale
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def head_logits(model, hidden: Tensor, vocab_size: int) -> Tensor:
    """The LM head on ``hidden`` (``[..., H]``), post-processed, cut to ``vocab_size``."""
    logits = model.get_output_embeddings()(hidden)
    scale, cap = logit_postprocess(model)
    return finish_logits(logits, scale, cap)[..., :vocab_size]


def head_weight(model, vocab_size: int) -> tuple[Tensor, Tensor | None]:
    """The head's weight (and bias) rows for the tokenizer's vocabulary, for losses that apply
    the head themselves a chunk at a time (only valid without post-processing)."""
    head = model.get_output_embeddings()
    weight = head.weight[:vocab_size]
    bias = getattr(head, "bias", None)
    return weight, (bias[:vocab_size] if bias is not None else None)


class Float32Head:
    """A model's LM head (weights cut to ``vocab_size``, post-processing included) evaluated in
    float32: ``float32(hidden) @ float32(W).T + float32(b)``.

    The float32 copy of the weight is made once (a bf16 weight is exactly representable, so
    the copy is lossless); for a float32 model it is the model's own tensor, shared. Cost: one
    ``vocab_size x hidden`` float32 matrix per model (Qwen2.5-7B: 151,665 x 3,584 x 4 B =
    2.2 GB), and the head's matmul in float32 instead of bf16.
    """

    def __init__(self, model, vocab_size: int):
        weight, bias = head_weight(model, vocab_size)
        with torch.no_grad():
            self.weight = weight.detach().float()
            self.bias = bias.detach().float() if bias is not None else None
        self.scale, self.cap = logit_postprocess(model)

    @torch.no_grad()
    def __call__(self, hidden: Tensor) -> Tensor:
        logits = F.linear(hidden.to(self.weight.device).float(), self.weight, self.bias)
        return finish_logits(logits, self.scale, self.cap)
