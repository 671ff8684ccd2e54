"""Samples for evaluation and for labelling pairs: ``n`` answers per prompt row.

Sampling uses exactly the given settings (default: the model's own distribution) and nothing
from the model's ``generation_config.json`` (see :mod:`student_trainer.rollout.hf_generate`);
each sample keeps its prompt row's user text, which is what a task's gold reward reads.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from student_trainer.rollout.hf_generate import RolloutConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    prompt_index: int
    prompt: str              #: the user text of the prompt
    prompt_ids: list[int]
    response_ids: list[int]  #: EOS included when the model stopped
    text: str                #: the response decoded without special tokens


def sample_answers(model_path: str, prompts_path: str, *, n: int, sampling: RolloutConfig,
                   seed: int, device: str = "auto", loaded=None) -> list[Sample]:
    """``n`` samples for every prompt row of ``prompts_path`` (seeded), with ``sampling``'s
    settings (``max_new_tokens``, ``batch_size`` prompts per call, temperature, top-p, top-k)."""
    from causal_lm.loading import load_model_and_tokenizer, pad_token_id, resolve_device
    from student_trainer.prompts import prompt_ids, prompt_text, read_prompt_rows
    from student_trainer.rollout.hf_generate import generate_responses

    sampling.validate()
    log.info(sampling.describe())

    if loaded is None:
        model, tokenizer = load_model_and_tokenizer(model_path, device=resolve_device(device))
    else:
        model, tokenizer = loaded
    rows = list(read_prompt_rows(prompts_path))
    ids = [prompt_ids(tokenizer, row, where) for where, row in rows]
    flat = [i for i in range(len(rows)) for _ in range(n)]
    results = generate_responses(
        model, [ids[i] for i in flat], pad_token_id=pad_token_id(tokenizer),
        eos_token_id=tokenizer.eos_token_id, seed=seed, config=sampling)
    samples = []
    for i, (seq, p) in zip(flat, results):
        response = list(seq[p:])
        samples.append(Sample(i, prompt_text(rows[i][1]), list(seq[:p]), response,
                              tokenizer.decode(response, skip_special_tokens=True).strip()))
    return samples
