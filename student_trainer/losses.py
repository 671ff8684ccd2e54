"""The student's AlignDistil losses (DESIGN §2): token-level reverse KL to the teacher pi*.

Per response position t the student pays ``KL(pi_theta(.|t) || pi*(.|t))``; a sequence pays
``(1/T) sum_t beta_t KL_t`` and a batch the mean over its sequences (eq. 18/19).

The teacher usually arrives sparse: the top-k ids of ``log pi*`` with their log-probs
(normalised over the full vocabulary V) and ``tail_logmass``, the log of the mass outside the
top-k. The tail is modelled two ways:

``uniform`` (default)
    The tail mass is spread evenly over the ``V - k`` ids outside the top-k, and the loss is the
    EXACT reverse KL to that densified teacher ``q``:

        KL = sum_{i in K} p_i (log p_i - l_i) + sum_{v not in K} p_v (log p_v - c),
        c  = tail_logmass - log(V - k).

    A student that moves its mass onto a few ids outside the top-k pays for it (each such id
    has teacher probability ``exp(c)``), which a top-k KL without a tail model does not see.

``bucket``
    KL over k + 1 categories (the top-k ids and one tail bucket):

        KL = sum_{i in K} p_i (log p_i - l_i) + P_out (log P_out - tail_logmass),

    where ``P_out`` is the student's mass outside the top-k. By the log-sum inequality
    bucket <= uniform; it does not care how the student spreads mass inside the tail.

``auto`` (the trainer's default)
    The trainer resolves it to ``bucket`` everywhere (:func:`resolve_tail`); passed to the
    loss as is, it is the per-position rule: ``bucket`` where pi* leaves more than :data:`AUTO_BROAD` (5%) of its mass
    outside the kept ids, ``uniform`` elsewhere. A broad tail spread evenly misprices the ids
    the student likes (the grammar world's lesson); a thin one is cheap to spread and
    ``uniform`` then sees a student that moves mass onto a few ids outside the kept ones.

Both cost O(V) per position from the student's logits (a log-softmax and one reduction) plus
O(k) gathers; no ``[..., V]`` teacher tensor is ever built. The gradient is analytic
(``dKL/dz_j = p_j (w_j - KL)`` with ``w_j = log p_j - log q_j``, or the bucket's per-category
version), computed in a custom autograd function that saves only the student's logits and
recomputes the softmax in backward, so at most two float32 ``[..., V]`` temporaries exist at
any time (forward: ``log p`` and ``p``; backward: the same two, reused in place for the
gradient). ``chunked_sparse_reverse_kl`` goes further: it takes the final hidden states and
the LM head and never holds more than a chunk of logits.

Numerics:

- Compute dtype is float64 when the student logits are float64, else float32 (bf16/fp16
  logits are upcast inside the log-softmax). The teacher's float16 log-probs are cast.
- ``P_out`` is a sum of the student's probabilities over the non-top-k ids (the top-k entries
  are zeroed first): a sum of non-negative terms, accurate to a few ulps relative even when
  ``P_out`` is tiny — never ``1 - sum(top-k)``.
- Teacher log-probs (top-k entries and the tail) are floored at :data:`LOGPROB_FLOOR`. A tail
  of ``-inf`` with k < V (or a float16 top-k log-prob that underflowed to ``-inf``) means the
  teacher forbids ids the student, being a softmax, always gives some mass: the true reverse KL
  is infinite. The floor makes it large but finite (about ``1e4 * P_out`` nats) with finite
  gradients that push the mass off those ids.
- When k == V there is no tail; ``tail_logmass`` (``-inf`` by contract) is ignored and the tail
  term is exactly 0 for both tail models, which then agree with :func:`exact_reverse_kl`.
- Student log-probs are clamped at a very negative finite value so ``p log p`` is 0, not NaN,
  for logits of ``-inf`` (masked ids) or of huge magnitude.

Padding positions may hold any finite teacher values (top-k ids must still be valid ids,
e.g. 0): their KL is finite, and :func:`aligndistil_loss` masks it out with zero gradient.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = [
    "AUTO_BROAD",
    "TAILS",
    "resolve_tail",
    "WEIGHTINGS",
    "LOGPROB_FLOOR",
    "sparse_reverse_kl",
    "chunked_sparse_reverse_kl",
    "exact_reverse_kl",
    "sequence_weights",
    "aligndistil_loss",
    "token_contrastive_reward",
]

#: Tail models of the sparse teacher (see the module docstring).
TAILS: tuple[str, ...] = ("auto", "uniform", "bucket")
#: ``auto``: above this pi* mass outside a position's kept ids, the bucket tail applies there
#: (a broad tail, where spreading the mass evenly misprices the ids the student likes); at or
#: below it, the uniform tail (benchmarks/results/fidelity_per_byte.md, fidelity_budget/).
AUTO_BROAD: float = 0.05
#: ``alpha``: beta_t = beta0 / alpha_t (the authors' released code); ``uniform``: beta_t = beta0.
WEIGHTINGS: tuple[str, ...] = ("alpha", "uniform")
#: Teacher log-probs (top-k entries and tail) are clamped to at least this value, so a teacher
#: that forbids ids (-inf) gives a large but finite loss. exp(-1e4) is 0 in every float format,
#: so no teacher value a float32 engine produces for a realistic model is changed.
LOGPROB_FLOOR: float = -1.0e4
# Student log-probs are clamped here: exp() of it is exactly 0, and 0 * it is 0 (not NaN).
_STUDENT_LOGP_FLOOR: float = -1.0e30


def resolve_tail(tail: str) -> str:
    """The tail model a run uses: ``auto`` becomes ``bucket`` at every position.

    Without the student's ids, the kept ids are the teacher's, and the student's mass outside
    them is priced by the tail model. ``uniform`` says each of those ids has a
    ``1/(V - k)`` share of pi*'s tail, far below what pi* really gives the few ids a student
    near the teachers favours, and that mispricing swamps the true gradient, which is small
    when the student starts at the teachers' base. Measured (parameter-gradient cosine with
    exact AlignDistil, benchmarks/results/fidelity_per_byte_dpo_pair.md; a SmolLM2-135M DPO
    pair and its base as the student): bucket 0.89-0.98 against uniform 0.10-0.36 and the
    per-position rule 0.16-0.52 at k = 8-64; with the student's own top 8 / 32 ids merged
    (``--student-top``) bucket 0.966 / 0.985 against the per-position rule's 0.29 / 0.46. In the
    broad grammar world bucket is the faithful one too (benchmarks/results/fidelity.md). The
    per-position rule stays available to the loss (``tail="auto"`` passed to it directly)."""
    return "bucket" if tail == "auto" else tail


# ----------------------------------------------------------------------------- helpers


def _compute_dtype(logits_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if logits_dtype == torch.float64 else torch.float32


def _autocast_off(t: Tensor) -> contextlib.AbstractContextManager:
    """Forward and backward must compute the same logits: the backward recomputes them, and
    autocast (if the caller's forward ran under it) is not active there. So neither uses it."""
    try:
        return torch.autocast(device_type=t.device.type, enabled=False)
    except RuntimeError:  # a device type autocast does not know
        return contextlib.nullcontext()


def _student_logprobs(logits: Tensor, dtype: torch.dtype) -> Tensor:
    """log_softmax in ``dtype`` (one [..., V] temporary), clamped so ``0 * log p`` is 0."""
    return torch.log_softmax(logits, dim=-1, dtype=dtype).clamp_(min=_STUDENT_LOGP_FLOOR)


def _require_float(name: str, x: Any) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def _check_tail(tail: str) -> None:
    if tail not in TAILS:
        raise ValueError(f"unknown tail model {tail!r}; expected one of {TAILS}")


def _check_sparse_targets(
    batch_shape: torch.Size, vocab_size: int, topk_ids: Tensor, topk_logprobs: Tensor,
    tail_logmass: Tensor,
) -> None:
    """Shapes, dtypes and id range of the sparse teacher against the student's [..., V]."""
    if not isinstance(topk_ids, Tensor):
        raise TypeError(f"topk_ids must be a torch.Tensor, got {type(topk_ids).__name__}")
    if topk_ids.is_floating_point() or topk_ids.is_complex() or topk_ids.dtype == torch.bool:
        raise TypeError(f"topk_ids must be an integer tensor, got dtype {topk_ids.dtype}")
    _require_float("topk_logprobs", topk_logprobs)
    _require_float("tail_logmass", tail_logmass)
    if topk_ids.dim() != len(batch_shape) + 1 or topk_ids.shape[:-1] != batch_shape:
        raise ValueError(
            f"topk_ids shape {tuple(topk_ids.shape)} must be [..., k] with the student's leading "
            f"dims {tuple(batch_shape)}")
    if topk_logprobs.shape != topk_ids.shape:
        raise ValueError(f"topk_logprobs shape {tuple(topk_logprobs.shape)} must equal topk_ids "
                         f"shape {tuple(topk_ids.shape)}")
    if tail_logmass.shape != batch_shape:
        raise ValueError(f"tail_logmass shape {tuple(tail_logmass.shape)} must equal the "
                         f"student's leading dims {tuple(batch_shape)}")
    k = topk_ids.shape[-1]
    if k < 1 or k > vocab_size:
        raise ValueError(f"top-k size k={k} must satisfy 1 <= k <= V={vocab_size} "
                         "(the teacher's vocabulary must match the student's)")
    if topk_ids.numel() > 0:
        lo, hi = torch.aminmax(topk_ids)  # one device sync; an out-of-range id would otherwise
        lo, hi = int(lo), int(hi)         # be a device-side assert on GPU
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"topk_ids must lie in [0, V={vocab_size}); got ids in [{lo}, {hi}]")


