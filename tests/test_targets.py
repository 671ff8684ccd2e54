"""Tests for teacher_service.targets: the AlignDistil teacher math (DESIGN §2).

Every output is checked against ``brute_force`` below: a dense float64 numpy transcription of
§2 written without calling into ``targets.py`` (it also uses the raw logits in eq. 17, where the
module uses log-probs, so the two formulations are checked against each other).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.overrides import TorchFunctionMode

from teacher_service.targets import (
    MODES,
    TVD_NORMS,
    SparseTargets,
    TargetConfig,
    compute_targets,
    default_r,
    teacher_logprobs,
)
from causal_lm.positions import response_logit_positions
from tiny_models import load

PROPERTY_SETTINGS = settings(max_examples=40, deadline=None, derandomize=True,
                             suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------- the reference

def _lse(x: np.ndarray) -> np.ndarray:
    """Row-wise log-sum-exp in float64; -inf for an empty or all -inf row."""
    if x.shape[-1] == 0:
        return np.full(x.shape[:-1], -np.inf)
    m = x.max(axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))[..., 0]


def _f64(t: torch.Tensor) -> np.ndarray:
    # bf16/fp16 values are exactly representable in float64: the reference sees what the
    # function under test sees.
    return t.detach().to(torch.float64).cpu().numpy()


def brute_force(dpo: torch.Tensor, other: torch.Tensor, next_ids: torch.Tensor, *, top_k: int,
                r: float = 20.0, eps: float = 1e-3, tvd_norm: str = "half-l1",
                mode: str = "adaptive", beta0: float = 0.1, beta: float = 0.05) -> dict:
    zd, zo = _f64(dpo), _f64(other)
    nxt = next_ids.cpu().numpy().astype(np.int64)
    n, v = zd.shape
    log_pd = zd - _lse(zd)[:, None]
    log_po = zo - _lse(zo)[:, None]
    if mode == "vanilla":
        w = beta0 / beta
        z_star = w * zd + (1.0 - w) * zo
        alpha = np.full(n, w)
    elif mode == "vanilla-adaptive":  # the released code's theorem1_adaptive
        l1 = np.abs(np.exp(log_pd) - np.exp(log_po)).sum(axis=-1)
        alpha = r * (0.5 * l1 if tvd_norm == "half-l1" else l1) + eps
        z_star = alpha[:, None] * zd + (1.0 - alpha[:, None]) * zo
    else:
        if mode == "adaptive":
            l1 = np.abs(np.exp(log_pd) - np.exp(log_po)).sum(axis=-1)
            alpha = r * (0.5 * l1 if tvd_norm == "half-l1" else l1) + eps
        else:
            alpha = np.full(n, beta0 / beta)
        z_star = zd + alpha[:, None] * (zd - zo)
    logp = z_star - _lse(z_star)[:, None]
    order = np.argsort(-logp, axis=-1, kind="stable")
    ids = order[:, :top_k]
    rows = np.arange(n)
    return {
        "alpha": alpha,
        "logp": logp,
        "topk_ids": ids,
        "topk_logprobs": np.take_along_axis(logp, ids, axis=-1),
        "tail_logmass": _lse(np.take_along_axis(logp, order[:, top_k:], axis=-1)),
        "dpo_logprobs": log_pd[rows, nxt],
        "reverse_logprobs": log_po[rows, nxt],
    }


def random_logits(n: int, v: int, *, seed: int, scale: float = 3.0, spread: float = 1.0,
                  dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor,
                                                               torch.Tensor]:
    """dpo logits, other logits = dpo + noise with a per-row size in [0, 2 * spread] (so alpha
    varies across rows), and next ids."""
    g = torch.Generator().manual_seed(seed)
    dpo = scale * torch.randn(n, v, generator=g, dtype=torch.float64)
    row_mix = 2.0 * spread * torch.rand(n, 1, generator=g, dtype=torch.float64)
    other = dpo + scale * row_mix * torch.randn(n, v, generator=g, dtype=torch.float64)
    next_ids = torch.randint(0, v, (n,), generator=g)
    return dpo.to(dtype), other.to(dtype), next_ids


def assert_matches(out: SparseTargets, ref: dict, *, dtype: torch.dtype, top_k: int,
                   exact_ids: bool) -> None:
    n, v = ref["logp"].shape
    k = top_k
    float_out = torch.float64 if dtype == torch.float64 else torch.float32
    tol = dict(rtol=1e-11, atol=1e-11) if float_out == torch.float64 else dict(rtol=3e-5,
                                                                                atol=3e-5)
    # contract: shapes and dtypes
    assert out.alpha.shape == (n,) and out.alpha.dtype == float_out
    assert out.topk_ids.shape == (n, k) and out.topk_ids.dtype == torch.int64
    assert out.topk_logprobs.shape == (n, k) and out.topk_logprobs.dtype == float_out
    for name in ("tail_logmass", "dpo_logprobs", "reverse_logprobs"):
        assert getattr(out, name).shape == (n,) and getattr(out, name).dtype == float_out

    np.testing.assert_allclose(out.alpha.numpy(), ref["alpha"], **tol)
    # The top-k values are the k largest log-probs of the full-vocabulary teacher ...
    np.testing.assert_allclose(out.topk_logprobs.numpy(), ref["topk_logprobs"], **tol)
    # ... each id carries its own log-prob (robust to near-ties swapping in float32) ...
    ids = out.topk_ids.numpy()
    assert ((ids >= 0) & (ids < v)).all()
    assert all(len(set(row)) == k for row in ids.tolist())
    np.testing.assert_allclose(np.take_along_axis(ref["logp"], ids, axis=-1),
                               out.topk_logprobs.numpy(), **tol)
    if exact_ids:  # ... and in float64 they are exactly the reference's ids, in order.
        np.testing.assert_array_equal(ids, ref["topk_ids"])
    if k == v:
        assert torch.isneginf(out.tail_logmass).all()
    else:
        np.testing.assert_allclose(out.tail_logmass.numpy(), ref["tail_logmass"], **tol)
    # top-k plus tail is the whole distribution
    total = torch.logsumexp(torch.cat([out.topk_logprobs, out.tail_logmass[:, None]], -1), -1)
    torch.testing.assert_close(total, torch.zeros_like(total), **tol)
    np.testing.assert_allclose(out.dpo_logprobs.numpy(), ref["dpo_logprobs"], **tol)
    np.testing.assert_allclose(out.reverse_logprobs.numpy(), ref["reverse_logprobs"], **tol)


# ---------------------------------------------------------------------------- against brute force

CASES = [(v, mode, norm, dtype, chunk)
         for v, chunk in ((7, 4), (50, 3), (1000, 5))
         for mode, norm in (("adaptive", "half-l1"), ("adaptive", "l1"),
                            ("constant", "half-l1"), ("vanilla", "half-l1"),
                            ("vanilla-adaptive", "half-l1"), ("vanilla-adaptive", "l1"))
         for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64)]


@pytest.mark.parametrize("vocab,mode,tvd_norm,dtype,chunk", CASES,
                         ids=[f"V{c[0]}-{c[1]}-{c[2]}-{str(c[3])[6:]}-chunk{c[4]}" for c in CASES])
def test_matches_brute_force(vocab, mode, tvd_norm, dtype, chunk):
    n = 11  # no chunk size above divides it
    dpo, other, next_ids = random_logits(n, vocab, seed=vocab + chunk, dtype=dtype)
    for top_k in sorted({1, max(1, vocab // 3), vocab}):
        cfg = TargetConfig(top_k=top_k, r=default_r(tvd_norm), tvd_norm=tvd_norm, mode=mode,
                           beta0=0.1, beta=0.04, chunk_size=chunk)
        out = compute_targets(dpo, other, next_ids, cfg)
        ref = brute_force(dpo, other, next_ids, top_k=top_k, r=cfg.r, eps=cfg.eps,
                          tvd_norm=tvd_norm, mode=mode, beta0=0.1, beta=0.04)
        assert_matches(out, ref, dtype=dtype, top_k=top_k, exact_ids=dtype == torch.float64)
        if mode == "constant":
            assert torch.all(out.alpha == torch.tensor(0.1 / 0.04, dtype=out.alpha.dtype))
        if mode == "vanilla":  # alpha reports w = beta0 / beta
            assert torch.allclose(out.alpha.double(), torch.full((n,), 0.1 / 0.04,
                                                                 dtype=torch.float64))


@pytest.mark.parametrize("tvd_norm", TVD_NORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_alpha_regimes(tvd_norm, dtype):
    r, eps, n, v = 10.0, 1e-3, 9, 200
    # Near-identical teachers: tvd ~ 0, alpha ~ eps.
    g = torch.Generator().manual_seed(3)
    # (dpo is representable in ``dtype``, so the 1e-6 noise cannot flip a bf16 rounding.)
    dpo = (3.0 * torch.randn(n, v, generator=g, dtype=torch.float64)).to(dtype).double()
    close = dpo + 1e-6 * torch.randn(n, v, generator=g, dtype=torch.float64)
    # Very different teachers: each puts almost all its mass on its own token, tvd ~ max.
    peaked = torch.zeros(n, v, dtype=torch.float64)
    peaked[:, 0] = 60.0
    other_peaked = torch.zeros(n, v, dtype=torch.float64)
    other_peaked[:, 1] = 60.0
    ids = torch.zeros(n, dtype=torch.int64)
    full = r if tvd_norm == "half-l1" else 2 * r
    cfg = TargetConfig(top_k=5, r=r, eps=eps, tvd_norm=tvd_norm, chunk_size=4)
    for a, b, expect in ((dpo, close, eps), (peaked, other_peaked, full + eps)):
        a, b = a.to(dtype), b.to(dtype)
        out = compute_targets(a, b, ids, cfg)
        ref = brute_force(a, b, ids, top_k=5, r=r, eps=eps, tvd_norm=tvd_norm)
        assert_matches(out, ref, dtype=dtype, top_k=5, exact_ids=False)
        np.testing.assert_allclose(out.alpha.double().numpy(), expect,
                                   rtol=1e-3 if expect > 1 else 0, atol=2e-5 if expect < 1 else 0)


def test_dense_teacher_matches_brute_force_and_sparse_targets():
    dpo, other, next_ids = random_logits(13, 300, seed=5, dtype=torch.bfloat16)
    for mode in MODES:
        cfg = TargetConfig(top_k=20, mode=mode, chunk_size=6)
        logp, alpha = teacher_logprobs(dpo, other, cfg)
        ref = brute_force(dpo, other, next_ids, top_k=20, mode=mode)
        assert logp.shape == (13, 300) and logp.dtype == torch.float32
        np.testing.assert_allclose(logp.numpy(), ref["logp"], rtol=3e-5, atol=3e-5)
        np.testing.assert_allclose(alpha.numpy(), ref["alpha"], rtol=1e-5, atol=1e-6)
        sparse = compute_targets(dpo, other, next_ids, cfg)
        torch.testing.assert_close(sparse.alpha, alpha)
        torch.testing.assert_close(sparse.topk_logprobs, logp.gather(-1, sparse.topk_ids))


def test_chunk_size_does_not_change_results():
    dpo, other, next_ids = random_logits(23, 64, seed=8)
    outs = [compute_targets(dpo, other, next_ids, TargetConfig(top_k=9, chunk_size=c))
            for c in (1, 4, 23, 1000)]
    for out in outs[1:]:
        for a, b in zip(outs[0], out):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------- the tail

def test_tail_logmass_is_accurate_where_one_minus_sum_is_not():
    """Top-k holds 1 - ~1e-9 of the mass: log(1 - sum(exp(topk))) in float32 is -inf or far
    off; the logsumexp tail matches the float64 reference."""
    n, v, k = 6, 500, 4
    g = torch.Generator().manual_seed(11)
    dpo = torch.randn(n, v, generator=g, dtype=torch.float64) - 33.0
    dpo[:, :k] = torch.tensor([6.0, 5.0, 4.0, 3.0], dtype=torch.float64)
    other = dpo + 0.3 * torch.randn(n, v, generator=g, dtype=torch.float64)
    dpo32, other32 = dpo.float(), other.float()
    ids = torch.zeros(n, dtype=torch.int64)
    cfg = TargetConfig(top_k=k, r=2.0, chunk_size=4)
    out = compute_targets(dpo32, other32, ids, cfg)
    ref = brute_force(dpo32, other32, ids, top_k=k, r=2.0)

    tail_ref = ref["tail_logmass"]
    assert (tail_ref < -18).all() and (tail_ref > -40).all()  # the regime this test is about
    np.testing.assert_allclose(out.tail_logmass.numpy(), tail_ref, rtol=1e-3)
    naive = torch.log1p(-out.topk_logprobs.exp().sum(-1))  # what the module must not do
    assert (~torch.isfinite(naive) | ((naive.double() - torch.from_numpy(tail_ref)).abs() > 1)
            ).all()


# ---------------------------------------------------------------------------- properties

@PROPERTY_SETTINGS
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 12), v=st.integers(1, 80),
       k_frac=st.floats(0.0, 1.0), r=st.floats(0.0, 40.0), eps=st.floats(1e-6, 1.0),
       tvd_norm=st.sampled_from(TVD_NORMS), scale=st.floats(0.0, 40.0),
       spread=st.floats(0.0, 3.0), chunk=st.integers(1, 8))
def test_properties_alpha_range_sorted_unique(seed, n, v, k_frac, r, eps, tvd_norm, scale,
                                              spread, chunk):
    k = max(1, math.ceil(k_frac * v))
    dpo, other, next_ids = random_logits(n, v, seed=seed, scale=scale, spread=spread)
    out = compute_targets(dpo, other, next_ids,
                          TargetConfig(top_k=k, r=r, eps=eps, tvd_norm=tvd_norm, chunk_size=chunk))
    alpha = out.alpha
    max_tvd = 1.0 if tvd_norm == "half-l1" else 2.0
    assert (alpha >= torch.tensor(eps, dtype=torch.float32)).all()
    assert (alpha <= r * max_tvd + eps + 1e-5 * (1 + r)).all()
    assert (out.topk_logprobs[:, 1:] <= out.topk_logprobs[:, :-1]).all()  # descending
    assert (out.topk_logprobs <= 0).all() and torch.isfinite(out.topk_logprobs).all()
    assert ((out.topk_ids >= 0) & (out.topk_ids < v)).all()
    assert all(len(set(row)) == k for row in out.topk_ids.tolist())
    if k == v:
        assert torch.isneginf(out.tail_logmass).all()
    else:
        assert torch.isfinite(out.tail_logmass).all() and (out.tail_logmass <= 0).all()
    total = torch.logsumexp(torch.cat([out.topk_logprobs, out.tail_logmass[:, None]], -1), -1)
    torch.testing.assert_close(total, torch.zeros_like(total), rtol=0, atol=1e-5)


@PROPERTY_SETTINGS
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 10), v=st.integers(2, 60),
       mode=st.sampled_from(MODES), tvd_norm=st.sampled_from(TVD_NORMS),
       shift_scale=st.floats(0.0, 1000.0), k_frac=st.floats(0.0, 1.0))
def test_property_invariant_to_per_position_logit_offsets(seed, n, v, mode, tvd_norm,
                                                          shift_scale, k_frac):
    k = max(1, math.ceil(k_frac * v))
    dpo, other, next_ids = random_logits(n, v, seed=seed, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed + 1)
    c_d = shift_scale * torch.randn(n, 1, generator=g, dtype=torch.float64)
    c_o = shift_scale * torch.randn(n, 1, generator=g, dtype=torch.float64)
    cfg = TargetConfig(top_k=k, mode=mode, tvd_norm=tvd_norm, chunk_size=3)
    base = compute_targets(dpo, other, next_ids, cfg)
    shifted = compute_targets(dpo + c_d, other + c_o, next_ids, cfg)
    torch.testing.assert_close(shifted.topk_ids, base.topk_ids, rtol=0, atol=0)
    for name in ("alpha", "topk_logprobs", "tail_logmass", "dpo_logprobs", "reverse_logprobs"):
        torch.testing.assert_close(getattr(shifted, name), getattr(base, name),
                                   rtol=1e-9, atol=1e-9, msg=name)
    # float32 (the production precision): the dense teacher moves only by rounding.
    logp32, alpha32 = teacher_logprobs(dpo.float(), other.float(), cfg)
    logp32s, alpha32s = teacher_logprobs((dpo + c_d).float(), (other + c_o).float(), cfg)
    torch.testing.assert_close(alpha32s, alpha32, rtol=0, atol=1e-3)
    torch.testing.assert_close(logp32s, logp32, rtol=0, atol=5e-2 if shift_scale > 10 else 1e-3)


# ---------------------------------------------------------------------------- memory shape

class _FullVocabRows(TorchFunctionMode):
    """Records the most rows of any full-vocabulary tensor ([rows, V]) an op returns."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.max_rows = 0
        self.ops = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        results = out if isinstance(out, (tuple, list)) else (out,)
        for t in results:
            if isinstance(t, torch.Tensor) and t.ndim >= 1 and t.shape[-1] == self.vocab:
                self.ops += 1
                self.max_rows = max(self.max_rows, t.numel() // self.vocab)
        return out


def test_no_op_sees_more_than_chunk_size_rows():
    n, v, chunk = 50, 97, 7
    dpo, other, next_ids = random_logits(n, v, seed=2, dtype=torch.bfloat16)
    for mode in MODES:
        recorder = _FullVocabRows(v)
        with recorder:
            compute_targets(dpo, other, next_ids, TargetConfig(top_k=5, mode=mode,
                                                               chunk_size=chunk))
        assert recorder.ops > 10  # the recorder did see the full-vocabulary work ...
        assert recorder.max_rows == chunk  # ... and none of it was bigger than one chunk
    # Control: the recorder does catch an unchunked computation.
    recorder = _FullVocabRows(v)
    with recorder:
        compute_targets(dpo, other, next_ids, TargetConfig(top_k=5, chunk_size=n))
    assert recorder.max_rows == n


# ---------------------------------------------------------------------------- validation

def test_default_r_reproduces_the_released_runs():
    assert default_r("l1", "off") == 10.0 and default_r("l1", "on") == 15.0
    assert default_r("half-l1", "off") == 20.0 and default_r("half-l1", "on") == 30.0
    assert default_r() == TargetConfig().r == 20.0
    assert default_r("l1", "on-policy") == 15.0
    with pytest.raises(ValueError, match="policy"):
        default_r("l1", "sideways")
    with pytest.raises(ValueError, match="tvd_norm"):
        default_r("l2")


@pytest.mark.parametrize("kwargs,match", [
    ({"mode": "bogus"},
     r"mode: expected one of \('adaptive', 'constant', 'vanilla', 'vanilla-adaptive'\)"),
    ({"tvd_norm": "l2"}, r"tvd_norm: expected one of \('half-l1', 'l1'\)"),
    ({"eps": 0.0}, r"eps: must be finite and > 0, got 0.0"),
    ({"eps": -1e-3}, r"eps: must be finite and > 0"),
    ({"r": -0.5}, r"r: must be finite and >= 0, got -0.5"),
    ({"r": float("nan")}, r"r: must be finite"),
    ({"top_k": 0}, r"top_k: must be >= 1, got 0"),
    ({"top_k": 2.5}, r"top_k: expected an integer"),
    ({"top_k": True}, r"top_k: expected an integer"),
    ({"chunk_size": 0}, r"chunk_size: must be >= 1"),
    ({"beta": 0.0}, r"beta: must be finite and > 0"),
    ({"beta0": -0.1}, r"beta0: must be finite and > 0"),
    ({"eps": "1e-3"}, r"eps: expected a number"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TargetConfig(**kwargs)


def test_top_k_above_vocab_is_refused_naming_both():
    dpo, other, next_ids = random_logits(3, 7, seed=0)
    with pytest.raises(ValueError, match=r"top_k = 8 exceeds the vocabulary size V = 7"):
        compute_targets(dpo, other, next_ids, TargetConfig(top_k=8))
    compute_targets(dpo, other, next_ids, TargetConfig(top_k=7))  # k == V is fine


def test_bad_inputs_are_refused():
    dpo, other, next_ids = random_logits(4, 10, seed=0)
    cfg = TargetConfig(top_k=3)
    bad = [
        ((dpo, other[:, :9], next_ids), "other_logits: shape"),
        ((dpo[0], other[0], next_ids[:1]), r"dpo_logits: expected shape \[N, V\]"),
        ((dpo.long(), other, next_ids), "dpo_logits: expected floating-point"),
        ((dpo, other, next_ids[:3]), r"next_ids: expected shape \(4,\)"),
        ((dpo, other, next_ids.float()), "next_ids: expected integer"),
        ((dpo, other, torch.tensor([0, 1, 2, 10])), r"next_ids: token ids must lie in \[0, V = 10\)"),
        ((dpo, other, torch.tensor([0, -1, 2, 3])), "next_ids: token ids must lie"),
    ]
    nan_other = other.clone()
    nan_other[3, 4] = float("nan")
    bad.append(((dpo, nan_other, next_ids), "other_logits: contains NaN or infinite"))
    inf_dpo = dpo.clone()
    inf_dpo[0, 0] = -float("inf")
    bad.append(((inf_dpo, other, next_ids), "dpo_logits: contains NaN or infinite"))
    for args, match in bad:
        with pytest.raises(ValueError, match=match):
            compute_targets(*args, cfg)


def test_empty_batch():
    out = compute_targets(torch.zeros(0, 10), torch.zeros(0, 10), torch.zeros(0, dtype=torch.long),
                          TargetConfig(top_k=4))
    assert out.topk_ids.shape == (0, 4) and out.alpha.shape == (0,)


def test_response_logit_positions():
    assert response_logit_positions(3, 7) == slice(2, 6)
    assert response_logit_positions(1, 2) == slice(0, 1)
    for p, length in ((0, 5), (5, 5), (6, 5)):
        with pytest.raises(ValueError, match="prompt_len"):
            response_logit_positions(p, length)


# ---------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def loaded_pair(teacher_pair):
    dpo_dir, reverse_dir = teacher_pair
    tokenizer, dpo = load(dpo_dir)
    _, reverse = load(reverse_dir)
    return tokenizer, dpo, reverse


def test_end_to_end_with_tiny_hf_pair(loaded_pair):
    tokenizer, dpo_model, reverse_model = loaded_pair
    prompt = [{"role": "user", "content": "sort the list 7 3 9 1 please"}]
    chat = prompt + [{"role": "assistant", "content": "1 3 7 9 done"}]
    prompt_ids = tokenizer.apply_chat_template(prompt, tokenize=True,
                                               add_generation_prompt=True)["input_ids"]
    input_ids = tokenizer.apply_chat_template(chat, tokenize=True)["input_ids"]
    p, length = len(prompt_ids), len(input_ids)
    assert input_ids[:p] == prompt_ids and length - p == 6  # "1 3 7 9 done <eos>"
    ids = torch.tensor([input_ids])
    with torch.no_grad():
        dpo_logits = dpo_model(input_ids=ids).logits[0]
        rev_logits = reverse_model(input_ids=ids).logits[0]
    vocab = len(tokenizer)
    assert dpo_logits.shape == (length, vocab)

    rows = response_logit_positions(p, length)
    next_ids = ids[0, p:]
    cfg = TargetConfig(top_k=8, chunk_size=4)
    out = compute_targets(dpo_logits[rows], rev_logits[rows], next_ids, cfg)
    ref = brute_force(dpo_logits[rows], rev_logits[rows], next_ids, top_k=8)
    assert_matches(out, ref, dtype=torch.float32, top_k=8, exact_ids=False)
    assert out.alpha.std() > 0  # the random pair disagrees differently per position

    # Alignment, checked by hand: target t scores input_ids[P + t] from the logit row P + t - 1.
    full_logp = torch.log_softmax(dpo_logits.double(), -1)
    for t in range(length - p):
        expect = full_logp[p + t - 1, input_ids[p + t]]
        assert abs(out.dpo_logprobs[t].item() - expect.item()) < 1e-5
    # ... and by Hugging Face's own label shifting: mean NLL over the response tokens.
    labels = ids.clone()
    labels[0, :p] = -100
    with torch.no_grad():
        hf_nll = dpo_model(input_ids=ids, labels=labels).loss
    torch.testing.assert_close(-out.dpo_logprobs.mean(), hf_nll, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- dpo_top

@pytest.mark.parametrize("m", [0, 3, 7])
def test_dpo_top_keeps_the_dpo_models_favourites_with_their_log_pi_star(m):
    """The kept ids are the dpo model's top m plus pi*'s best others, each with its own log pi*,
    sorted by log pi*; the tail is pi*'s mass outside them (brute force, float64)."""
    k, v = 8, 50
    dpo, other, nxt = random_logits(12, v, seed=5, dtype=torch.float64)
    out = compute_targets(dpo, other, nxt, TargetConfig(top_k=k, dpo_top=m, chunk_size=5))
    ref = brute_force(dpo, other, nxt, top_k=k)
    dpo_order = np.argsort(-_f64(dpo), axis=-1, kind="stable")
    ids, values = out.topk_ids.numpy(), out.topk_logprobs.numpy()
    for row in range(12):
        kept = set(ids[row].tolist())
        assert len(kept) == k and set(dpo_order[row, :m].tolist()) <= kept
        others = [i for i in np.argsort(-ref["logp"][row], kind="stable")
                  if i not in set(dpo_order[row, :m].tolist())][:k - m]
        assert kept == set(dpo_order[row, :m].tolist()) | set(others)
        rest = np.array([i for i in range(v) if i not in kept])
        np.testing.assert_allclose(out.tail_logmass[row].item(),
                                   _lse(ref["logp"][row, rest]), rtol=1e-11, atol=1e-11)
    np.testing.assert_allclose(values, np.take_along_axis(ref["logp"], ids, axis=-1), rtol=1e-11,
                               atol=1e-11)
    assert (np.diff(values, axis=-1) <= 0).all()
    if m == 0:  # off: exactly pi*'s top-k, as before
        np.testing.assert_array_equal(ids, ref["topk_ids"])
    np.testing.assert_allclose(out.alpha.numpy(), ref["alpha"], rtol=1e-11, atol=1e-11)


def test_dpo_top_at_or_above_top_k_is_refused():
    """With dpo_top = top_k no place is left for pi*'s own best ids: on random logits pi*'s mode
    fell into the tail at 133 of 200 positions (tail mass 0.007 -> 0.67)."""
    for m in (8, 9):
        with pytest.raises(ValueError, match=f"dpo_top = {m} must be below top_k = 8"):
            TargetConfig(top_k=8, dpo_top=m)
    # one place for pi*: its mode is always kept, whatever the dpo model prefers
    dpo, other, nxt = random_logits(200, 50, seed=9, dtype=torch.float64)
    out = compute_targets(dpo, other, nxt, TargetConfig(top_k=8, dpo_top=7))
    mode = brute_force(dpo, other, nxt, top_k=8)["topk_ids"][:, 0]
    assert all(m in kept for m, kept in zip(mode.tolist(), out.topk_ids.numpy().tolist()))
    with pytest.raises(ValueError, match="dpo_top"):
        TargetConfig(top_k=8, dpo_top=-1)
