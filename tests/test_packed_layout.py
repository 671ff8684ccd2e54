"""The ``packed`` layout (format version 4): each position's ids as a sorted set of
frequency codes, log pi* as 8-bit log-spaced codes, float16 scalars. Round trips within the
documented bound, ragged and fixed k, through the writer, the reader and the precompute CLI;
version-3 readers refuse it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from storage.record import TargetRecord
from storage.store import LAYOUTS, TargetStore
from storage.store.layout import (poslog_decode, poslog_encode, position_deltas,
                                  position_sums)
from test_store import make_meta, make_records, write_store

REPO = Path(__file__).resolve().parents[1]


def ragged_records(seed: int, n: int, vocab: int = 1000, cap: int = 12) -> list[TargetRecord]:
    """Records whose positions keep 1..cap entries, with deep tails (a range of ~60 nats, as
    --dpo-top ids give) and float16 ties."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        L = int(rng.integers(3, 40))
        P = int(rng.integers(1, L))
        T = L - P
        counts = rng.integers(1, cap + 1, T)
        ids, lps = [], []
        for c in counts:
            ids.append(rng.choice(vocab, int(c), replace=False).tolist())
            lp = -np.sort(rng.exponential(6.0, int(c))).astype(np.float16)
            lp[len(lp) // 2:] = np.round(lp[len(lp) // 2:])  # ties
            lps.append((-np.sort(-lp.astype(np.float32))).tolist())
        out.append(TargetRecord.create(
            example_index=i, input_ids=rng.integers(0, vocab, L), prompt_len=P,
            alpha=rng.uniform(1e-3, 5.0, T), topk_ids=ids, topk_logprobs=lps,
            topk_count=counts, tail_logmass=-rng.exponential(3.0, T),
            dpo_logprobs=-rng.exponential(1.0, T), reverse_logprobs=-rng.exponential(1.0, T),
            vocab_size=vocab))
    return out


def assert_close_to(got: TargetRecord, want: TargetRecord) -> None:
    """Same ids per position (a set; back in log-prob order), log-probs within the layout's
    bound, the largest exact, alpha exact, the other scalars within float16 rounding."""
    got.validate()                                            # sorted, <= 0, finite
    np.testing.assert_array_equal(got.input_ids, want.input_ids)
    np.testing.assert_array_equal(got.topk_count, want.topk_count)
    np.testing.assert_array_equal(got.alpha, want.alpha)
    for name in ("tail_logmass", "dpo_logprobs", "reverse_logprobs"):
        np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=1e-3,
                                   atol=1e-6)
    rows = zip(got.kept_rows("topk_ids"), got.kept_rows("topk_logprobs"),
               want.kept_rows("topk_ids"), want.kept_rows("topk_logprobs"))
    for g_ids, g_lp, w_ids, w_lp in rows:
        assert sorted(g_ids.tolist()) == sorted(w_ids.tolist())
        w_of = dict(zip(w_ids.tolist(), w_lp.astype(np.float32).tolist()))
        want_lp = np.array([w_of[i] for i in g_ids.tolist()], np.float32)
        top, span = np.float32(w_lp[0]), np.float32(w_lp[0]) - np.float32(w_lp[-1])
        half_ulp = np.maximum(np.abs(np.spacing(want_lp.astype(np.float16))),
                              np.abs(np.spacing(g_lp))).astype(np.float32) / 2
        # the grid step, float16 rounding of the result, float32 arithmetic in the decoder
        bound = (1 + (top - want_lp)) * np.expm1(np.log1p(span) / 510) * (1 + 1e-3) \
            + half_ulp + 1e-4
        assert (np.abs(g_lp.astype(np.float32) - want_lp) <= bound).all()
        assert g_lp[0] == w_lp[0]                             # the largest is exact


def test_position_deltas_and_poslog_invert_on_awkward_runs():
    counts = np.array([1, 3, 1, 4, 2])
    codes = np.array([7, 0, 5, 65535, 9, 1, 2, 3, 60000, 0, 65535], np.uint16)
    # exact in any order (modular), sorted or not
    np.testing.assert_array_equal(position_sums(position_deltas(codes, counts), counts), codes)
    for k in range(len(counts)):  # each position sorted ascending, as the encoder leaves it
        s = counts[:k].sum()
        codes[s:s + counts[k]] = np.sort(codes[s:s + counts[k]])
    np.testing.assert_array_equal(position_sums(position_deltas(codes, counts), counts), codes)
    lp = np.array([-0.0, -1.0, -1.0, -80.0, -3.0, -0.5, -0.5, -0.5, -0.5, -2.0, -9.0],
                  np.float16)
    q, first, last = poslog_encode(lp, counts)
    back = poslog_decode(q, first, last, counts)
    np.testing.assert_array_equal(first, [-0.0, -1.0, -3.0, -0.5, -2.0])
    # each position's largest and smallest come back exactly; a constant run stays constant
    for s, c in zip(np.cumsum(counts) - counts, counts):
        assert back[s] == lp[s:s + c].max() and back[s + c - 1] == lp[s:s + c].min()
    np.testing.assert_array_equal(back[5:9], lp[5:9])


