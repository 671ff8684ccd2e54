"""Padding-free forwards: several sequences laid back to back in one row of the batch.

Position ids restart at 0 for each sequence and no attention mask is passed, which is how
Hugging Face models take packed sequences. How the attention then keeps them apart depends on
its implementation:

- ``sdpa``, ``eager`` and ``flex_attention`` build their mask with
  ``transformers.masking_utils``, which derives a block-diagonal causal mask from the position
  ids of every row: a batch may hold several packed rows (:data:`ROW_AWARE`).
- ``flash_attention_2``/``_3`` (and any other kernel) read the position ids as sequence
  boundaries only when the batch has ONE row (``_is_packed_sequence`` in
  ``transformers.modeling_flash_attention_utils``); with several rows they attend across the
  packed sequences. Their packed batches are therefore laid out as one row, the rows end to end
  (:func:`packed_hidden`), which is also what their variable-length kernels are for.

A row's unused places at its end (only in each batch's last rows) hold the pad id with positions
restarting too, so they form a sequence of their own that nothing reads.

Not every model honours this (a model with its own mask code would attend across the packed
sequences), so :func:`packing_check` runs the model once on a packed probe of several rows,
through the same :func:`packed_hidden`, and compares it with separate forwards; callers pack
only when it passes, and use the padded layout otherwise.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from causal_lm.positions import response_rows
from storage.errors import ConfigError

log = logging.getLogger("aligndistil.packing")


@dataclass
class PackedRows:
    """``[R, C]`` tensors of sequences packed into rows, and where each sequence starts."""

    input_ids: Tensor     #: [R, C] long
    position_ids: Tensor  #: [R, C] long, restarting at 0 for each sequence
    token_mask: Tensor    #: [R, C] long, 1 on the sequences' tokens, 0 on unused places
    seq_row: np.ndarray   #: [S] the row of sequence s (s indexes ``sequences``)
    seq_start: np.ndarray  #: [S] its first column

    def response_coordinates(self, prompt_lens: Sequence[int], lengths: Sequence[int]
                             ) -> tuple[np.ndarray, np.ndarray]:
        """``(row, column)`` of every response logit row (``P-1 .. L-2`` of each sequence), in
        sequence order: the packed counterpart of :func:`positions.response_coordinates`."""
        rows, cols = [], []
        for s, (p, n) in enumerate(zip(prompt_lens, lengths)):
            rows.append(np.full(n - p, self.seq_row[s], dtype=np.int64))
            cols.append(response_rows(p, n) + self.seq_start[s])
        if not rows:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        return np.concatenate(rows), np.concatenate(cols)


#: Attention implementations whose masks keep packed sequences apart in every row of a batch.
ROW_AWARE = frozenset({"sdpa", "eager", "flex_attention"})


def attention_of(model) -> str:
    """The attention implementation ``model`` runs (transformers' default when unset: eager)."""
    return getattr(model.config, "_attn_implementation", None) or "eager"


def is_flash(model) -> bool:
    """A FlashAttention kernel (``flash_attention_2``/``_3``/``_4``, or a kernels-hub
    ``.../flash-attn...``): it runs in half precision only, on CUDA only."""
    return "flash" in attention_of(model)


def flash_precision(model):
    """The context every forward of ``model`` needs outside training's autocast: bf16 autocast
    for a float32 model whose attention is a FlashAttention kernel (the kernels take fp16/bf16
    only, and transformers casts to the autocast dtype), else nothing."""
    import contextlib

    param = next(model.parameters())
    if is_flash(model) and param.dtype == torch.float32 and param.device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def packed_hidden(model, input_ids: Tensor, position_ids: Tensor, *,
                  one_row: bool | None = None) -> Tensor:
    """The decoder's last hidden states ``[R, C, H]`` for packed rows ``[R, C]`` (no attention
    mask): as they are for :data:`ROW_AWARE` attention, else as one row ``[1, R * C]`` (every
    row's positions restart at 0, so the boundaries between rows are sequence boundaries too).
    ``one_row`` forces the choice."""
    decoder = model.get_decoder()
    rows, width = input_ids.shape
    if one_row is None:
        one_row = attention_of(model) not in ROW_AWARE
    if rows > 1 and one_row:
        out = decoder(input_ids=input_ids.reshape(1, -1), position_ids=position_ids.reshape(1, -1),
                      use_cache=False).last_hidden_state
        return out.reshape(rows, width, -1)
    return decoder(input_ids=input_ids, position_ids=position_ids,
                   use_cache=False).last_hidden_state


def pack_rows(sequences: Sequence[Sequence[int]], rows: Sequence[Sequence[int]], pad_id: int
              ) -> PackedRows:
    """Lay ``sequences`` out as ``rows`` (lists of indices into ``sequences``, each sequence in
    exactly one row) of width ``C`` = the fullest row."""
    width = max(sum(len(sequences[i]) for i in row) for row in rows)
    n_rows = len(rows)
    ids = torch.full((n_rows, width), pad_id, dtype=torch.long)
    pos = torch.empty((n_rows, width), dtype=torch.long)
    mask = torch.zeros((n_rows, width), dtype=torch.long)
    seq_row = np.full(len(sequences), -1, dtype=np.int64)
    seq_start = np.zeros(len(sequences), dtype=np.int64)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = len(sequences[i])
            if seq_row[i] >= 0:
                raise ValueError(f"sequence {i} is in more than one row")
            ids[r, at:at + n] = torch.as_tensor(np.asarray(sequences[i], dtype=np.int64))
            pos[r, at:at + n] = torch.arange(n)
            mask[r, at:at + n] = 1
            seq_row[i], seq_start[i] = r, at
            at += n
        pos[r, at:] = torch.arange(width - at)
    if (seq_row < 0).any():
        raise ValueError(f"sequences {np.flatnonzero(seq_row < 0).tolist()[:5]} are in no row")
    return PackedRows(ids, pos, mask, seq_row, seq_start)


@torch.no_grad()
def packing_check(model) -> tuple[bool, str]:
    """Whether ``model`` computes packed rows exactly as separate sequences: ``(ok, why)``.

    Four short sequences packed two to a row, in two rows (:func:`packed_hidden`, the layout
    every packed forward uses), must give the hidden states each gives alone (within the
    model's dtype's rounding); a model that attends across them (within a row, or across rows
    as flash-attention kernels do when a batch has several rows), ignores the restarted
    positions or refuses position ids without a mask fails.

    A FlashAttention model runs it in bf16 (:func:`flash_precision`). On the CPU, where
    FlashAttention cannot run (rank 0 of an FSDP run holds the whole model there), the probe
    runs sdpa in the one-row layout the kernel would get, and says so."""
    decoder = model.get_decoder()
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (7, 5, 6, 4)]
    packed = pack_rows(seqs, [[0, 1], [2, 3]], pad_id=0)
    attention = attention_of(model)
    stand_in = is_flash(model) and device.type != "cuda"
    one_row = attention not in ROW_AWARE
    was_training = model.training
    model.eval()
    if stand_in:
        model.set_attn_implementation("sdpa")
    low_precision = next(model.parameters()).dtype != torch.float32 or is_flash(model)
    try:
        with flash_precision(model):
            hidden = packed_hidden(model, packed.input_ids.to(device),
                                   packed.position_ids.to(device), one_row=one_row).float()
            alone = [decoder(input_ids=torch.tensor([s], device=device),
                             use_cache=False).last_hidden_state[0].float() for s in seqs]
        together = torch.cat([hidden[packed.seq_row[i], packed.seq_start[i]:
                                     packed.seq_start[i] + len(s)] for i, s in enumerate(seqs)])
    except Exception as exc:  # noqa: BLE001 - any failure means: do not pack this model
        return False, f"a packed forward fails ({type(exc).__name__}: {exc})"[:300]
    finally:
        model.train(was_training)
        if stand_in:
            model.set_attn_implementation(attention)
    expected = torch.cat(alone)
    scale = float(expected.abs().max()) or 1.0
    tol = 2e-2 if low_precision else 1e-4
    err = float((together - expected).abs().max()) / scale
    if err > tol:
        return False, (f"packed sequences do not match separate forwards (relative error "
                       f"{err:.2g} > {tol:g}): its attention does not keep them apart")
    how = f" (probed with sdpa on the {device.type}, in {attention}'s one-row layout)" \
        if stand_in else ""
    return True, f"packed forwards match separate ones (attention: {attention}){how}"


def choose_packing(setting: str, *models) -> bool:
    """``--packing auto|on|off`` for these models: ``auto`` packs when every model passes
    :func:`packing_check` (else the padded layout, and the log says why); ``on`` refuses
    models that fail it. The choice is logged."""
    if setting not in ("auto", "on", "off"):
        raise ValueError(f"packing must be auto, on or off, got {setting!r}")
    if setting == "off":
        log.info("packing: off (--packing off): padded batches")
        return False
    why = ""
    for model in models:
        ok, why = packing_check(model)
        if not ok:
            if setting == "on":
                raise ConfigError(f"--packing on: {model.config.model_type} model: {why}; use "
                                  f"--packing auto or off")
            log.warning("packing: off, padded batches instead: %s model: %s",
                        model.config.model_type, why)
            return False
    log.info("packing: on (%s)", why)
    return True
