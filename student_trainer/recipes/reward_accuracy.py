"""``aligndistil reward-accuracy``: the paper's Table 2 — how often a reward ranks the chosen
response above the rejected one, on the pairs the teachers were trained on and on held-out
pairs.

Two rewards, from summed response log-probs (``sum_t``):

- the DPO reward ``beta0 * sum_t (log pi_dpo - log pi_ref)`` (the implicit reward of DPO);
- the contrastive reward ``beta0 * sum_t (log pi_dpo - log pi_rev)`` (AlignDistil's: the
  reverse-DPO model in place of the reference).

A pair counts as right when the reward of chosen is strictly higher; ties are counted apart.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from causal_lm.loading import load_model_and_tokenizer, pad_token_id, resolve_device
from storage.fsio import atomic_write_text
from storage.tokenization import tokenizer_sha256
from student_trainer.errors import TokenizerMismatch
from student_trainer.modeling import StudentForward
from student_trainer.preferences import load_pairs, pair_logprobs
from student_trainer.recipes.configs import RewardAccuracyConfig

ROLES = ("dpo", "reverse", "reference")


def rank_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> dict:
    """``{"accuracy", "correct", "ties", "pairs"}`` for per-pair rewards of chosen/rejected."""
    correct = int((chosen > rejected).sum())
    ties = int((chosen == rejected).sum())
    n = int(chosen.numel())
    return {"accuracy": correct / n if n else None, "correct": correct, "ties": ties,
            "pairs": n}


def run_reward_accuracy(config: RewardAccuracyConfig) -> dict:
    config.validate()
    started = time.perf_counter()
    device = resolve_device(config.device)
    paths = {"dpo": config.dpo_model, "reverse": config.reverse_model,
             "reference": config.reference_model}
    models, tokenizers = {}, {}
    for role, path in paths.items():
        models[role], tokenizers[role] = load_model_and_tokenizer(
            path, device=device, flag=f"--{role}-model",
            trust_remote_code=config.trust_remote_code,
            attn_implementation=config.attn_implementation)
    shas = {role: tokenizer_sha256(tok) for role, tok in tokenizers.items()}
    if len(set(shas.values())) != 1:
        raise TokenizerMismatch(f"the three models do not share a tokenizer: "
                                f"{ {r: s[:12] for r, s in shas.items()} }")
    tokenizer = tokenizers["dpo"]
    pad_id = pad_token_id(tokenizer)
    result: dict = {"models": paths, "beta0": config.beta0, "splits": {}}
    for split, data in (("train", config.train_pairs), ("test", config.test_pairs)):
        if not data:
            continue
        pairs = load_pairs(data, tokenizer, max_seq_len=config.max_seq_len)
        logp = {}
        for role in ROLES:
            forward = StudentForward(models[role], len(tokenizer))
            logp[role] = pair_logprobs(forward, pairs, pad_id=pad_id,
                                       max_tokens=config.max_tokens, device=device,
                                       desc=f"{split} {role}" if config.progress else None)
        dpo_c, dpo_r = logp["dpo"]
        result["splits"][split] = {
            "pairs_file": str(data),
            "dpo_reward": rank_accuracy(config.beta0 * (dpo_c - logp["reference"][0]),
                                        config.beta0 * (dpo_r - logp["reference"][1])),
            "contrastive_reward": rank_accuracy(config.beta0 * (dpo_c - logp["reverse"][0]),
                                                config.beta0 * (dpo_r - logp["reverse"][1])),
        }
    result["seconds"] = round(time.perf_counter() - started, 2)
    if config.out:
        Path(config.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(config.out, json.dumps(result, indent=2) + "\n")
    return result
