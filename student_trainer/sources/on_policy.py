"""On-policy records: prompts -> responses sampled from the student -> the teacher server's
targets, step by step on the plan of :mod:`.plan`.

The source owns what it opens: :meth:`OnPolicySource.open` connects the teacher client, checks
the server's tokenizer against the student's, reads the prompts and starts the rollout backend;
:meth:`OnPolicySource.close` closes all of them (and the background thread, if any).

Staleness (``--max-staleness S``). Write ``w_j`` for the weights after ``j`` optimizer updates;
step ``t`` trains ``w_t``. With ``S = 0`` step ``t`` samples from ``w_t``. With ``S > 0`` the
rollouts and scoring of steps ``t + 1 .. t + S`` run in a background thread while step ``t``
trains: just before step ``t`` trains, step ``t + S`` is queued with a copy of ``w_t``, so it
samples from weights ``S`` updates old (the first ``S`` steps of a run sample from ``w_0``:
``min(t, S)`` old). Every step reports the staleness it trained on. A checkpoint keeps the
samples of the steps in flight, so a resumed run trains on what the uninterrupted one would.
"""

from __future__ import annotations

import copy
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator, Mapping, Protocol, Sequence

import numpy as np
import torch

from storage.datasets import data_source
from storage.record import TargetRecord
from student_trainer.rollout.weights import weights_snapshot
from student_trainer.sources.plan import (StepData, epoch_permutation, rank_block, step_range,
                                         steps_per_epoch)

log = logging.getLogger(__name__)


class RolloutBackend(Protocol):
    def sample(self, model: torch.nn.Module, prompts: Sequence[Sequence[int]], seed: int
               ) -> list[tuple[list[int], int]]: ...

    def close(self) -> None: ...


@dataclass
class Rollout:
    """What one rank sampled for one step: enough to score it again after a resume."""
    step: int
    sequences: list[tuple[list[int], int]]   #: (prompt + response ids, prompt length)
    candidates: list[np.ndarray] | None      #: --student-top: [T, N] ids per sequence
    filler: bool                             #: this rank has no prompt in the step
    staleness: int                           #: updates between the sampling and trained weights

    def to_state(self) -> dict:
        """Plain types and tensors (checkpoints load with ``weights_only=True``)."""
        return {"sequences": [[list(map(int, ids)), int(p)] for ids, p in self.sequences],
                "candidates": None if self.candidates is None else
                [torch.from_numpy(np.asarray(c, dtype=np.int32)) for c in self.candidates],
                "filler": self.filler, "staleness": self.staleness}


class Scorer(Protocol):
    def score(self, sequences: Sequence[tuple[Sequence[int], int]], *, top_k: int | None = None
              ) -> list[TargetRecord]: ...

    def close(self) -> None: ...


