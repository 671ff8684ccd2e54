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

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from causal_lm.head import Float32Head, response_hidden
from causal_lm.packed import choose_packing, pack_rows
from causal_lm.positions import response_coordinates
from storage.errors import ConfigError, UserError
from storage.packing import batch_plan
from storage.record import TargetRecord
from teacher_service.models import TeacherPair, describe
from teacher_service.targets import (SparseTargets, TargetConfig, compute_targets,
                                     teacher_logprobs)


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
    #: ids whose log pi* the client wants at each response position: ``[T, m]`` ints, -1 for
    #: padding (:meth:`TeacherEngine.score_detailed` only)
    extra_ids: np.ndarray | None = None
    #: keep the last position's whole log pi* row (:attr:`PositionDetail.last_row`)
    keep_last_row: bool = False


@dataclass(frozen=True)
class PositionDetail:
    """Per response position of one sequence, beyond its record (for the scoring protocols):
    log pi* of the actual next token and its 1-based rank over the vocabulary, and log pi* at
    the ids the request named (``None`` without them; -inf where an id was padding)."""
    next_logprobs: np.ndarray            # float32 [T]
    next_ranks: np.ndarray               # int64 [T]
    extra_logprobs: np.ndarray | None    # float32 [T, m]
    topk_ids: np.ndarray                 # int64 [T, k] pi*'s own top-k (whatever dpo_top keeps)
    topk_logprobs: np.ndarray            # float32 [T, k] their log pi*, unrounded
    last_row: torch.Tensor | None = None  # float32 [V] log pi* at the last position, on request


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
                "dpo_top": c.dpo_top, "tail_budget": c.tail_budget, "min_k": c.min_k,
                "max_seq_len": self.max_seq_len}

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

    def validate_extra_ids(self, index: int, req: ScoreRequest) -> None:
        """``extra_ids``: one row per response position, ids in the vocabulary or -1."""
        named = req.extra_ids
        t = len(req.input_ids) - req.prompt_len
        if named.ndim != 2 or named.shape[0] != t:
            raise InvalidSequenceError(index, f"extra_ids has {named.shape[0]} rows; the "
                                              f"sequence has {t} response positions")
        if named.size and (named.min() < -1 or named.max() >= self.pair.vocab_size):
            bad = int(named.min()) if named.min() < -1 else int(named.max())
            raise InvalidSequenceError(index, f"extra_ids: token id {bad} outside the "
                                              f"vocabulary [0, {self.pair.vocab_size})")

    # ------------------------------------------------------------------ scoring
    def score(self, requests: Sequence[ScoreRequest], *, top_k: int | None = None
              ) -> list[TargetRecord]:
        """Targets for every request, in input order. ``top_k`` (<= the engine's) truncates the
        top-k lists, folding the dropped entries into the tail mass exactly."""
        return [record for record, _ in self._score(requests, top_k, detail=False)]

    def score_detailed(self, requests: Sequence[ScoreRequest], *, top_k: int | None = None
                       ) -> list[tuple[TargetRecord, PositionDetail]]:
        """As :meth:`score`, with each sequence's :class:`PositionDetail` (and log pi* at the
        requests' ``extra_ids``)."""
        return self._score(requests, top_k, detail=True)

    def _score(self, requests: Sequence[ScoreRequest], top_k: int | None, *, detail: bool
               ) -> list[tuple[TargetRecord, PositionDetail | None]]:
        k = self.config.top_k if top_k is None else top_k
        if not 1 <= k <= self.config.top_k:
            raise ValueError(f"top_k must be in [1, {self.config.top_k}], got {k}")
        for i, req in enumerate(requests):
            self.validate(i, req.input_ids, req.prompt_len)
            if req.extra_ids is not None:
                if not detail:
                    raise ValueError("extra_ids need score_detailed")
                self.validate_extra_ids(i, req)
        results: list[Any] = [None] * len(requests)
        lengths = [len(r.input_ids) for r in requests]
        for members, rows in batch_plan(lengths, self.max_batch_tokens, packing=self.packing):
            scored = self._score_batch([requests[i] for i in members], k, rows, detail)
            for i, result in zip(members, scored):
                results[i] = result
        return results

    @torch.inference_mode()
    def next_token_logprobs(self, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
        """log pi* ``[B, V]`` (float32, CPU) of the token after each sequence: what sampling a
        completion from the composite teacher draws from. Padded forwards of each teacher under
        the engine's token budget (no cache: each call scores the sequences afresh)."""
        out = torch.zeros((len(sequences), self.pair.vocab_size))
        for i, ids in enumerate(sequences):
            # a placeholder after the last token: its row is the distribution of the next one
            self.validate(i, [*ids, 0], len(ids))
        device = self.pair.device
        lengths = [len(s) + 1 for s in sequences]
        for members, _ in batch_plan(lengths, self.max_batch_tokens, packing=False):
            batch = [ScoreRequest([*sequences[i], 0], len(sequences[i])) for i in members]
            ids, mask, _, rows, cols = self._layout(batch, None)
            ids, mask = ids.to(device), mask.to(device)
            row_idx = torch.from_numpy(rows).to(device)
            col_idx = torch.from_numpy(cols).to(device)
            dpo = self.dpo_head(response_hidden(self.pair.dpo, ids, mask, row_idx, col_idx))
            other = self.other_head(response_hidden(self.pair.other, ids, mask, row_idx, col_idx))
            log_star, _ = teacher_logprobs(dpo, other.to(dpo.device), self.config)
            out[members] = log_star.float().cpu()
        return out

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
                     packed_rows: list[list[int]] | None = None, detail: bool = False
                     ) -> list[tuple[TargetRecord, PositionDetail | None]]:
        device = self.pair.device
        ids, mask, positions, rows, cols = self._layout(batch, packed_rows)
        ids, mask = ids.to(device), mask.to(device)
        positions = positions.to(device) if positions is not None else None
        row_idx = torch.from_numpy(rows).to(device)
        col_idx = torch.from_numpy(cols).to(device)
        next_ids = ids[row_idx, col_idx + 1]

        hidden_dpo = response_hidden(self.pair.dpo, ids, mask, row_idx, col_idx, positions)
        hidden_other = response_hidden(self.pair.other, ids, mask, row_idx, col_idx, positions)
        extra = _named_ids(batch) if detail else None
        last = None
        if detail and any(r.keep_last_row for r in batch):
            ends = np.cumsum([len(r.input_ids) - r.prompt_len for r in batch]) - 1
            last = torch.zeros(int(ends[-1]) + 1, dtype=torch.bool)
            last[[int(e) for e, r in zip(ends, batch) if r.keep_last_row]] = True
        parts: list[SparseTargets] = []
        chunk = self.config.chunk_size
        for start in range(0, hidden_dpo.shape[0], chunk):
            sl = slice(start, start + chunk)
            dpo_logits = self.dpo_head(hidden_dpo[sl])
            # the target math runs where the dpo teacher's head is (teachers may be split)
            parts.append(compute_targets(
                dpo_logits, self.other_head(hidden_other[sl]).to(dpo_logits.device),
                next_ids[sl].to(dpo_logits.device), self.config, detail=detail,
                extra_ids=extra[sl] if extra is not None else None,
                dense_rows=last[sl] if last is not None else None))
        targets = SparseTargets(*(torch.cat(field_parts).cpu() if field_parts[0] is not None
                                  else None for field_parts in zip(*parts)))
        if k < self.config.top_k:
            targets = truncate_topk(targets, k)

        results = []
        offset = 0
        rows = iter(targets.dense_logprobs.float()) if last is not None else iter(())
        for req in batch:
            t = len(req.input_ids) - req.prompt_len
            sl = slice(offset, offset + t)
            offset += t
            position_detail = None
            if detail:
                named = None
                if req.extra_ids is not None:
                    named = targets.extra_logprobs[sl, :req.extra_ids.shape[1]].float().numpy()
                position_detail = PositionDetail(
                    next_logprobs=targets.next_logprobs[sl].float().numpy(),
                    next_ranks=targets.next_ranks[sl].numpy(), extra_logprobs=named,
                    topk_ids=targets.pi_topk_ids[sl].numpy(),
                    topk_logprobs=targets.pi_topk_logprobs[sl].float().numpy(),
                    last_row=next(rows) if req.keep_last_row else None)
            results.append((TargetRecord.create(
                example_index=req.example_index,
                input_ids=list(req.input_ids), prompt_len=req.prompt_len,
                alpha=targets.alpha[sl].numpy(),
                topk_ids=targets.topk_ids[sl].numpy(),
                topk_logprobs=targets.topk_logprobs[sl].numpy(),
                tail_logmass=targets.tail_logmass[sl].numpy(),
                dpo_logprobs=targets.dpo_logprobs[sl].numpy(),
                reverse_logprobs=targets.reverse_logprobs[sl].numpy(),
                topk_count=targets.topk_count[sl].numpy(),
            ), position_detail))
        return results


