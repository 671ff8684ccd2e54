"""Rollouts and eval sample exactly from pi_theta (DESIGN §2): the user's settings and nothing
from the model's ``generation_config.json``.

The model here ships the kind of generation config chat models do (temperature 0.2, top_k 3,
repetition penalty 2.0). The first response token is sampled thousands of times; its frequencies
must match the softmax of the model's own logits (a chi-square test at p = 1e-4). The same test
run on ``generate`` called the plain way (what the code did before) rejects, so it has the power
to tell.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from live_server import REPO
from student_trainer.rollout.hf_generate import RolloutConfig, generate_responses
from tiny_models import load, save_model_dir

N_SAMPLES = 3000
#: Words the model (seed 5) itself finds likely next, so that a repetition penalty on the
#: prompt's tokens (as in the model's generation_config.json) visibly distorts the first token.
PROMPT = [{"role": "user", "content": "96 37 which 84 16 31 what 6 1 61"}]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    from transformers import GenerationConfig

    path = save_model_dir(tmp_path_factory.mktemp("chat") / "model", seed=5)
    GenerationConfig(do_sample=True, temperature=0.2, top_k=3, top_p=0.8,
                     repetition_penalty=2.0, bos_token_id=2, eos_token_id=3,
                     pad_token_id=0).save_pretrained(path)
    tok, model = load(path)
    assert model.generation_config.temperature == 0.2  # the file is really there
    prompt = tok.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=True)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt])).logits[0, -1].double()
    return {"path": path, "tok": tok, "model": model, "prompt": list(prompt),
            "probs": torch.softmax(logits, -1).numpy()}


def test_the_prompt_holds_a_good_part_of_the_first_tokens_mass(chat_model):
    probs = chat_model["probs"]
    assert probs[sorted(set(chat_model["prompt"]))].sum() > 0.15


def chi_square_rejects(first_tokens: list[int], probs: np.ndarray, alpha_z: float = 3.719
                       ) -> tuple[bool, float, float]:
    """Pearson's test of the observed first tokens against ``probs``; cells with fewer than 5
    expected draws are pooled. The critical value (upper 1e-4 point, z = 3.719) is the
    Wilson-Hilferty approximation. Returns (rejects, statistic, critical value)."""
    n = len(first_tokens)
    observed = np.bincount(first_tokens, minlength=len(probs)).astype(np.float64)
    expected = n * probs
    big = expected >= 5
    obs = np.append(observed[big], observed[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    df = int(keep.sum()) - 1
    crit = df * (1 - 2 / (9 * df) + alpha_z * math.sqrt(2 / (9 * df))) ** 3
    return stat > crit, stat, crit


def test_hf_rollouts_sample_the_models_own_distribution(chat_model):
    tok, model = chat_model["tok"], chat_model["model"]
    results = generate_responses(
        model, [chat_model["prompt"]] * N_SAMPLES, pad_token_id=0, eos_token_id=tok.eos_token_id,
        config=RolloutConfig(max_new_tokens=1, batch_size=1000), seed=11)
    p = len(chat_model["prompt"])
    first = [seq[p] for seq, _ in results]
    rejects, stat, crit = chi_square_rejects(first, chat_model["probs"])
    assert not rejects, (stat, crit)
    assert model.generation_config.temperature == 0.2  # the model's own config is restored


def test_plain_generate_merges_the_models_generation_config_and_the_test_sees_it(chat_model):
    """What rollouts did before: ``generate`` with our kwargs fills every unset setting (here
    the repetition penalty) from generation_config.json; the chi-square test rejects it."""
    model, prompt = chat_model["model"], chat_model["prompt"]
    torch.manual_seed(11)
    ids = torch.tensor([prompt] * N_SAMPLES)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                         temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=1,
                         min_new_tokens=1, pad_token_id=0)
    rejects, stat, crit = chi_square_rejects(out[:, len(prompt)].tolist(), chat_model["probs"])
    assert rejects, (stat, crit)


def test_user_settings_are_applied_and_nothing_else(chat_model):
    """With --temperature 2 the frequencies match softmax(logits / 2), not the model's 0.2."""
    tok, model = chat_model["tok"], chat_model["model"]
    results = generate_responses(
        model, [chat_model["prompt"]] * N_SAMPLES, pad_token_id=0, eos_token_id=tok.eos_token_id,
        config=RolloutConfig(max_new_tokens=1, batch_size=1000, temperature=2.0), seed=12)
    p = len(chat_model["prompt"])
    probs = chat_model["probs"] ** 0.5
    probs /= probs.sum()
    first = [seq[p] for seq, _ in results]
    assert not chi_square_rejects(first, probs)[0]
    assert chi_square_rejects(first, chat_model["probs"])[0]


def test_eval_samples_out_follows_the_policy_and_records_every_sample(chat_model, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": PROMPT[0]["content"]}) + "\n")
    samples = tmp_path / "samples.jsonl"
    res = subprocess.run(
        [sys.executable, "-m", "aligndistil.cli", "eval", "--model", str(chat_model["path"]),
         "--prompts", str(prompts), "--samples-per-prompt", str(N_SAMPLES), "--max-new-tokens",
         "1", "--batch-size", "1000", "--device", "cpu", "--samples-out", str(samples)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    assert "temperature 1, top_p 1, top_k off" in res.stderr  # printed at the start
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(rows) == N_SAMPLES
    assert set(rows[0]) == {"prompt", "response", "response_ids"}
    assert all(r["prompt"] == PROMPT[0]["content"] for r in rows)
    rejects, stat, crit = chi_square_rejects([r["response_ids"][0] for r in rows],
                                             chat_model["probs"])
    assert not rejects, (stat, crit)
    assert json.loads(res.stdout)["sampling"]["temperature"] == 1.0
