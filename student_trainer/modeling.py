"""The student's forward: only what the losses need (loading lives in :mod:`causal_lm.loading`).

The AlignDistil loss needs the student's logits at the response positions only (rows
``P-1 .. L-2``), never at the prompt. :class:`StudentForward` runs the decoder over the padded
batch, gathers the hidden states of those rows (``[N, H]`` for N response tokens) and applies
the LM head to them alone, so the largest vocabulary-sized tensor is ``[N, V]`` instead of
``[B, L, V]`` (and with ``loss_chunk_size`` only ``[chunk, V]``: the loss is computed from
hidden states a chunk of rows at a time, see ``losses.chunked_sparse_reverse_kl``).

The whole computation, loss included, happens inside ``forward`` so the module can be wrapped
in DistributedDataParallel as is: DDP only sees parameters used inside the wrapped forward.

The decoder at response rows and the LM head (post-processing, the cut to the tokenizer's
vocabulary) are :mod:`causal_lm.head`'s, the same code the teacher engine runs.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from causal_lm.head import head_logits, head_weight, logit_postprocess, response_hidden
from causal_lm.loading import load_model_and_tokenizer
from student_trainer import losses

log = logging.getLogger(__name__)


class StudentForward(nn.Module):
    """Response-position log-likelihood terms of a causal LM, computed inside ``forward``.

    ``mode="kl"``: per-position reverse KL to sparse teacher targets (``[N]``).
    ``mode="logprobs"``: log-probability of the given next tokens (``[N]``; DPO).
    ``mode="top"``: the ``top_n`` likeliest next ids (``[N, top_n]``, no gradient; the
    student's own candidates, :mod:`student_trainer.candidates`).
    """

    def __init__(self, model: nn.Module, vocab_size: int, *, tail: str = "auto",
                 loss_chunk_size: int | None = None):
        super().__init__()
        self.model = model
        self.vocab_size = int(vocab_size)
        self.tail = tail
        self.loss_chunk_size = loss_chunk_size or None
        scale, cap = logit_postprocess(model)
        if self.loss_chunk_size and (scale or cap):
            raise ValueError("--loss-chunk-size needs a plain linear LM head; this model "
                             "scales or soft-caps its logits (use the unchunked loss)")

    def head(self, hidden: Tensor) -> Tensor:
        return head_logits(self.model, hidden, self.vocab_size)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, row_idx: Tensor,
                col_idx: Tensor, *, mode: str = "kl", topk_ids: Tensor | None = None,
                topk_logprobs: Tensor | None = None, tail_logmass: Tensor | None = None,
                target_ids: Tensor | None = None, position_ids: Tensor | None = None,
                parts: bool = False, topk_count: Tensor | None = None, top_n: int = 0) -> Tensor | tuple[Tensor, Tensor | None, Tensor | None]:
        """``mode="kl"`` with ``parts``: ``(kl, kl on the teacher's kept ids, the student's
        mass outside them)`` (:func:`losses.sparse_kl_parts`; both None with
        ``loss_chunk_size``, where the logits are never whole)."""
        hidden = response_hidden(self.model, input_ids, attention_mask, row_idx, col_idx,
                                 position_ids)
        if mode == "top":
            from student_trainer.candidates import top_ids_of_hidden

            with torch.no_grad():
                return top_ids_of_hidden(self.model, hidden, top_n, self.vocab_size)
        if mode == "logprobs":
            logits = self.head(hidden)
            logp = torch.log_softmax(logits.float(), dim=-1)
            return logp.gather(-1, target_ids.unsqueeze(-1)).squeeze(-1)
        if mode != "kl":
            raise ValueError(f"mode must be 'kl', 'logprobs' or 'top', got {mode!r}")
        if self.loss_chunk_size:
            weight, bias = head_weight(self.model, self.vocab_size)
            if weight.dtype != hidden.dtype:  # autocast: bf16 hidden states, fp32 master weight
                weight = weight.to(hidden.dtype)
                bias = bias.to(hidden.dtype) if bias is not None else None
            kl = losses.chunked_sparse_reverse_kl(
                hidden, weight, topk_ids, topk_logprobs, tail_logmass, self.tail,
                lm_head_bias=bias, chunk_size=self.loss_chunk_size, topk_count=topk_count)
            return (kl, None, None) if parts else kl
        logits = self.head(hidden)
        kl = losses.sparse_reverse_kl(logits, topk_ids, topk_logprobs, tail_logmass,
                                      tail=self.tail, topk_count=topk_count)
        if not parts:
            return kl
        return (kl, *losses.sparse_kl_parts(logits.detach(), topk_ids, topk_logprobs,
                                            topk_count))


def load_student(path, *, device: torch.device, dtype: torch.dtype = torch.float32,
                 trust_remote_code: bool = False):
    """``(model, tokenizer)`` of the student, in train mode (:mod:`causal_lm.loading`'s checks:
    safetensors only, a logit for every token)."""
    return load_model_and_tokenizer(path, device=device, dtype=dtype, train=True,
                                    trust_remote_code=trust_remote_code)
