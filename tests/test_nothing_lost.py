"""The rest of the "nothing lost" contract, with real processes and real files: resume means the
same run, partial data is loud, a server that cannot serve exits, secrets stay out of files,
and long work shows a total."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from aligndistil.cli import main
from live_server import REPO, start_server, stop_server
from tiny_models import build_tokenizer, save_model_dir
from trainer_support import dense_records, random_sequences, write_store

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def world(tmp_path_factory, teacher_pair):
    root = tmp_path_factory.mktemp("nothing_lost")
    tok = build_tokenizer()
    records, _ = dense_records(*teacher_pair, random_sequences(len(tok), 8, seed=4))
    store = write_store(root / "store", records, tok)
    student = save_model_dir(root / "student", seed=7)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"sort {i} 4 2"}) + "\n" for i in range(4)))
    return {"root": root, "store": store, "student": student, "prompts": prompts,
            "pair": teacher_pair}


def _train(world, out, *extra):
    return ["train", "--mode", "off-policy", "--store", str(world["store"]), "--model",
            str(world["student"]), "--out", str(out), "--global-batch-size", "4", "--epochs",
            "2", "--save-every", "1", "--device", "cpu", "--no-progress", "--report-to", "none",
            "--log-level", "warning", *extra]


def test_resume_refuses_changed_settings_and_continues_the_same_ones(world, tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*_train(world, out), "--max-steps", "2"]) == 0
    saved = yaml.safe_load((out / "train_config.yaml").read_text())
    assert saved["max_steps"] == 2 and "api_key" not in saved
    capsys.readouterr()
    # A changed lr, loss weight and tail: refused, all three named, nothing touched.
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert main([*_train(world, out), "--max-steps", "2", "--resume", "--lr", "3e-4",
                 "--beta0", "0.2", "--tail", "bucket"]) == 2
    err = capsys.readouterr().err
    assert "--resume:" in err and "--lr 1e-06 -> 0.0003" in err
    assert "--beta0 0.1 -> 0.2" in err and "--tail 'auto' -> 'bucket'" in err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    # Without --resume, the used folder is refused (not replaced, not mixed).
    assert main([*_train(world, out), "--max-steps", "4"]) == 2
    assert "already holds another run's files" in capsys.readouterr().err
    # The same settings resume (a longer --max-steps changes the plan: refused as well).
    assert main([*_train(world, out), "--max-steps", "4", "--resume"]) == 2
    assert "--max-steps 2 -> 4" in capsys.readouterr().err
    assert main([*_train(world, out), "--max-steps", "2", "--resume"]) == 0
    # --overwrite starts over in the same folder: one run's files only.
    assert main([*_train(world, out), "--max-steps", "1", "--overwrite"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1]
    assert not list(out.glob("checkpoint-*"))


def test_an_incomplete_store_is_refused_unless_asked_and_skips_are_recorded(world, tmp_path,
                                                                            capsys):
    dpo, rev = world["pair"]
    data = tmp_path / "data.jsonl"
    rows = [json.dumps({"prompt": f"sort {i} 2", "response": f"2 {i}"}) for i in range(10)]
    rows[3] = '{"prompt": "sort 1 2", "response": '          # malformed JSON
    rows[6] = json.dumps({"prompt": "sort 1 2"})             # no response
    data.write_text("\n".join(rows) + "\n")
    store = tmp_path / "half"
    common = ["precompute", "--dpo-model", str(dpo), "--reverse-model", str(rev), "--data",
              str(data), "--out", str(store), "--top-k", "4", "--device", "cpu",
              "--skip-bad-rows", "--num-workers", "2"]
    assert main([*common, "--worker-index", "0"]) == 0
    out = capsys.readouterr().out
    assert "skipped rows: 1 malformed" in out or "skipped rows: 2 malformed" in out
    train = ["train", "--mode", "off-policy", "--store", str(store), "--model",
             str(world["student"]), "--global-batch-size", "2", "--max-steps", "1",
             "--device", "cpu", "--no-progress", "--report-to", "none", "--log-level", "warning"]
    assert main([*train, "--out", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err
    assert "is incomplete: worker 1 of 2 never committed" in err and "--allow-incomplete" in err
    assert main([*train, "--out", str(tmp_path / "partial"), "--allow-incomplete"]) == 0
    assert main([*common, "--worker-index", "1"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(store), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["complete"] and summary["skipped"] == {"malformed": 2}
    assert summary["examples"] == 8
    assert main(["inspect", str(store)]) == 0
    assert "skipped rows    2 malformed" in capsys.readouterr().out


def test_a_server_whose_teachers_cannot_load_exits_with_the_reason(world, tmp_path):
    """top_k above the vocabulary: the teachers load, the engine refuses; the process stops
    with exit 2 and says why, instead of answering 503 forever."""
    dpo, rev = world["pair"]
    proc = subprocess.run(
        [sys.executable, "-m", "aligndistil.cli", "serve", "--dpo-model", str(dpo),
         "--reverse-model", str(rev), "--top-k", "100000", "--device", "cpu", "--port", "0",
         "--log-level", "warning"], cwd=REPO, env=ENV, capture_output=True, text=True,
        timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("aligndistil: error: the teachers could not be loaded")
    assert "--top-k 100000 exceeds the vocabulary size" in last


def test_the_api_key_never_reaches_a_file(world, tmp_path):
    dpo, rev = world["pair"]
    key = "s3cret-Key-That-Must-Not-Leak"
    proc, url = start_server(dpo, rev, "--top-k", "8", "--max-seq-len", "64",
                             "--api-key", key, log_path=tmp_path / "server.log")
    out = tmp_path / "run"
    try:
        res = subprocess.run(
            [sys.executable, "-m", "aligndistil.cli", "train", "--mode", "on-policy",
             "--teacher-url", url, "--prompts", str(world["prompts"]), "--model",
             str(world["student"]), "--out", str(out), "--global-batch-size", "2",
             "--max-steps", "1", "--max-new-tokens", "3", "--api-key", key, "--device", "cpu",
             "--no-progress"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    finally:
        assert stop_server(proc) == 0
    assert res.returncode == 0, res.stderr[-2000:]
    assert key not in res.stdout + res.stderr
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name == "train_config.yaml" for p in files)
    assert all(key.encode() not in p.read_bytes() for p in files)


def test_precompute_progress_has_a_total_and_an_eta(world, tmp_path):
    dpo, rev = world["pair"]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"sort {i} 3", "response": f"3 {i}"}) + "\n"
                            for i in range(9)))
    res = subprocess.run(
        [sys.executable, "-m", "aligndistil.cli", "precompute", "--dpo-model", str(dpo),
         "--reverse-model", str(rev), "--data", str(data), "--out", str(tmp_path / "s"),
         "--top-k", "4", "--device", "cpu", "--group-size", "4"], cwd=REPO, env=ENV,
        capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "9/9" in res.stderr and "<" in res.stderr  # n/total and tqdm's elapsed<remaining


def test_every_option_shows_its_default_in_help():
    for command in ("serve", "precompute", "train", "dpo", "eval"):
        res = subprocess.run([sys.executable, "-m", "aligndistil.cli", command, "--help"],
                             cwd=REPO, env=ENV, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0
        assert res.stdout.count("(default:") + res.stdout.count("(required)") >= 10, command
    assert Path(REPO / "README.md").is_file()
