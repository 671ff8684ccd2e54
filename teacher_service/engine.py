"""The one batching engine behind both ``precompute`` and ``serve``.

Per call: validate the sequences, sort them by length, pack them into batches under a token
budget (padded tokens count), run each teacher's decoder once per batch, and apply the LM head
only at the response positions (prompt positions never need logits), a chunk of positions at a
time. Each chunk's two ``[chunk, V]`` logit blocks go straight into the target math, so the
largest vocabulary-sized tensor alive is O(chunk x V) — never ``[batch, time, V]``. Records come
back in input order.

Because precompute and the server call the same :meth:`TeacherEngine.score`, they cannot
disagree: the float32 targets are rounded to the record's dtypes in exactly one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from causal_lm.head import Float32Head, response_hidden
from causal_lm.packed import choose_packing, pack_rows
from causal_lm.positions import response_coordinates
from storage.errors import ConfigError, UserError
from storage.packing import batch_plan
from storage.record import TargetRecord
from teacher_service.models import TeacherPair, describe
from teacher_service.targets import SparseTargets, TargetConfig, compute_targets


class InvalidSequenceError(UserError, ValueError):
    """A sequence the engine cannot score; ``index`` is its position in the request."""

    def __init__(self, index: int, message: str):
        super().__init__(f"sequences[{index}]: {message}")
        self.index = index


class SequenceTooLongError(InvalidSequenceError):
    """A sequence longer than the engine's ``max_seq_len`` (the server answers 413)."""


@dataclass(frozen=True)
class ScoreRequest:
    input_ids: Sequence[int]
    prompt_len: int
    example_index: int = -1


class TeacherEngine:
    """Scores (input_ids, prompt_len) sequences with the teacher pair into sparse-target records."""

    def __init__(self, pair: TeacherPair, config: TargetConfig, *, max_batch_tokens: int = 8192,
                 max_seq_len: int | None = None, packing: bool = False):
        if config.top_k > pair.vocab_size:
            raise ConfigError(f"--top-k {config.top_k} exceeds the vocabulary size "
                             f"{pair.vocab_size}")
        if max_batch_tokens < 2:
            raise ConfigError(f"--max-batch-tokens must be >= 2, got {max_batch_tokens}")
        model_max = getattr(pair.dpo.config, "max_position_embeddings", None)
        self.pair = pair
        self.config = config
        # Each head in float32 from the decoder's hidden states, whatever the decoder's dtype.
        self.dpo_head = Float32Head(pair.dpo, pair.vocab_size)
        self.other_head = Float32Head(pair.other, pair.vocab_size)
        self.max_batch_tokens = max_batch_tokens
        #: Padding-free forwards (only for models :func:`packing_check` passed).
        self.packing = packing
        self.max_seq_len = max_seq_len or model_max or 4096
        if model_max and self.max_seq_len > model_max:
            raise ConfigError(f"--max-seq-len {self.max_seq_len} exceeds the models' "
                             f"max_position_embeddings {model_max}")

    def info(self) -> dict[str, Any]:
        """What ``/v1/info`` reports and the store's metadata records: the models, the
        vocabulary and tokenizer, and every setting that shapes the targets."""
        c = self.config
        return {**describe(self.pair), "top_k": c.top_k, "r": c.r, "eps": c.eps,
                "tvd_norm": c.tvd_norm, "mode": c.mode, "beta0": c.beta0, "beta": c.beta,
                "dpo_top": c.dpo_top, "max_seq_len": self.max_seq_len}

    # ------------------------------------------------------------------ validation
    def validate(self, index: int, input_ids: Sequence[int], prompt_len: int) -> None:
        n = len(input_ids)
        if n < 2:
            raise InvalidSequenceError(index, f"input_ids has {n} token(s); need a prompt and a "
                                              f"response (>= 2)")
        if n > self.max_seq_len:
            raise SequenceTooLongError(index, f"input_ids has {n} tokens, over max_seq_len "
                                              f"{self.max_seq_len}")
        if not 1 <= prompt_len < n:
            raise InvalidSequenceError(index, f"prompt_len must satisfy 1 <= prompt_len < "
                                              f"len(input_ids) = {n}, got {prompt_len}")
        lo, hi = min(input_ids), max(input_ids)
        if lo < 0 or hi >= self.pair.vocab_size:
            bad = lo if lo < 0 else hi
            raise InvalidSequenceError(index, f"token id {bad} outside the vocabulary "
                                              f"[0, {self.pair.vocab_size})")

    # ------------------------------------------------------------------ scoring
    def score(self, requests: Sequence[ScoreRequest], *, top_k: int | None = None
              ) -> list[TargetRecord]:
        """Targets for every request, in input order. ``top_k`` (<= the engine's) truncates the
        top-k lists, folding the dropped entries into the tail mass exactly."""
        k = self.config.top_k if top_k is None else top_k
        if not 1 <= k <= self.config.top_k:
            raise ValueError(f"top_k must be in [1, {self.config.top_k}], got {k}")
        for i, req in enumerate(requests):
            self.validate(i, req.input_ids, req.prompt_len)
        results: list[TargetRecord | None] = [None] * len(requests)
        lengths = [len(r.input_ids) for r in requests]
        for members, rows in batch_plan(lengths, self.max_batch_tokens, packing=self.packing):
            for i, record in zip(members, self._score_batch([requests[i] for i in members], k,
                                                            rows)):
                results[i] = record
        return results  # type: ignore[return-value]

    @staticmethod
    def _layout(batch: list[ScoreRequest], rows: list[list[int]] | None):
        """``(input_ids, attention_mask, position_ids, rows, cols)`` of a batch: packed
        ``rows`` (``position_ids`` set, no mask for the model) or, without them, right-padded
        sequences (no ``position_ids``)."""
        lengths = [len(r.input_ids) for r in batch]
        prompt_lens = [r.prompt_len for r in batch]
        if rows is not None:
            packed = pack_rows([r.input_ids for r in batch], rows, pad_id=0)
            rows, cols = packed.response_coordinates(prompt_lens, lengths)
            return packed.input_ids, packed.token_mask, packed.position_ids, rows, cols
        ids = torch.zeros((len(batch), max(lengths)), dtype=torch.long)
        mask = torch.zeros((len(batch), max(lengths)), dtype=torch.long)
        for b, req in enumerate(batch):
            n = len(req.input_ids)
            ids[b, :n] = torch.as_tensor(req.input_ids, dtype=torch.long)
            mask[b, :n] = 1
        rows, cols = response_coordinates(lengths, prompt_lens)
        return ids, mask, None, rows, cols

    @torch.inference_mode()
    def _score_batch(self, batch: list[ScoreRequest], k: int,
                     packed_rows: list[list[int]] | None = None) -> list[TargetRecord]:
        device = self.pair.device
        ids, mask, positions, rows, cols = self._layout(batch, packed_rows)
        ids, mask = ids.to(device), mask.to(device)
        positions = positions.to(device) if positions is not None else None
        row_idx = torch.from_numpy(rows).to(device)
        col_idx = torch.from_numpy(cols).to(device)
        next_ids = ids[row_idx, col_idx + 1]

        hidden_dpo = response_hidden(self.pair.dpo, ids, mask, row_idx, col_idx, positions)
        hidden_other = response_hidden(self.pair.other, ids, mask, row_idx, col_idx, positions)
        parts: list[SparseTargets] = []
        chunk = self.config.chunk_size
        for start in range(0, hidden_dpo.shape[0], chunk):
            sl = slice(start, start + chunk)
            dpo_logits = self.dpo_head(hidden_dpo[sl])
            # the target math runs where the dpo teacher's head is (teachers may be split)
            parts.append(compute_targets(
                dpo_logits, self.other_head(hidden_other[sl]).to(dpo_logits.device),
                next_ids[sl].to(dpo_logits.device), self.config))
        targets = SparseTargets(*(torch.cat(field_parts).cpu() for field_parts in zip(*parts)))
        if k < self.config.top_k:
            targets = truncate_topk(targets, k)

        records = []
        offset = 0
        for req in batch:
            t = len(req.input_ids) - req.prompt_len
            sl = slice(offset, offset + t)
            offset += t
            records.append(TargetRecord.create(
                example_index=req.example_index,
                input_ids=list(req.input_ids), prompt_len=req.prompt_len,
                alpha=targets.alpha[sl].numpy(),
                topk_ids=targets.topk_ids[sl].numpy(),
                topk_logprobs=targets.topk_logprobs[sl].numpy(),
                tail_logmass=targets.tail_logmass[sl].numpy(),
                dpo_logprobs=targets.dpo_logprobs[sl].numpy(),
                reverse_logprobs=targets.reverse_logprobs[sl].numpy(),
            ))
        return records

