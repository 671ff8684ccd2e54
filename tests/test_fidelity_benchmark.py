"""``benchmarks/fidelity.py --quick``: one seed of exact (k = V) vs k = 64 AlignDistil in the
grammar world, through the real commands (about 5 minutes on 2 idle cores: opt-in, -m slow).

What is checked is that the benchmark measures, not what it finds: the JSON's fields, that the
exact run's store really holds the whole vocabulary, and that the numbers hang together.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.timeout(2400)  # ~5 min alone on 2 cores; over 20 under a load of 4
def test_quick_fidelity_writes_the_promised_json(tmp_path):
    out = tmp_path / "fid"
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "fidelity.py"), "--quick",
                        "--seed", "3", "--out", str(out)], capture_output=True, text=True,
                       timeout=2300, cwd=REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads((out / "fidelity.json").read_text())
    assert {"seed", "exact_gain", "k64_gain", "retained", "median_tail_mass", "default_gain",
            "default_retained", "default_kl_ratio", "default_bytes_per_token"} <= set(result)
    assert result["seed"] == 3
    assert result["retained"] == pytest.approx(result["k64_gain"] / result["exact_gain"])
    assert result["default_retained"] == pytest.approx(result["default_gain"]
                                                       / result["exact_gain"])
    exact_kl = result["per_seed"][0]["runs"]["off-policy/exact"]["kl_to_teacher"]
    default = result["per_seed"][0]["runs"]["off-policy/default"]
    assert result["default_kl_ratio"] == pytest.approx(default["kl_to_teacher"] / exact_kl)
    assert result["default_bytes_per_token"] > 0
    assert 0 < result["median_tail_mass"] < 1
    seed = result["per_seed"][0]
    assert seed["runs"]["off-policy/exact"]["k"] == seed["vocab_size"] == 2008
    sft = seed["sft"]["gold_reward"]
    for name in ("off-policy/exact", "off-policy/k64-uniform", "off-policy/default"):
        run = seed["runs"][name]
        assert run["gain"] == pytest.approx(run["gold_reward"] - sft)
        assert math.isfinite(run["kl_to_teacher"]) and run["kl_to_teacher"] >= 0
    # the exact store holds every id at every position: no tail
    from storage.store import TargetStore

    store = TargetStore.open(out / "work" / "seed3" / "store_kV")
    batch = store.load_shard(0)
    assert batch.topk_ids.shape[1] == 2008 and (batch.tail_logmass == -math.inf).all()
    assert (out / "fidelity_vs_k.png").stat().st_size > 0
    assert (out / "fidelity_training_curves.png").stat().st_size > 0


def test_figure2_counts_the_steps_to_each_baselines_final_reward(tmp_path):
    """paper_analyses' Figure 2 arithmetic on made-up curves (the runs themselves are the
    benchmark's): a baseline's final reward is the mean of its last 16 steps, and the count is
    the first step at which AlignDistil's trailing 8-step mean reaches it."""
    sys.path.insert(0, str(REPO))
    from benchmarks import paper_analyses as pa

    ours = [0.0] * 10 + [1.0] * 118           # the trailing mean reaches 0.5 at step 14
    never = [2.0] * 128                       # a baseline AlignDistil never reaches
    slow = [0.0] * 112 + [0.5] * 16           # final reward 0.5
    speed = pa.convergence({"aligndistil": ours, "reinforce-token": slow,
                            "reinforce-sentence": never}, "aligndistil")
    assert speed["reinforce-token"] == {"final": 0.5, "steps_to_reach": 14, "steps": 128,
                                        "fraction": 14 / 128}
    assert speed["reinforce-sentence"]["steps_to_reach"] is None
    assert pa.trailing_mean([1.0, 3.0, 5.0], 2) == [1.0, 2.0, 4.0]
    arms = {a.name: ours for a in pa.FIG2_ARMS}
    seed = {"seed": 0, "epochs": 4, "curves": arms,
            "eval": {a.name: {"gold_reward": 0.8, "kl_to_dpo_per_sequence": 0.5,
                              "kl_to_teacher": 0.1, "train_seconds": None}
                     for a in pa.FIG2_ARMS},
            "speed": {o: pa.convergence(arms, o) for o in ("aligndistil", "aligndistil-constant")}}
    text = pa.format_figure2([seed])
    assert "| reinforce-token@lr1e-3 |" in text and "of 128" in text
    assert pa.plot_figure2([seed], tmp_path / "f.png").stat().st_size > 0
