"""On-policy rollouts: sample responses from the current student with Hugging Face ``generate``.

Sampling is from the student's own distribution: temperature 1 and no top-k / top-p cut
(``generate``'s default top-k of 50 would silently sample from a truncated policy). A response
ends at the first EOS (kept: the student learns to stop) or after ``max_new_tokens``.

Prompts of different lengths are LEFT-padded for one batched ``generate`` call, and the
padding is stripped again, so each result is exactly ``prompt ids + response ids`` with
``prompt_len = len(prompt ids)``: the pair the teacher server scores.

Each call draws from its own seeded generator state (``seed``), so a resumed run samples the
same responses as an uninterrupted one, and the global RNG the training step uses is left
untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class RolloutConfig:
    max_new_tokens: int = 256
    temperature: float = 1.0
    batch_size: int = 32  #: prompts per ``generate`` call


def generate_responses(model, prompts: Sequence[Sequence[int]], *, pad_token_id: int,
                       eos_token_id: int | Sequence[int] | None, config: RolloutConfig,
                       seed: int, max_seq_len: int | None = None
                       ) -> list[tuple[list[int], int]]:
    """Sample one response per prompt: ``[(prompt + response ids, len(prompt)), ...]``.

    ``model`` is a plain Hugging Face causal LM (not a DDP wrapper); it is put in eval mode for
    the call and restored afterwards.
    """
    if config.temperature <= 0:
        raise ValueError(f"temperature must be > 0 (sampling), got {config.temperature}")
    eos_ids = _as_set(eos_token_id)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    results: list[tuple[list[int], int]] = []
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(seed)
            for start in range(0, len(prompts), config.batch_size):
                chunk = [list(map(int, p)) for p in prompts[start:start + config.batch_size]]
                results.extend(_generate_chunk(model, chunk, pad_token_id, eos_ids, config,
                                               device, max_seq_len))
    finally:
        model.train(was_training)
    return results


def _generate_chunk(model, prompts, pad_id, eos_ids, config, device, max_seq_len):
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
    out = model.generate(
        input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=True,
        temperature=config.temperature, top_k=0, top_p=1.0, max_new_tokens=new_tokens,
        min_new_tokens=1, pad_token_id=pad_id,
        eos_token_id=sorted(eos_ids) if eos_ids else None)
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


def _as_set(eos) -> set[int]:
    if eos is None:
        return set()
    if isinstance(eos, int):
        return {eos}
    return {int(e) for e in eos}


class HFRollouts:
    """The ``hf`` rollout backend: :func:`generate_responses` with fixed settings."""

    def __init__(self, config: RolloutConfig, *, pad_token_id: int,
                 eos_token_id: int | Sequence[int] | None, max_seq_len: int | None = None):
        self.config = config
        self.pad_token_id, self.eos_token_id = pad_token_id, eos_token_id
        self.max_seq_len = max_seq_len

    def sample(self, model, prompts: Sequence[Sequence[int]], seed: int
               ) -> list[tuple[list[int], int]]:
        return generate_responses(model, prompts, pad_token_id=self.pad_token_id,
                                  eos_token_id=self.eos_token_id, config=self.config, seed=seed,
                                  max_seq_len=self.max_seq_len)

    def close(self) -> None:
        pass
