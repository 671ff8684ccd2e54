"""``benchmarks/gpu/run.sh --dry-run``: the GPU benchmark's every section on tiny shapes on the
CPU (about a minute), so the prepared GPU command cannot rot between GPU sessions. What is
checked is that it runs and reports, not what it finds (the numbers of a dry run mean nothing).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SECTIONS = ("setup", "load_teachers", "forward", "precompute", "target_math", "head_fp32",
            "score_student_records", "student", "server", "packing")


def test_the_gpu_benchmark_dry_run_measures_every_section(tmp_path):
    out = tmp_path / "gpu"
    r = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu" / "run.sh"), "--dry-run",
                        "--out", str(out), "--work", str(tmp_path / "models")],
                       capture_output=True, text=True, timeout=400, cwd=REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["dry_run"] and result["failed"] == {} and result["skipped"] == {}
    assert set(SECTIONS) <= set(result["section_seconds"])
    assert result["forward"]["tokens_per_s"] > 0
    pre = result["precompute"]
    assert all(pre[way]["tokens_per_s"] > 0 for way in ("padded", "packed", "naive"))
    # measured, not asserted: separate timings on a busy machine can put the share above 1
    share = result["target_math"]["math_share_of_precompute"]
    assert isinstance(share, float) and share == share and share != float("inf")
    student = result["student"]
    steps = [f"{loss}_{layout}" for loss in ("aligndistil", "sft_cross_entropy")
             for layout in ("packed", "padded")]
    assert all(student[s]["seconds"] > 0 and student[s]["micro_batches"] >= 1 for s in steps)
    # several micro-batches: the SFT baseline runs over the same token budget as AlignDistil
    assert student["sft_cross_entropy_padded"]["micro_batches"] == \
        student["aligndistil_padded"]["micro_batches"] > 1
    assert student["sft_cross_entropy_packed"]["micro_batches"] == \
        student["aligndistil_packed"]["micro_batches"]
    assert all(result["server"][c]["requests"] > 0 and result["server"][c]["errors"] == 0
               for c in ("1", "8", "32"))
    assert isinstance(result["server_log_tail"], str)
    packing = result["packing"]  # sdpa on the CPU: the FlashAttention-2 section's code path
    assert packing["attn_implementation"] == "sdpa" and isinstance(
        packing["packing_check"]["ok"], bool)
    hidden = packing["hidden_states"]
    assert hidden["response_positions"] > 0 and hidden["multi_row_micro_batches"] >= 1
    assert hidden["rows_with_several_sequences"] >= 1
    assert hidden["max_abs_diff"] >= 0 and hidden["max_rel_diff"] >= 0
    report = out.with_suffix(".md").read_text()
    assert "Dry run" in report and "## Server" in report and "## Packed vs padded" in report


def test_a_dry_run_writes_to_a_temporary_folder_unless_told_where():
    import importlib.util
    import shutil

    spec = importlib.util.spec_from_file_location(
        "gpu_bench", REPO / "benchmarks" / "gpu" / "gpu_bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    dry = Path(bench.parse_args(["--dry-run"]).out)
    try:
        assert REPO not in dry.parents and dry.parent.is_dir() and dry.name == "gpu"
    finally:
        shutil.rmtree(dry.parent)
    assert Path(bench.parse_args([]).out) == REPO / "benchmarks" / "results" / "gpu"
    assert bench.parse_args(["--dry-run", "--out", "/x/y"]).out == "/x/y"
