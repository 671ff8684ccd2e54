"""The tail budget (``--tail-budget EPS``): each position keeps the fewest of pi*'s best ids
whose mass reaches 1 - EPS, so the targets are ragged. Checked against the float64 dense
reference, through the loss, the store (format version 3, refused by the previous release's
reader), the wire (JSON and Arrow from a real server) and an off-policy training run."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import io
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from live_server import REPO, start_server, stop_server
from reference import full_logits
from tiny_models import build_tokenizer, load, save_model_dir
from trainer_support import random_sequences

from storage import wire
from storage.record import TargetRecord
from storage.store import TargetStore
from student_trainer import losses
from teacher_service.engine import ScoreRequest, TeacherEngine
from teacher_service.models import load_teacher_pair
from teacher_service.targets import TargetConfig, compute_targets, teacher_logprobs

#: The release before the tail budget (format versions 1 and 2 only).
PREVIOUS_RELEASE = "9f649a7"


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aligndistil.cli", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def pair(teacher_pair):
    return load_teacher_pair(*teacher_pair, device="cpu")


def _logits(pair, n=3, seed=0):
    """Two teachers' logits at the response positions of a few random sequences (float64)."""
    rows_d, rows_o, nxt = [], [], []
    for ids, p in random_sequences(pair.vocab_size, n, seed=seed):
        rows_d.append(torch.from_numpy(full_logits(pair.dpo, ids)[p - 1:len(ids) - 1]))
        rows_o.append(torch.from_numpy(full_logits(pair.other, ids)[p - 1:len(ids) - 1]))
        nxt += ids[p:]
    return torch.cat(rows_d).double(), torch.cat(rows_o).double(), torch.tensor(nxt)


@pytest.mark.parametrize("eps,min_k", [(0.2, 1), (0.02, 1), (0.002, 2), (0.02, 3)])
def test_each_position_keeps_the_fewest_ids_that_reach_the_budget(pair, eps, min_k):
    dpo, other, nxt = _logits(pair)
    cap = 24
    config = TargetConfig(top_k=cap, tail_budget=eps, min_k=min_k)
    got = compute_targets(dpo, other, nxt, config)
    log_pi, _ = teacher_logprobs(dpo, other, config)  # float64 dense
    counts = got.topk_count.tolist()
    assert len(set(counts)) > 1, "the positions should not all keep the same number"
    for t, k in enumerate(counts):
        order = torch.sort(log_pi[t], descending=True).values
        mass = order.exp().cumsum(0)
        assert min_k <= k <= cap
        # the fewest: k - 1 ids leave more than EPS out (unless min_k decided) ...
        if k > min_k:
            assert 1 - mass[k - 2] > eps
        # ... and k ids leave at most EPS out (unless the cap decided)
        if k < cap:
            assert 1 - mass[k - 1] <= eps + 1e-12
        ids = got.topk_ids[t]
        assert set(ids[:k].tolist()) == set(torch.topk(log_pi[t], k).indices.tolist())
        torch.testing.assert_close(got.topk_logprobs[t, :k], log_pi[t, ids[:k]])
        # the columns past k repeat column 0
        assert (ids[k:] == ids[0]).all() and (got.topk_logprobs[t, k:] == got.topk_logprobs[t, 0]).all()
        rest = log_pi[t].clone()
        rest[ids[:k]] = -torch.inf
        torch.testing.assert_close(got.tail_logmass[t], torch.logsumexp(rest, 0))
        if k < cap:
            assert got.tail_logmass[t].exp() <= eps + 1e-12


