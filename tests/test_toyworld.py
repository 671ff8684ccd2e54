"""The toy world's parts: the task's gold reward, the saved tokenizer and model folder, the data
files (read by the same readers a real run uses), and the ``sft``/``pairs``/``eval`` CLIs on it.

The whole pipeline end to end is tests/test_demo.py.
"""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from storage.datasets import read_examples
from storage.tokenization import tokenize_example
from aligndistil.worlds.toy.build import WorldConfig, build_world
from aligndistil.worlds.toy.task import (SortTask, gold_reward, make_prompt, parse_prompt,
                                         target_answer)


# ------------------------------------------------------------------------------ the task
@pytest.mark.parametrize("answer, expected", [
    ("2 7 15", 1.0),          # exact
    ("2 7 14", 2 / 3),        # one wrong token
    ("7 2 15", 1 / 3),        # two swapped: both positions wrong
    ("2 7", 2 / 3),           # one missing
    ("2 7 15 15", 3 / 4),     # one extra costs 1/len too
    ("", 0.0),
    ("two seven fifteen", 0.0),
])
def test_gold_reward_counts_individual_tokens(answer, expected):
    assert gold_reward("sort 7 2 15", answer) == pytest.approx(expected)


def test_gold_reward_is_one_only_for_the_sorted_list():
    task, rng = SortTask(), random.Random(3)
    for _ in range(200):
        nums = task.sample_numbers(rng)
        prompt = make_prompt(nums)
        assert parse_prompt(prompt) == nums
        assert gold_reward(prompt, target_answer(nums)) == 1.0
        shuffled = nums[:]
        while shuffled == sorted(nums):
            rng.shuffle(shuffled)
        assert gold_reward(prompt, " ".join(map(str, shuffled))) < 1.0


def test_a_prompt_from_another_task_is_refused():
    with pytest.raises(ValueError, match="not a sort prompt"):
        gold_reward("reverse 1 2", "2 1")


# ------------------------------------------------------------------------------ the world
@pytest.fixture(scope="module")
def world(toy_world):
    return toy_world


def test_tokenizer_and_model_load_through_auto_classes_and_round_trip(world):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, paths = world
    tok = AutoTokenizer.from_pretrained(paths["model"])
    model = AutoModelForCausalLM.from_pretrained(paths["model"])
    assert (Path(paths["model"]) / "model.safetensors").exists()
    assert model.config.head_dim >= 32, "vLLM's CPU backend needs head dim >= 32"
    assert model.config.vocab_size == len(tok)
    text = "sort 13 0 17"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 4 and tok.unk_token_id not in ids
    assert tok.decode(ids) == text
    chat = tok.apply_chat_template([{"role": "user", "content": text}],
                                   add_generation_prompt=True, tokenize=False)
    assert chat == "<|user|> sort 13 0 17 <|assistant|> "


def test_world_files_are_read_by_the_real_readers_and_splits_are_disjoint(world):
    from transformers import AutoTokenizer

    out, paths = world
    tok = AutoTokenizer.from_pretrained(paths["model"])
    demos = list(read_examples(paths["demos"]))
    assert 250 <= len(demos) <= 300
    ids, p = tokenize_example(tok, demos[0])
    assert tok.decode(ids[p:], skip_special_tokens=True).strip() == demos[0].response
    assert ids[-1] == tok.eos_token_id, "the response must end with EOS so the model learns to stop"
    evals = [json.loads(line) for line in open(paths["prompts_eval"])]
    train = [json.loads(line) for line in open(paths["prompts_train"])]
    assert len(evals) == 16 and len(train) == 40
    held_out = {row["prompt"] for row in evals}
    assert not held_out & {row["prompt"] for row in train}
    assert not held_out & {d.prompt_messages[-1]["content"] for d in demos}
    for row in evals:
        assert row["reference"] == target_answer(parse_prompt(row["prompt"]))


