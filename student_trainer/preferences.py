"""Preference pairs: reading and tokenising them, micro-batching chosen and rejected together,
and the summed response log-probs of both under a model. Used by DPO (training the teachers)
and by reward accuracy (measuring them).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from storage.packing import pack_by_token_budget
from student_trainer.collate import Batch, collate_sequences
from student_trainer.distributed import DistEnv, all_reduce_max, gather_objects

Sequence_ = tuple[list[int], int]  # (input_ids, prompt_len)



@dataclass(frozen=True)
class PreferencePair:
    index: int           #: row in the source file
    chosen: Sequence_    #: the preferred sequence (after --reverse: the source's rejected one)
    rejected: Sequence_


def sequence_logprobs(forward: torch.nn.Module, batch: Batch) -> Tensor:
    """Summed log-prob of each sequence's response tokens: ``[B]`` (differentiable)."""
    token_logp = forward(batch.input_ids, batch.attention_mask, batch.row_idx, batch.col_idx,
                         mode="logprobs", target_ids=batch.target_ids)
    out = torch.zeros(batch.num_sequences, dtype=token_logp.dtype, device=token_logp.device)
    return out.index_add(0, batch.row_idx, token_logp)


def load_pairs(path: str | Path, tokenizer, *, max_seq_len: int | None, reverse: bool = False,
               truncated: list[int] | None = None) -> list[PreferencePair]:
    """Tokenised (chosen, rejected) pairs of a preference file; swapped when ``reverse``.

    A sequence longer than ``max_seq_len`` is cut in its response, keeping the response's EOS
    (as the released code does); each cut sequence's original length is appended to
    ``truncated``."""
    from storage.datasets import DataError, read_examples
    from storage.tokenization import tokenize_example

    cut = truncated.append if truncated is not None else None
    chosen = read_examples(path, response_field="chosen")
    rejected = read_examples(path, response_field="rejected")
    pairs = []
    for c, r in zip(chosen, rejected, strict=True):
        c_seq = tokenize_example(tokenizer, c, max_seq_len, truncation="response-keep-eos",
                                 on_truncate=cut)
        r_seq = tokenize_example(tokenizer, r, max_seq_len, truncation="response-keep-eos",
                                 on_truncate=cut)
        if reverse:
            c_seq, r_seq = r_seq, c_seq
        pairs.append(PreferencePair(c.index, (list(c_seq[0]), c_seq[1]),
                                    (list(r_seq[0]), r_seq[1])))
    if not pairs:
        raise DataError(f"{path}: no preference pairs")
    return pairs


def pair_micro_batches(pairs: Sequence[PreferencePair], max_tokens: int) -> list[list[int]]:
    """Indices of pairs per micro-batch; a micro-batch holds chosen AND rejected sequences, so
    each pair costs twice its longer sequence."""
    lengths = [2 * max(len(p.chosen[0]), len(p.rejected[0])) for p in pairs]
    return pack_by_token_budget(lengths, max_tokens)


def collate_pairs(pairs: Sequence[PreferencePair], pad_id: int) -> Batch:
    """Chosen sequences first (rows 0..n-1), then rejected (rows n..2n-1)."""
    return collate_sequences([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)


@torch.no_grad()
def pair_logprobs(forward: torch.nn.Module, pairs: Sequence[PreferencePair], *, pad_id: int,
                  max_tokens: int, device: torch.device, desc: str | None = None,
                  env: DistEnv = DistEnv(), lockstep: bool = False, amp: bool = False
                  ) -> tuple[Tensor, Tensor]:
    """Summed response log-probs ``(chosen [n], rejected [n])`` under ``forward``'s model, in
    float64 on the CPU (eval mode, no gradients).

    Under torchrun each rank scores pairs ``rank, rank + world_size, ...`` and every rank gets
    all of them back. ``lockstep``: ``forward`` runs collectives (FSDP gathers each layer's
    shards, DDP syncs buffers), so every rank makes as many forward passes, a rank with fewer
    micro-batches repeating its last one (and discarding it). ``amp``: bf16 autocast."""
    from tqdm.auto import tqdm

    was_training = forward.training
    forward.eval()
    chosen = torch.zeros(len(pairs), dtype=torch.float64)
    rejected = torch.zeros(len(pairs), dtype=torch.float64)
    mine = list(range(env.rank, len(pairs), env.world_size))
    groups = [[mine[i] for i in group]
              for group in pair_micro_batches([pairs[i] for i in mine], max_tokens)]
    passes = all_reduce_max(env, len(groups)) if lockstep else len(groups)
    try:
        for i in tqdm(range(passes), desc=desc, disable=desc is None or not env.is_main,
                      unit="batch"):
            group = groups[i] if i < len(groups) else (groups[-1] if groups else [0])
            batch = collate_pairs([pairs[j] for j in group], pad_id).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logp = sequence_logprobs(forward, batch).double().cpu()
            if i < len(groups):
                n = len(group)
                chosen[group] = logp[:n]
                rejected[group] = logp[n:]
    finally:
        forward.train(was_training)
    if env.enabled:
        for ids, c, r in gather_objects(env, (mine, chosen[mine], rejected[mine])):
            chosen[ids], rejected[ids] = c, r
    return chosen, rejected
