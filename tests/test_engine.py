"""The teacher pair loader and the batching engine, on tiny real Hugging Face models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reference import dense_targets, full_logits
from tiny_models import build_model, build_tokenizer, load, save_model_dir
from storage.packing import pack_by_token_budget as pack_batches
from teacher_service.engine import ScoreRequest, TeacherEngine, truncate_topk
from causal_lm.loading import ModelLoadError
from teacher_service.models import TeacherLoadError, load_teacher_pair
from teacher_service.targets import TargetConfig, compute_targets


@pytest.fixture(scope="module")
def pair_dirs(teacher_pair):
    return teacher_pair


@pytest.fixture(scope="module")
def pair(pair_dirs):
    return load_teacher_pair(*pair_dirs, device="cpu")


def _requests(tokenizer, n=7, seed=0):
    rng = np.random.default_rng(seed)
    reqs = []
    for i in range(n):
        length = int(rng.integers(3, 40))
        ids = rng.integers(0, len(tokenizer), size=length).tolist()
        reqs.append(ScoreRequest(ids, int(rng.integers(1, length)), example_index=100 + i))
    return reqs


def test_engine_matches_dense_float64_reference(pair, pair_dirs):
    config = TargetConfig(top_k=16, r=20.0, chunk_size=5)
    engine = TeacherEngine(pair, config, max_batch_tokens=64)
    reqs = _requests(pair.tokenizer)
    records = engine.score(reqs)
    _, dpo = load(pair_dirs[0])
    _, rev = load(pair_dirs[1])
    for req, rec in zip(reqs, records):
        assert rec.example_index == req.example_index
        assert rec.input_ids.tolist() == list(req.input_ids)
        P, L = req.prompt_len, len(req.input_ids)
        zd = full_logits(dpo, req.input_ids)[P - 1:L - 1]
        zr = full_logits(rev, req.input_ids)[P - 1:L - 1]
        ref = dense_targets(zd, zr, req.input_ids[P:], top_k=16)
        np.testing.assert_allclose(rec.alpha, ref["alpha"], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(rec.dpo_logprobs, ref["dpo_logprobs"], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(rec.reverse_logprobs, ref["reverse_logprobs"], rtol=1e-4,
                                   atol=1e-4)
        # float16 storage of the log-probs: relative 2^-11.
        np.testing.assert_allclose(rec.topk_logprobs, ref["topk_logprobs"], rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(rec.tail_logmass, ref["tail_logmass"], rtol=1e-4, atol=1e-4)
        # Ids agree wherever the reference's log-probs are not (near-)tied.
        gaps = np.diff(ref["topk_logprobs"], axis=1, append=-np.inf)
        gaps = np.minimum(gaps, np.diff(ref["topk_logprobs"], axis=1, prepend=np.inf))
        clear = np.abs(gaps) > 1e-4
        assert (rec.topk_ids[clear] == ref["topk_ids"][clear]).all()


def test_engine_is_batching_invariant(pair):
    reqs = _requests(pair.tokenizer, n=9, seed=1)
    config = TargetConfig(top_k=8, chunk_size=7)
    one_by_one = [TeacherEngine(pair, config, max_batch_tokens=2).score([r])[0] for r in reqs]
    batched = TeacherEngine(pair, config, max_batch_tokens=4096).score(reqs)
    for a, b in zip(one_by_one, batched):
        np.testing.assert_allclose(a.alpha, b.alpha, rtol=1e-5, atol=1e-6)
        # Different batch layouts may round the same value to neighbouring float16 steps.
        np.testing.assert_allclose(a.topk_logprobs.astype(np.float32),
                                   b.topk_logprobs.astype(np.float32), rtol=2e-3, atol=1e-3)
        np.testing.assert_allclose(a.dpo_logprobs, b.dpo_logprobs, atol=1e-4)


def test_engine_applies_head_only_at_response_positions(pair, monkeypatch):
    """The LM head sees exactly the response positions, in chunks of at most chunk_size rows."""
    seen = []
    engine = TeacherEngine(pair, TargetConfig(top_k=4, chunk_size=6))
    real_head = engine.dpo_head

    def recording_head(hidden):
        seen.append(tuple(hidden.shape))
        return real_head(hidden)

    monkeypatch.setattr(engine, "dpo_head", recording_head)
    reqs = _requests(pair.tokenizer, n=5, seed=2)
    engine.score(reqs)
    total = sum(len(r.input_ids) - r.prompt_len for r in reqs)
    assert sum(s[0] for s in seen) == total
    assert max(s[0] for s in seen) <= 6
    assert all(len(s) == 2 for s in seen)  # [chunk, H], never [batch, time, H]


def test_requested_top_k_folds_dropped_mass_into_tail(pair):
    reqs = _requests(pair.tokenizer, n=3, seed=3)
    engine = TeacherEngine(pair, TargetConfig(top_k=32))
    full = engine.score(reqs)
    small = engine.score(reqs, top_k=5)
    for a, b in zip(full, small):
        assert b.top_k == 5
        assert (a.topk_ids[:, :5] == b.topk_ids).all()
        mass = np.logaddexp(a.tail_logmass, np.logaddexp.reduce(
            a.topk_logprobs[:, 5:].astype(np.float64), axis=1))
        # Rebuilt here from float16-rounded log-probs (the float32 path is exact: see below).
        np.testing.assert_allclose(b.tail_logmass, mass, rtol=2e-3, atol=1e-2)
    with pytest.raises(ValueError, match="top_k"):
        engine.score(reqs, top_k=33)


def test_truncate_topk_is_exact_in_float32():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 20, generator=g) * 3
    ids = torch.randint(0, 20, (4,), generator=g)
    cfg = TargetConfig(top_k=10)
    full = compute_targets(logits, logits.flip(-1), ids, cfg)
    cut = truncate_topk(full, 3)
    direct = compute_targets(logits, logits.flip(-1), ids, TargetConfig(top_k=3))
    torch.testing.assert_close(cut.tail_logmass, direct.tail_logmass, rtol=1e-5, atol=1e-5)
    assert torch.equal(cut.topk_ids, direct.topk_ids)


@pytest.mark.parametrize("bad,match", [
    (ScoreRequest([5], 1), "need a prompt and a response"),
    (ScoreRequest([5, 6, 7], 0), "prompt_len"),
    (ScoreRequest([5, 6, 7], 3), "prompt_len"),
    (ScoreRequest([5, 6, 10_000], 1), "outside the vocabulary"),
    (ScoreRequest([5, -1, 7], 1), "outside the vocabulary"),
])
def test_invalid_sequences_are_refused_with_their_index(pair, bad, match):
    engine = TeacherEngine(pair, TargetConfig(top_k=4))
    good = ScoreRequest([5, 6, 7], 1)
    with pytest.raises(ValueError, match=match) as info:
        engine.score([good, bad])
    assert "sequences[1]" in str(info.value)


def test_max_seq_len_is_enforced(pair):
    engine = TeacherEngine(pair, TargetConfig(top_k=4), max_seq_len=10)
    with pytest.raises(ValueError, match="max_seq_len 10"):
        engine.score([ScoreRequest(list(range(5, 16)), 2)])


def test_pack_batches_respects_budget_and_covers():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 100, size=200).tolist()
    batches = pack_batches(lengths, 256)
    assert sorted(i for b in batches for i in b) == list(range(200))
    for b in batches:
        assert len(b) == 1 or max(lengths[i] for i in b) * len(b) <= 256


def test_mismatched_tokenizers_are_refused(tmp_path):
    a = save_model_dir(tmp_path / "a", seed=1)
    b = save_model_dir(tmp_path / "b", seed=2, extra_words=3)
    with pytest.raises(TeacherLoadError, match="do not share a tokenizer"):
        load_teacher_pair(a, b, device="cpu")


def test_padded_embedding_rows_are_dropped_explicitly(tmp_path, caplog):
    """Models with more output rows than the tokenizer has tokens (as Qwen2.5 pads 151665 to
    151936): targets range over the tokenizer's vocabulary only, and the loader says so."""
    tok = build_tokenizer()
    for name, seed in (("dpo", 1), ("rev", 2)):
        model = build_model(len(tok) + 12, seed=seed)
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    with caplog.at_level("WARNING"):
        pair = load_teacher_pair(tmp_path / "dpo", tmp_path / "rev", device="cpu")
    assert pair.vocab_size == len(tok) and pair.model_vocab_size == len(tok) + 12
    assert "12 padding rows" in caplog.text
    engine = TeacherEngine(pair, TargetConfig(top_k=len(tok)))
    rec = engine.score([ScoreRequest([4, 20, 30, 40], 2)])[0]
    assert rec.topk_ids.max() < len(tok)
    assert np.isneginf(rec.tail_logmass).all()  # k == V of the tokenizer: no tail


