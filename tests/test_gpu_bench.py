"""``benchmarks/gpu/run.sh --dry-run``: the GPU benchmark's every section on tiny shapes on the
CPU (about a minute), so the prepared GPU command cannot rot between GPU sessions. What is
checked is that it runs and reports, not what it finds (the numbers of a dry run mean nothing).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SECTIONS = ("forward", "precompute", "target_math", "head_fp32", "student", "server")


def test_the_gpu_benchmark_dry_run_measures_every_section(tmp_path):
    out = tmp_path / "gpu"
    r = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu" / "run.sh"), "--dry-run",
                        "--out", str(out), "--work", str(tmp_path / "models")],
                       capture_output=True, text=True, timeout=400, cwd=REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["dry_run"] and result["failed"] == {}
    assert set(SECTIONS) <= set(result["section_seconds"])
    assert result["forward"]["tokens_per_s"] > 0
    pre = result["precompute"]
    assert all(pre[way]["tokens_per_s"] > 0 for way in ("padded", "packed", "naive"))
    assert 0 < result["target_math"]["math_share_of_precompute"] < 1
    student = result["student"]
    assert {"aligndistil_packed", "aligndistil_padded", "sft_cross_entropy"} <= set(student)
    assert all(result["server"][c]["requests"] > 0 and result["server"][c]["errors"] == 0
               for c in ("1", "8", "32"))
    report = out.with_suffix(".md").read_text()
    assert "Dry run" in report and "## Server" in report
