"""The fidelity world (``toyworld --world grammar``): the task's exact gold reward, its
demonstrations and prompts, and the built folder's tokenizer (2,008 tokens, ids round-trip)."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest

from aligndistil.worlds.toy.grammar import (CLASSES, LENGTH, STRAY, WORDS_PER_CLASS,
                                            GrammarTask, decoy, gold_reward, parse_prompt,
                                            successors, word, word_class)


def chain(start_cls: int, n: int) -> list[str]:
    """A chain of ``n`` good words."""
    out, cls = [], start_cls
    for i in range(n):
        cls = successors(cls)[0]
        out.append(word(cls, (7 * i) % WORDS_PER_CLASS))
    return out


def test_the_decoy_is_never_a_successor():
    for c in range(CLASSES):
        assert decoy(c) not in successors(c)


def test_gold_reward_counts_good_words_over_sixteen():
    prompt = f"continue w0000 {word(12, 3)}"
    assert parse_prompt(prompt) == 12
    good = chain(12, 16)
    assert gold_reward(prompt, " ".join(good)) == 1.0
    # one word from the decoy class: that word is wrong, and the chain goes on from it, so the
    # next one (a successor of the right class, not of the decoy's) is wrong too
    bad = good[:]
    bad[5] = word(decoy(word_class(good[4])), 0)
    assert gold_reward(prompt, " ".join(bad)) == pytest.approx(14 / 16)
    assert gold_reward(prompt, " ".join(good[:12])) == pytest.approx(12 / 16)  # 4 missing
    extra = good + [word(successors(word_class(good[-1]))[0], 0)]
    assert gold_reward(prompt, " ".join(extra)) == pytest.approx(16 / 17)  # one extra
    assert gold_reward(prompt, "") == 0.0
    assert gold_reward(prompt, " ".join(["hello"] + good[1:])) == pytest.approx(14 / 16)
    assert gold_reward(prompt, "w0050 " * 16) == 0.0  # word index 50 does not exist


@pytest.mark.parametrize("prompt", ["continue w0312", "sort 1 2", "continue w0000 x",
                                    "continue w0000 w0050"])
def test_a_prompt_from_another_task_is_refused(prompt):
    with pytest.raises(ValueError, match="not a grammar prompt"):
        gold_reward(prompt, "w0000")


def test_demonstrations_are_right_about_one_minus_the_noise():
    task, rng = GrammarTask(), random.Random(0)
    rewards = []
    for _ in range(2000):
        key = task.sample_key(rng)
        prompt = task.prompt(key)
        answer = task.demonstration(key, 0.2, rng)
        assert len(answer.split()) == LENGTH
        rewards.append(gold_reward(prompt, answer))
        assert gold_reward(prompt, task.reference(key)) == 1.0
        assert gold_reward(prompt, task.demonstration(key, 0.0, rng)) >= 1 - 2 * STRAY * LENGTH
    mean = sum(rewards) / len(rewards)
    # a noisy word is wrong; a stray word is wrong unless it lands in the successor class
    assert mean == pytest.approx(1 - 0.2 - STRAY * (1 - 1 / CLASSES), abs=0.01)


def test_the_built_world_has_a_2008_token_vocabulary_and_disjoint_eval_prompts(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "world"
    subprocess.run([sys.executable, "-m", "aligndistil.cli", "toyworld", "--world", "grammar",
                    "--out", str(out), "--demos", "300", "--train-prompts", "64",
                    "--eval-prompts", "16", "--hidden-size", "64", "--layers", "1"],
                   check=True, capture_output=True)
    tok = AutoTokenizer.from_pretrained(out / "init")
    model = AutoModelForCausalLM.from_pretrained(out / "init")
    assert len(tok) == model.config.vocab_size == 7 + 1 + CLASSES * WORDS_PER_CLASS
    demo = json.loads((out / "sft_demos.jsonl").read_text().splitlines()[0])
    text = demo["messages"][1]["content"]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == LENGTH and tok.unk_token_id not in ids and tok.decode(ids) == text
    evals = {json.loads(line)["prompt"] for line in (out / "prompts_eval.jsonl").open()}
    train = {json.loads(line)["prompt"] for line in (out / "prompts_train.jsonl").open()}
    demos = {json.loads(line)["messages"][0]["content"]
             for line in (out / "sft_demos.jsonl").open()}
    assert len(evals) == 16 and len(train) == 64
    assert not evals & train and not evals & demos


def test_more_prompts_than_the_world_has_is_a_clear_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "aligndistil.cli", "toyworld", "--out",
                        str(tmp_path / "w"), "--train-prompts", "2000000", "--eval-prompts", "1"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "exceed the" in r.stderr and "distinct prompts of --world sort" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "w").exists()