def test_world_is_the_same_for_the_same_seed(world, tmp_path):
    out, paths = world
    again = build_world(WorldConfig(out=str(tmp_path), demos=300, train_prompts=40,
                                    eval_prompts=16))
    for key in ("demos", "prompts_train", "prompts_eval"):
        assert Path(paths[key]).read_bytes() == Path(again[key]).read_bytes(), key
    digest = lambda p: hashlib.sha256((Path(p) / "model.safetensors").read_bytes()).hexdigest()  # noqa: E731
    assert digest(paths["model"]) == digest(again["model"])


# ------------------------------------------------------------------------------ the CLIs
def _cli(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aligndistil.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=300, cwd=cwd,
                          env={**__import__("os").environ, "TQDM_DISABLE": "1"})


def test_sft_then_pairs_then_eval_through_the_cli(world, tmp_path):
    out, paths = world
    sft = _cli("sft", "--model", paths["model"], "--data", paths["demos"], "--out",
               tmp_path / "sft", "--lr", "3e-3", "--epochs", "2", "--batch-size", "32",
               "--no-progress")
    assert sft.returncode == 0, sft.stderr
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "sft" / "metrics.jsonl")]
    assert losses[-1] < losses[0] - 0.5, f"SFT did not learn: {losses[0]} -> {losses[-1]}"

    pairs = _cli("pairs", "--model", tmp_path / "sft", "--prompts", paths["prompts_train"],
                 "--out", tmp_path / "pairs.jsonl", "--samples-per-prompt", "4")
    assert pairs.returncode == 0, pairs.stderr
    summary = json.loads(pairs.stdout)
    rows = [json.loads(line) for line in open(tmp_path / "pairs.jsonl")]
    assert summary["pairs"] == len(rows) > 0
    for row in rows:
        assert row["score_chosen"] > row["score_rejected"]
        assert row["score_chosen"] == gold_reward(row["prompt"], row["chosen"][-1]["content"])
        assert row["score_rejected"] == gold_reward(row["prompt"], row["rejected"][-1]["content"])
    # UltraFeedback-style rows go through the same reader the precompute and dpo CLIs use.
    chosen = list(read_examples(tmp_path / "pairs.jsonl", response_field="chosen"))
    rejected = list(read_examples(tmp_path / "pairs.jsonl", response_field="rejected"))
    assert [e.response for e in chosen] == [r["chosen"][-1]["content"] for r in rows]
    assert [e.response for e in rejected] == [r["rejected"][-1]["content"] for r in rows]

    ev = _cli("eval", "--model", tmp_path / "sft", "--prompts", paths["prompts_eval"],
              "--task", "sort", "--samples-per-prompt", "2", "--max-new-tokens", "12",
              "--out", tmp_path / "eval.json")
    assert ev.returncode == 0, ev.stderr
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result == json.loads(ev.stdout)
    assert result["num_prompts"] == 16 and result["samples"] == 32
    assert 0.0 <= result["gold_reward"] <= 1.0 and 0.0 <= result["exact_match"] <= 1.0
    assert 1 <= result["mean_response_length"] <= 12
    assert "contrastive_reward" not in result, "no teacher server was given"
    for ex in result["examples"]:
        assert ex["gold_reward"] == gold_reward(ex["prompt"], ex["response"])


def test_eval_and_pairs_reject_bad_arguments_clearly(world, tmp_path):
    out, paths = world
    bad = _cli("pairs", "--model", paths["model"], "--prompts", paths["prompts_train"],
               "--out", tmp_path / "p.jsonl", "--samples-per-prompt", "1")
    assert bad.returncode == 2 and "--samples-per-prompt must be at least 2" in bad.stderr
    missing = _cli("eval", "--model", tmp_path / "nope", "--prompts", paths["prompts_eval"])
    assert missing.returncode == 2 and "nope" in missing.stderr
    assert not (tmp_path / "p.jsonl").exists()