@pytest.mark.parametrize("kind", ["ragged", "fixed"])
def test_a_packed_store_round_trips_within_the_bound(tmp_path, kind):
    records = ragged_records(0, 30) if kind == "ragged" else make_records(3, 30)
    meta = make_meta(layout="packed", top_k=12 if kind == "ragged" else 8,
                     tail_budget=0.01 if kind == "ragged" else 0.0)
    write_store(tmp_path / "s", records, meta, shard_tokens=60)
    doc = json.loads((tmp_path / "s" / "zarr.json").read_text())["attributes"]["aligndistil"]
    assert doc["format_version"] == 4 and doc["layout"] == "packed"
    store = TargetStore.open(tmp_path / "s")
    assert len(store.shards) > 2 and len(store) == len(records)
    for want, got in zip(records, store.iter_records(shuffle=False)):
        assert_close_to(got, want)
    assert not LAYOUTS["packed"].lossless


def test_a_fixed_k_packed_store_refuses_a_narrower_record(tmp_path):
    """A packed store without a tail budget is ragged on disk but holds k at every position,
    as a compact fixed-k store does."""
    from storage.record import RecordError
    from storage.store import TargetStoreWriter

    with TargetStoreWriter(tmp_path / "s", make_meta(layout="packed", top_k=12)) as w:
        with pytest.raises(RecordError, match="keeps fewer than k ids"):
            w.write(ragged_records(2, 1)[0])


def _cli(*args, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aligndistil.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("targets,compact_version", [
    (("--top-k", 16, "--dpo-top", 4), 2),
    # the small-store recipe's shape (docs/training.md: the dpo model's mass held to the budget
    # too), with a cap and a budget these tiny, broad teachers reach
    (("--top-k", 16, "--dpo-top", 15, "--tail-budget", 0.5), 3)])
def test_precompute_in_the_packed_layout_holds_the_compact_stores_targets(
        teacher_pair, tmp_path, targets, compact_version):
    data = tmp_path / "train.jsonl"
    rng = np.random.default_rng(0)
    data.write_text("".join(json.dumps({"prompt": f"sort {' '.join(map(str, n))}",
                                        "response": " ".join(map(str, sorted(n)))}) + "\n"
                            for n in (rng.integers(0, 100, 5).tolist() for _ in range(12))))
    common = ["--dpo-model", teacher_pair[0], "--reverse-model", teacher_pair[1], "--data",
              data, *targets, "--device", "cpu", "--group-size", 6,
              "--shard-tokens", 40, "--no-progress"]
    for layout in ("compact", "packed"):
        res = _cli("precompute", *common, "--out", tmp_path / layout, "--layout", layout)
        assert res.returncode == 0, res.stderr
    exact, packed = TargetStore.open(tmp_path / "compact"), TargetStore.open(tmp_path / "packed")
    assert packed.metadata.format_version == 4
    assert exact.metadata.format_version == compact_version
    assert len(packed) == len(exact) == 12
    for i in range(12):
        assert_close_to(packed[i], exact[i])
    if "--tail-budget" in targets:  # the budget was at work: some positions keep fewer ids
        assert min(int(exact[i].topk_count.min()) for i in range(12)) < 16
    res = _cli("inspect", tmp_path / "packed")
    assert res.returncode == 0 and "format v4, layout packed" in res.stdout, res.stderr
    assert _cli("inspect", tmp_path / "packed", "--stats").returncode == 0
    assert _cli("inspect", tmp_path / "packed", "--verify").returncode == 0


def test_a_version_3_reader_refuses_a_packed_store(tmp_path):
    """The release that wrote version 3 (its own code, run) refuses version 4 at open."""
    release = "254029f"  # the last commit whose readers know versions 1-3 only
    known = subprocess.run(["git", "cat-file", "-e", f"{release}^{{commit}}"], cwd=REPO,
                           capture_output=True)
    if known.returncode != 0:
        pytest.skip(f"needs the repository's history (commit {release}); a shallow clone "
                    f"lacks it")
    write_store(tmp_path / "s", ragged_records(1, 4),
                make_meta(layout="packed", top_k=12, tail_budget=0.01))
    import io
    import tarfile
    archive = subprocess.run(["git", "archive", release, "storage"], cwd=REPO,
                             capture_output=True, check=True).stdout
    old = tmp_path / "old"
    old.mkdir()
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(old, filter="data")
    code = ("import sys\nfrom storage.store import TargetStore\n"
            "try:\n    TargetStore.open(sys.argv[1])\nexcept Exception as exc:\n"
            "    print(type(exc).__name__, exc)\nelse:\n    print('OPENED')\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "s")], cwd=old,
                         capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(old), "PATH": "/usr/bin:/bin"})
    assert "format_version 4 is not supported" in out.stdout, out.stdout + out.stderr