def test_model_with_too_few_rows_is_refused(tmp_path):
    tok = build_tokenizer()
    for name in ("dpo", "rev"):
        build_model(len(tok) - 4).save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    with pytest.raises(TeacherLoadError, match="would have no logit"):
        load_teacher_pair(tmp_path / "dpo", tmp_path / "rev", device="cpu")


def test_pickle_weights_are_refused(tmp_path):
    d = save_model_dir(tmp_path / "m")
    for f in d.glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    with pytest.raises(ModelLoadError, match="only safetensors"):
        load_teacher_pair(d, d, device="cpu")


def test_each_torchrun_worker_takes_the_gpu_of_its_local_rank(monkeypatch):
    """Pure index logic (no GPU here): under torchrun LOCAL_RANK picks the device."""
    from causal_lm.loading import local_cuda_index

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert local_cuda_index(8) == 0
    for rank in range(8):
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        assert local_cuda_index(8) == rank
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert local_cuda_index(1) == 0  # one visible device (CUDA_VISIBLE_DEVICES per worker)


def test_bfloat16_teachers_get_float32_heads(pair_dirs):
    """DESIGN §2 precision: with bf16 decoders, the targets equal a float64 computation from the
    SAME bf16 hidden states and weights to float32 precision; a bf16 head (the head in the
    decoder's dtype) is far off, because alpha multiplies its rounding."""
    from causal_lm.head import response_hidden

    pair = load_teacher_pair(*pair_dirs, device="cpu", dtype="bfloat16")
    assert pair.dpo.dtype == torch.bfloat16 and pair.other.dtype == torch.bfloat16
    # One sequence per pass (no padding), so the decoder's bf16 hidden states below are the
    # engine's own, bit for bit.
    engine = TeacherEngine(pair, TargetConfig(top_k=8, r=20.0), max_batch_tokens=2)
    reqs = _requests(pair.tokenizer, n=6, seed=3)
    records = engine.score(reqs)
    vocab = pair.vocab_size
    err = {"float32 head": [], "bf16 head": []}
    for req, rec in zip(reqs, records):
        P, L = req.prompt_len, len(req.input_ids)
        ids = torch.tensor([list(req.input_ids)])
        rows, cols = torch.zeros(L - P, dtype=torch.long), torch.arange(P - 1, L - 1)
        with torch.no_grad():
            h_d = response_hidden(pair.dpo, ids, torch.ones_like(ids), rows, cols)
            h_o = response_hidden(pair.other, ids, torch.ones_like(ids), rows, cols)
            w_d = pair.dpo.get_output_embeddings().weight[:vocab]
            w_o = pair.other.get_output_embeddings().weight[:vocab]
            exact = (h_d.double() @ w_d.double().T, h_o.double() @ w_o.double().T)
            bf16 = ((h_d @ w_d.T).double(), (h_o @ w_o.T).double())
        ref = dense_targets(*[z.numpy() for z in exact], req.input_ids[P:], top_k=8)
        old = dense_targets(*[z.numpy() for z in bf16], req.input_ids[P:], top_k=8)
        for name, got in (("float32 head", rec), ("bf16 head", old)):
            got = got if isinstance(got, dict) else {k: getattr(got, k) for k in ref
                                                     if k != "log_pi"}
            err[name].append(max(
                np.abs(np.asarray(got["alpha"], np.float64) - ref["alpha"]).max(),
                np.abs(np.asarray(got["dpo_logprobs"], np.float64) - ref["dpo_logprobs"]).max(),
                np.abs(np.asarray(got["reverse_logprobs"], np.float64)
                       - ref["reverse_logprobs"]).max()))
        # float16 storage of the top-k log-probs: relative 2^-11.
        np.testing.assert_allclose(rec.topk_logprobs, ref["topk_logprobs"], rtol=2e-3, atol=2e-3)
    fp32, bf = max(err["float32 head"]), max(err["bf16 head"])
    assert fp32 < 1e-4, err
    assert bf > 50 * fp32, err  # what the head in the decoder's dtype used to cost