def _prepare_teacher(
    topk_ids: Tensor, topk_logprobs: Tensor, tail_logmass: Tensor, vocab_size: int,
    dtype: torch.dtype, topk_count: Tensor | None = None, tail_model: str = "uniform",
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(ids, logq_k, tail, log_rest, count)``: int64 ids; log-probs and tail cast to
    ``dtype`` and floored (see LOGPROB_FLOOR; the tail is 0 where ``k_t`` = V, never read);
    ``log(V - k_t)``, the log of the number of ids in the tail; ``k_t`` as int64; and where the
    bucket tail applies (bool, per position: everywhere, nowhere, or with ``auto`` where pi*
    leaves more than :data:`AUTO_BROAD` of its mass outside the kept ids).

    ``topk_count`` (ragged targets) says how many columns each position keeps; the columns past
    it must repeat column 0 (the record's padding rule), so gathering and scattering them touch
    an id that is kept anyway. The KL terms of those columns are zeroed with :func:`_keep`."""
    ids = topk_ids.long()
    logq_k = topk_logprobs.to(dtype).clamp(min=LOGPROB_FLOOR)
    width = ids.shape[-1]
    if topk_count is None:
        count = torch.full(ids.shape[:-1], width, dtype=torch.long, device=ids.device)
    else:
        count = topk_count.to(device=ids.device, dtype=torch.long)
        if count.numel():
            lo, hi = torch.aminmax(count)
            if int(lo) < 1 or int(hi) > width:
                raise ValueError(f"topk_count must lie in [1, k = {width}]; got counts in "
                                 f"[{int(lo)}, {int(hi)}]")
        # whatever the caller padded with: the padding columns repeat column 0 from here on
        pad = torch.arange(width, device=ids.device) >= count.unsqueeze(-1)
        ids = torch.where(pad, ids[..., :1], ids)
        logq_k = torch.where(pad, logq_k[..., :1], logq_k)
    no_tail = count >= vocab_size
    tail = tail_logmass.to(dtype).clamp(min=LOGPROB_FLOOR).masked_fill(no_tail, 0.0)
    log_rest = (vocab_size - count).clamp_min(1).to(dtype).log()  # never read where no_tail
    if tail_model == "auto":
        bucket = tail_logmass.to(dtype) > math.log(AUTO_BROAD)
    else:
        bucket = torch.full_like(no_tail, tail_model == "bucket")
    return ids, logq_k, tail, log_rest, count, bucket


def _keep(ids: Tensor, count: Tensor, dtype: torch.dtype) -> Tensor:
    """1 on the kept columns, 0 on the padding of ragged targets."""
    return (torch.arange(ids.shape[-1], device=ids.device) < count.unsqueeze(-1)).to(dtype)


# ----------------------------------------------------------------------------- the math


def _sparse_kl_stats(
    logits: Tensor, ids: Tensor, logq_k: Tensor, tail: Tensor, log_rest: Tensor, count: Tensor,
    bucket: Tensor, dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    """KL per position, with the student's probabilities on the kept ids (0 on padding
    columns) and its mass P_out outside them. ``bucket`` (bool, per position) picks the bucket
    tail there and the uniform tail elsewhere."""
    vocab_size = logits.shape[-1]
    logp = _student_logprobs(logits, dtype)                    # temporary 1
    logp_k = logp.gather(-1, ids)
    p_k = logp_k.exp() * _keep(ids, count, dtype)
    kl = (p_k * (logp_k - logq_k)).sum(-1)
    if bool((count >= vocab_size).all()):
        return kl, p_k, torch.zeros_like(kl)
    p_rest = logp.exp().scatter_(-1, ids, 0.0)                 # temporary 2: p outside kept
    p_out = p_rest.sum(-1)
    bucket_term = p_out * (_safe_log(p_out) - tail)
    if bool(bucket.all()):
        return kl + bucket_term, p_k, p_out
    c = tail - log_rest                                        # log q_v for v outside kept
    uniform_term = logp.sub_(c.unsqueeze(-1)).mul_(p_rest).sum(-1)
    return kl + torch.where(bucket, bucket_term, uniform_term), p_k, p_out


def _safe_log(x: Tensor) -> Tensor:
    # P_out == 0 only when every non-top-k p_v underflowed to 0, and then every term it
    # multiplies is 0 too; the clamp keeps those products 0 instead of NaN.
    return x.clamp_min(torch.finfo(x.dtype).tiny).log()


def _sparse_kl_grad_logits(
    logits: Tensor, ids: Tensor, logq_k: Tensor, tail: Tensor, log_rest: Tensor, count: Tensor,
    bucket: Tensor, dtype: torch.dtype, kl: Tensor, p_out: Tensor, grad_kl: Tensor,
) -> Tensor:
    """dKL/dz_j * grad_kl = p_j (w_j - KL) * grad_kl, in ``dtype``, with two [..., V] temporaries.

    ``w_j = log p_j - log q_j`` (uniform) or ``log P_c(j) - log Q_c(j)`` for j's category c
    (bucket: the id itself inside the kept ids, the tail bucket outside), per position as
    ``bucket`` says. Padding columns of ragged targets repeat column 0, so scattering them
    writes column 0's value again.
    """
    vocab_size = logits.shape[-1]
    w = _student_logprobs(logits, dtype)                       # temporary 1, becomes w
    p = w.exp()                                                # temporary 2
    w_k = w.gather(-1, ids) - logq_k
    if not bool((count >= vocab_size).all()):
        w_bucket = (_safe_log(p_out) - tail).unsqueeze(-1)
        if bool(bucket.all()):
            w.copy_(w_bucket.expand_as(w))
        else:
            w.sub_((tail - log_rest).unsqueeze(-1))
            if bool(bucket.any()):  # row by row, no third [..., V] temporary
                w[bucket] = w_bucket[bucket]
    w.scatter_(-1, ids, w_k)
    return w.sub_(kl.unsqueeze(-1)).mul_(p).mul_(grad_kl.unsqueeze(-1))


class _SparseReverseKL(torch.autograd.Function):
    """Reverse KL to the sparse teacher; saves only the logits and O(k) statistics."""

    @staticmethod
    def forward(ctx: Any, logits: Tensor, ids: Tensor, logq_k: Tensor, tail: Tensor,
                log_rest: Tensor, count: Tensor, bucket: Tensor) -> Tensor:
        dtype = _compute_dtype(logits.dtype)
        with _autocast_off(logits):
            kl, p_k, p_out = _sparse_kl_stats(logits, ids, logq_k, tail, log_rest, count,
                                              bucket, dtype)
        ctx.save_for_backward(logits, ids, logq_k, tail, log_rest, count, bucket, kl, p_k,
                              p_out)
        return kl

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_kl: Tensor) -> tuple[Tensor | None, ...]:
        logits, ids, logq_k, tail, log_rest, count, bucket, kl, p_k, p_out = ctx.saved_tensors
        dtype = kl.dtype
        grad_kl = grad_kl.to(dtype)
        grad_logits = grad_logq = grad_tail = None
        if ctx.needs_input_grad[0]:
            with _autocast_off(logits):
                grad_logits = _sparse_kl_grad_logits(
                    logits, ids, logq_k, tail, log_rest, count, bucket, dtype, kl,
                    p_out, grad_kl,
                ).to(logits.dtype)
        if ctx.needs_input_grad[2]:       # dKL/dl_i = -p_i (0 on padding columns: p_k is)
            grad_logq = -p_k * grad_kl.unsqueeze(-1)
        if ctx.needs_input_grad[3]:       # dKL/dtail = -P_out (0 when k == V: no tail)
            grad_tail = -p_out * grad_kl
        return grad_logits, None, grad_logq, grad_tail, None, None, None


# ----------------------------------------------------------------------------- public API


def sparse_reverse_kl(
    student_logits: Tensor, topk_ids: Tensor, topk_logprobs: Tensor, tail_logmass: Tensor,
    tail: str = "uniform", *, topk_count: Tensor | None = None,
) -> Tensor:
    """Per-position ``KL(pi_theta || pi*)`` in nats against a sparse teacher.

    Shapes: ``student_logits [..., V]`` (any float dtype), ``topk_ids [..., k]`` (integer,
    distinct per position), ``topk_logprobs [..., k]`` (log pi* over the full vocabulary, e.g.
    float16 from the store), ``tail_logmass [...]`` (log mass outside the top-k; -inf when
    k == V). Returns ``[...]`` in float32 (float64 for float64 logits). ``tail`` picks the
    tail model, ``uniform`` (exact KL to the densified teacher) or ``bucket``; see the module
    docstring for the formulas, the floor on -inf teacher values and the memory story.
    Differentiable w.r.t. the logits (and the teacher's log-probs and tail); not twice.
    ``topk_count [...]`` (ragged targets, a teacher with a tail budget): position t keeps its
    first ``k_t`` columns, the rest repeat column 0 (the record's padding) and do not count;
    the uniform tail spreads over ``V - k_t`` ids.
    """
    _check_tail(tail)
    _require_float("student_logits", student_logits)
    if student_logits.dim() < 1 or student_logits.shape[-1] < 1:
        raise ValueError(f"student_logits must be [..., V] with V >= 1, got "
                         f"{tuple(student_logits.shape)}")
    vocab_size = student_logits.shape[-1]
    _check_sparse_targets(student_logits.shape[:-1], vocab_size, topk_ids, topk_logprobs,
                          tail_logmass)
    _check_count(topk_count, topk_ids)
    dtype = _compute_dtype(student_logits.dtype)
    ids, logq_k, tail_lm, log_rest, count, bucket = _prepare_teacher(
        topk_ids, topk_logprobs, tail_logmass, vocab_size, dtype, topk_count, tail)
    return _SparseReverseKL.apply(student_logits, ids, logq_k, tail_lm, log_rest, count, bucket)


def _check_count(topk_count: Tensor | None, topk_ids: Tensor) -> None:
    if topk_count is None:
        return
    if not isinstance(topk_count, Tensor) or topk_count.is_floating_point():
        raise TypeError("topk_count must be an integer tensor")
    if topk_count.shape != topk_ids.shape[:-1]:
        raise ValueError(f"topk_count shape {tuple(topk_count.shape)} must equal topk_ids' "
                         f"leading dims {tuple(topk_ids.shape[:-1])}")


class _ChunkedSparseReverseKL(torch.autograd.Function):
    """Reverse KL from hidden states and the LM head, a chunk of rows of logits at a time.

    Forward keeps no logits; backward recomputes each chunk's logits (one extra matmul) and
    accumulates the gradients of the hidden states, the weight and the bias.
    """

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, bias: Tensor | None, ids: Tensor,
                logq_k: Tensor, tail: Tensor, log_rest: Tensor, count: Tensor, bucket: Tensor,
                chunk_size: int) -> Tensor:
        dtype = _compute_dtype(hidden.dtype)
        n = hidden.shape[0]
        kl = hidden.new_empty(n, dtype=dtype)
        p_k = hidden.new_empty(ids.shape, dtype=dtype)
        p_out = hidden.new_empty(n, dtype=dtype)
        with _autocast_off(hidden):
            for s in range(0, n, chunk_size):
                e = min(s + chunk_size, n)
                logits = _linear(hidden[s:e], weight, bias)
                kl[s:e], p_k[s:e], p_out[s:e] = _sparse_kl_stats(
                    logits, ids[s:e], logq_k[s:e], tail[s:e], log_rest[s:e], count[s:e],
                    bucket[s:e], dtype)
        ctx.save_for_backward(hidden, weight, bias, ids, logq_k, tail, log_rest, count, bucket,
                              kl, p_k, p_out)
        ctx.chunk_size = chunk_size
        return kl

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_kl: Tensor) -> tuple[Tensor | None, ...]:
        hidden, weight, bias, ids, logq_k, tail, log_rest, count, bucket, kl, p_k, p_out = \
            ctx.saved_tensors
        dtype = kl.dtype
        grad_kl = grad_kl.to(dtype)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        # Sum the weight/bias gradients over chunks in at least float32 (a bf16 running sum
        # over many chunks would lose most of its bits); each chunk's product is computed in
        # the inputs' dtype, like the forward's matmul.
        acc = torch.promote_types(weight.dtype, torch.float32)
        grad_w = torch.zeros_like(weight, dtype=acc) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=acc) if (need_b and bias is not None) else None
        if need_h or need_w or need_b:
            n = hidden.shape[0]
            with _autocast_off(hidden):
                for s in range(0, n, ctx.chunk_size):
                    e = min(s + ctx.chunk_size, n)
                    h = hidden[s:e]
                    g = _sparse_kl_grad_logits(
                        _linear(h, weight, bias), ids[s:e], logq_k[s:e], tail[s:e],
                        log_rest[s:e], count[s:e], bucket[s:e], dtype, kl[s:e], p_out[s:e],
                        grad_kl[s:e])
                    if grad_b is not None:
                        grad_b.add_(g.sum(0))
                    g = g.to(weight.dtype)
                    if grad_w is not None:
                        grad_w.add_(g.t() @ h)
                    if grad_h is not None:
                        grad_h[s:e] = g @ weight
        grad_logq = -p_k * grad_kl.unsqueeze(-1) if ctx.needs_input_grad[4] else None
        grad_tail = -p_out * grad_kl if ctx.needs_input_grad[5] else None
        return (grad_h,
                grad_w.to(weight.dtype) if grad_w is not None else None,
                grad_b.to(bias.dtype) if grad_b is not None else None,
                None, grad_logq, grad_tail, None, None, None, None)


def _linear(h: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return h @ weight.t() if bias is None else torch.addmm(bias, h, weight.t())


def chunked_sparse_reverse_kl(
    hidden: Tensor, lm_head_weight: Tensor, topk_ids: Tensor, topk_logprobs: Tensor,
    tail_logmass: Tensor, tail: str = "uniform", *, lm_head_bias: Tensor | None = None,
    chunk_size: int = 1024, topk_count: Tensor | None = None,
) -> Tensor:
    """:func:`sparse_reverse_kl` of ``logits = hidden @ lm_head_weight.T (+ bias)``, in chunks.

    ``hidden [..., H]``, ``lm_head_weight [V, H]``, ``lm_head_bias [V]`` (optional); the
    teacher arguments as in :func:`sparse_reverse_kl`. At most ``chunk_size`` rows of logits
    (and two float32 temporaries of that size) exist at a time, instead of ``[..., V]``; the
    price is recomputing each chunk's logits in backward. Logits are computed in the hidden
    states' dtype with autocast switched off, so the forward and the backward's recomputation
    agree bit for bit (cast weight and hidden states to bf16 yourself to get bf16 matmuls);
    the KL in float32 (float64 for float64 inputs). Only for heads that are a
    plain linear map (no logit soft-capping or scaling).
    """
    _check_tail(tail)
    _require_float("hidden", hidden)
    _require_float("lm_head_weight", lm_head_weight)
    if hidden.dim() < 1:
        raise ValueError("hidden must be [..., H]")
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"lm_head_weight shape {tuple(lm_head_weight.shape)} must be [V, H] "
                         f"with H = hidden.shape[-1] = {hidden.shape[-1]}")
    if hidden.dtype != lm_head_weight.dtype:
        raise TypeError(f"hidden ({hidden.dtype}) and lm_head_weight ({lm_head_weight.dtype}) "
                        "must share a dtype")
    vocab_size = lm_head_weight.shape[0]
    if lm_head_bias is not None:
        _require_float("lm_head_bias", lm_head_bias)
        if lm_head_bias.shape != (vocab_size,) or lm_head_bias.dtype != hidden.dtype:
            raise ValueError(f"lm_head_bias must be [V={vocab_size}] in {hidden.dtype}, got "
                             f"{tuple(lm_head_bias.shape)} {lm_head_bias.dtype}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    batch_shape = hidden.shape[:-1]
    _check_sparse_targets(batch_shape, vocab_size, topk_ids, topk_logprobs, tail_logmass)
    _check_count(topk_count, topk_ids)
    dtype = _compute_dtype(hidden.dtype)
    ids, logq_k, tail_lm, log_rest, count, bucket = _prepare_teacher(
        topk_ids, topk_logprobs, tail_logmass, vocab_size, dtype, topk_count, tail)
    k = ids.shape[-1]
    kl = _ChunkedSparseReverseKL.apply(
        hidden.reshape(-1, hidden.shape[-1]), lm_head_weight, lm_head_bias, ids.reshape(-1, k),
        logq_k.reshape(-1, k), tail_lm.reshape(-1), log_rest.reshape(-1), count.reshape(-1),
        bucket.reshape(-1), chunk_size)
    return kl.reshape(batch_shape)


@torch.no_grad()
def sparse_kl_parts(student_logits: Tensor, topk_ids: Tensor, topk_logprobs: Tensor,
                    topk_count: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Diagnostics per position: ``(KL's part on the teacher's kept ids, the student's mass
    outside them)``. The kept-ids part is ``sum_{v in K} p_v (log p_v - log q_v)``; the rest of
    :func:`sparse_reverse_kl` (its value minus this) is the tail's part. A student drifting
    onto ids the teacher's top-k does not hold shows as a growing outside mass."""
    dtype = _compute_dtype(student_logits.dtype)
    with _autocast_off(student_logits):
        logp = _student_logprobs(student_logits, dtype)
        ids = topk_ids.long()
        logp_k = logp.gather(-1, ids)
        logq_k = topk_logprobs.to(dtype).clamp(min=LOGPROB_FLOOR)
        p_k = logp_k.exp()
        if topk_count is not None:
            p_k = p_k * _keep(ids, topk_count.to(ids.device), dtype)
        top = (p_k * (logp_k - logq_k)).sum(-1)
        outside = (1.0 - p_k.sum(-1)).clamp_min(0.0)
    return top, outside


def exact_reverse_kl(student_logits: Tensor, teacher_logprobs: Tensor) -> Tensor:
    """Per-position ``KL(pi_theta || pi*) = sum_v p_v (log p_v - log pi*_v)`` over the full
    vocabulary, for an in-process teacher (``[..., V]`` both, teacher log-probs assumed
    normalised; -inf is floored at LOGPROB_FLOOR like the sparse forms). Plain autograd, so
    it is also differentiable w.r.t. the teacher. Returns float32 (float64 for float64 logits).
    """
    _require_float("student_logits", student_logits)
    _require_float("teacher_logprobs", teacher_logprobs)
    if student_logits.dim() < 1 or teacher_logprobs.shape != student_logits.shape:
        raise ValueError(f"teacher_logprobs shape {tuple(teacher_logprobs.shape)} must equal "
                         f"student_logits shape {tuple(student_logits.shape)} ([..., V])")
    dtype = _compute_dtype(student_logits.dtype)
    logp = torch.log_softmax(student_logits, dim=-1, dtype=dtype).clamp(min=_STUDENT_LOGP_FLOOR)
    logq = teacher_logprobs.to(dtype).clamp(min=LOGPROB_FLOOR)
    return (logp.exp() * (logp - logq)).sum(-1)


def sequence_weights(alpha: Tensor, beta0: float = 0.1, weighting: str = "alpha") -> Tensor:
    """Per-position ``beta_t``: ``beta0 / alpha_t`` (``alpha``, the released code: a strongly
    extrapolated teacher — large alpha — is trusted less) or ``beta0`` (``uniform``).

    ``alpha`` must be > 0 wherever the weight is used (the engine's alpha is >= eps = 1e-3, so
    beta_t <= 100 * beta0). Returns float32 (float64 for float64 alpha).
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; expected one of {WEIGHTINGS}")
    _require_float("alpha", alpha)
    a = alpha.to(_compute_dtype(alpha.dtype))
    if weighting == "uniform":
        return torch.full_like(a, float(beta0))
    return float(beta0) / a


def aligndistil_loss(
    per_position_kl: Tensor, alpha: Tensor, mask: Tensor, beta0: float = 0.1,
    weighting: str = "alpha",
) -> Tensor:
    """The AlignDistil objective (eq. 18/19) as a scalar.

    ``per_position_kl``, ``alpha``, ``mask``: ``[B, T]``; ``mask`` is nonzero on real response
    positions. Sequence b pays ``(1/T_b) sum_t beta_t KL_t`` over its ``T_b`` real positions;
    the result is the mean over the sequences with ``T_b >= 1`` (0.0, still attached to the
    graph, when there are none). Padding contributes nothing — not even NaN: its KL and alpha
    (e.g. 0) are replaced before use, so its gradient is exactly 0.
    """
    _require_float("per_position_kl", per_position_kl)
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; expected one of {WEIGHTINGS}")
    if per_position_kl.dim() != 2:
        raise ValueError(f"per_position_kl must be [B, T], got {tuple(per_position_kl.shape)}")
    for name, x in (("alpha", alpha), ("mask", mask)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.shape != per_position_kl.shape:
            raise ValueError(f"{name} shape {tuple(x.shape)} must equal per_position_kl shape "
                             f"{tuple(per_position_kl.shape)} ([B, T])")
    _require_float("alpha", alpha)
    dtype = _compute_dtype(per_position_kl.dtype)
    real = mask != 0
    beta = sequence_weights(torch.where(real, alpha.to(dtype), 1.0), beta0, weighting)
    # where(), not multiplication by the mask: padding may hold inf/NaN, and 0 * NaN is NaN.
    weighted = beta * torch.where(real, per_position_kl.to(dtype), 0.0)
    lengths = real.sum(-1)
    per_sequence = weighted.sum(-1) / lengths.clamp_min(1).to(dtype)
    has_tokens = lengths > 0
    n_sequences = has_tokens.sum().clamp_min(1).to(dtype)
    return (per_sequence * has_tokens.to(dtype)).sum() / n_sequences


def token_contrastive_reward(dpo_logprobs: Tensor, reverse_logprobs: Tensor,
                             beta0: float = 0.1) -> Tensor:
    """Token-level contrastive reward ``beta0 * (log pi_dpo - log pi_reverse)`` of the actual
    tokens (DESIGN §2); same shapes in and out, float32 (float64 for float64 inputs)."""
    _require_float("dpo_logprobs", dpo_logprobs)
    _require_float("reverse_logprobs", reverse_logprobs)
    if dpo_logprobs.shape != reverse_logprobs.shape:
        raise ValueError(f"dpo_logprobs shape {tuple(dpo_logprobs.shape)} must equal "
                         f"reverse_logprobs shape {tuple(reverse_logprobs.shape)}")
    dtype = torch.promote_types(_compute_dtype(dpo_logprobs.dtype),
                                _compute_dtype(reverse_logprobs.dtype))
    return float(beta0) * (dpo_logprobs.to(dtype) - reverse_logprobs.to(dtype))