def truncate_topk(targets: SparseTargets, k: int) -> SparseTargets:
    """Keep the first ``k`` entries; the dropped log-probs join the tail by a logsumexp. The
    entries are sorted by log pi* whatever ids were kept (``dpo_top``), so this keeps the ``k``
    with the highest log pi*: with ``dpo_top`` the dpo model's favourites are the first to go."""
    dropped = targets.topk_logprobs[:, k:]
    tail = torch.logsumexp(torch.cat([targets.tail_logmass[:, None], dropped], dim=1), dim=1)
    return targets._replace(topk_ids=targets.topk_ids[:, :k],
                            topk_logprobs=targets.topk_logprobs[:, :k], tail_logmass=tail)


def build_engine(options) -> TeacherEngine:
    """Load the teacher pair named by ``options`` (a :class:`~teacher_service.config.
    TeacherOptions`) and wrap it in the engine both ``serve`` and ``precompute`` use."""
    from teacher_service.models import load_teacher_pair
    from teacher_service.targets import TargetConfig

    target_config = TargetConfig(top_k=options.top_k, r=options.resolved_r(), eps=options.eps,
                                 tvd_norm=options.tvd_norm, mode=options.mode,
                                 beta0=options.beta0, beta=options.beta,
                                 chunk_size=options.chunk_size, dpo_top=options.dpo_top)
    pair = load_teacher_pair(options.dpo_model, options.other_model(), mode=options.mode,
                             device=options.device, dtype=options.dtype,
                             trust_remote_code=options.trust_remote_code,
                             dpo_devices=options.dpo_devices,
                             other_devices=options.reverse_devices,
                             attn_implementation=options.attn_implementation)
    max_seq_len = options.max_seq_len
    if max_seq_len is None and options.DEFAULT_MAX_SEQ_LEN is not None:
        model_max = getattr(pair.dpo.config, "max_position_embeddings", None)
        max_seq_len = min(options.DEFAULT_MAX_SEQ_LEN, model_max or options.DEFAULT_MAX_SEQ_LEN)
    return TeacherEngine(pair, target_config, max_batch_tokens=options.max_batch_tokens,
                         max_seq_len=max_seq_len,
                         packing=choose_packing(options.packing, pair.dpo, pair.other))

