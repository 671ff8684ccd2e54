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
    assert {"seed", "exact_gain", "k64_gain", "retained", "median_tail_mass"} <= set(result)
    assert result["seed"] == 3
    assert result["retained"] == pytest.approx(result["k64_gain"] / result["exact_gain"])
    assert 0 < result["median_tail_mass"] < 1
    seed = result["per_seed"][0]
    assert seed["runs"]["off-policy/exact"]["k"] == seed["vocab_size"] == 2008
    sft = seed["sft"]["gold_reward"]
    for name in ("off-policy/exact", "off-policy/k64-uniform"):
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
