"""On-policy rollouts: sample responses from the current student with Hugging Face ``generate``.

Sampling uses exactly the settings the user gave (default: temperature 1, no top-p, no top-k,
no repetition penalty: the student's own distribution, which the AlignDistil loss assumes) and
NOTHING from the model's ``generation_config.json``. Hugging Face ``generate`` merges that file
into every call (chat models ship temperature 0.7, top_p 0.8, top_k 20 and a repetition
penalty there, and ``generate`` itself defaults to top_k 50), so each call here passes a
complete neutral :class:`~transformers.GenerationConfig` and hides the model's own while it
runs. No other logits processor is active: not even a minimum length, so a response may be a
lone EOS, exactly as often as the policy says. A response ends at the first EOS (kept: the
student learns to stop) or after ``max_new_tokens``.

Prompts of different lengths are LEFT-padded for one batched ``generate`` call, and the
padding is stripped again, so each result is exactly ``prompt ids + response ids`` with
``prompt_len = len(prompt ids)``: the pair the teacher server scores.

Each call draws from its own seeded generator state (``seed``), so a resumed run samples the
same responses as an uninterrupted one, and the global RNG the training step uses is left
untouched.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Sequence

import torch

from causal_lm.packed import flash_precision
from student_trainer.distributed import max_over_group


@dataclass(frozen=True)
class RolloutConfig:
    max_new_tokens: int = 256
    temperature: float = 1.0
    batch_size: int = 32  #: prompts per ``generate`` call
    top_p: float = 1.0    #: 1: no nucleus cut
    top_k: int = 0        #: 0: no top-k cut

    def describe(self) -> str:
        """The sampling settings in words, for the start of a run's log."""
        return (f"sampling: temperature {self.temperature:g}, top_p {self.top_p:g}, top_k "
                f"{self.top_k or 'off'}, no repetition penalty, no other logits processor; the "
                f"model's generation_config.json is not used")

    @property
    def is_policy(self) -> bool:
        """Whether the samples come from the policy itself (what the loss assumes)."""
        return self.temperature == 1.0 and self.top_p >= 1.0 and not self.top_k

    def validate(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (sampling), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: off), got {self.top_k}")


def neutral_generation_config(config: RolloutConfig, *, max_new_tokens: int, pad_token_id: int,
                              eos_ids: set[int]):
    """A complete :class:`~transformers.GenerationConfig` for plain sampling with ``config``'s
    settings: every logits-processor field at its neutral value, so none is filled in from a
    model's ``generation_config.json``."""
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=True, num_beams=1, temperature=config.temperature, top_p=config.top_p,
        top_k=config.top_k, min_p=None, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0,
        repetition_penalty=1.0, encoder_repetition_penalty=1.0, no_repeat_ngram_size=0,
        encoder_no_repeat_ngram_size=0, bad_words_ids=None, sequence_bias=None,
        suppress_tokens=None, begin_suppress_tokens=None, forced_bos_token_id=None,
        forced_eos_token_id=None, exponential_decay_length_penalty=None, min_length=0,
        min_new_tokens=None, max_new_tokens=max_new_tokens, renormalize_logits=False,
        remove_invalid_values=False, guidance_scale=None, watermarking_config=None,
        pad_token_id=pad_token_id, eos_token_id=sorted(eos_ids) if eos_ids else None,
        use_cache=True)


@contextlib.contextmanager
def _model_generation_config_hidden(model):
    """Give ``model`` a fresh, empty generation config for the duration (restored after)."""
    from transformers import GenerationConfig

    saved = getattr(model, "generation_config", None)
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved


def generate_responses(model, prompts: Sequence[Sequence[int]], *, pad_token_id: int,
                       eos_token_id: int | Sequence[int] | None, config: RolloutConfig,
                       seed: int, max_seq_len: int | None = None, synced_gpus: bool = False,
                       calls: int | None = None) -> list[tuple[list[int], int]]:
    """Sample one response per prompt: ``[(prompt + response ids, len(prompt)), ...]``.

    ``model`` is a plain Hugging Face causal LM (not a DDP wrapper); it is put in eval mode for
    the call and restored afterwards. ``synced_gpus``: every rank runs ``generate``'s forward
    passes until all ranks are done (FSDP-sharded layers gather their weights in each forward,
    a collective); a rank that finished early draws nothing more, so its samples are those of
    an unsynced call. ``calls``: run ``generate`` this many times (every rank as many), the
    calls beyond this rank's own chunks on its first prompt, their samples dropped.
    """
    config.validate()
    eos_ids = eos_id_set(eos_token_id)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    results: list[tuple[list[int], int]] = []
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(seed)
            starts = range(0, len(prompts), config.batch_size)
            for start in starts:
                chunk = [list(map(int, p)) for p in prompts[start:start + config.batch_size]]
                results.extend(_generate_chunk(model, chunk, pad_token_id, eos_ids, config,
                                               device, max_seq_len, synced_gpus))
            for _ in range((calls or 0) - len(starts)):  # keep step with the other ranks
                _generate_chunk(model, [list(map(int, prompts[0]))], pad_token_id, eos_ids,
                                config, device, max_seq_len, synced_gpus)
    finally:
        model.train(was_training)
    return results


