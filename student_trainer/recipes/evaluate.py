"""``aligndistil eval``: sample a model on held-out prompts and measure it.

For every prompt, ``n`` answers are sampled at temperature 1 (the policy itself, as RLHF
measures it). Reported, averaged over the samples:

- ``gold_reward``: the task's exact reward, when the prompts belong to a known task (``--task``);
- ``contrastive_reward``: the token-averaged DPO contrastive reward
  ``beta0 * mean_t (log pi_dpo(y_t) - log pi_reverse(y_t))`` from a running teacher server;
- ``kl_to_dpo``: per-token KL(pi_model || pi_dpo), estimated on the samples as
  ``mean_t (log pi_model(y_t) - log pi_dpo(y_t))`` (unbiased, since the samples come from
  pi_model);
- ``kl_to_dpo_per_sequence``: the same summed over each response (the paper's Table 3 unit);
- ``kl_to_teacher``: per-token ``KL(pi_model || pi*)`` over the whole vocabulary at every
  sampled position, against the server's top-k of log pi* with the uniform tail: the exact
  AlignDistil objective on held-out samples when the server's ``top_k`` is the vocabulary size
  (``teacher_exact``);
- ``mean_response_length``: response tokens, EOS included.

Sampling uses exactly ``--temperature`` / ``--top-p`` / ``--sampling-top-k`` (default: the
model's own distribution) and nothing from the model's ``generation_config.json``;
``--samples-out FILE`` writes every sample (JSONL).

The teacher is reached only over HTTP (:class:`student_trainer.client.TeacherClient`); the task's
gold reward comes from the registry (:mod:`student_trainer.tasks`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from causal_lm.head import head_logits, response_hidden
from storage.datasets import data_source
from storage.fsio import atomic_write_text
from student_trainer.collate import collate_records, collate_sequences
from student_trainer.recipes.configs import EvalConfig
from student_trainer.rollout.hf_generate import RolloutConfig
from student_trainer.sampling import Sample, sample_answers


@torch.no_grad()
def response_logprobs(model, samples: list[Sample], pad_id: int, batch_size: int,
                      vocab_size: int, records: list | None = None
                      ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Log-probs of each sample's response tokens under ``model`` (float32, CPU): the decoder
    and LM head at the response rows only (:mod:`causal_lm`), as the teachers compute theirs.
    With the teacher's ``records`` for the samples, also each position's
    ``KL(model || pi*)`` against their top-k with the uniform tail (exact when k = V).
    Returns ``(log-probs, KLs)``, one tensor per sample each (KLs empty without records)."""
    from student_trainer.losses import sparse_reverse_kl

    device = next(model.parameters()).device
    logprobs, kls = [], []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        lengths = [len(s.response_ids) for s in chunk]
        batch = collate_sequences([(s.prompt_ids + s.response_ids, len(s.prompt_ids))
                                   for s in chunk], pad_id).to(device)
        hidden = response_hidden(model, batch.input_ids, batch.attention_mask, batch.row_idx,
                                 batch.col_idx)
        logits = head_logits(model, hidden, vocab_size).float()
        logp = torch.log_softmax(logits, dim=-1)
        picked = logp.gather(-1, batch.target_ids[:, None])[:, 0].cpu()
        logprobs.extend(torch.split(picked, lengths))
        if records is not None:
            targets = collate_records(records[start:start + batch_size], pad_id).to(device)
            kl = sparse_reverse_kl(logits, targets.topk_ids, targets.topk_logprobs,
                                   targets.tail_logmass, topk_count=targets.topk_count)
            kls.extend(torch.split(kl.cpu(), lengths))
    return logprobs, kls