def _named_ids(batch: list[ScoreRequest]) -> torch.Tensor | None:
    """The batch's ``extra_ids`` as one ``[positions, m]`` tensor in response-position order
    (-1 padded; rows of a request without any are all -1), or None when no request names ids."""
    widths = [r.extra_ids.shape[1] for r in batch if r.extra_ids is not None]
    if not widths:
        return None
    rows = []
    for req in batch:
        t = len(req.input_ids) - req.prompt_len
        block = np.full((t, max(widths)), -1, dtype=np.int64)
        if req.extra_ids is not None:
            block[:, :req.extra_ids.shape[1]] = req.extra_ids
        rows.append(block)
    return torch.from_numpy(np.concatenate(rows))

def truncate_topk(targets: SparseTargets, k: int) -> SparseTargets:
    """Keep the first ``k`` entries; the dropped log-probs join the tail by a logsumexp. The
    entries are sorted by log pi* whatever ids were kept (``dpo_top``), so this keeps the ``k``
    with the highest log pi*: with ``dpo_top`` the dpo model's favourites are the first to go."""
    count = targets.topk_count
    width = targets.topk_logprobs.shape[1]
    kept = torch.arange(width) < count.unsqueeze(-1)        # padding columns are not entries
    dropped = targets.topk_logprobs[:, k:].masked_fill(~kept[:, k:], -math.inf)
    tail = torch.logsumexp(torch.cat([targets.tail_logmass[:, None], dropped], dim=1), dim=1)
    truncated = targets._replace(topk_ids=targets.topk_ids[:, :k],
                                 topk_logprobs=targets.topk_logprobs[:, :k], tail_logmass=tail,
                                 topk_count=count.clamp(max=k))
    if targets.pi_topk_ids is not None:  # pi*'s own top-k, sorted: its first k are the top k
        truncated = truncated._replace(pi_topk_ids=targets.pi_topk_ids[:, :k],
                                       pi_topk_logprobs=targets.pi_topk_logprobs[:, :k])
    return truncated


def build_engine(options) -> TeacherEngine:
    """Load the teacher pair named by ``options`` (a :class:`~teacher_service.config.
    TeacherOptions`) and wrap it in the engine both ``serve`` and ``precompute`` use."""
    from teacher_service.models import load_teacher_pair
    from teacher_service.targets import TargetConfig

    target_config = TargetConfig(top_k=options.top_k, r=options.resolved_r(), eps=options.eps,
                                 tvd_norm=options.tvd_norm, mode=options.mode,
                                 beta0=options.beta0, beta=options.beta,
                                 chunk_size=options.chunk_size, dpo_top=options.dpo_top,
                                 tail_budget=options.tail_budget, min_k=options.min_k)
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