class OnPolicySource:
    """Prompts -> sampled responses (the student) -> teacher targets (the server).

    ``rollouts`` samples and ``scorer`` scores; this class decides what is generated when, and
    owns (closes) both. ``max_staleness``: see the module docstring. A backend that keeps its
    own copy of the weights (vLLM: ``sync_weights``) is handed a snapshot of the student's
    weights per queued step; the HF backend samples from a copy of the student that the
    background thread loads each snapshot into.
    """

    def __init__(self, prompts: Sequence[Sequence[int]], *, model: torch.nn.Module,
                 rollouts: RolloutBackend | None, scorer: Scorer | None, seed: int,
                 top_k: int | None = None, rank: int = 0, world_size: int = 1,
                 max_staleness: int = 0, eos_ids: set[int] | None = None,
                 prompts_truncated: int = 0, teacher_info: dict | None = None,
                 student_top: int = 0, pad_id: int = 0, vocab_size: int | None = None,
                 sharded_root: torch.nn.Module | None = None, candidate_batch_size: int = 32):
        self.prompts = [list(p) for p in prompts]
        self.model = model
        self.rollouts, self.scorer, self.top_k = rollouts, scorer, top_k
        self.eos_ids = set(eos_ids or ())
        self.prompts_truncated = prompts_truncated  #: prompts cut to --max-prompt-len
        self.teacher_info = teacher_info or {}      #: the server's /v1/info
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.records_per_epoch = len(self.prompts)
        if self.records_per_epoch < 1:
            raise ValueError("no prompts")
        self.max_staleness = int(max_staleness)
        #: the backend holds its own weights, loaded before each rollout (vLLM)
        self.engine_weights = hasattr(rollouts, "sync_weights")
        #: --student-top: also score the sampling student's top N ids at each position
        self.student_top, self.pad_id, self.vocab_size = student_top, pad_id, vocab_size
        self.sharded_root = sharded_root
        self.candidate_batch_size = candidate_batch_size
        self._pool: ThreadPoolExecutor | None = None
        self._rollout_model: torch.nn.Module | None = None
        self._pending: dict[int, Future] = {}
        #: steps whose samples a checkpoint kept (resume): scored again, not sampled
        self._restored: dict[int, Rollout] = {}

    def steps_per_epoch(self, global_batch: int) -> int:
        return steps_per_epoch(self.records_per_epoch, global_batch)

    def prompts_for(self, step: int, global_batch: int) -> tuple[int, list[list[int]], int, bool]:
        """``(epoch, this rank's prompts, the step's prompts over all ranks, filler)``: the
        step's prompts are the same for any number of ranks (:mod:`.plan`); a rank with none
        gets the step's first prompt as a filler, trained with weight 0."""
        epoch, start, stop = step_range(step, self.records_per_epoch, global_batch)
        order = epoch_permutation(len(self.prompts), self.seed, epoch)
        lo, hi = rank_block(start, stop, self.rank, self.world_size)
        filler = hi == lo
        chosen = order[start:start + 1] if filler else order[lo:hi]
        return epoch, [self.prompts[i] for i in chosen], stop - start, filler

    # ------------------------------------------------------------------ one step
    def _job(self, weights, step: int, global_batch: int, staleness: int,
             sync_s: float = 0.0) -> StepData:
        """Sample step ``step`` from ``weights`` (the live student, or a snapshot of its state
        dict) and score it; ``sync_s``: seconds already spent copying the weights."""
        timings = {"weight_sync_s": sync_s}
        rollout = self._restored.pop(step, None)
        if rollout is None:
            rollout = self._sample(weights, step, global_batch, staleness, timings)
        else:  # sampled before the resume: nothing to sample now
            timings["rollout_s"] = 0.0
        return self._score(rollout, step, global_batch, timings)

    def _sample(self, weights, step: int, global_batch: int, staleness: int,
                timings: dict[str, float]) -> Rollout:
        _, prompts, _, filler = self.prompts_for(step, global_batch)
        seed = (self.seed * 1_000_003 + step) * self.world_size + self.rank
        t0 = time.perf_counter()
        if self.engine_weights:
            self.rollouts.sync_weights(weights)
        elif isinstance(weights, Mapping):  # a snapshot: into the background thread's copy
            self._rollout_model.load_state_dict(weights)
        t1 = time.perf_counter()
        timings["weight_sync_s"] += t1 - t0
        #: the HF backend's sampling model: the live student, or the copy holding the snapshot
        model = self._rollout_model if isinstance(weights, Mapping) else weights
        candidates = None
        if self.student_top and hasattr(self.rollouts, "generate_with_top_ids"):
            # vLLM ranks the ids while sampling: --student-top's candidates cost no pass
            sequences, candidates = self.rollouts.generate_with_top_ids(prompts, seed,
                                                                        self.student_top)
        elif self.engine_weights:
            sequences = self.rollouts.generate(prompts, seed)
        else:
            sequences = self.rollouts.sample(model, prompts, seed)
        timings["rollout_s"] = time.perf_counter() - t1
        if self.student_top and candidates is None:
            from student_trainer.candidates import student_top_ids

            t2 = time.perf_counter()
            sharded = self.sharded_root if model is self.model else None
            candidates = student_top_ids(model, sequences, self.student_top,
                                         pad_id=self.pad_id, vocab_size=self.vocab_size,
                                         forward=sharded, batch_size=self.candidate_batch_size)
            timings["candidates_s"] = time.perf_counter() - t2
        return Rollout(step, sequences, candidates, filler, staleness)

    def _score(self, rollout: Rollout, step: int, global_batch: int,
               timings: dict[str, float]) -> StepData:
        epoch, prompts, size, filler = self.prompts_for(step, global_batch)
        sequences = rollout.sequences
        t0 = time.perf_counter()
        if rollout.candidates is not None:
            from student_trainer.candidates import merge_candidates

            scored = self.scorer.score_named(
                [(ids, p, named) for (ids, p), named in zip(sequences, rollout.candidates)],
                top_k=self.top_k)
            records = [merge_candidates(record, named, logprobs)
                       for (record, logprobs), named in zip(scored, rollout.candidates)]
        else:
            records = self.scorer.score(sequences, top_k=self.top_k)
        timings["score_s"] = time.perf_counter() - t0
        # Responses that hit --max-new-tokens (or the length limit) before an EOS.
        unfinished = 0 if filler else \
            sum(1 for ids, _ in sequences if not ids or ids[-1] not in self.eos_ids)
        return StepData(step, epoch, [] if filler else records, timings,
                        {"responses_without_eos": float(unfinished)}, step_sequences=size,
                        filler=records[0] if filler else None, staleness=rollout.staleness,
                        rollout=rollout)

    # ------------------------------------------------------------------ the steps
    def iterate(self, start_step: int, total_steps: int, global_batch: int
                ) -> Iterator[StepData]:
        S = self.max_staleness
        if S == 0:
            for step in range(start_step, total_steps):
                yield self._job(self.model, step, global_batch, 0)
            return
        device = self._device()
        # a new thread's current CUDA device is 0: the rank's own GPU for the engine's calls
        self._pool = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="rollout",
            initializer=torch.cuda.set_device if device.type == "cuda" else None,
            initargs=(device,) if device.type == "cuda" else ())
        # Fill the pipeline: steps the checkpoint kept are scored again; the others (a fresh
        # run's first S steps) sample from the weights now.
        for step in range(start_step, min(start_step + S, total_steps)):
            stale = self._restored[step].staleness if step in self._restored else \
                step - start_step
            if step not in self._restored and start_step > 0:
                log.warning("step %d: its samples were not in the checkpoint; it samples "
                            "from the resumed weights (%d updates old)", step, stale)
            self._queue(step, global_batch, stale)
        for step in range(start_step, total_steps):
            data = self._pending.pop(step).result()
            if step + S < total_steps:  # sampled from the weights step `step` trains: w_step
                self._queue(step + S, global_batch, S)
            yield data

    def _queue(self, step: int, global_batch: int, staleness: int) -> None:
        """Queue step ``step``'s job with a snapshot of the student's weights now."""
        t0 = time.perf_counter()
        if self._rollout_model is None and not self.engine_weights:
            with torch.no_grad():
                self._rollout_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        snapshot = None if step in self._restored else weights_snapshot(
            self.model, device="cpu" if self.engine_weights else self._device())
        self._pending[step] = self._pool.submit(self._job, snapshot, step, global_batch,
                                                staleness, time.perf_counter() - t0)

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ checkpoints
    def in_flight(self) -> dict[int, dict]:
        """This rank's samples of the steps queued but not trained yet, for a checkpoint
        (waits for them to be sampled and scored: a save drains the pipeline). A step whose
        job failed is left out (a resume restores a step only if every rank kept it)."""
        kept = {}
        for step, future in sorted(self._pending.items()):
            try:
                kept[step] = future.result().rollout.to_state()
            except Exception as exc:  # e.g. the teacher gave up: that step samples again
                log.warning("step %d in flight is not kept by the checkpoint (%s)", step, exc)
        return kept

    def restore_in_flight(self, saved: list[dict[int, dict]], global_batch: int) -> None:
        """Take back the samples a checkpoint kept (``saved``: every rank's :meth:`in_flight`,
        in rank order). On another number of ranks a step's sequences are split again: they
        are the step's prompts in order, each rank's block contiguous (:mod:`.plan`)."""
        steps = sorted({step for by_rank in saved for step in by_rank})
        for step in steps:
            parts = [by_rank.get(step) for by_rank in saved]
            if any(p is None for p in parts):
                continue
            if len(saved) == self.world_size:
                mine = parts[self.rank]
                self._restored[step] = _rollout_from_state(step, mine)
                continue
            _, prompts, _, filler = self.prompts_for(step, global_batch)
            whole = [p for p in parts if not p["filler"]]
            sequences = [seq for p in whole for seq in p["sequences"]]
            candidates = None if any(p["candidates"] is None for p in whole) else \
                [c for p in whole for c in p["candidates"]]
            epoch, start, stop = step_range(step, self.records_per_epoch, global_batch)
            lo, hi = rank_block(start, stop, self.rank, self.world_size)
            if filler:  # a filler runs the step's first sequence with weight 0
                lo, hi = start, start + 1
            # Every rank restores the same steps: one that sampled instead would gather weights
            # for its snapshot (a collective under FSDP) that the others never join.
            self._restored[step] = _rollout_from_state(step, {
                "sequences": sequences[lo - start:hi - start],
                "candidates": None if candidates is None else candidates[lo - start:hi - start],
                "filler": filler, "staleness": whole[0]["staleness"]})

    def close(self) -> None:
        """Stop the background thread, then close the rollout backend and the client."""
        try:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
                self._pool = None
        finally:
            try:
                if self.rollouts is not None:
                    self.rollouts.close()
            finally:
                if self.scorer is not None:
                    self.scorer.close()

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, config, *, model: torch.nn.Module, tokenizer, rank: int, world_size: int,
             sharded_root: torch.nn.Module | None = None
             ) -> "OnPolicySource":
        """The source for a :class:`~student_trainer.recipes.configs.TrainConfig`: the client
        (checked against the student's tokenizer), the prompts, the rollout backend
        (``sharded_root``: the FSDP root around ``model``, gathered for sampling)."""
        from causal_lm.loading import pad_token_id
        from storage.tokenization import tokenizer_sha256
        from student_trainer.client import RetryPolicy, TeacherClient
        from student_trainer.errors import ConfigError
        from student_trainer.prompts import load_prompts
        from student_trainer.rollout.hf_generate import HFRollouts, RolloutConfig, eos_id_set

        if config.rollout_backend == "vllm":
            from student_trainer.rollout.vllm_engine import require_vllm

            require_vllm()  # a missing extra fails before the first request
        client = TeacherClient(config.teacher_url, api_key=config.api_key,
                               timeout=config.request_timeout,
                               retry=RetryPolicy(max_retries=config.max_retries))
        try:
            info = client.check_compatible(tokenizer_sha256=tokenizer_sha256(tokenizer),
                                           vocab_size=len(tokenizer),
                                           student=f"--model {config.model}")
            served = info.get("max_seq_len")
            if config.max_seq_len and served and config.max_seq_len > served:
                raise ConfigError(f"--max-seq-len {config.max_seq_len} exceeds the teacher "
                                  f"servers' max_seq_len {served}: every sequence longer than "
                                  f"that would be refused (413); use at most {served}")
            if config.student_top and config.student_top > int(info.get("top_k", 0)):
                raise ConfigError(f"--student-top {config.student_top} exceeds the teacher "
                                  f"servers' top_k {info.get('top_k')}: a server scores at "
                                  f"most that many named ids per position")
            max_seq_len = config.max_seq_len or served
            max_prompt_len = config.max_prompt_len
            if max_seq_len:  # leave room for at least one response token
                max_prompt_len = min(max_prompt_len, max_seq_len - 1)
            cut: list[int] = []
            source = data_source(config.prompts, split=config.split,
                                 config_name=config.data_config, flag="--prompts")
            prompts = load_prompts(source, tokenizer, max_prompt_len=max_prompt_len,
                                   on_truncate=cut.append)
            if cut:
                log.warning("%d of %d prompts were longer than %d tokens and keep their last %d "
                            "(the longest had %d)", len(cut), len(prompts), max_prompt_len,
                            max_prompt_len, max(cut))
            rollout_config = RolloutConfig(max_new_tokens=config.max_new_tokens,
                                           batch_size=config.rollout_batch_size,
                                           temperature=config.temperature, top_p=config.top_p,
                                           top_k=config.sampling_top_k)
            rollout_config.validate()
            log.info("rollouts (%s): %s", config.rollout_backend, rollout_config.describe())
            if not rollout_config.is_policy:
                log.warning("the samples do not come from the student's own distribution "
                            "(temperature %g, top_p %g, top_k %s): the AlignDistil loss assumes "
                            "they do", rollout_config.temperature, rollout_config.top_p,
                            rollout_config.top_k or "off")
            if config.rollout_backend == "vllm":
                from student_trainer.rollout.vllm_engine import VLLMRollouts

                # under torchrun: one engine per rank, in torchrun's process group
                rollouts = VLLMRollouts(config.model, tokenizer, rollout_config,
                                        max_seq_len=max_seq_len, seed=config.seed,
                                        trust_remote_code=config.trust_remote_code,
                                        max_logprobs=config.student_top,
                                        gpu_memory_utilization=config.vllm_gpu_memory,
                                        sleep=config.vllm_sleep)
            else:
                rollouts = HFRollouts(rollout_config, pad_token_id=pad_token_id(tokenizer),
                                      eos_token_id=tokenizer.eos_token_id,
                                      max_seq_len=max_seq_len, sharded_root=sharded_root,
                                      gathered=config.fsdp_sampling == "gathered")
        except BaseException:
            client.close()
            raise
        return cls(prompts, model=model, rollouts=rollouts, scorer=client, seed=config.seed,
                   top_k=config.top_k, rank=rank, world_size=world_size,
                   max_staleness=config.staleness,
                   eos_ids=eos_id_set(tokenizer.eos_token_id), prompts_truncated=len(cut),
                   teacher_info=info, student_top=config.student_top,
                   pad_id=pad_token_id(tokenizer), vocab_size=len(tokenizer),
                   sharded_root=sharded_root, candidate_batch_size=config.rollout_batch_size)



def _rollout_from_state(step: int, state: dict) -> Rollout:
    candidates = state.get("candidates")
    return Rollout(step, [(list(ids), int(p)) for ids, p in state["sequences"]],
                   None if candidates is None else [np.asarray(c, dtype=np.int64)
                                                    for c in candidates],
                   bool(state["filler"]), int(state["staleness"]))
