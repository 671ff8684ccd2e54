"""``aligndistil eval``: sample a model on held-out prompts and measure it.

For every prompt, ``n`` answers are sampled at temperature 1 (the policy itself, as RLHF
measures it). Reported, averaged over the samples:

- ``gold_reward``: the task's exact reward, when the prompts belong to a known task (``--task``);
- ``contrastive_reward``: the token-averaged DPO contrastive reward
  ``beta0 * mean_t (log pi_dpo(y_t) - log pi_reverse(y_t))`` from a running teacher server;
- ``kl_to_dpo``: per-token KL(pi_model || pi_dpo), estimated on the samples as
  ``mean_t (log pi_model(y_t) - log pi_dpo(y_t))`` (unbiased, since the samples come from
  pi_model);
- ``mean_response_length``: response tokens, EOS included.

The teacher is reached only over HTTP (:class:`student_trainer.client.TeacherClient`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Sample:
    prompt_index: int
    prompt: str              #: the user text of the prompt
    prompt_ids: list[int]
    response_ids: list[int]  #: EOS included when the model stopped
    text: str                #: the response decoded without special tokens


@dataclass(frozen=True)
class EvalConfig:
    model: str
    prompts: str
    out: str | None = None
    teacher_url: str | None = None
    api_key: str | None = None
    task: str | None = None
    samples_per_prompt: int = 1
    max_new_tokens: int = 64
    batch_size: int = 256
    beta0: float = 0.1
    seed: int = 1234
    device: str = "auto"
    examples: int = 5        #: how many samples to include verbatim in the JSON


def sample_answers(model_path: str, prompts_path: str, *, n: int, max_new_tokens: int,
                   batch_size: int, seed: int, device: str = "auto",
                   loaded=None) -> list[Sample]:
    """``n`` temperature-1 samples for every prompt row of ``prompts_path`` (seeded)."""
    from student_trainer.modeling import load_student, pad_token_id, resolve_device
    from student_trainer.prompts import prompt_ids, read_prompt_rows
    from student_trainer.rollout import RolloutConfig, generate_responses
    from student_trainer.toyworld.task import prompt_text

    if loaded is None:
        model, tokenizer = load_student(model_path, device=resolve_device(device))
    else:
        model, tokenizer = loaded
    rows = list(read_prompt_rows(prompts_path))
    ids = [prompt_ids(tokenizer, row, where) for where, row in rows]
    flat = [i for i in range(len(rows)) for _ in range(n)]
    results = generate_responses(
        model, [ids[i] for i in flat], pad_token_id=pad_token_id(tokenizer),
        eos_token_id=tokenizer.eos_token_id, seed=seed,
        config=RolloutConfig(max_new_tokens=max_new_tokens, batch_size=batch_size))
    samples = []
    for i, (seq, p) in zip(flat, results):
        response = list(seq[p:])
        samples.append(Sample(i, prompt_text(rows[i][1]), list(seq[:p]), response,
                              tokenizer.decode(response, skip_special_tokens=True).strip()))
    return samples


@torch.no_grad()
def response_logprobs(model, samples: list[Sample], pad_id: int, batch_size: int
                      ) -> list[torch.Tensor]:
    """Log-probs of each sample's response tokens under ``model`` (float32, CPU)."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        seqs = [s.prompt_ids + s.response_ids for s in chunk]
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, seq in enumerate(seqs):
            ids[r, :len(seq)] = torch.tensor(seq)
            mask[r, :len(seq)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        for r, s in enumerate(chunk):
            # Only this row's response positions go to float32: O(T x V) extra, not [B, L, V].
            p, t = len(s.prompt_ids), len(s.response_ids)
            rows = logits[r, p - 1:p - 1 + t].float()
            picked = rows.gather(-1, torch.tensor(s.response_ids, device=device)[:, None])[:, 0]
            out.append((picked - torch.logsumexp(rows, dim=-1)).cpu())
    return out


def run_eval(config: EvalConfig) -> dict:
    from storage.tokenization import tokenizer_sha256
    from student_trainer.client import TeacherClient
    from student_trainer.errors import ConfigError
    from student_trainer.modeling import load_student, pad_token_id, resolve_device
    from student_trainer.toyworld.task import gold_reward

    if config.task not in (None, "sort"):
        raise ConfigError(f"--task {config.task!r}: known tasks are ['sort']")
    if config.samples_per_prompt < 1:
        raise ConfigError("--samples-per-prompt must be at least 1")
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    model, tokenizer = load_student(config.model, device=resolve_device(config.device))
    model.eval()
    samples = sample_answers(config.model, config.prompts, n=config.samples_per_prompt,
                             max_new_tokens=config.max_new_tokens, batch_size=config.batch_size,
                             seed=config.seed, loaded=(model, tokenizer))
    result: dict = {"model": str(config.model), "prompts": str(config.prompts),
                    "num_prompts": len({s.prompt_index for s in samples}),
                    "samples": len(samples), "seed": config.seed,
                    "mean_response_length": _mean([len(s.response_ids) for s in samples])}
    if config.task is not None:
        rewards = [gold_reward(s.prompt, s.text) for s in samples]
        result["task"] = config.task
        result["gold_reward"] = _mean(rewards)
        result["exact_match"] = _mean([float(r == 1.0) for r in rewards])
    if config.teacher_url:
        own = response_logprobs(model, samples, pad_token_id(tokenizer), config.batch_size)
        with TeacherClient(config.teacher_url, api_key=config.api_key) as client:
            client.check_compatible(tokenizer_sha256=tokenizer_sha256(tokenizer),
                                    vocab_size=len(tokenizer))
            records = client.score([(s.prompt_ids + s.response_ids, len(s.prompt_ids))
                                    for s in samples])
        contrast, kl = [], []
        for rec, mine in zip(records, own):
            dpo = torch.as_tensor(rec.dpo_logprobs, dtype=torch.float32)
            rev = torch.as_tensor(rec.reverse_logprobs, dtype=torch.float32)
            contrast.append(float(config.beta0 * (dpo - rev).mean()))
            kl.append(float((mine - dpo).mean()))
        result.update(teacher_url=config.teacher_url, beta0=config.beta0,
                      contrastive_reward=_mean(contrast), kl_to_dpo=_mean(kl))
    result["examples"] = [{"prompt": s.prompt, "response": s.text,
                           **({"gold_reward": gold_reward(s.prompt, s.text)}
                              if config.task else {})}
                          for s in samples[:config.examples]]
    result["seconds"] = round(time.perf_counter() - started, 2)
    if config.out:
        Path(config.out).parent.mkdir(parents=True, exist_ok=True)
        Path(config.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def _mean(values) -> float | None:
    values = list(values)
    return round(sum(values) / len(values), 6) if values else None
