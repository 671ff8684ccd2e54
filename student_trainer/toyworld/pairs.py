"""Preference pairs sampled from a model and labelled by the task's gold reward.

For every prompt, ``samples_per_prompt`` answers are sampled (temperature 1); the best and the
worst by gold reward become ``chosen`` and ``rejected``; prompts whose samples all score the same
give no pair. Rows are UltraFeedback-style, so the same reader a real run uses reads them:
``{"prompt", "chosen": [user, assistant], "rejected": [user, assistant], "score_chosen",
"score_rejected"}``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PairsConfig:
    model: str
    prompts: str
    out: str
    task: str = "sort"
    samples_per_prompt: int = 4
    max_new_tokens: int = 16
    batch_size: int = 256
    seed: int = 42
    device: str = "auto"


def run_pairs(config: PairsConfig) -> dict:
    from student_trainer.errors import ConfigError
    from student_trainer.evaluate import sample_answers

    from .task import TASKS, gold_reward

    if config.task not in TASKS:
        raise ConfigError(f"--task {config.task!r}: known tasks are {sorted(TASKS)}")
    if config.samples_per_prompt < 2:
        raise ConfigError("--samples-per-prompt must be at least 2 to form a pair")
    samples = sample_answers(config.model, config.prompts, n=config.samples_per_prompt,
                             max_new_tokens=config.max_new_tokens, batch_size=config.batch_size,
                             seed=config.seed, device=config.device)
    by_prompt: dict[int, list] = {}
    for s in samples:
        by_prompt.setdefault(s.prompt_index, [])
        if s.text.strip():  # an answer that is only <eos> cannot be a chat message
            by_prompt[s.prompt_index].append(s)
    rows, ties = [], 0
    for group in by_prompt.values():
        if len(group) < 2:
            ties += 1
            continue
        scored = sorted(((gold_reward(s.prompt, s.text), i, s) for i, s in enumerate(group)),
                        key=lambda x: (-x[0], x[1]))
        (best, _, win), (worst, _, lose) = scored[0], scored[-1]
        if best == worst:
            ties += 1
            continue
        user = {"role": "user", "content": win.prompt}
        rows.append({"prompt": win.prompt,
                     "chosen": [user, {"role": "assistant", "content": win.text}],
                     "rejected": [user, {"role": "assistant", "content": lose.text}],
                     "score_chosen": best, "score_rejected": worst})
    out = Path(config.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    with open(partial, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    os.replace(partial, out)  # a killed run never leaves a short file under the final name
    mean = sum(gold_reward(s.prompt, s.text) for s in samples) / max(1, len(samples))
    return {"pairs": len(rows), "prompts": len(by_prompt), "ties_skipped": ties,
            "samples": len(samples), "sample_gold_reward": round(mean, 4), "out": str(out)}
