"""``aligndistil dpo``: the dpo teacher learns to prefer the chosen answers, the reverse teacher
(``--reverse``) the rejected ones. Measured independently with plain HF forwards."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from aligndistil.cli import main
from tiny_models import load, save_model_dir
from storage.datasets import read_examples
from storage.tokenization import tokenize_example
from student_trainer.recipes.dpo import dpo_loss
from student_trainer.metrics import read_jsonl


def _write_prefs(path, n=24, seed=0):
    """Sort prompts; chosen = sorted numbers, rejected = a shuffle (UltraFeedback shape)."""
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for _ in range(n):
            nums = [rng.randrange(100) for _ in range(4)]
            prompt = "sort " + " ".join(map(str, nums))
            good = " ".join(map(str, sorted(nums)))
            bad = " ".join(map(str, rng.sample(nums, 4)))
            if bad == good:
                bad = " ".join(map(str, sorted(nums, reverse=True)))
            user = {"role": "user", "content": prompt}
            fh.write(json.dumps({"prompt": prompt,
                                 "chosen": [user, {"role": "assistant", "content": good}],
                                 "rejected": [user, {"role": "assistant", "content": bad}]})
                     + "\n")
    return path


def _logprob(model, ids, p) -> float:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits[p - 1:len(ids) - 1], -1)
    return float(logp.gather(-1, torch.tensor(ids[p:])[:, None]).sum())


def chosen_preferred_fraction(model_dir, prefs) -> float:
    """Fraction of pairs where the model gives the ORIGINAL chosen answer more likelihood."""
    tok, model = load(model_dir)
    wins = 0
    pairs = list(zip(read_examples(prefs, response_field="chosen"),
                     read_examples(prefs, response_field="rejected")))
    for c, r in pairs:
        wins += _logprob(model, *tokenize_example(tok, c)) > _logprob(model, *tokenize_example(tok, r))
    return wins / len(pairs)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    return root, save_model_dir(root / "base", seed=3), _write_prefs(root / "prefs.jsonl")


ARGS = ["--lr", "1e-3", "--batch-size", "8", "--max-tokens", "128", "--epochs", "3",
        "--no-progress", "--device", "cpu", "--log-level", "warning"]


def test_dpo_raises_and_reverse_dpo_lowers_preference_accuracy(setup):
    root, base, prefs = setup
    start = chosen_preferred_fraction(base, prefs)
    assert 0.2 < start < 0.8  # the random base model has no preference either way

    assert main(["dpo", "--model", str(base), "--data", str(prefs), "--out", str(root / "dpo"),
                 *ARGS]) == 0
    assert main(["dpo", "--model", str(base), "--data", str(prefs), "--out",
                 str(root / "reverse"), "--reverse", *ARGS]) == 0
    assert chosen_preferred_fraction(root / "dpo", prefs) >= 0.9
    assert chosen_preferred_fraction(root / "reverse", prefs) <= 0.1

    rows = read_jsonl(root / "dpo" / "metrics.jsonl")
    assert len(rows) == 9  # 24 pairs / 8 per step x 3 epochs
    # The reference is the initial model: the first step's policy equals it, loss = log 2.
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[-1]["loss"] < 0.5 and rows[-1]["preference_accuracy"] >= 0.75
    summary = json.loads((root / "reverse" / "dpo_summary.json").read_text())
    assert summary["reverse"] is True and summary["preference_accuracy"] >= 0.9
    assert (root / "dpo" / "model.safetensors").is_file()
    assert (root / "dpo" / "training_curves.png").is_file()


def test_dpo_loss_is_the_sigmoid_loss():
    pc, pr = torch.tensor([-3.0, -1.0]), torch.tensor([-2.0, -4.0])
    rc, rr = torch.tensor([-2.5, -2.0]), torch.tensor([-2.5, -2.0])
    loss, r_c, r_r = dpo_loss(pc, pr, rc, rr, beta=0.1)
    margin = 0.1 * ((pc - rc) - (pr - rr))
    assert torch.allclose(loss, torch.log1p(torch.exp(-margin)))
    assert torch.allclose(r_c, 0.1 * (pc - rc)) and torch.allclose(r_r, 0.1 * (pr - rr))


def test_dpo_refuses_rows_without_a_rejected_answer(setup, tmp_path, capsys):
    _, base, _ = setup
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "sort 1 2", "chosen": [
        {"role": "user", "content": "sort 1 2"}, {"role": "assistant", "content": "1 2"}]}) + "\n")
    assert main(["dpo", "--model", str(base), "--data", str(bad), "--out", str(tmp_path / "o"),
                 *ARGS]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err


@pytest.fixture(scope="module")
def teachers(setup):
    """The dpo and reverse teachers of the first test (trained here if it did not run)."""
    root, base, prefs = setup
    for name, extra in (("dpo", []), ("reverse", ["--reverse"])):
        if not (root / name / "model.safetensors").is_file():
            assert main(["dpo", "--model", str(base), "--data", str(prefs), "--out",
                         str(root / name), *extra, *ARGS]) == 0
    return root / "dpo", root / "reverse"


def test_reward_accuracy_counts_both_rewards_on_train_and_held_out_pairs(setup, teachers,
                                                                        tmp_path, capsys):
    """Table 2's two rewards, checked against plain HF forwards: the DPO reward beta0 *
    sum(log pi_dpo - log pi_ref) and the contrastive reward beta0 * sum(log pi_dpo -
    log pi_rev), each counted where chosen scores strictly higher."""
    root, base, prefs = setup
    held_out = _write_prefs(tmp_path / "held_out.jsonl", n=16, seed=7)
    out = tmp_path / "acc.json"
    assert main(["reward-accuracy", "--dpo-model", str(teachers[0]), "--reverse-model",
                 str(teachers[1]), "--reference-model", str(base), "--train-pairs", str(prefs),
                 "--test-pairs", str(held_out), "--device", "cpu", "--no-progress",
                 "--out", str(out), "--log-level", "warning"]) == 0
    result = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == result
    models = {name: load(path) for name, path in
              (("dpo", teachers[0]), ("reverse", teachers[1]), ("reference", base))}
    for split, path in (("train", prefs), ("test", held_out)):
        want = {"dpo_reward": 0, "contrastive_reward": 0}
        pairs = list(zip(read_examples(path, response_field="chosen"),
                         read_examples(path, response_field="rejected")))
        for c, r in pairs:
            lp = {name: [_logprob(model, *tokenize_example(tok, ex)) for ex in (c, r)]
                  for name, (tok, model) in models.items()}
            for key, other in (("dpo_reward", "reference"), ("contrastive_reward", "reverse")):
                chosen = 0.1 * (lp["dpo"][0] - lp[other][0])
                rejected = 0.1 * (lp["dpo"][1] - lp[other][1])
                want[key] += chosen > rejected
        got = result["splits"][split]
        for key in want:
            assert got[key]["pairs"] == len(pairs) and got[key]["correct"] == want[key], key
            assert got[key]["accuracy"] == pytest.approx(want[key] / len(pairs))
    # Trained on these pairs, both teachers separate them: the contrastive reward (dpo vs
    # reverse) ranks every training pair right.
    assert result["splits"]["train"]["contrastive_reward"]["accuracy"] == 1.0


def test_dpo_killed_and_resumed_gives_the_uninterrupted_weights(setup, tmp_path, capsys):
    """--save-every writes checkpoint-N/ (model, AdamW, schedule, RNG, the reference
    log-probs); a run SIGKILLed after step 2 and rerun with --resume ends at bitwise the weights
    of a run never interrupted (CPU, same thread count), every step logged once."""
    import os
    import signal
    import subprocess
    import sys
    
    from safetensors.torch import load_file

    from live_server import REPO

    _, model, prefs = setup

    def argv(out):
        return [sys.executable, "-m", "aligndistil.cli", "dpo", "--model",
                str(model), "--data", str(prefs), "--out", str(out),
                "--batch-size", "4", "--epochs", "2", "--lr", "1e-3", "--seed", "3",
                "--save-every", "1", "--save-total-limit", "2", "--device", "cpu",
                "--no-progress", "--report-to", "none", "--log-level", "warning"]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole = subprocess.run(argv(tmp_path / "whole"), cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-2000:]
    out = tmp_path / "killed"
    proc = subprocess.Popen(argv(out), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    from process_control import run_until

    run_until(proc, (out / "checkpoint-00000003" / "trainer_state.pt").exists, timeout=120,
              what="checkpoint 3")
    os.kill(proc.pid, signal.SIGKILL)  # stopped: it dies where it stands
    proc.wait()
    assert not (out / "model.safetensors").exists()
    resumed = subprocess.run([*argv(out), "--resume"], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    want = load_file(tmp_path / "whole" / "model.safetensors")
    got = load_file(out / "model.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    steps = [r["step"] for r in read_jsonl(out / "metrics.jsonl")]
    assert steps == sorted(set(steps)) and steps[-1] == len(read_jsonl(
        tmp_path / "whole" / "metrics.jsonl"))
    # a changed setting is refused on --resume, naming it
    assert main([*argv(out)[3:], "--resume", "--beta", "0.2"]) == 2
    assert "--beta 0.1 -> 0.2" in capsys.readouterr().err


def test_dpo_first_step_starts_at_log_2_in_float32_and_under_bf16_autocast(setup, tmp_path):
    """The policy starts as the reference, so step 1's loss is log 2 (margin 0). Under
    --bf16 on the reference log-probs are scored under the same autocast as the policy's: the
    margin stays within bf16 rounding of 0 instead of carrying a float32-vs-bf16 offset."""
    _, base, prefs = setup
    losses = {}
    for bf16 in ("off", "on"):
        out = tmp_path / bf16
        assert main(["dpo", "--model", str(base), "--data", str(prefs), "--out", str(out),
                     "--max-steps", "1", "--bf16", bf16, "--report-to", "none", *ARGS]) == 0
        losses[bf16] = read_jsonl(out / "metrics.jsonl")[0]
    assert abs(losses["off"]["loss"] - math.log(2)) < 1e-5
    assert abs(losses["off"]["reward_margin"]) < 1e-5
    assert abs(losses["on"]["loss"] - math.log(2)) < 5e-3
    # autocast did run: the gradient differs at bf16's precision
    assert 0 < abs(losses["on"]["grad_norm"] / losses["off"]["grad_norm"] - 1) < 0.05
