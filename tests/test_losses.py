"""The student losses (student_trainer/losses.py) against dense float64 brute force.

The references below are written straight from DESIGN §2 with numpy in float64: they build the
densified teacher as an explicit [..., V] array and sum p (log p - log q) over it, sharing no
code with the module under test (only its documented floor constant).
"""

from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from student_trainer import losses
from student_trainer.losses import (
    LOGPROB_FLOOR,
    AUTO_BROAD,
    TAILS,
    aligndistil_loss,
    chunked_sparse_reverse_kl,
    exact_reverse_kl,
    sequence_weights,
    sparse_reverse_kl,
    token_contrastive_reward,
)

# ----------------------------------------------------------------------------- references


def np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    m = np.max(np.where(np.isfinite(z), z, -np.inf), axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        return (z - m) - np.log(np.exp(z - m).sum(-1, keepdims=True))


def dense_teacher(vocab: int, ids: np.ndarray, logq_k: np.ndarray, tail: np.ndarray) -> np.ndarray:
    """The densified teacher log q [..., V]: top-k log-probs at their ids, the tail mass spread
    evenly over the other V - k ids (both floored at LOGPROB_FLOOR, the module's documented
    treatment of -inf)."""
    ids = np.asarray(ids, dtype=np.int64)
    k = ids.shape[-1]
    logq = np.empty(ids.shape[:-1] + (vocab,), dtype=np.float64)
    if k < vocab:
        tail = np.maximum(np.asarray(tail, dtype=np.float64), LOGPROB_FLOOR)
        logq[...] = (tail - math.log(vocab - k))[..., None]
    np.put_along_axis(logq, ids, np.maximum(np.asarray(logq_k, dtype=np.float64),
                                            LOGPROB_FLOOR), axis=-1)
    return logq


def brute_kl(student_logits: np.ndarray, logq: np.ndarray) -> np.ndarray:
    """sum_v p_v (log p_v - log q_v), term by term, 0 where p_v == 0."""
    logp = np_log_softmax(student_logits)
    p = np.exp(logp)
    with np.errstate(invalid="ignore"):
        return np.where(p > 0, p * (logp - logq), 0.0).sum(-1)


def brute_bucket_kl(student_logits: np.ndarray, ids, logq_k, tail) -> np.ndarray:
    """KL over k + 1 categories, from explicit per-id masks."""
    vocab = student_logits.shape[-1]
    p = np.exp(np_log_softmax(student_logits))
    ids = np.asarray(ids, dtype=np.int64)
    in_top = np.zeros(p.shape, dtype=bool)
    np.put_along_axis(in_top, ids, True, axis=-1)
    p_k = np.take_along_axis(p, ids, axis=-1)
    l_k = np.maximum(np.asarray(logq_k, dtype=np.float64), LOGPROB_FLOOR)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = np.where(p_k > 0, p_k * (np.log(p_k) - l_k), 0.0).sum(-1)
        if ids.shape[-1] < vocab:
            p_out = np.where(in_top, 0.0, p).sum(-1)
            t = np.maximum(np.asarray(tail, dtype=np.float64), LOGPROB_FLOOR)
            kl = kl + np.where(p_out > 0, p_out * (np.log(p_out) - t), 0.0)
    return kl


def brute(tail_model: str, z, ids, logq_k, tail) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    uniform = brute_kl(z, dense_teacher(z.shape[-1], ids, logq_k, tail))
    bucket = brute_bucket_kl(z, ids, logq_k, tail)
    if tail_model == "auto":  # per position: bucket where more than AUTO_BROAD is left out
        return np.where(np.asarray(tail, dtype=np.float64) > math.log(AUTO_BROAD), bucket,
                        uniform)
    return uniform if tail_model == "uniform" else bucket


def make_teacher(rng, batch_shape, vocab, k, scale, logprob_dtype=np.float16):
    """A teacher's sparse targets as the store holds them: int32 ids by log-prob descending,
    float16 log-probs normalised over the full vocabulary, float32 tail (-inf when k == V).
    ``logprob_dtype=np.float64`` keeps log-probs and tail in float64 (exactly normalised)."""
    logpi = np_log_softmax(rng.normal(size=tuple(batch_shape) + (vocab,)) * scale)
    order = np.argsort(-logpi, axis=-1, kind="stable")
    ids = order[..., :k]
    logq_k = np.take_along_axis(logpi, ids, axis=-1)
    if k < vocab:
        rest = np.take_along_axis(logpi, order[..., k:], axis=-1)
        m = rest.max(-1, keepdims=True)
        tail = (m + np.log(np.exp(rest - m).sum(-1, keepdims=True)))[..., 0]
    else:
        tail = np.full(tuple(batch_shape), -np.inf)
    return (torch.from_numpy(ids.astype(np.int32)),
            torch.from_numpy(logq_k.astype(logprob_dtype)),
            torch.from_numpy(tail.astype(np.promote_types(logprob_dtype, np.float32))))


def as_np(x: torch.Tensor) -> np.ndarray:
    return x.detach().to(torch.float64).numpy()


def tolerance(dtype: torch.dtype) -> dict:
    return {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-4,
                                                                           "atol": 1e-4}


# ----------------------------------------------------------------------------- vs brute force

K_FOR_V = {5: (1, 2, 4, 5), 64: (1, 8, 63, 64), 2000: (1, 50, 1999, 2000)}
GRID = [(v, k) for v, ks in K_FOR_V.items() for k in ks]
DTYPES = [torch.float32, torch.float64, torch.bfloat16]


@pytest.mark.parametrize("batch_shape", [(6,), (2, 3)], ids=["NV", "BTV"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("teacher_scale", [0.3, 8.0], ids=["flat", "sharp"])
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("vocab,k", GRID)
def test_sparse_matches_dense_bruteforce(vocab, k, tail, teacher_scale, dtype, batch_shape):
    rng = np.random.default_rng([vocab, k, int(teacher_scale * 10), len(batch_shape)])
    ids, logq_k, tail_lm = make_teacher(rng, batch_shape, vocab, k, teacher_scale)
    z = torch.from_numpy(rng.normal(size=batch_shape + (vocab,)) * 3.0).to(dtype)
    out = sparse_reverse_kl(z, ids, logq_k, tail_lm, tail=tail)
    assert out.shape == batch_shape
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    ref = brute(tail, as_np(z), ids.numpy(), logq_k.numpy(), tail_lm.numpy())
    np.testing.assert_allclose(as_np(out), ref, **tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", [5, 64, 2000])
def test_exact_matches_dense_bruteforce(vocab, dtype):
    rng = np.random.default_rng(vocab)
    logq = np_log_softmax(rng.normal(size=(2, 3, vocab)) * 4.0)
    z = torch.from_numpy(rng.normal(size=(2, 3, vocab)) * 3.0).to(dtype)
    out = exact_reverse_kl(z, torch.from_numpy(logq))
    np.testing.assert_allclose(as_np(out), brute_kl(as_np(z), logq), **tolerance(dtype))


@pytest.mark.parametrize("tail", TAILS)
def test_gradient_matches_dense_autograd_at_scale(tail):
    """The analytic backward, in float32 at V = 2000, against torch autograd through a dense
    float64 brute force (a random upstream gradient, so every position's scale matters)."""
    rng = np.random.default_rng(7)
    vocab, k = 2000, 50
    ids, logq_k, tail_lm = make_teacher(rng, (2, 3), vocab, k, 4.0)
    z = torch.from_numpy(rng.normal(size=(2, 3, vocab)) * 3.0).float().requires_grad_()
    upstream = torch.from_numpy(rng.uniform(0.1, 2.0, size=(2, 3)))
    (sparse_reverse_kl(z, ids, logq_k, tail_lm, tail=tail).double() * upstream).sum().backward()

    z64 = z.detach().double().requires_grad_()
    logp = torch.log_softmax(z64, -1)
    ids64, l64 = ids.long(), logq_k.double()
    logq = torch.from_numpy(dense_teacher(vocab, ids, logq_k.numpy(), tail_lm.numpy()))
    kl_uniform = (logp.exp() * (logp - logq)).sum(-1)
    p = logp.exp()
    p_k = p.gather(-1, ids64)
    p_out = p.scatter(-1, ids64, 0.0).sum(-1)
    kl_bucket = (p_k * (p_k.log() - l64)).sum(-1) + p_out * (p_out.log() - tail_lm.double())
    broad = tail_lm.double() > math.log(AUTO_BROAD)
    kl = {"uniform": kl_uniform, "bucket": kl_bucket,
          "auto": torch.where(broad, kl_bucket, kl_uniform)}[tail]
    (kl * upstream).sum().backward()
    torch.testing.assert_close(z.grad.double(), z64.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_k_equals_vocab_all_forms_agree(dtype):
    """With k == V there is no tail: uniform == bucket == exact, values and gradients, whatever
    order the ids come in and although tail_logmass is -inf."""
    rng = np.random.default_rng(3)
    vocab = 37
    logpi = np_log_softmax(rng.normal(size=(4, 5, vocab)) * 5.0)
    ids = np.argsort(rng.random(size=logpi.shape), axis=-1)  # a random permutation per row
    logq_k = torch.from_numpy(np.take_along_axis(logpi, ids, -1)).to(dtype)
    tail_lm = torch.full((4, 5), -math.inf)
    ids = torch.from_numpy(ids)
    z0 = torch.from_numpy(rng.normal(size=(4, 5, vocab)) * 3.0).to(dtype)
    values, grads = [], []
    for fn in (lambda z: sparse_reverse_kl(z, ids, logq_k, tail_lm, "uniform"),
               lambda z: sparse_reverse_kl(z, ids, logq_k, tail_lm, "bucket"),
               lambda z: exact_reverse_kl(z, torch.from_numpy(logpi))):
        z = z0.clone().requires_grad_()
        kl = fn(z)
        kl.sum().backward()
        assert torch.isfinite(kl).all() and torch.isfinite(z.grad).all()
        values.append(kl.double())
        grads.append(z.grad.double())
    tol = tolerance(dtype)
    for v, g in zip(values[1:], grads[1:]):
        torch.testing.assert_close(v, values[0], **tol)
        torch.testing.assert_close(g, grads[0], **tol)
    np.testing.assert_allclose(as_np(values[0]), brute_kl(as_np(z0), logpi), **tol)


# ----------------------------------------------------------------------------- gradcheck


def _f64_teacher(rng, batch_shape, vocab, k, scale=2.0):
    ids, logq_k, tail_lm = make_teacher(rng, batch_shape, vocab, k, scale, np.float64)
    return ids, logq_k.double(), tail_lm.double()


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("k", [1, 3, 6, 7])
def test_gradcheck_sparse(tail, k):
    rng = np.random.default_rng(k)
    vocab = 7
    ids, logq_k, tail_lm = _f64_teacher(rng, (2, 3), vocab, k)
    z = torch.from_numpy(rng.normal(size=(2, 3, vocab)) * 2.0).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda z_: sparse_reverse_kl(z_, ids, logq_k, tail_lm, tail), (z,))
    if k < vocab:  # also w.r.t. the teacher's values (dKL/dl = -p, dKL/dtail = -P_out)
        assert torch.autograd.gradcheck(
            lambda z_, l_, t_: sparse_reverse_kl(z_, ids, l_, t_, tail),
            (z, logq_k.clone().requires_grad_(), tail_lm.clone().requires_grad_()))


def test_gradcheck_exact():
    rng = np.random.default_rng(11)
    z = torch.from_numpy(rng.normal(size=(3, 6))).requires_grad_()
    logq = torch.from_numpy(np_log_softmax(rng.normal(size=(3, 6)))).requires_grad_()
    assert torch.autograd.gradcheck(exact_reverse_kl, (z, logq))


@pytest.mark.parametrize("weighting", ["alpha", "uniform"])
@pytest.mark.parametrize("tail", TAILS)
def test_gradcheck_aligndistil_loss(tail, weighting):
    """The whole student objective w.r.t. the logits, with padding and alpha near eps."""
    rng = np.random.default_rng(5)
    vocab, k = 9, 3
    ids, logq_k, tail_lm = _f64_teacher(rng, (3, 4), vocab, k)
    alpha = torch.tensor([[1e-3, 0.5, 2.0, 0.0], [0.3, 0.0, 0.0, 0.0], [0.0] * 4],
                         dtype=torch.float64)
    mask = alpha > 0
    z = torch.from_numpy(rng.normal(size=(3, 4, vocab))).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda z_: aligndistil_loss(sparse_reverse_kl(z_, ids, logq_k, tail_lm, tail), alpha,
                                    mask, 0.1, weighting), (z,))


def test_gradcheck_forbidden_tail_is_finite():
    """tail_logmass = -inf with k < V: floored, so the loss is large, finite and smooth."""
    rng = np.random.default_rng(2)
    ids, logq_k, _ = _f64_teacher(rng, (4,), 6, 2)
    tail_lm = torch.full((4,), -math.inf, dtype=torch.float64)
    z = torch.from_numpy(rng.normal(size=(4, 6))).requires_grad_()
    for tail in TAILS:
        assert torch.autograd.gradcheck(
            lambda z_: sparse_reverse_kl(z_, ids, logq_k, tail_lm, tail), (z,))


# ----------------------------------------------------------------------------- properties


@st.composite
def sparse_case(draw, max_vocab: int = 40):
    vocab = draw(st.integers(2, max_vocab))
    k = draw(st.integers(1, vocab))
    seed = draw(st.integers(0, 2**32 - 1))
    t_scale = draw(st.sampled_from([0.0, 0.1, 1.0, 5.0, 30.0]))
    s_scale = draw(st.sampled_from([0.0, 0.1, 1.0, 5.0, 30.0]))
    rng = np.random.default_rng(seed)
    ids, logq_k, tail_lm = _f64_teacher(rng, (3,), vocab, k, t_scale)
    z = torch.from_numpy(rng.normal(size=(3, vocab)) * s_scale)
    return z, ids, logq_k, tail_lm


PROPERTY = settings(max_examples=60, deadline=None)


@PROPERTY
@given(sparse_case(), st.sampled_from([torch.float32, torch.float64]))
def test_property_nonnegative_and_bucket_below_uniform(case, dtype):
    z, ids, logq_k, tail_lm = case
    uniform = sparse_reverse_kl(z.to(dtype), ids, logq_k, tail_lm, "uniform").double()
    bucket = sparse_reverse_kl(z.to(dtype), ids, logq_k, tail_lm, "bucket").double()
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    assert (bucket >= -tol).all(), bucket
    assert (uniform >= -tol).all(), uniform
    assert (bucket <= uniform + tol * (1 + uniform.abs())).all(), (bucket, uniform)


@PROPERTY
@given(sparse_case())
def test_property_zero_when_student_is_the_densified_teacher(case):
    z, ids, logq_k, tail_lm = case
    # The student's logits are exactly log q of the densified teacher.
    z = torch.from_numpy(dense_teacher(z.shape[-1], ids.numpy(), logq_k.numpy(),
                                       tail_lm.numpy()))
    for tail in TAILS:
        kl = sparse_reverse_kl(z, ids, logq_k, tail_lm, tail)
        assert kl.abs().max() < 1e-9, (tail, kl)
    assert exact_reverse_kl(z, z).abs().max() < 1e-9


@PROPERTY
@given(sparse_case(), st.floats(-1e3, 1e3), st.sampled_from(TAILS))
def test_property_shift_invariance(case, shift, tail):
    z, ids, logq_k, tail_lm = case
    base = sparse_reverse_kl(z, ids, logq_k, tail_lm, tail)
    shifted = sparse_reverse_kl(z + shift, ids, logq_k, tail_lm, tail)
    torch.testing.assert_close(shifted, base, rtol=1e-9, atol=1e-9)
    f32 = sparse_reverse_kl((z + shift).float(), ids, logq_k, tail_lm, tail)
    torch.testing.assert_close(f32.double(), base, rtol=1e-3, atol=1e-3)


@PROPERTY
@given(sparse_case(max_vocab=12), st.sampled_from(TAILS))
def test_property_matches_bruteforce(case, tail):
    z, ids, logq_k, tail_lm = case
    out = sparse_reverse_kl(z, ids, logq_k, tail_lm, tail)
    ref = brute(tail, z.numpy(), ids.numpy(), logq_k.numpy(), tail_lm.numpy())
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------------- why a tail model


def test_uniform_tail_punishes_collapse_outside_topk():
    """A student that puts its mass on ONE id outside the top-k looks perfect to a top-k KL
    with no tail model, is only mildly penalised by the bucket tail, and pays the full price
    under the uniform tail: that is why the uniform tail is the default."""
    vocab, k = 1000, 10
    top_ids = torch.arange(k)
    teacher = np.full(vocab, 0.1 / (vocab - k))           # 10% of the mass spread over the tail
    teacher[:k] = 0.09                                    # 90% on the top-k
    logq = np.log(teacher)
    logq_k = torch.from_numpy(logq[:k])[None]
    tail_lm = torch.tensor([math.log(0.1)], dtype=torch.float64)
    ids = top_ids[None]

    aligned = torch.from_numpy(logq)[None]                 # the densified teacher itself
    collapsed = torch.full((1, vocab), 0.0, dtype=torch.float64)
    collapsed[0, 500] = 20.0                               # ~all mass on one non-top-k id
    spread = aligned.clone()                               # the same tail mass, spread evenly
    spread[0, k:] += math.log(collapsed.softmax(-1)[0, k:].sum() / 0.1)
    spread[0, :k] += math.log(collapsed.softmax(-1)[0, :k].sum() / 0.9)

    def topk_only(z):  # "no tail model": the KL summed over the top-k ids only
        logp = z.log_softmax(-1)[:, :k]
        return (logp.exp() * (logp - logq_k)).sum(-1)

    kl_collapsed = sparse_reverse_kl(collapsed, ids, logq_k, tail_lm, "uniform")
    ref = brute_kl(collapsed.numpy(), dense_teacher(vocab, ids.numpy(), logq_k.numpy(),
                                                   tail_lm.numpy()))
    np.testing.assert_allclose(kl_collapsed.numpy(), ref, rtol=1e-12)
    # log(1 / q_500) = log(9900): the collapse costs ~9.2 nats per token.
    assert kl_collapsed.item() > 9.0
    assert sparse_reverse_kl(aligned, ids, logq_k, tail_lm, "uniform").item() < 1e-12
    # Without a tail model the collapse is free (even slightly "better" than the teacher).
    assert abs(topk_only(collapsed).item()) < 1e-4
    assert topk_only(collapsed).item() <= topk_only(aligned).item() + 1e-4
    # The bucket sees only the total tail mass: collapsing it onto one id costs nothing more
    # than spreading the same mass evenly, while the uniform tail tells the two apart.
    b_col = sparse_reverse_kl(collapsed, ids, logq_k, tail_lm, "bucket").item()
    b_spr = sparse_reverse_kl(spread, ids, logq_k, tail_lm, "bucket").item()
    u_spr = sparse_reverse_kl(spread, ids, logq_k, tail_lm, "uniform").item()
    assert b_col == pytest.approx(b_spr, rel=1e-9)
    assert u_spr == pytest.approx(b_spr, rel=1e-9)
    assert kl_collapsed.item() > u_spr + 6.0


# ----------------------------------------------------------------------------- edge cases


def test_forbidden_teacher_values_are_floored_finite():
    """-inf tail with k < V, and float16 top-k log-probs that underflowed to -inf: large but
    finite, equal to the brute force with the documented floor, finite gradients."""
    rng = np.random.default_rng(9)
    ids, logq_k, tail_lm = make_teacher(rng, (5,), 30, 4, 2.0)
    tail_lm[:2] = -math.inf
    logq_k[2, -1] = -math.inf
    z = torch.from_numpy(rng.normal(size=(5, 30))).float().requires_grad_()
    for tail in TAILS:
        kl = sparse_reverse_kl(z, ids, logq_k, tail_lm, tail)
        assert torch.isfinite(kl).all()
        assert (kl[:3] > 100).all()          # forbidding ids the student uses costs a lot
        np.testing.assert_allclose(as_np(kl), brute(tail, as_np(z), ids.numpy(),
                                                    logq_k.numpy(), tail_lm.numpy()), rtol=1e-5)
        (grad,) = torch.autograd.grad(kl.sum(), z)
        assert torch.isfinite(grad).all()


@pytest.mark.parametrize("tail", TAILS)
def test_huge_and_infinite_student_logits(tail):
    rng = np.random.default_rng(4)
    vocab, k = 50, 5
    ids, logq_k, tail_lm = make_teacher(rng, (4,), vocab, k, 2.0)
    z = torch.from_numpy(rng.normal(size=(4, vocab)) * 1e4).float()
    z[1, ids[1, 0]] = -math.inf                            # a masked id inside the top-k
    z[1, (ids[1] + 1) % vocab] = -math.inf                 # and masked ids elsewhere
    z[2] = torch.where(torch.arange(vocab) % 2 == 0, 3e38, -3e38)
    z[3, :] = -math.inf
    z[3, ids[3, 0]] = 0.0                                  # all mass on the teacher's top-1
    z.requires_grad_()
    kl = sparse_reverse_kl(z, ids, logq_k, tail_lm, tail)
    (grad,) = torch.autograd.grad(kl.sum(), z)
    assert torch.isfinite(kl).all() and torch.isfinite(grad).all()
    ref = brute(tail, as_np(z), ids.numpy(), logq_k.numpy(), tail_lm.numpy())
    np.testing.assert_allclose(as_np(kl), ref, rtol=1e-4, atol=1e-4)
    ex = exact_reverse_kl(z, torch.from_numpy(dense_teacher(vocab, ids, logq_k.numpy(),
                                                            tail_lm.numpy())))
    assert torch.isfinite(ex).all()
    assert torch.isfinite(torch.autograd.grad(ex.sum(), z)[0]).all()


def test_dtypes_in_and_out():
    rng = np.random.default_rng(1)
    ids, logq_k, tail_lm = make_teacher(rng, (3,), 20, 4, 1.0)
    assert logq_k.dtype == torch.float16
    for dtype, out_dtype in [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                             (torch.float32, torch.float32), (torch.float64, torch.float64)]:
        z = torch.from_numpy(rng.normal(size=(3, 20))).to(dtype).requires_grad_()
        kl = sparse_reverse_kl(z, ids, logq_k, tail_lm)
        kl.sum().backward()
        assert kl.dtype == out_dtype and z.grad.dtype == dtype
        assert exact_reverse_kl(z, torch.zeros(3, 20, dtype=dtype)).dtype == out_dtype


def test_empty_batch():
    z = torch.zeros(0, 7, requires_grad=True)
    kl = sparse_reverse_kl(z, torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, 3),
                           torch.zeros(0))
    assert kl.shape == (0,)
    kl.sum().backward()
    assert z.grad.shape == (0, 7)


def test_saves_only_the_logits_for_backward():
    """The memory story: autograd keeps no [..., V] tensor but the student's own (bf16) logits;
    the softmax is recomputed in backward."""
    rng = np.random.default_rng(0)
    vocab = 300
    ids, logq_k, tail_lm = make_teacher(rng, (2, 5), vocab, 8, 1.0)
    z = torch.from_numpy(rng.normal(size=(2, 5, vocab))).bfloat16().requires_grad_()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        kl = sparse_reverse_kl(z, ids, logq_k, tail_lm)
    vocab_sized = [t for t in saved if t.dim() and t.shape[-1] == vocab]
    assert len(vocab_sized) == 1 and vocab_sized[0].data_ptr() == z.data_ptr()
    assert sum(t.numel() for t in saved if t is not vocab_sized[0]) < z.numel() // 4
    kl.sum().backward()
    assert torch.isfinite(z.grad.float()).all()


# ----------------------------------------------------------------------------- chunked


@pytest.mark.parametrize("tail", TAILS)
def test_chunked_matches_materialised_logits(tail):
    rng = np.random.default_rng(8)
    vocab, hid, k = 200, 16, 10
    ids, logq_k, tail_lm = make_teacher(rng, (2, 5), vocab, k, 2.0)
    h = torch.from_numpy(rng.normal(size=(2, 5, hid))).float().requires_grad_()
    w = torch.from_numpy(rng.normal(size=(vocab, hid)) * 0.5).float().requires_grad_()
    b = torch.from_numpy(rng.normal(size=(vocab,))).float().requires_grad_()
    upstream = torch.from_numpy(rng.uniform(0.5, 1.5, size=(2, 5))).float()
    kl_c = chunked_sparse_reverse_kl(h, w, ids, logq_k, tail_lm, tail, lm_head_bias=b,
                                     chunk_size=3)
    grads_c = torch.autograd.grad((kl_c * upstream).sum(), (h, w, b))
    kl_m = sparse_reverse_kl(h @ w.t() + b, ids, logq_k, tail_lm, tail)
    grads_m = torch.autograd.grad((kl_m * upstream).sum(), (h, w, b))
    assert kl_c.shape == (2, 5)
    torch.testing.assert_close(kl_c, kl_m, rtol=1e-5, atol=1e-5)
    for gc, gm in zip(grads_c, grads_m):
        torch.testing.assert_close(gc, gm, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tail", TAILS)
def test_gradcheck_chunked(tail):
    rng = np.random.default_rng(12)
    ids, logq_k, tail_lm = _f64_teacher(rng, (5,), 11, 3)
    h = torch.from_numpy(rng.normal(size=(5, 4))).requires_grad_()
    w = torch.from_numpy(rng.normal(size=(11, 4))).requires_grad_()
    b = torch.from_numpy(rng.normal(size=(11,))).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda h_, w_, b_: chunked_sparse_reverse_kl(h_, w_, ids, logq_k, tail_lm, tail,
                                                     lm_head_bias=b_, chunk_size=2),
        (h, w, b))


def test_chunked_bf16():
    rng = np.random.default_rng(13)
    ids, logq_k, tail_lm = make_teacher(rng, (7,), 64, 5, 2.0)
    h = torch.from_numpy(rng.normal(size=(7, 8))).bfloat16().requires_grad_()
    w = torch.from_numpy(rng.normal(size=(64, 8))).bfloat16().requires_grad_()
    kl = chunked_sparse_reverse_kl(h, w, ids, logq_k, tail_lm, chunk_size=4)
    ref = sparse_reverse_kl(h @ w.t(), ids, logq_k, tail_lm)
    assert kl.dtype == torch.float32
    torch.testing.assert_close(kl, ref, rtol=1e-5, atol=1e-5)
    kl.sum().backward()
    assert h.grad.dtype == w.grad.dtype == torch.bfloat16
    assert torch.isfinite(h.grad.float()).all() and torch.isfinite(w.grad.float()).all()


# ----------------------------------------------------------------------------- the objective


def _hand_example():
    nan, inf = math.nan, math.inf
    kl = torch.tensor([[1.0, 2.0, 3.0, 4.0],
                       [0.5, 1.5, 9.0, nan],          # length 2; padding holds garbage
                       [nan, inf, 7.0, 7.0]],         # no real positions at all
                      requires_grad=True)
    alpha = torch.tensor([[0.5, 1.0, 2.0, 0.25],
                          [0.1, 1.0, 0.0, 0.0],
                          [0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]])
    return kl, alpha, mask


def test_aligndistil_loss_hand_computed():
    kl, alpha, mask = _hand_example()
    # alpha weighting, beta0 = 0.1: beta = 0.1 / alpha.
    #   seq 0: (0.2*1 + 0.1*2 + 0.05*3 + 0.4*4) / 4 = 2.15 / 4 = 0.5375
    #   seq 1: (1.0*0.5 + 0.1*1.5) / 2             = 0.65 / 2 = 0.325
    #   seq 2: no real positions -> not counted.   mean = 0.43125
    loss = aligndistil_loss(kl, alpha, mask, beta0=0.1, weighting="alpha")
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(0.43125, rel=1e-6)
    (grad,) = torch.autograd.grad(loss, kl)
    expected = torch.tensor([[0.2, 0.1, 0.05, 0.4], [0.5, 0.05, 0.0, 0.0], [0.0] * 4]) / 2
    expected[0] /= 4
    torch.testing.assert_close(grad, expected)
    # uniform weighting: seq 0: 0.1 * 10 / 4 = 0.25; seq 1: 0.1 * 2 / 2 = 0.1; mean 0.175.
    for m in (mask, mask.bool(), mask.float()):
        assert aligndistil_loss(kl, alpha, m, 0.1, "uniform").item() == pytest.approx(0.175)
    # beta0 scales the whole loss linearly
    assert aligndistil_loss(kl, alpha, mask, 0.2).item() == pytest.approx(2 * 0.43125)


def test_aligndistil_loss_all_padding_is_zero_not_nan():
    kl, alpha, mask = _hand_example()
    loss = aligndistil_loss(kl, alpha, torch.zeros_like(mask))
    assert loss.item() == 0.0
    (grad,) = torch.autograd.grad(loss, kl)
    assert torch.equal(grad, torch.zeros_like(grad))


def test_aligndistil_loss_alpha_near_eps_stays_finite():
    """alpha = eps = 1e-3 gives beta_t = 100: finite loss and gradients, exactly 1000x the
    uniform-weighted loss (beta0 / eps / beta0)."""
    rng = np.random.default_rng(6)
    ids, logq_k, tail_lm = make_teacher(rng, (2, 6), 512, 16, 8.0)
    z = torch.from_numpy(rng.normal(size=(2, 6, 512)) * 10.0).float().requires_grad_()
    mask = torch.tensor([[1] * 6, [1, 1, 1, 0, 0, 0]])
    alpha = torch.where(mask.bool(), 1e-3, 0.0)
    kl = sparse_reverse_kl(z, ids, logq_k, tail_lm)
    loss = aligndistil_loss(kl, alpha, mask, beta0=0.1)
    (grad,) = torch.autograd.grad(loss, z)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert grad[1, 3:].abs().max() == 0                     # padding gets no gradient
    manual = 100.0 * (kl[0].mean() + kl[1, :3].mean()) / 2
    assert loss.item() == pytest.approx(manual.item(), rel=1e-5)
    uniform = aligndistil_loss(kl, alpha, mask, beta0=0.1, weighting="uniform")
    assert loss.item() == pytest.approx(1000 * uniform.item(), rel=1e-5)


def test_sequence_weights():
    alpha = torch.tensor([1e-3, 0.5, 2.0])
    torch.testing.assert_close(sequence_weights(alpha), torch.tensor([100.0, 0.2, 0.05]))
    torch.testing.assert_close(sequence_weights(alpha, 0.2, "uniform"), torch.full((3,), 0.2))
    assert sequence_weights(alpha.double()).dtype == torch.float64


def test_token_contrastive_reward():
    dpo = torch.tensor([-1.0, -2.5, -0.1], dtype=torch.float16)
    rev = torch.tensor([-3.0, -0.5, -0.1])
    r = token_contrastive_reward(dpo, rev, beta0=0.1)
    assert r.dtype == torch.float32
    torch.testing.assert_close(r, torch.tensor([0.2, -0.2, 0.0]))
    torch.testing.assert_close(token_contrastive_reward(dpo, rev), r)  # beta0 defaults to 0.1


# ----------------------------------------------------------------------------- validation


def _valid(vocab=10, k=3):
    return (torch.zeros(2, vocab), torch.zeros(2, k, dtype=torch.int32),
            torch.zeros(2, k, dtype=torch.float16), torch.zeros(2))


@pytest.mark.parametrize("change,error,match", [
    (lambda a: {**a, "tail": "gaussian"}, ValueError, "unknown tail model 'gaussian'"),
    (lambda a: {**a, "topk_ids": torch.zeros(2, 11, dtype=torch.long),
                "topk_logprobs": torch.zeros(2, 11)}, ValueError, r"k=11 must satisfy .* V=10"),
    (lambda a: {**a, "topk_ids": torch.zeros(2, 0, dtype=torch.long),
                "topk_logprobs": torch.zeros(2, 0)}, ValueError, "k=0"),
    (lambda a: {**a, "topk_logprobs": torch.zeros(2, 4)}, ValueError,
     r"topk_logprobs shape \(2, 4\) must equal topk_ids shape \(2, 3\)"),
    (lambda a: {**a, "topk_ids": torch.zeros(3, 3, dtype=torch.long),
                "topk_logprobs": torch.zeros(3, 3)}, ValueError, "leading dims"),
    (lambda a: {**a, "topk_ids": torch.zeros(2, 1, 3, dtype=torch.long),
                "topk_logprobs": torch.zeros(2, 1, 3)}, ValueError, r"\[\.\.\., k\]"),
    (lambda a: {**a, "tail_logmass": torch.zeros(2, 1)}, ValueError, "tail_logmass shape"),
    (lambda a: {**a, "topk_ids": torch.zeros(2, 3)}, TypeError, "integer tensor"),
    (lambda a: {**a, "topk_ids": torch.tensor([[0, 1, 10], [0, 1, 2]])}, ValueError,
     r"topk_ids must lie in \[0, V=10\); got ids in \[0, 10\]"),
    (lambda a: {**a, "topk_ids": torch.tensor([[0, 1, -1], [0, 1, 2]])}, ValueError,
     "must lie in"),
    (lambda a: {**a, "student_logits": torch.zeros(2, 10, dtype=torch.long)}, TypeError,
     "student_logits must be a floating-point tensor"),
    (lambda a: {**a, "tail_logmass": [0.0, 0.0]}, TypeError, "tail_logmass must be a torch"),
])
def test_sparse_input_validation(change, error, match):
    z, ids, lp, t = _valid()
    args = change({"student_logits": z, "topk_ids": ids, "topk_logprobs": lp,
                   "tail_logmass": t, "tail": "uniform"})
    with pytest.raises(error, match=match):
        sparse_reverse_kl(**args)


def test_other_input_validation():
    z = torch.zeros(2, 5)
    with pytest.raises(ValueError, match="must equal student_logits shape"):
        exact_reverse_kl(z, torch.zeros(2, 6))
    kl, alpha, mask = _hand_example()
    with pytest.raises(ValueError, match=r"mask shape \(3, 3\) must equal"):
        aligndistil_loss(kl, alpha, mask[:, :3])
    with pytest.raises(ValueError, match="alpha shape"):
        aligndistil_loss(kl, alpha[0], mask)
    with pytest.raises(ValueError, match=r"must be \[B, T\]"):
        aligndistil_loss(kl[0], alpha[0], mask[0])
    with pytest.raises(ValueError, match="unknown weighting 'beta'"):
        aligndistil_loss(kl, alpha, mask, weighting="beta")
    with pytest.raises(ValueError, match="unknown weighting"):
        sequence_weights(alpha, weighting="nope")
    with pytest.raises(ValueError, match="dpo_logprobs shape"):
        token_contrastive_reward(torch.zeros(3), torch.zeros(4))
    ids, lp, t = torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3), torch.zeros(2)
    with pytest.raises(ValueError, match=r"lm_head_weight shape \(5, 4\) must be \[V, H\]"):
        chunked_sparse_reverse_kl(torch.zeros(2, 3), torch.zeros(5, 4), ids, lp, t)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_sparse_reverse_kl(torch.zeros(2, 4), torch.zeros(5, 4), ids, lp, t,
                                  chunk_size=0)


def test_student_trainer_losses_never_imports_teacher_service():
    tree = ast.parse(Path(losses.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not any(name.split(".")[0] == "teacher_service" for name in imported), imported


@pytest.mark.parametrize("tail", TAILS)
def test_tiny_tail_mass_is_accurate_in_float32(tail):
    """A sharp teacher (tail mass ~e^-60) and a student that matches it: the KL is ~0 and
    must come out so in float32. Computing the student's tail mass as 1 - sum(top-k) would
    leave ~1e-7 of phantom mass there, worth ~1e-6 nats against a tail of e^-60."""
    rng = np.random.default_rng(21)
    vocab, k = 1000, 20
    logits = rng.normal(size=(16, vocab))
    logits[:, :k] += 70.0
    logpi = np_log_softmax(logits)
    order = np.argsort(-logpi, -1, kind="stable")
    ids = torch.from_numpy(order[:, :k])
    logq_k = torch.from_numpy(np.take_along_axis(logpi, order[:, :k], -1))
    rest = np.take_along_axis(logpi, order[:, k:], -1)
    tail_lm = torch.from_numpy(np.log(np.exp(rest - rest.max(-1, keepdims=True)).sum(-1))
                               + rest.max(-1))
    assert (tail_lm < -55).all()
    z = torch.from_numpy(logpi + rng.normal(size=logpi.shape) * 1e-3).float()
    kl = sparse_reverse_kl(z, ids, logq_k, tail_lm, tail)
    ref = brute(tail, as_np(z), ids.numpy(), logq_k.numpy(), tail_lm.numpy())
    assert (np.abs(ref) < 1e-6).all()
    np.testing.assert_allclose(as_np(kl), ref, rtol=0, atol=3e-7)


def test_autocast_does_not_split_forward_from_backward():
    """Under autocast the custom backward recomputes the same logits as the forward used:
    results and gradients are those of the plain float32 computation."""
    rng = np.random.default_rng(14)
    ids, logq_k, tail_lm = make_teacher(rng, (6,), 40, 4, 2.0)
    h = torch.from_numpy(rng.normal(size=(6, 8))).float().requires_grad_()
    w = torch.from_numpy(rng.normal(size=(40, 8))).float().requires_grad_()
    plain = chunked_sparse_reverse_kl(h, w, ids, logq_k, tail_lm, chunk_size=4)
    plain_grads = torch.autograd.grad(plain.sum(), (h, w))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = chunked_sparse_reverse_kl(h, w, ids, logq_k, tail_lm, chunk_size=4)
        z = h @ w.t()                                  # bf16 under autocast
        sparse = sparse_reverse_kl(z, ids, logq_k, tail_lm)
    torch.testing.assert_close(auto, plain, rtol=0, atol=0)
    for ga, gp in zip(torch.autograd.grad(auto.sum(), (h, w)), plain_grads):
        torch.testing.assert_close(ga, gp, rtol=1e-6, atol=1e-6)
    assert z.dtype == torch.bfloat16 and sparse.dtype == torch.float32
    torch.testing.assert_close(sparse, sparse_reverse_kl(z.detach(), ids, logq_k, tail_lm))


def test_kl_parts_split_the_kl_at_the_teachers_kept_ids():
    """sparse_kl_parts against brute force on a dense student: the kept-ids part of
    KL(p || q) and the student's mass outside the kept ids."""
    g = torch.Generator().manual_seed(3)
    n, vocab, k = 5, 40, 6
    logits = torch.randn(n, vocab, generator=g, dtype=torch.float64) * 2
    teacher = torch.log_softmax(torch.randn(n, vocab, generator=g, dtype=torch.float64) * 2, -1)
    logq_k, ids = torch.topk(teacher, k, dim=-1)
    top, outside = losses.sparse_kl_parts(logits, ids, logq_k)
    logp = torch.log_softmax(logits, -1)
    p = logp.exp()
    for i in range(n):
        kept = ids[i].tolist()
        want_top = sum(float(p[i, v] * (logp[i, v] - teacher[i, v])) for v in kept)
        want_out = float(p[i].sum() - p[i, kept].sum())
        assert float(top[i]) == pytest.approx(want_top, rel=1e-9, abs=1e-12)
        assert float(outside[i]) == pytest.approx(want_out, rel=1e-9, abs=1e-12)
    # with the uniform tail, KL = the kept part + the tail's part, brute force
    tail = torch.logsumexp(teacher.scatter(-1, ids, float("-inf")), -1)
    kl = losses.sparse_reverse_kl(logits, ids, logq_k, tail, tail="uniform")
    for i in range(n):
        rest = [v for v in range(vocab) if v not in ids[i].tolist()]
        logq_rest = float(tail[i]) - math.log(vocab - k)
        tail_part = sum(float(p[i, v] * (logp[i, v] - logq_rest)) for v in rest)
        assert float(kl[i]) == pytest.approx(float(top[i]) + tail_part, rel=1e-9, abs=1e-12)


def test_auto_resolves_to_the_bucket_tail_with_or_without_the_students_candidates():
    """The trainer's --tail auto: bucket at every position, whatever the targets (a fixed k,
    a budget, the student's ids merged: it does not ask); explicit choices pass through."""
    from student_trainer.losses import resolve_tail

    assert resolve_tail("auto") == "bucket"
    assert resolve_tail("uniform") == "uniform"
    assert resolve_tail("bucket") == "bucket"