def test_dpo_top_under_a_budget_covers_the_dpo_models_mass_too(pair):
    """With --dpo-top under a budget, a position keeps ids until at most EPS of pi*'s mass AND
    of the dpo model's mass is left out (unless the cap decides): more ids than pi*'s budget
    alone where the two disagree."""
    dpo, other, nxt = _logits(pair, seed=3)
    eps, cap, m = 0.02, 24, 23
    config = TargetConfig(top_k=cap, tail_budget=eps, dpo_top=m)
    got = compute_targets(dpo, other, nxt, config)
    pi_only = compute_targets(dpo, other, nxt, TargetConfig(top_k=cap, tail_budget=eps))
    log_pi, _ = teacher_logprobs(dpo, other, config)
    p_d = torch.softmax(dpo, -1)
    grew = 0
    for t, k in enumerate(got.topk_count.tolist()):
        kept = got.topk_ids[t, :k]
        assert len(set(kept.tolist())) == k <= cap
        if k < cap:
            assert 1 - log_pi[t, kept].exp().sum() <= eps + 1e-9
            assert 1 - p_d[t, kept].sum() <= eps + 1e-9
        rest = log_pi[t].clone()
        rest[kept] = -torch.inf
        torch.testing.assert_close(got.tail_logmass[t], torch.logsumexp(rest, 0))
        grew += k > pi_only.topk_count[t]
    assert grew  # the dpo model's mass costs ids on this pair


def _ragged_targets(V=40, N=9, cap=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, cap + 1, (N,), generator=g)
    counts[0] = cap
    log_pi = torch.log_softmax(3 * torch.randn(N, V, generator=g, dtype=torch.float64), -1)
    ids = torch.topk(log_pi, cap).indices
    slot = torch.arange(cap)
    ids = torch.where(slot < counts[:, None], ids, ids[:, :1])
    lps = log_pi.gather(-1, ids)
    kept = torch.zeros(N, V, dtype=torch.bool).scatter_(-1, ids, True)
    tail = torch.logsumexp(log_pi.masked_fill(kept, -torch.inf), -1)
    return log_pi, ids, lps, tail, counts


@pytest.mark.parametrize("tail_model", ["uniform", "bucket", "auto"])
def test_the_ragged_loss_is_each_positions_own_fixed_k_loss(tail_model):
    """A position of a ragged batch pays exactly what it pays alone with its k_t entries (value
    and gradient), whatever the padding columns hold, and the uniform tail spreads over V - k_t."""
    V = 40
    _, ids, lps, tail, counts = _ragged_targets(V)
    logits = torch.randn(len(counts), V, dtype=torch.float64, requires_grad=True)
    kl = losses.sparse_reverse_kl(logits, ids, lps, tail, tail_model, topk_count=counts)
    kl.sum().backward()
    # other padding (ids the position does not keep, any log-probs) changes nothing
    junk = torch.arange(ids.shape[1]) >= counts[:, None]
    other_ids = torch.where(junk, (ids + 1) % V, ids)
    other_lps = torch.where(junk, torch.full_like(lps, -0.5), lps)
    torch.testing.assert_close(losses.sparse_reverse_kl(
        logits.detach(), other_ids, other_lps, tail, tail_model, topk_count=counts), kl.detach())
    with pytest.raises(ValueError, match="topk_count must lie in"):
        losses.sparse_reverse_kl(logits.detach(), ids, lps, tail, tail_model,
                                 topk_count=counts * 0)
    for t, k in enumerate(counts.tolist()):
        z = logits.detach()[t:t + 1].clone().requires_grad_(True)
        alone = losses.sparse_reverse_kl(z, ids[t:t + 1, :k], lps[t:t + 1, :k], tail[t:t + 1],
                                         tail_model)
        alone.sum().backward()
        torch.testing.assert_close(kl[t], alone[0])
        torch.testing.assert_close(logits.grad[t], z.grad[0])
    if tail_model == "uniform":  # the densified teacher: exact KL against it
        q = torch.full((len(counts), V), 0.0, dtype=torch.float64)
        for t, k in enumerate(counts.tolist()):
            q[t] = tail[t] - np.log(V - k)
            q[t, ids[t, :k]] = lps[t, :k]
        torch.testing.assert_close(kl, losses.exact_reverse_kl(logits.detach(), q))
    # the chunked form agrees
    hidden = torch.randn(len(counts), 16, dtype=torch.float64)
    weight = torch.randn(V, 16, dtype=torch.float64)
    chunked = losses.chunked_sparse_reverse_kl(hidden, weight, ids, lps, tail, tail_model,
                                               chunk_size=4, topk_count=counts)
    torch.testing.assert_close(chunked, losses.sparse_reverse_kl(
        hidden @ weight.T, ids, lps, tail, tail_model, topk_count=counts))


