"""``benchmarks/vs_trl.py``: the z* teacher it hands TRL, its batches, and (opt-in, ``-m trl``,
needs the ``bench`` extra) the whole benchmark on tiny models through real TRL and real
aligndistil commands.

What is checked is that the benchmark measures what it says, not what it finds.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from reference import dense_targets, full_logits
from tiny_models import load

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.vs_trl import ZStarTeacher, pad_batch, response_mask  # noqa: E402
from teacher_service.targets import TargetConfig  # noqa: E402


def test_the_wrapper_teacher_returns_log_pi_star_at_every_position(teacher_pair):
    """TRL softmaxes its teacher's logits: the wrapper's must be log pi* itself (normalised),
    equal to the independent float64 reference of eq. 17 on the two teachers' logits."""
    (_, dpo), (_, reverse) = (load(p) for p in teacher_pair)
    teacher = ZStarTeacher(dpo, reverse, TargetConfig(top_k=1, r=20.0))
    ids = [5, 9, 7, 3, 11, 4, 8]
    with torch.no_grad():
        log_star = teacher(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)).logits
    assert log_star.shape == (1, len(ids), dpo.config.vocab_size)
    assert torch.allclose(log_star.exp().sum(-1), torch.ones(1, len(ids)), atol=1e-5)
    ref = dense_targets(full_logits(dpo, ids), full_logits(reverse, ids), ids, top_k=1, r=20.0)
    np.testing.assert_allclose(log_star[0].double().numpy(), ref["log_pi"], atol=2e-5)
    assert teacher.config.vocab_size == dpo.config.vocab_size  # what GKDTrainer reads


def test_batches_mask_the_prompt_and_padding_and_left_pad_the_prompts():
    rows = [{"input_ids": [1, 2, 3, 4, 5], "prompt_len": 2},
            {"input_ids": [6, 7, 8], "prompt_len": 1}]
    b = pad_batch(rows, pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert b["labels"].tolist() == [[-100, -100, 3, 4, 5], [-100, 7, 8, -100, -100]]
    assert b["prompts"].tolist() == [[1, 2], [0, 6]]
    assert b["prompt_attention_mask"].tolist() == [[1, 1], [0, 1]]
    # logits position t predicts token t + 1: the response tokens, and nothing else
    assert response_mask(b["labels"]).tolist() == [[False, True, True, True],
                                                   [True, True, False, False]]


@pytest.mark.trl
@pytest.mark.timeout(900)
def test_the_benchmark_runs_every_system_and_writes_its_report(teacher_pair, tmp_path):
    pytest.importorskip("trl", reason="the trl marker needs the bench extra: "
                                      "pip install -e '.[bench]'")
    rng = np.random.default_rng(0)
    data = tmp_path / "data.jsonl"
    with data.open("w") as fh:
        for _ in range(12):
            p, n = int(rng.integers(2, 5)), int(rng.integers(3, 7))
            ids = rng.integers(4, 40, size=p + n).tolist()
            fh.write(json.dumps({"input_ids": ids, "prompt_len": p}) + "\n")
    out = tmp_path / "out"
    dpo, reverse = map(str, teacher_pair)
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "vs_trl.py"), "--name", "tiny",
                        "--student", dpo, "--dpo", dpo, "--reverse", reverse, "--data", str(data),
                        "--batch", "4", "--on-steps", "2", "--max-new-tokens", "6",
                        "--top-k", "8", "--workdir", str(tmp_path / "work"), "--out", str(out)],
                       capture_output=True, text=True, timeout=880, cwd=REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads((out / "vs_trl.json").read_text())["tiny"]
    assert result["rows"] == 12 and result["steps_per_epoch"] == 3
    for policy, steps in (("off_policy", 3), ("on_policy", 2)):
        for system in ("trl", "aligndistil", "exact"):
            row = result[policy][system]
            assert row["steps"] == steps, (policy, system)
            assert row["step_s_median"] > 0 and row["peak_rss_mib"] > 50
            assert row["response_tokens_per_s"] > 0
    # one epoch of the same sequences in every system (in its own order): the same response
    # tokens in all
    raw = result["raw"]["off_policy"]
    assert sum(raw["trl"]["response_tokens"]) == sum(raw["exact"]["response_tokens"]) \
        == sum(raw["aligndistil"]["response_tokens"])
    assert result["kl_check"]["abs_diff"] < 1e-5
    assert result["precompute"]["wall_s"] > 0 and result["payback"]["epochs"] > 0
    report = (out / "vs_trl.md").read_text()
    assert "## tiny" in report and "pays back after" in report
