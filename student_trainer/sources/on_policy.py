"""On-policy records: prompts -> responses sampled from the student -> the teacher server's
targets, step by step on the plan of :mod:`.plan`.

The source owns what it opens: :meth:`OnPolicySource.open` connects the teacher client, checks
the server's tokenizer against the student's, reads the prompts and starts the rollout backend;
:meth:`OnPolicySource.close` closes all of them (and the background thread, if any).
"""

from __future__ import annotations

import copy
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterator, Protocol, Sequence

import torch

from storage.datasets import data_source
from storage.record import TargetRecord
from student_trainer.sources.plan import (StepData, epoch_permutation, rank_block, step_range,
                                         steps_per_epoch)

log = logging.getLogger(__name__)


class RolloutBackend(Protocol):
    def sample(self, model: torch.nn.Module, prompts: Sequence[Sequence[int]], seed: int
               ) -> list[tuple[list[int], int]]: ...

    def close(self) -> None: ...


class Scorer(Protocol):
    def score(self, sequences: Sequence[tuple[Sequence[int], int]], *, top_k: int | None = None
              ) -> list[TargetRecord]: ...

    def close(self) -> None: ...


class OnPolicySource:
    """Prompts -> sampled responses (the student) -> teacher targets (the server).

    ``rollouts`` samples and ``scorer`` scores; this class decides what is generated when, and
    owns (closes) both. With ``async_rollouts`` the rollouts and scoring of step
    ``s + 1`` run in a background thread while step ``s`` trains, on a copy of the student
    holding the weights from before step ``s``'s update: the samples of step ``s + 1`` are one
    update stale (the usual price of pipelining; PPO-style trainers accept the same). Without
    it every step samples from the current weights.
    """

    def __init__(self, prompts: Sequence[Sequence[int]], *, model: torch.nn.Module,
                 rollouts: RolloutBackend | None, scorer: Scorer | None, seed: int,
                 top_k: int | None = None, rank: int = 0, world_size: int = 1,
                 async_rollouts: bool = False, eos_ids: set[int] | None = None,
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
        self.async_rollouts = async_rollouts
        #: --student-top: also score the sampling student's top N ids at each position
        self.student_top, self.pad_id, self.vocab_size = student_top, pad_id, vocab_size
        self.sharded_root = sharded_root
        self.candidate_batch_size = candidate_batch_size
        self._pool: ThreadPoolExecutor | None = None
        self._rollout_model: torch.nn.Module | None = None

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

    def _job(self, model, step: int, global_batch: int) -> StepData:
        epoch, prompts, size, filler = self.prompts_for(step, global_batch)
        t0 = time.perf_counter()
        sequences = self.rollouts.sample(
            model, prompts, (self.seed * 1_000_003 + step) * self.world_size + self.rank)
        t1 = time.perf_counter()
        timings = {"rollout_s": t1 - t0}
        if self.student_top:
            records, timings["candidates_s"] = self._score_with_candidates(model, sequences)
        else:
            records = self.scorer.score(sequences, top_k=self.top_k)
        t2 = time.perf_counter()
        timings["score_s"] = t2 - t1 - timings.get("candidates_s", 0.0)
        # Responses that hit --max-new-tokens (or the length limit) before an EOS.
        unfinished = 0 if filler else \
            sum(1 for ids, _ in sequences if not ids or ids[-1] not in self.eos_ids)
        return StepData(step, epoch, [] if filler else records, timings,
                        {"responses_without_eos": float(unfinished)}, step_sequences=size,
                        filler=records[0] if filler else None)

    def _score_with_candidates(self, model, sequences) -> tuple[list[TargetRecord], float]:
        """Score with the student's top ``student_top`` ids named per position, and merge them
        into each record (:mod:`student_trainer.candidates`); also the seconds the student's
        pass took."""
        from student_trainer.candidates import merge_candidates, student_top_ids

        t0 = time.perf_counter()
        sharded = self.sharded_root if model is self.model else None
        top = student_top_ids(model, sequences, self.student_top, pad_id=self.pad_id,
                              vocab_size=self.vocab_size, forward=sharded,
                              batch_size=self.candidate_batch_size)
        seconds = time.perf_counter() - t0
        scored = self.scorer.score_named([(ids, p, named) for (ids, p), named
                                          in zip(sequences, top)], top_k=self.top_k)
        return [merge_candidates(record, named, logprobs)
                for (record, logprobs), named in zip(scored, top)], seconds

    def iterate(self, start_step: int, total_steps: int, global_batch: int
                ) -> Iterator[StepData]:
        if not self.async_rollouts:
            for step in range(start_step, total_steps):
                yield self._job(self.model, step, global_batch)
            return
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout")
        future: Future | None = None
        for step in range(start_step, total_steps):
            if future is None:  # the first step has nothing in flight
                self._sync_rollout_model()
                future = self._pool.submit(self._job, self._rollout_model, step, global_batch)
            data = future.result()
            future = None
            if step + 1 < total_steps:
                # Weights now are those before this step's update: step + 1 samples from them.
                self._sync_rollout_model()
                future = self._pool.submit(self._job, self._rollout_model, step + 1,
                                           global_batch)
            yield data

    def _sync_rollout_model(self) -> None:
        """Copy the student's current weights into the rollout copy (made on first use)."""
        with torch.no_grad():
            if self._rollout_model is None:
                self._rollout_model = copy.deepcopy(self.model).eval().requires_grad_(False)
                return
            for dst, src in zip(self._rollout_model.state_dict().values(),
                                self.model.state_dict().values()):
                dst.copy_(src)

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
             distributed: bool, sharded_root: torch.nn.Module | None = None
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

            if distributed:
                raise ConfigError("--rollout-backend vllm runs one in-process engine and "
                                  "supports a single process only (vLLM creates and tears down "
                                  "the default torch.distributed group the DDP ranks share); "
                                  "use --rollout-backend hf with torchrun")
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

                rollouts = VLLMRollouts(config.model, tokenizer, rollout_config,
                                        max_seq_len=max_seq_len, seed=config.seed,
                                        trust_remote_code=config.trust_remote_code)
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
                   async_rollouts=config.async_rollouts,
                   eos_ids=eos_id_set(tokenizer.eos_token_id), prompts_truncated=len(cut),
                   teacher_info=info, student_top=config.student_top,
                   pad_id=pad_token_id(tokenizer), vocab_size=len(tokenizer),
                   sharded_root=sharded_root, candidate_batch_size=config.rollout_batch_size)