def test_packed_forwards_give_the_padded_records(pair):
    """Padding-free rows (several sequences back to back, positions restarting) score every
    sequence as the padded layout does, within float32 rounding; a small budget forces several
    batches and rows holding several sequences."""
    reqs = _requests(pair.tokenizer, n=15, seed=3)
    config = TargetConfig(top_k=8, chunk_size=16)
    padded = TeacherEngine(pair, config, max_batch_tokens=80).score(reqs)
    packed_engine = TeacherEngine(pair, config, max_batch_tokens=80, packing=True)
    packed = packed_engine.score(reqs)
    for a, b in zip(padded, packed):
        assert a.example_index == b.example_index and (a.input_ids == b.input_ids).all()
        np.testing.assert_allclose(a.alpha, b.alpha, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a.dpo_logprobs, b.dpo_logprobs, atol=1e-4)
        np.testing.assert_allclose(a.reverse_logprobs, b.reverse_logprobs, atol=1e-4)
        np.testing.assert_allclose(a.topk_logprobs.astype(np.float32),
                                   b.topk_logprobs.astype(np.float32), rtol=2e-3, atol=1e-3)
        np.testing.assert_allclose(a.tail_logmass, b.tail_logmass, rtol=1e-4, atol=1e-4)


def test_packing_rows_hold_several_sequences_within_the_budget():
    from storage.packing import pack_rows_by_token_budget

    lengths = [30, 5, 12, 30, 7, 18, 3, 25, 9, 9]
    batches = pack_rows_by_token_budget(lengths, 64)
    seen = sorted(i for rows in batches for row in rows for i in row)
    assert seen == list(range(len(lengths)))
    for rows in batches:
        capacity = max(lengths[i] for row in rows for i in row)
        assert all(sum(lengths[i] for i in row) <= capacity for row in rows)
        assert len(rows) * capacity <= 64 or len(rows) == 1
    assert any(len(row) > 1 for rows in batches for row in rows)
    # fewer computed places than the padded layout under the same budget
    packed = sum(len(rows) * max(lengths[i] for r in rows for i in r) for rows in batches)
    padded = sum(len(g) * max(lengths[i] for i in g) for g in pack_batches(lengths, 64))
    assert packed < padded
    assert pack_rows_by_token_budget([100, 3], 10) == [[[0]], [[1]]]  # over budget: alone