def test_a_batch_of_ragged_records_of_different_widths_trains_on_each_records_own_loss(
        teacher_pair):
    """collate pads records of different widths to one tensor and passes the counts, so the
    batch loss is the mean of each record's own loss (the trainer's per-sequence mean)."""
    from student_trainer.api import aligndistil_batch_loss
    from student_trainer.collate import collate_records
    from student_trainer.modeling import StudentForward

    _, model = load(teacher_pair[0])
    V = model.config.vocab_size
    records = []
    for i, cap in enumerate((3, 7)):
        _, ids, lps, tail, counts = _ragged_targets(V, N=5, cap=cap, seed=i)
        records.append(TargetRecord.create(
            example_index=i, input_ids=list(range(10, 16)), prompt_len=1,
            alpha=np.full(5, 2.0), topk_ids=ids.numpy(), topk_logprobs=lps.numpy(),
            tail_logmass=tail.numpy(), dpo_logprobs=np.full(5, -1.0),
            reverse_logprobs=np.full(5, -2.0), topk_count=counts.numpy()))
    batch = collate_records(records, pad_id=0)
    assert batch.topk_ids.shape[1] == 7
    assert batch.topk_count.tolist() == [c for r in records for c in r.topk_count.tolist()]
    forward = StudentForward(model.double(), V, tail="auto")
    whole = aligndistil_batch_loss(forward, batch)
    alone = [aligndistil_batch_loss(forward, collate_records([r], pad_id=0)) for r in records]
    torch.testing.assert_close(whole, sum(alone) / 2)


def test_without_counts_the_padding_would_be_counted():
    """The reason the count travels: the padding columns are real-looking entries."""
    _, ids, lps, tail, counts = _ragged_targets()
    logits = torch.randn(len(counts), 40, dtype=torch.float64)
    with_counts = losses.sparse_reverse_kl(logits, ids, lps, tail, topk_count=counts)
    without = losses.sparse_reverse_kl(logits, ids, lps, tail)
    short = counts < ids.shape[1]
    assert not torch.allclose(with_counts[short], without[short])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("budget_data") / "train.jsonl"
    rng = np.random.default_rng(0)
    with path.open("w") as fh:
        for i in range(24):
            nums = rng.integers(0, 100, size=int(rng.integers(2, 7))).tolist()
            fh.write(json.dumps({"prompt": "sort " + " ".join(map(str, nums)),
                                 "response": " ".join(map(str, sorted(nums)))}) + "\n")
    return path