def _generate_chunk(model, prompts, pad_id, eos_ids, config, device, max_seq_len, synced_gpus):
    longest = max(len(p) for p in prompts)
    new_tokens = config.max_new_tokens
    if max_seq_len is not None:
        new_tokens = min(new_tokens, max_seq_len - longest)
        if new_tokens < 1:
            raise ValueError(f"a prompt of {longest} tokens leaves no room for a response "
                             f"under max_seq_len {max_seq_len}")
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, longest - len(p):] = 1
    settings = neutral_generation_config(config, max_new_tokens=new_tokens, pad_token_id=pad_id,
                                         eos_ids=eos_ids)
    with _model_generation_config_hidden(model), flash_precision(model):
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             generation_config=settings, synced_gpus=synced_gpus)
    generated = out[:, longest:].tolist()
    results = []
    for prompt, response in zip(prompts, generated):
        results.append((prompt + cut_at_eos(response, eos_ids), len(prompt)))
    return results


def cut_at_eos(tokens: list[int], eos_ids: set[int]) -> list[int]:
    """The response up to and including its first EOS (``generate`` pads after it)."""
    for i, t in enumerate(tokens):
        if t in eos_ids:
            return tokens[:i + 1]
    return tokens


def eos_id_set(eos) -> set[int]:
    """A tokenizer's ``eos_token_id`` (an id, a list of ids, or None) as a set."""
    if eos is None:
        return set()
    if isinstance(eos, int):
        return {eos}
    return {int(e) for e in eos}


class HFRollouts:
    """The ``hf`` rollout backend: :func:`generate_responses` with fixed settings."""

    def __init__(self, config: RolloutConfig, *, pad_token_id: int,
                 eos_token_id: int | Sequence[int] | None, max_seq_len: int | None = None,
                 sharded_root: torch.nn.Module | None = None, gathered: bool = False):
        self.config = config
        self.pad_token_id, self.eos_token_id = pad_token_id, eos_token_id
        self.max_seq_len = max_seq_len
        #: ``--strategy fsdp``: the root FSDP unit around the model. ``generate`` calls the
        #: model, never the root's forward, so the root's own parameters (embeddings, final
        #: norm, LM head) are gathered around the call; each decoder layer gathers its own in
        #: every forward (one all-gather per layer per new token), or, ``gathered``, every
        #: unit is gathered once for the whole call (the whole model on each rank meanwhile).
        self.sharded_root = sharded_root
        self.gathered = gathered

    def sample(self, model, prompts: Sequence[Sequence[int]], seed: int
               ) -> list[tuple[list[int], int]]:
        root = self.sharded_root
        if root is None:
            return self._generate(model, prompts, seed, synced_gpus=False)
        from torch.distributed.fsdp import FSDPModule

        units = [m for m in root.modules() if isinstance(m, FSDPModule)]
        if self.gathered:
            root.set_reshard_after_forward(False)  # every unit stays gathered between forwards
        for unit in (units if self.gathered else [root]):
            unit.unshard()
        try:
            # gathered: no forward runs a collective, so the ranks need not step together;
            # per-layer: every rank makes as many generate calls (blocks may differ by one)
            if self.gathered:
                return self._generate(model, prompts, seed, synced_gpus=False)
            calls = max_over_group(math.ceil(len(prompts) / self.config.batch_size))
            return self._generate(model, prompts, seed, synced_gpus=True, calls=calls)
        finally:
            for unit in (units if self.gathered else [root]):
                unit.reshard()
            if self.gathered:  # back to FSDP's defaults: layers reshard, the root does not
                root.set_reshard_after_forward(True)
                root.set_reshard_after_forward(False, recurse=False)

    def _generate(self, model, prompts, seed, *, synced_gpus: bool, calls: int | None = None):
        return generate_responses(model, prompts, pad_token_id=self.pad_token_id,
                                  eos_token_id=self.eos_token_id, config=self.config, seed=seed,
                                  max_seq_len=self.max_seq_len, synced_gpus=synced_gpus,
                                  calls=calls)

    def close(self) -> None:
        pass