def test_packing_is_refused_or_skipped_for_a_model_that_attends_across_sequences(tmp_path):
    """A real architecture whose attention ignores the packed positions (Bloom: ALiBi and its
    own mask): auto falls back to padded batches and says why; on refuses."""
    from transformers import BloomConfig, BloomForCausalLM

    from storage.errors import ConfigError
    from causal_lm.packed import choose_packing

    torch.manual_seed(0)
    bloom = BloomForCausalLM(BloomConfig(n_layer=2, hidden_size=64, n_head=2, vocab_size=100))
    assert choose_packing("auto", bloom) is False
    with pytest.raises(ConfigError, match="--packing on: bloom model: packed sequences do not"):
        choose_packing("on", bloom)
    assert choose_packing("off", bloom) is False


def test_a_layer_split_device_map_gives_the_single_device_records(pair, pair_dirs):
    """--dpo-devices / --reverse-devices: each teacher loaded through a device map that splits
    its layers over two devices (here both the CPU: no GPUs on this machine, so the split
    across real devices is not exercised) scores every example exactly as the default path."""
    from causal_lm.placement import layer_device_map

    split = load_teacher_pair(*pair_dirs, device="cpu", dpo_devices="cpu,cpu",
                              other_devices="cpu,cpu")
    reqs = _requests(pair.tokenizer, n=9, seed=4)
    config = TargetConfig(top_k=8, chunk_size=16)
    want = TeacherEngine(pair, config).score(reqs)
    got = TeacherEngine(split, config).score(reqs)
    assert all(a.equals(b) for a, b in zip(want, got))
    # the map the flags build: layers in order, embeddings first, final norm and head last
    placed = layer_device_map(pair_dirs[0], ["cuda:0", "cuda:1", "cuda:2"])
    layers = {k: v for k, v in placed.items() if ".layers." in k}
    assert layers == {"model.layers.0": "cuda:0", "model.layers.1": "cuda:1"}
    assert placed["model.embed_tokens"] == "cuda:0"
    assert placed["model.norm"] == placed["lm_head"] == "cuda:2"


