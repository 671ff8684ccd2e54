"""``aligndistil precompute`` as a real subprocess: output, resume after SIGKILL, workers, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from process_control import run_until
from live_server import REPO, start_server, stop_server

from storage import wire
from storage.datasets import read_examples
from storage.store import TargetStore
from storage.tokenization import tokenize_example
from teacher_service.engine import ScoreRequest, TeacherEngine
from teacher_service.models import load_teacher_pair
from teacher_service.targets import TargetConfig


def _cli(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aligndistil.cli", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, **kw)


def _write_data(path: Path, n: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    with path.open("w") as fh:
        for i in range(n):
            nums = rng.integers(0, 100, size=int(rng.integers(2, 7))).tolist()
            prompt = "sort " + " ".join(map(str, nums))
            answer = " ".join(map(str, sorted(nums)))
            if i % 3 == 0:  # UltraFeedback-binarized shape
                row = {"prompt": prompt,
                       "chosen": [{"role": "user", "content": prompt},
                                  {"role": "assistant", "content": answer}],
                       "rejected": [{"role": "user", "content": prompt},
                                    {"role": "assistant", "content": "no"}]}
            elif i % 3 == 1:
                row = {"messages": [{"role": "user", "content": prompt},
                                    {"role": "assistant", "content": answer}]}
            else:
                row = {"prompt": prompt, "response": answer}
            fh.write(json.dumps(row) + "\n")
    return path


def _records(store_path) -> dict:
    store = TargetStore.open(store_path)
    return {store[i].example_index: store[i] for i in range(len(store))}


@pytest.fixture(scope="module")
def pair_dirs(teacher_pair):
    return teacher_pair


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _write_data(tmp_path_factory.mktemp("data") / "train.jsonl", 30)


@pytest.fixture(scope="module")
def store(pair_dirs, data, tmp_path_factory):
    # --overwrite with an --out that does not exist yet: nothing to clear (it used to crash)
    out = tmp_path_factory.mktemp("store") / "targets"
    res = _cli("precompute", "--dpo-model", pair_dirs[0], "--reverse-model", pair_dirs[1],
               "--data", data, "--out", out, "--top-k", 8, "--device", "cpu",
               "--group-size", 8, "--shard-tokens", 40, "--overwrite")
    assert res.returncode == 0, res.stderr
    assert "30 new examples" in res.stdout and "tokens/s" in res.stdout
    return out


def test_precompute_writes_engine_targets(store, pair_dirs, data):
    records = _records(store)
    assert sorted(records) == list(range(30))
    store_meta = TargetStore.open(store).metadata
    assert store_meta.r == 20.0 and store_meta.top_k == 8 and store_meta.tvd_norm == "half-l1"
    pair = load_teacher_pair(*pair_dirs, device="cpu")
    assert store_meta.tokenizer_sha256 == pair.tokenizer_sha256
    # The CLI's --packing auto packs these models (they pass the probe): so does this engine.
    engine = TeacherEngine(pair, TargetConfig(top_k=8, r=20.0), packing=True)
    examples = list(read_examples(data))
    reqs = [ScoreRequest(*tokenize_example(pair.tokenizer, ex), example_index=ex.index)
            for ex in examples]
    # The same groups of 8 as the CLI formed: identical batches, identical bits.
    for start in range(0, 30, 8):
        for want in engine.score(reqs[start:start + 8]):
            assert records[want.example_index].equals(want)


def test_precompute_equals_server_output(store, pair_dirs, tmp_path):
    records = _records(store)
    proc, url = start_server(*pair_dirs, "--top-k", "8", "--r", "20", log_path=tmp_path / "log")
    try:
        chosen = [records[i] for i in (0, 4, 11, 29)]
        body = {"sequences": [{"input_ids": r.input_ids.tolist(), "prompt_len": r.prompt_len}
                              for r in chosen]}
        resp = httpx.post(url + "/v1/score", json=body, timeout=60,
                          headers={"Accept": wire.ARROW_STREAM_MEDIA_TYPE})
        assert resp.status_code == 200
        for served, stored in zip(wire.decode_arrow(resp.content), chosen):
            assert served.input_ids.tolist() == stored.input_ids.tolist()
            np.testing.assert_allclose(served.alpha, stored.alpha, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(served.topk_logprobs.astype(np.float32),
                                       stored.topk_logprobs.astype(np.float32), rtol=2e-3,
                                       atol=1e-3)
            np.testing.assert_allclose(served.tail_logmass, stored.tail_logmass, rtol=1e-4,
                                       atol=1e-4)
            np.testing.assert_allclose(served.dpo_logprobs, stored.dpo_logprobs, atol=1e-4)
    finally:
        assert stop_server(proc) == 0


def test_inspect_reads_the_precomputed_store(store):
    res = _cli("inspect", store, "--json")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["examples"] == 30 and summary["complete"] is True
    one = _cli("inspect", store, "--example", 3, "--json")
    assert json.loads(one.stdout)["example_index"] == 3


def test_inspect_stats_and_plot_describe_the_targets(store, tmp_path, capsys):
    """--stats: every distribution recomputed here from the records; --plot: a PNG."""
    from aligndistil.cli import main

    assert main(["inspect", str(store), "--stats", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    records = list(_records(store).values())
    alpha = np.concatenate([r.alpha for r in records]).astype(np.float64)
    assert stats["positions"] == alpha.size and stats["examples"] == 30
    assert stats["alpha"]["mean"] == pytest.approx(alpha.mean(), rel=1e-6)
    assert stats["alpha"]["p90"] == pytest.approx(np.quantile(alpha, 0.9), rel=1e-6)
    tvd = (alpha - 1e-3) / 20.0
    assert stats["tvd"]["mean"] == pytest.approx(tvd.mean(), rel=1e-6)
    assert 0 <= stats["tvd"]["min"] and stats["tvd"]["max"] <= 1
    top1 = np.concatenate([np.exp(r.topk_logprobs[:, 0].astype(np.float64)) for r in records])
    assert stats["top1"]["p50"] == pytest.approx(np.median(top1), rel=1e-6)
    tail = np.concatenate([np.exp(r.tail_logmass.astype(np.float64)) for r in records])
    kept = np.concatenate([np.exp(r.topk_logprobs.astype(np.float64)).sum(1) for r in records])
    assert stats["tail_mass"]["mean"] == pytest.approx(tail.mean(), rel=1e-6)
    np.testing.assert_allclose(stats["kept_mass"]["mean"] + stats["tail_mass"]["mean"], 1.0,
                               atol=2e-3)  # float16 log-probs
    reward = np.concatenate([0.1 * (r.dpo_logprobs.astype(np.float64)
                                    - r.reverse_logprobs.astype(np.float64)) for r in records])
    assert stats["reward"]["mean"] == pytest.approx(reward.mean(), rel=1e-5, abs=1e-9)
    lengths = [r.response_len for r in records]
    assert stats["response_len"]["max"] == max(lengths)
    assert 0 <= stats["alpha_at_bottom"] <= 1 and 0 <= stats["alpha_at_top"] <= 1

    png = tmp_path / "targets.png"
    assert main(["inspect", str(store), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "pi* top-1 probability" in out and f"plot: {png}" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["inspect", str(store), "--plot", str(tmp_path / "no" / "x.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["inspect", str(store), "--plot", str(store / "x.png")]) == 2
    assert "inside the store" in capsys.readouterr().err


@pytest.mark.slow  # 400 rows, ~50 s: the default suite proves the same promise with
# test_crash_precompute.py::test_random_sigkills_with_concurrent_reader_resume_to_the_uninterrupted_store
def test_sigkill_then_resume_equals_uninterrupted(pair_dirs, tmp_path):
    data = _write_data(tmp_path / "big.jsonl", 400, seed=1)
    common = ["--dpo-model", pair_dirs[0], "--reverse-model", pair_dirs[1], "--data", data,
              "--top-k", 4, "--device", "cpu", "--group-size", 4, "--shard-tokens", 1]
    clean = tmp_path / "clean"
    assert _cli("precompute", *common, "--out", clean).returncode == 0

    crashed = tmp_path / "crashed"
    cmd = [sys.executable, "-m", "aligndistil.cli", "precompute", *map(str, common),
           "--out", str(crashed)]
    kills = 0
    for _ in range(2):  # kill twice at different points, resume each time
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        manifest = crashed / "manifest-w0000.json"
        target = 3 + 10 * kills
        run_until(proc, lambda: manifest.exists() and
                  len(json.loads(manifest.read_text())["shards"]) >= target, timeout=120,
                  what=f"{target} committed shards")
        os.kill(proc.pid, signal.SIGKILL)  # stopped: it dies where it stands
        proc.wait()
        kills += 1
        partial = TargetStore.open(crashed)
        assert 0 < partial.num_examples < 400
    res = _cli("precompute", *common, "--out", crashed)
    assert res.returncode == 0, res.stderr
    assert "already committed" in res.stdout
    a, b = _records(clean), _records(crashed)
    assert sorted(a) == sorted(b) == list(range(400))
    assert all(a[i].equals(b[i]) for i in a)
    for key in ("teachers", "tokenizer_sha256", "r", "top_k", "source_fingerprint"):
        assert getattr(TargetStore.open(clean).metadata, key) == \
            getattr(TargetStore.open(crashed).metadata, key)


def test_two_workers_write_one_store(pair_dirs, data, tmp_path):
    out = tmp_path / "two"
    common = ["--dpo-model", pair_dirs[0], "--reverse-model", pair_dirs[1], "--data", data,
              "--out", out, "--top-k", 4, "--device", "cpu", "--num-workers", 2]
    procs = [subprocess.Popen([sys.executable, "-m", "aligndistil.cli", "precompute",
                               *map(str, common), "--worker-index", str(w)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for w in (0, 1)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    records = _records(out)
    assert sorted(records) == list(range(30))
    summary = json.loads(_cli("inspect", out, "--json").stdout)
    assert summary["complete"] and [w["examples"] for w in summary["workers"]] == [15, 15]
    # RANK / WORLD_SIZE (torchrun) place a worker when the flags are absent.
    env = {**os.environ, "RANK": "1", "WORLD_SIZE": "2"}
    again = _cli("precompute", *common[:-2], env=env)
    assert again.returncode == 0 and "(15 already committed)" in again.stdout


def test_bad_row_names_file_and_line_and_skip_counts(pair_dirs, data, tmp_path):
    bad = tmp_path / "bad.jsonl"
    lines = data.read_text().splitlines()
    lines.insert(4, '{"messages": "not a list"}')
    bad.write_text("\n".join(lines) + "\n")
    common = ["--dpo-model", pair_dirs[0], "--reverse-model", pair_dirs[1], "--data", bad,
              "--top-k", 4, "--device", "cpu"]
    res = _cli("precompute", *common, "--out", tmp_path / "s1")
    assert res.returncode == 2 and "bad.jsonl:5" in res.stderr and "messages" in res.stderr
    ok = _cli("precompute", *common, "--out", tmp_path / "s2", "--skip-bad-rows")
    assert ok.returncode == 0 and "1 malformed" in ok.stdout
    assert TargetStore.open(tmp_path / "s2").num_examples == 30


def test_resume_with_other_settings_is_refused(store, pair_dirs, data):
    res = _cli("precompute", "--dpo-model", pair_dirs[0], "--reverse-model", pair_dirs[1],
               "--data", data, "--out", store, "--top-k", 8, "--device", "cpu", "--r", 7)
    assert res.returncode == 2 and "r" in res.stderr


def test_missing_flags_and_files_are_clear(pair_dirs, tmp_path):
    res = _cli("precompute", "--dpo-model", pair_dirs[0], "--data", tmp_path / "none.jsonl",
               "--out", tmp_path / "x")
    assert res.returncode != 0 and "--reverse-model" in res.stderr
    res = _cli("precompute", "--dpo-model", pair_dirs[0], "--reverse-model", pair_dirs[1],
               "--data", tmp_path / "none.jsonl", "--out", tmp_path / "x")
    assert res.returncode == 2 and "no such file" in res.stderr


def test_vanilla_adaptive_mode_end_to_end(pair_dirs, data, tmp_path):
    """--mode vanilla-adaptive (the released code's theorem1_adaptive): z* = w z_dpo +
    (1 - w) z_ref with w = r * TVD(p_dpo, p_ref) + eps per position, alpha = w in the record
    (so the student's weight is beta0 / w); recorded in the store and in /v1/info."""
    from reference import dense_targets, full_logits
    from tiny_models import load

    dpo_dir, ref_dir = pair_dirs  # the second model plays the reference (SFT) model
    out = tmp_path / "va"
    res = _cli("precompute", "--dpo-model", dpo_dir, "--reference-model", ref_dir,
               "--mode", "vanilla-adaptive", "--r", 0.5, "--data", data, "--out", out,
               "--top-k", 8, "--device", "cpu", "--limit", 6)
    assert res.returncode == 0, res.stderr
    meta = TargetStore.open(out).metadata
    assert meta.mode == "vanilla-adaptive" and set(meta.teachers) == {"dpo", "reference"}
    _, dpo = load(dpo_dir)
    _, ref = load(ref_dir)
    records = _records(out)
    assert sorted(records) == list(range(6))
    for rec in records.values():
        ids, p = rec.input_ids.tolist(), rec.prompt_len
        want = dense_targets(full_logits(dpo, ids)[p - 1:-1], full_logits(ref, ids)[p - 1:-1],
                             ids[p:], top_k=8, r=0.5, mode="vanilla-adaptive")
        np.testing.assert_allclose(rec.alpha, want["alpha"], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(rec.topk_logprobs, want["topk_logprobs"], rtol=2e-3,
                                   atol=2e-3)
        assert (rec.alpha > 1e-3).all() and (rec.alpha < 0.5 + 1e-3 + 1e-6).all()
    proc, url = start_server(dpo_dir, None, "--reference-model", str(ref_dir), "--mode",
                             "vanilla-adaptive", "--top-k", "8", log_path=tmp_path / "log")
    try:
        info = httpx.get(url + "/v1/info", timeout=30).json()
        assert info["mode"] == "vanilla-adaptive" and set(info["models"]) == {"dpo", "reference"}
    finally:
        assert stop_server(proc) == 0


def test_precompute_and_inspect_show_what_r_did_to_alpha(store, pair_dirs, data, tmp_path):
    """alpha's mean, p50, p90, max and the share at either end of [eps, r + eps] (half-l1),
    over every response position of the store, from the manifests' per-shard statistics: a
    copy of the store whose shards lost their alpha arrays summarises the same."""
    import shutil

    alpha = np.concatenate([r.alpha for r in _records(store).values()]).astype(np.float64)
    summary = json.loads(_cli("inspect", store, "--json").stdout)["alpha"]
    assert summary["positions"] == alpha.size
    assert summary["mean"] == pytest.approx(alpha.mean(), rel=1e-9)
    bin_width = 20.0 / 400  # the histogram's: quantiles are good to a bin
    assert summary["p90"] == pytest.approx(np.quantile(alpha, 0.9), abs=bin_width)
    assert summary["p50"] == pytest.approx(np.quantile(alpha, 0.5), abs=bin_width)
    assert summary["max"] == pytest.approx(alpha.max(), rel=1e-9)
    copy = tmp_path / "no_alpha"
    shutil.copytree(store, copy)
    removed = [shutil.rmtree(d) for d in copy.glob("shards/*/alpha")]
    assert len(removed) > 1
    assert json.loads(_cli("inspect", copy, "--json").stdout)["alpha"] == summary
    assert summary["range"] == [pytest.approx(1e-3), pytest.approx(20.001)]
    assert summary["frac_at_max"] == pytest.approx((alpha >= 20.001 - 0.2).mean())
    assert summary["frac_at_min"] == pytest.approx((alpha <= 1e-3 + 0.2).mean())
    text = _cli("inspect", store).stdout
    assert "alpha           mean" in text and "at the bottom" in text
    again = _cli("precompute", "--dpo-model", pair_dirs[0], "--reverse-model", pair_dirs[1],
                 "--data", data, "--out", tmp_path / "s", "--top-k", 8, "--device", "cpu",
                 "--limit", 5)
    assert again.returncode == 0, again.stderr
    assert "alpha (r 20, half-l1): mean" in again.stdout


def test_overlong_examples_are_cut_keeping_eos_and_counted(pair_dirs, tmp_path):
    """Past --max-seq-len the response is cut, keeping its EOS (the released code's
    truncation), and the summary counts the cut examples; nothing is refused."""
    rows = [{"prompt": "sort 3 1", "response": " ".join(["1"] * n)} for n in (3, 40, 60)]
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = _cli("precompute", "--dpo-model", pair_dirs[0], "--reverse-model", pair_dirs[1],
               "--data", data, "--out", tmp_path / "s", "--top-k", 4, "--device", "cpu",
               "--max-seq-len", 24)
    assert res.returncode == 0, res.stderr
    assert "truncated: 2 examples longer than max_seq_len 24" in res.stdout
    records = _records(tmp_path / "s")
    pair = load_teacher_pair(*pair_dirs, device="cpu")
    eos = pair.tokenizer.eos_token_id
    assert [records[i].seq_len for i in (1, 2)] == [24, 24]
    assert all(records[i].input_ids[-1] == eos for i in range(3))


def test_k_equal_to_the_vocabulary_is_exact_aligndistil_through_the_store(pair_dirs, data,
                                                                          tmp_path):
    """k = V: the store carries the whole pi* (tail -inf), and the sparse loss on the stored
    record is the exact full-vocabulary reverse KL, up to the float16 storage of log pi* —
    exact AlignDistil through the very same path, no separate code."""
    import torch

    from reference import dense_targets, full_logits
    from student_trainer.losses import exact_reverse_kl, sparse_reverse_kl
    from tiny_models import load

    pair = load_teacher_pair(*pair_dirs, device="cpu")
    vocab = pair.vocab_size
    out = tmp_path / "full"
    res = _cli("precompute", "--dpo-model", pair_dirs[0], "--reverse-model", pair_dirs[1],
               "--data", data, "--out", out, "--top-k", vocab, "--device", "cpu", "--limit", 4)
    assert res.returncode == 0, res.stderr
    _, dpo = load(pair_dirs[0])
    _, rev = load(pair_dirs[1])
    g = torch.Generator().manual_seed(0)
    for rec in _records(out).values():
        assert rec.topk_ids.shape[1] == vocab and np.isneginf(rec.tail_logmass).all()
        ids, p = rec.input_ids.tolist(), rec.prompt_len
        log_pi = dense_targets(full_logits(dpo, ids)[p - 1:-1], full_logits(rev, ids)[p - 1:-1],
                               ids[p:], top_k=vocab)["log_pi"]
        student = torch.randn(len(ids) - p, vocab, generator=g, dtype=torch.float64) * 3
        sparse = sparse_reverse_kl(student, torch.from_numpy(rec.topk_ids.astype(np.int64)),
                                   torch.from_numpy(rec.topk_logprobs.astype(np.float64)),
                                   torch.from_numpy(rec.tail_logmass.astype(np.float64)))
        exact = exact_reverse_kl(student, torch.from_numpy(log_pi))
        torch.testing.assert_close(sparse, exact, rtol=2e-3, atol=2e-3)


def test_lossy8_layout_is_pinned_and_decodes_close_to_the_lossless_store(store, pair_dirs, data,
                                                                         tmp_path):
    out = tmp_path / "lossy"
    res = _cli("precompute", "--dpo-model", pair_dirs[0], "--reverse-model", pair_dirs[1],
               "--data", data, "--out", out, "--top-k", 8, "--device", "cpu",
               "--group-size", 8, "--shard-tokens", 40, "--layout", "compact-lossy8")
    assert res.returncode == 0, res.stderr
    assert TargetStore.open(out).metadata.layout == "compact-lossy8"
    exact, lossy = _records(store), _records(out)
    assert sorted(lossy) == sorted(exact)
    worst = 0.0
    for i, want in exact.items():
        got = lossy[i]
        assert np.array_equal(got.topk_ids, want.topk_ids)
        assert np.array_equal(got.alpha, want.alpha)
        assert np.array_equal(got.tail_logmass, want.tail_logmass)
        span = np.ptp(want.topk_logprobs.astype(np.float64), axis=1, keepdims=True)
        err = np.abs(got.topk_logprobs.astype(np.float64) - want.topk_logprobs)
        # 8-bit codes over each row's range: at most half a step, plus float16 rounding
        assert (err <= span / 255 / 2 + 2e-3 * (1 + np.abs(want.topk_logprobs))).all()
        worst = max(worst, float(err.max()))
    assert worst > 0  # it is lossy: the test would notice a lossless store
    # resuming the store with the other layout is refused, naming the field
    res = _cli("precompute", "--dpo-model", pair_dirs[0], "--reverse-model", pair_dirs[1],
               "--data", data, "--out", out, "--top-k", 8, "--device", "cpu")
    assert res.returncode == 2 and "layout" in res.stderr, res.stderr


def test_dpo_top_is_a_format_version_2_store_pinned_for_resume(pair_dirs, data, tmp_path):
    """--dpo-top 4: each position keeps the dpo model's top 4 ids (with their log pi*) within
    the top 8; the store says so (format version 2, inspect), the server reports it in
    /v1/info and scores the same records, and resuming without it is refused."""
    out = tmp_path / "dpo_top"
    args = ["precompute", "--dpo-model", pair_dirs[0], "--reverse-model", pair_dirs[1], "--data",
            data, "--out", out, "--top-k", 8, "--device", "cpu", "--group-size", 8]
    res = _cli(*args, "--dpo-top", 4)
    assert res.returncode == 0, res.stderr
    doc = json.loads((out / "zarr.json").read_text())["attributes"]["aligndistil"]
    assert doc["format_version"] == 2 and doc["dpo_top"] == 4
    assert "includes the dpo model's top 4" in _cli("inspect", out).stdout
    records = _records(out)
    pair = load_teacher_pair(pair_dirs[0], pair_dirs[1], device="cpu")
    engine = TeacherEngine(pair, TargetConfig(top_k=8, dpo_top=4))
    for rec in list(records.values())[:5]:
        want = engine.score([ScoreRequest(rec.input_ids.tolist(), int(rec.prompt_len))])[0]
        assert np.array_equal(rec.topk_ids, want.topk_ids)
        np.testing.assert_allclose(rec.topk_logprobs, want.topk_logprobs, rtol=1e-6)
        with torch.no_grad():  # the dpo model's own top 4 at each response position
            logits = pair.dpo(torch.tensor(rec.input_ids.tolist())[None]).logits[0].double()
        rows = logits[rec.prompt_len - 1:len(rec.input_ids) - 1, :pair.vocab_size]
        top4 = torch.topk(rows, 4, dim=-1).indices.numpy()
        for kept, favourite in zip(rec.topk_ids, top4):
            assert set(favourite.tolist()) <= set(kept.tolist())
    proc, url = start_server(pair_dirs[0], pair_dirs[1], "--top-k", "8", "--dpo-top", "4",
                             log_path=tmp_path / "server.log")
    try:
        assert httpx.get(url + "/v1/info").json()["dpo_top"] == 4
    finally:
        stop_server(proc)
    res = _cli(*args)  # resuming without --dpo-top
    assert res.returncode == 2 and "dpo_top" in res.stderr, res.stderr
    res = _cli("precompute", "--dpo-model", pair_dirs[0], "--reverse-model", pair_dirs[1],
               "--data", data, "--out", tmp_path / "bad", "--top-k", 8, "--dpo-top", 8)
    assert res.returncode == 2 and "--dpo-top 8 must be below --top-k 8" in res.stderr, \
        res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    assert not (tmp_path / "bad").exists()  # refused before any work