def run_eval(config: EvalConfig) -> dict:
    from causal_lm.loading import load_model_and_tokenizer, pad_token_id, resolve_device
    from storage.tokenization import tokenizer_sha256
    from student_trainer.client import TeacherClient
    from student_trainer.tasks import get_task

    config.validate()
    task = get_task(config.task) if config.task is not None else None
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    model, tokenizer = load_model_and_tokenizer(config.model,
                                                device=resolve_device(config.device),
                                                attn_implementation=config.attn_implementation)
    sampling = RolloutConfig(max_new_tokens=config.max_new_tokens, batch_size=config.batch_size,
                             temperature=config.temperature, top_p=config.top_p,
                             top_k=config.sampling_top_k)
    prompts = data_source(config.prompts, split=config.split, config_name=config.data_config,
                          flag="--prompts")
    samples = sample_answers(config.model, prompts, n=config.samples_per_prompt,
                             sampling=sampling, seed=config.seed, loaded=(model, tokenizer))
    result: dict = {"model": str(config.model), "prompts": str(prompts),
                    "num_prompts": len({s.prompt_index for s in samples}),
                    "samples": len(samples), "seed": config.seed,
                    "mean_response_length": _mean([len(s.response_ids) for s in samples])}
    rewards = [task.score(s.prompt, s.text, f"--prompts {config.prompts}") for s in samples] \
        if task else []
    if task is not None:
        result["task"] = config.task
        result["gold_reward"] = _mean(rewards)
        result["exact_match"] = _mean([float(r == 1.0) for r in rewards])
    if config.teacher_url:
        with TeacherClient(config.teacher_url, api_key=config.api_key) as client:
            info = client.check_compatible(tokenizer_sha256=tokenizer_sha256(tokenizer),
                                           vocab_size=len(tokenizer),
                                           student=f"--model {config.model}")
            records = client.score([(s.prompt_ids + s.response_ids, len(s.prompt_ids))
                                    for s in samples])
        own, to_teacher = response_logprobs(model, samples, pad_token_id(tokenizer),
                                            config.batch_size, len(tokenizer), records)
        contrast, kl, kl_seq = [], [], []
        for rec, mine in zip(records, own):
            dpo = torch.as_tensor(rec.dpo_logprobs, dtype=torch.float32)
            rev = torch.as_tensor(rec.reverse_logprobs, dtype=torch.float32)
            contrast.append(float(config.beta0 * (dpo - rev).mean()))
            kl.append(float((mine - dpo).mean()))
            kl_seq.append(float((mine - dpo).sum()))
        # kl_to_dpo: per token (mean over a response's tokens, then over samples);
        # kl_to_dpo_per_sequence: summed over each response (the paper's Table 3 unit).
        result.update(teacher_url=config.teacher_url, beta0=config.beta0,
                      contrastive_reward=_mean(contrast), kl_to_dpo=_mean(kl),
                      kl_to_dpo_per_sequence=_mean(kl_seq),
                      kl_to_teacher=_mean(float(t.mean()) for t in to_teacher if len(t)),
                      teacher_top_k=info.get("top_k"),
                      teacher_exact=info.get("top_k") == len(tokenizer)
                      and not info.get("tail_budget"))
    result["examples"] = [{"prompt": s.prompt, "response": s.text,
                           **({"gold_reward": reward} if task else {})}
                          for s, reward in zip(samples[:config.examples],
                                               rewards or [None] * config.examples)]
    result["sampling"] = {"temperature": sampling.temperature, "top_p": sampling.top_p,
                          "top_k": sampling.top_k, "max_new_tokens": sampling.max_new_tokens}
    result["seconds"] = round(time.perf_counter() - started, 2)
    if config.samples_out:
        Path(config.samples_out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(config.samples_out, "".join(
            json.dumps({"prompt": s.prompt, "response": s.text, "response_ids": s.response_ids,
                        **({"gold_reward": reward} if task else {})}) + "\n"
            for s, reward in zip(samples, rewards or [None] * len(samples))))
    if config.out:
        Path(config.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(config.out, json.dumps(result, indent=2) + "\n")
    return result


def _mean(values) -> float | None:
    values = list(values)
    return round(sum(values) / len(values), 6) if values else None