def test_bad_device_lists_are_refused():
    from causal_lm.placement import PlacementError, parse_devices

    assert parse_devices("balanced", "--dpo-devices") == "balanced"
    assert parse_devices("cuda:0, cuda:1", "--dpo-devices") == ["cuda:0", "cuda:1"]
    for bad in ("", "gpu0,gpu1"):
        with pytest.raises(PlacementError, match="--dpo-devices"):
            parse_devices(bad, "--dpo-devices")


def test_score_detailed_gives_the_actual_tokens_log_pi_star_rank_and_named_ids(pair):
    """The protocols' extras against the float64 dense reference: log pi* of each actual next
    token and its 1-based rank over the vocabulary (ids with log pi* >= it, as vLLM counts),
    and log pi* at the ids a request names (-1: padding, -inf)."""
    reqs = _requests(pair.tokenizer, n=5, seed=11)
    rng = np.random.default_rng(3)
    named = []
    for i, r in enumerate(reqs):
        t = len(r.input_ids) - r.prompt_len
        ids = rng.integers(0, pair.vocab_size, size=(t, 3 + i % 2))
        ids[0, -1] = -1
        named.append(ids)
    detailed = TeacherEngine(pair, TargetConfig(top_k=8), max_batch_tokens=60).score_detailed(
        [ScoreRequest(r.input_ids, r.prompt_len, r.example_index, extra_ids=ids)
         for r, ids in zip(reqs, named)])
    plain = TeacherEngine(pair, TargetConfig(top_k=8), max_batch_tokens=60).score(reqs)
    for (record, detail), req, ids, same in zip(detailed, reqs, named, plain):
        assert record.equals(same)  # the records are the ones score() gives
        p, n = req.prompt_len, len(req.input_ids)
        log_pi = dense_targets(full_logits(pair.dpo, req.input_ids)[p - 1:n - 1],
                               full_logits(pair.other, req.input_ids)[p - 1:n - 1],
                               req.input_ids[p:], top_k=8)["log_pi"]
        actual = log_pi[np.arange(n - p), req.input_ids[p:]]
        np.testing.assert_allclose(detail.next_logprobs, actual, rtol=1e-4, atol=1e-4)
        # 1-based: the actual token counts itself; exact wherever no other id is within float32
        # rounding of it (a near-tie may land either side)
        want_rank = (log_pi >= actual[:, None]).sum(-1)
        near = (np.abs(log_pi - actual[:, None]) < 1e-4).sum(-1) > 1
        assert (detail.next_ranks[~near] == want_rank[~near]).all()
        assert (np.abs(detail.next_ranks - want_rank) <= near.astype(int)).all()
        want = np.where(ids >= 0, np.take_along_axis(log_pi, np.maximum(ids, 0), -1), -np.inf)
        np.testing.assert_allclose(detail.extra_logprobs, want, rtol=1e-4, atol=1e-4)


def test_named_ids_outside_the_vocabulary_or_of_the_wrong_shape_are_refused(pair):
    from teacher_service.engine import InvalidSequenceError

    engine = TeacherEngine(pair, TargetConfig(top_k=8))
    req = ScoreRequest([5, 6, 7, 8], 2)
    with pytest.raises(InvalidSequenceError, match="outside the vocabulary"):
        engine.score_detailed([ScoreRequest(req.input_ids, 2, extra_ids=np.array([[1], [10**6]]))])
    with pytest.raises(InvalidSequenceError, match="extra_ids has 3 rows"):
        engine.score_detailed([ScoreRequest(req.input_ids, 2, extra_ids=np.zeros((3, 1), int))])