@pytest.fixture(scope="module")
def budget_store(teacher_pair, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("budget_store") / "targets"
    res = _cli("precompute", "--dpo-model", teacher_pair[0], "--reverse-model", teacher_pair[1],
               "--data", data, "--out", out, "--top-k", 16, "--tail-budget", 0.02, "--device",
               "cpu", "--group-size", 8, "--shard-tokens", 60)
    assert res.returncode == 0, res.stderr
    return out


@pytest.fixture(scope="module")
def fixed_store(teacher_pair, data, tmp_path_factory):
    """The budget store's data and teachers at a fixed k = 16 (format version 1)."""
    out = tmp_path_factory.mktemp("fixed_store") / "targets"
    res = _cli("precompute", "--dpo-model", teacher_pair[0], "--reverse-model", teacher_pair[1],
               "--data", data, "--out", out, "--top-k", 16, "--device", "cpu", "--group-size",
               8, "--shard-tokens", 60)
    assert res.returncode == 0, res.stderr
    return out


def test_precompute_writes_a_version_3_store_of_the_engines_ragged_records(
        budget_store, fixed_store, teacher_pair, pair, data):
    doc = json.loads((budget_store / "zarr.json").read_text())["attributes"]["aligndistil"]
    assert doc["format_version"] == 3 and doc["tail_budget"] == 0.02 and doc["min_k"] == 1
    store = TargetStore.open(budget_store)
    assert len(store.shards) > 1
    records = [store[i] for i in range(len(store))]
    assert any(r.ragged for r in records)
    engine = TeacherEngine(pair, TargetConfig(top_k=16, tail_budget=0.02), packing=True)
    wants = engine.score([ScoreRequest(r.input_ids.tolist(), int(r.prompt_len))
                          for r in records[:8]])  # the CLI's first group of 8
    for rec, want in zip(records[:8], wants):
        np.testing.assert_array_equal(rec.topk_count, want.topk_count)
        for got_row, want_row in zip(rec.kept_rows("topk_ids"), want.kept_rows("topk_ids")):
            np.testing.assert_array_equal(got_row, want_row)
        for got_row, want_row in zip(rec.kept_rows("topk_logprobs"),
                                     want.kept_rows("topk_logprobs")):
            np.testing.assert_allclose(got_row, want_row, rtol=2e-3, atol=2e-3)

    # the shards hold the kept entries only: fewer bytes than the cap everywhere takes
    fixed = fixed_store

    def topk_chunk_bytes(store):  # the data of every topk array (metadata files aside)
        return sum(f.stat().st_size for f in Path(store, "shards").glob("*/topk_*/c/**/*")
                   if f.is_file())
    counts = np.concatenate([r.topk_count for r in records])
    assert counts.mean() < 4
    assert topk_chunk_bytes(budget_store) < 0.5 * topk_chunk_bytes(fixed)


def test_inspect_stats_show_the_k_distribution_and_the_capped_share(budget_store):
    res = _cli("inspect", budget_store, "--stats", "--json")
    assert res.returncode == 0, res.stderr
    stats = json.loads(res.stdout)
    hist = {int(k): v for k, v in stats["k_histogram"].items()}
    store = TargetStore.open(budget_store)
    counts = np.concatenate([store[i].topk_count for i in range(len(store))])
    assert hist == {int(k): int(n) for k, n in zip(*np.unique(counts, return_counts=True))}
    tails = np.exp(np.concatenate([store[i].tail_logmass for i in range(len(store))]))
    want = float(((counts >= 16) & (tails > 0.02)).mean())
    assert stats["capped_over_budget"] == pytest.approx(want)
    text = _cli("inspect", budget_store, "--stats").stdout
    assert "ids kept per position" in text and "k_t distribution" in text
    assert "tail budget 0.02" in _cli("inspect", budget_store).stdout
    # the plain summary reads the manifests' per-shard statistics, not the shards
    kept = json.loads(_cli("inspect", budget_store, "--json").stdout)["kept_ids"]
    assert kept["mean"] == pytest.approx(counts.mean())
    assert {int(k): v for k, v in kept["histogram"].items()} == hist
    assert kept["over_budget"] == pytest.approx(float((tails > 0.02).mean()))


def test_the_previous_release_refuses_a_version_3_store(budget_store, tmp_path):
    """Readers of versions 1 and 2 refuse version 3: the previous release's own code, run."""
    known = subprocess.run(["git", "cat-file", "-e", f"{PREVIOUS_RELEASE}^{{commit}}"],
                           cwd=REPO, capture_output=True)
    if known.returncode != 0:
        pytest.skip(f"needs the repository's history (commit {PREVIOUS_RELEASE}); a shallow "
                    f"clone lacks it")
    archive = subprocess.run(["git", "archive", PREVIOUS_RELEASE, "storage"], cwd=REPO,
                             capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(tmp_path, filter="data")
    code = ("import sys\nfrom storage.store import TargetStore\n"
            "try:\n    TargetStore.open(sys.argv[1])\nexcept Exception as exc:\n"
            "    print(type(exc).__name__, exc)\nelse:\n    print('OPENED')\n")
    out = subprocess.run([sys.executable, "-c", code, str(budget_store)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert "format_version 3 is not supported" in out.stdout, out.stdout + out.stderr


def test_a_server_with_a_budget_sends_ragged_lists_in_json_and_arrow(teacher_pair, pair,
                                                                      tmp_path):
    proc, url = start_server(*teacher_pair, "--top-k", "16", "--tail-budget", "0.02",
                             log_path=tmp_path / "server.log")
    try:
        info = httpx.get(url + "/v1/info").json()
        assert info["tail_budget"] == 0.02 and info["min_k"] == 1 and info["top_k"] == 16
        seqs = random_sequences(pair.vocab_size, 4, seed=5)
        body = {"sequences": [{"input_ids": ids, "prompt_len": p} for ids, p in seqs]}
        as_json = httpx.post(url + "/v1/score", json=body, timeout=60)
        as_arrow = httpx.post(url + "/v1/score", json=body, timeout=60,
                              headers={"Accept": wire.ARROW_STREAM_MEDIA_TYPE})
        assert as_json.status_code == as_arrow.status_code == 200
        # the server packs these models (they pass the probe): so does this engine
        engine = TeacherEngine(pair, TargetConfig(top_k=16, tail_budget=0.02, r=info["r"]),
                               packing=True)
        want = engine.score([ScoreRequest(ids, p) for ids, p in seqs])
        raw = as_json.json()["results"]
        for item, rec in zip(raw, want):  # inner lists of k_t entries, no count field
            assert [len(row) for row in item["topk_ids"]] == rec.topk_count.tolist()
            assert "topk_count" not in item
        assert any(rec.ragged for rec in want)
        for got in (wire.decode_json(as_json.content), wire.decode_arrow(as_arrow.content)):
            for g, w in zip(got, want):
                np.testing.assert_array_equal(g.topk_count, w.topk_count)
                assert all(np.array_equal(a, b) for a, b in
                           zip(g.kept_rows("topk_ids"), w.kept_rows("topk_ids")))
                assert all(np.allclose(a, b, atol=2e-3) for a, b in
                           zip(g.kept_rows("topk_logprobs"), w.kept_rows("topk_logprobs")))
        # a client asking for fewer entries gets at most that many per position
        small = httpx.post(url + "/v1/score", json={**body, "top_k": 2}, timeout=60).json()
        assert max(len(row) for res in small["results"] for row in res["topk_ids"]) <= 2
    finally:
        assert stop_server(proc) == 0


@pytest.mark.parametrize("which", ["budget", "fixed"])
def test_off_policy_training_from_a_version_3_store(budget_store, fixed_store, tmp_path,
                                                    teacher_pair, which):
    """Training reads the ragged store; --tail auto (the default) trains with the bucket tail
    on stored targets, a budget's or a fixed k's: the same losses as --tail bucket, not those
    of uniform (the fixed store's auto was the per-position rule before)."""
    from aligndistil.cli import main

    student = save_model_dir(tmp_path / "student", seed=7)
    store = budget_store if which == "budget" else fixed_store
    opened = TargetStore.open(store)
    tails = np.exp(np.concatenate([opened[i].tail_logmass for i in range(len(opened))]))
    # the per-position rule would differ from bucket: it takes uniform where at most 5% is out
    assert (tails <= losses.AUTO_BROAD).any()

    def run(name, *extra):
        out = tmp_path / name
        rc = main(["train", "--mode", "off-policy", "--store", str(store), "--model",
                   str(student), "--out", str(out), "--epochs", "2", "--global-batch-size", "8",
                   "--max-tokens", "96", "--lr", "3e-3", "--no-progress", "--device", "cpu",
                   "--log-level", "warning", *extra])
        assert rc == 0
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if "loss" in r]

    auto = run("auto")
    assert auto and all(np.isfinite(auto))
    assert run("bucket", "--tail", "bucket") == auto
    assert run("uniform", "--tail", "uniform") != auto


def _score_requests(url: str) -> float:
    import re

    text = httpx.get(url + "/metrics").text
    m = re.search(r'aligndistil_requests_total\{path="/v1/score",status="200"\} (\S+)', text)
    return float(m.group(1)) if m else 0.0


def test_on_policy_with_the_students_candidates_against_a_live_server(teacher_pair, tmp_path):
    """--student-top 4 against a server with a tail budget: each step names the student's top
    4 ids per position (one request per step still) and trains on the union."""
    from aligndistil.cli import main
    from student_trainer.metrics import read_jsonl

    student = save_model_dir(tmp_path / "student", seed=7)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in
                               ["sort 3 1 2", "copy 5 6", "hello how are you ?", "sort 9 8"]))
    proc, url = start_server(*teacher_pair, "--top-k", "8", "--tail-budget", "0.05",
                             "--max-seq-len", "64", log_path=tmp_path / "server.log")
    try:
        common = ["train", "--mode", "on-policy", "--teacher-url", url, "--prompts",
                  str(prompts), "--model", str(student), "--global-batch-size", "4",
                  "--epochs", "2", "--max-new-tokens", "6", "--lr", "3e-3", "--save-every",
                  "0", "--no-progress", "--report-to", "none", "--device", "cpu",
                  "--log-level", "warning"]
        before = _score_requests(url)
        assert main([*common, "--out", str(tmp_path / "with"), "--student-top", "4"]) == 0
        assert _score_requests(url) - before == 2  # one request per step, ids named in it
        assert main([*common, "--out", str(tmp_path / "without")]) == 0
        with_rows = read_jsonl(tmp_path / "with" / "metrics.jsonl")
        without = read_jsonl(tmp_path / "without" / "metrics.jsonl")
        assert [r["step"] for r in with_rows] == [1, 2]
        assert all(r["candidates_s"] > 0 and np.isfinite(r["loss"]) for r in with_rows)
        assert "candidates_s" not in without[0]
        # the same samples (same seed and weights at step 1), scored on more ids: the step-1
        # loss differs, since the student's ids left the tail
        assert with_rows[0]["loss"] != pytest.approx(without[0]["loss"], rel=1e-6)
        assert main([*common, "--out", str(tmp_path / "big"), "--student-top", "9"]) == 2
    finally:
        assert stop_server(proc) == 0


@pytest.mark.parametrize("mode", ["constant", "vanilla"])
def test_inspect_summarises_a_store_whose_alpha_is_constant(tmp_path, mode):
    """Modes without alpha's adaptive range: the manifests' statistics still summarise alpha
    (it is one value), and inspect and precompute's closing lines print it."""
    from storage.store.metadata import StoreMetadata
    from storage.store.summary import format_summary, summarize
    from storage.store.writer import TargetStoreWriter

    meta = StoreMetadata(teachers={"dpo": "a", "reference": "b"}, tokenizer_sha256="x",
                         vocab_size=40, top_k=7, r=20.0, eps=1e-3, tvd_norm="half-l1",
                         mode=mode, source_fingerprint="t")
    with TargetStoreWriter(tmp_path / "s", meta, shard_tokens=6, durable=False) as writer:
        for i in range(4):
            log_pi, _, _, _, _ = _ragged_targets(40, N=5, cap=7, seed=i)
            lps, ids = torch.topk(log_pi, 7)
            rest = log_pi.scatter(-1, ids, -torch.inf)
            tail = torch.logsumexp(rest, -1)
            writer.write(TargetRecord.create(
                example_index=i, input_ids=list(range(1, 7)), prompt_len=1,
                alpha=np.full(5, 2.0), topk_ids=ids.numpy(), topk_logprobs=lps.numpy(),
                tail_logmass=tail.numpy(), dpo_logprobs=np.full(5, -1.0),
                reverse_logprobs=np.full(5, -2.0)))
    summary = summarize(TargetStore.open(tmp_path / "s"))
    assert summary["alpha"]["p50"] == summary["alpha"]["p90"] == 2.0
    assert "p50 2, p90 2" in format_summary(summary)
    res = _cli("inspect", tmp_path / "s")
    assert res.returncode == 0 and "alpha           mean 2" in res.stdout, res.stderr


def test_settings_that_cannot_go_together_are_refused_before_any_work(teacher_pair, data,
                                                                     tmp_path):
    res = _cli("precompute", "--dpo-model", teacher_pair[0], "--reverse-model", teacher_pair[1],
               "--data", data, "--out", tmp_path / "lossy", "--layout", "compact-lossy8",
               "--tail-budget", 0.01)
    assert res.returncode == 2 and "not offered with --tail-budget" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "lossy").exists()
    res = _cli("serve", "--dpo-model", teacher_pair[0], "--reverse-model", teacher_pair[1],
               "--tail-budget", 1.5)
    assert res.returncode == 2 and "--tail-budget" in res.stderr and "Traceback" not in res.stderr
    res = _cli("train", "--mode", "on-policy", "--teacher-url", "http://127.0.0.1:9",
               "--prompts", data, "--model", teacher_pair[0], "--out", tmp_path / "run",
               "--student-top", 4, "--objective", "reinforce-token")
    assert res.returncode == 2 and "--student-top applies to --objective aligndistil" in \
        res.stderr, res.stderr
