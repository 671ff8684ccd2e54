"""Preference pairs sampled from a model and labelled by the task's gold reward.

For every prompt, ``samples_per_prompt`` answers are sampled (temperature 1); the best and the
worst by gold reward become ``chosen`` and ``rejected``; prompts whose samples all score the same
give no pair. Rows are UltraFeedback-style, so the same reader a real run uses reads them:
``{"prompt", "chosen": [user, assistant], "rejected": [user, assistant], "score_chosen",
"score_rejected"}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from storage.errors import ConfigError
from storage.fsio import atomic_write_text
from student_trainer.recipes.configs import SamplingOptions, check_sampling


@dataclass(kw_only=True)
class PairsConfig(SamplingOptions):
    """``aligndistil pairs``: preference pairs sampled from a model, labelled by a task."""
    model: Annotated[str, "the model to sample from"]
    prompts: Annotated[str, "JSONL/Parquet rows with 'prompt' or 'messages'"]
    out: Annotated[str, "the pairs file to write (JSONL)"]
    task: Annotated[str, "the registered task whose gold reward labels the pairs"] = "sort"
    samples_per_prompt: Annotated[int, "samples per prompt (the best and worst become a "
                                  "pair; at least 2)"] = 4
    max_new_tokens: Annotated[int, "longest sampled answer", ">=1"] = 16
    batch_size: Annotated[int, "prompts per generate call", ">=1"] = 256
    seed: Annotated[int, "sampling seed"] = 42
    device: Annotated[Literal["auto", "cpu", "cuda"], "where the model runs"] = "auto"

    def validate(self) -> None:
        if self.samples_per_prompt < 2:
            raise ConfigError("--samples-per-prompt must be at least 2 to form a pair")
        check_sampling(self)


def run_pairs(config: PairsConfig) -> dict:
    from student_trainer.rollout.hf_generate import RolloutConfig
    from student_trainer.sampling import sample_answers
    from student_trainer.tasks import get_task

    config.validate()
    task = get_task(config.task)
    where = f"--prompts {config.prompts}"
    samples = sample_answers(config.model, config.prompts, n=config.samples_per_prompt,
                             sampling=RolloutConfig(max_new_tokens=config.max_new_tokens,
                                                    batch_size=config.batch_size,
                                                    temperature=config.temperature,
                                                    top_p=config.top_p,
                                                    top_k=config.sampling_top_k),
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
        scored = sorted(((task.score(s.prompt, s.text, where), i, s) for i, s in enumerate(group)),
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
    # A killed run never leaves a short file under the final name.
    atomic_write_text(out, "".join(json.dumps(row) + "\n" for row in rows))
    mean = sum(task.score(s.prompt, s.text, where) for s in samples) / max(1, len(samples))
    return {"pairs": len(rows), "prompts": len(by_prompt), "ties_skipped": ties,
            "samples": len(samples), "sample_gold_reward": round(mean, 4), "out": str(out)}
