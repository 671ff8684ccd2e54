"""The AlignDistil teacher targets (DESIGN §2): pure tensor functions, no I/O.

Per response position the teacher is ``log pi* = log_softmax(z*)`` with
``z* = z_dpo + alpha * (z_dpo - z_rev)`` (eq. 17), ``alpha = r * tvd(p_dpo, p_rev) + eps``.
Three choices shape the code:

- **Chunks over positions.** The logits are ``[N, V]`` with V up to ~150k, and the math needs
  several full-vocabulary temporaries per row (two softmaxes, z*, log pi*). Rows are processed
  ``chunk_size`` at a time, so the extra memory is O(chunk_size x V), never another ``[N, V]``
  tensor (the dense :func:`teacher_logprobs` returns one because that is what it is for).
- **float32 (or float64) math.** Teachers run in bf16, whose 8-bit mantissa cannot hold an
  extrapolated logit (alpha up to 30) or a probability difference; each chunk is upcast first.
  The extrapolation uses the log-probabilities instead of the raw logits: the result differs by
  a per-row constant only, which ``log_softmax`` removes, but the numbers stay bounded and the
  invariance to a per-row logit offset holds in floating point too.
- **The tail by logsumexp.** ``tail_logmass`` is a logsumexp over the non-top-k log-probs.
  ``log(1 - sum(exp(topk)))`` cancels catastrophically when the top-k holds nearly all the mass
  (in float32 ``1 - 1e-9`` is ``1``, giving ``-inf`` for a true ``-20.7``), and the tail is what
  the ``uniform`` and ``bucket`` losses model.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch import Tensor

TVD_NORMS = ("half-l1", "l1")
MODES = ("adaptive", "constant", "vanilla", "vanilla-adaptive")
#: Modes whose second model is the reference (SFT) model rather than the reverse-DPO model.
REFERENCE_MODES = ("vanilla", "vanilla-adaptive")
POLICIES = ("off", "on")

#: The authors' released runs use the l1 norm with r = 10 off-policy and 15 on-policy; the
#: paper's half-l1 norm is half as large, so the same alphas need twice the r.
_DEFAULT_R = {("l1", "off"): 10.0, ("l1", "on"): 15.0,
              ("half-l1", "off"): 20.0, ("half-l1", "on"): 30.0}


def default_r(tvd_norm: str = "half-l1", policy: str = "off") -> float:
    """The r that reproduces the authors' released runs for this norm and policy.

    ``policy`` is ``"off"`` or ``"on"`` (``"off-policy"`` / ``"on-policy"`` are accepted too).
    """
    if tvd_norm not in TVD_NORMS:
        raise ValueError(f"tvd_norm: expected one of {TVD_NORMS}, got {tvd_norm!r}")
    key = policy.removesuffix("-policy") if isinstance(policy, str) else policy
    if key not in POLICIES:
        raise ValueError(f"policy: expected one of {POLICIES}, got {policy!r}")
    return _DEFAULT_R[(tvd_norm, key)]


@dataclass(frozen=True)
class TargetConfig:
    """How targets are built. ``beta0`` is the DPO beta the teachers were trained with;
    ``beta`` is the student's KL weight, used by the ablation modes: ``constant`` sets
    ``alpha = beta0 / beta`` everywhere, ``vanilla`` mixes ``z* = w z_dpo + (1 - w) z_ref``
    with ``w = beta0 / beta`` (and reports ``alpha = w``). ``vanilla-adaptive`` (the released
    code's ``theorem1_adaptive``) mixes the same way with a per-position
    ``w = r * TVD(p_dpo, p_ref) + eps`` and reports ``alpha = w`` (so the loss weight is
    ``beta0 / w``). ``r``, ``eps`` and ``tvd_norm`` are used by the adaptive modes.

    ``dpo_top`` (0: off) changes which ``top_k`` ids a position keeps: the dpo model's
    ``dpo_top`` likeliest ids, then pi*'s best other ids up to ``top_k``; each kept id still
    carries its ``log pi*`` and the tail is pi*'s mass outside the kept ids. The reverse KL
    weighs pi* where the *student* puts mass, and a student near the dpo model puts it on the
    dpo model's favourites, which the extrapolation pushes down into pi*'s tail
    (benchmarks/results/grad_fidelity.md)."""

    top_k: int = 64
    r: float = 20.0
    eps: float = 1e-3
    tvd_norm: str = "half-l1"
    mode: str = "adaptive"
    beta0: float = 0.1
    beta: float = 0.05
    chunk_size: int = 256
    dpo_top: int = 0
    #: 0: keep ``top_k`` ids everywhere. EPS > 0: keep the fewest of pi*'s best ids whose mass
    #: reaches ``1 - EPS`` (at least ``min_k``, at most ``top_k``); see :func:`kept_counts`.
    tail_budget: float = 0.0
    min_k: int = 1

    def __post_init__(self) -> None:
        _check_int("top_k", self.top_k, minimum=1)
        _check_int("dpo_top", self.dpo_top, minimum=0)
        _check_int("min_k", self.min_k, minimum=1)
        _check_real("tail_budget", self.tail_budget, "in [0, 1)", lambda v: 0 <= v < 1)
        if self.min_k > self.top_k:
            raise ValueError(f"min_k = {self.min_k} must be at most top_k = {self.top_k}")
        if self.dpo_top and self.dpo_top >= self.top_k:
            # with no place left for pi*'s own best ids, pi*'s mode can fall into the tail
            raise ValueError(f"dpo_top = {self.dpo_top} must be below top_k = {self.top_k} (the "
                             f"kept ids are the dpo model's top dpo_top, then pi*'s best)")
        _check_int("chunk_size", self.chunk_size, minimum=1)
        _check_real("r", self.r, ">= 0", lambda v: v >= 0)
        _check_real("eps", self.eps, "> 0", lambda v: v > 0)
        _check_real("beta0", self.beta0, "> 0", lambda v: v > 0)
        _check_real("beta", self.beta, "> 0", lambda v: v > 0)
        if self.tvd_norm not in TVD_NORMS:
            raise ValueError(f"tvd_norm: expected one of {TVD_NORMS}, got {self.tvd_norm!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {self.mode!r}")


class SparseTargets(NamedTuple):
    """Sparse targets for N positions. Floats are float32 (float64 when the logits were)."""

    alpha: Tensor             # [N]
    topk_ids: Tensor          # [N, k] int64 kept ids, by log pi* descending
    topk_logprobs: Tensor     # [N, k] log pi*, normalised over the full vocabulary
    tail_logmass: Tensor      # [N] log of pi*'s mass outside the kept ids; -inf when k == V
    dpo_logprobs: Tensor      # [N] log softmax(z_dpo)[next_id]
    reverse_logprobs: Tensor  # [N] log softmax(z_other)[next_id]
    #: [N] int64: how many of the ``k`` columns are kept ids (``k`` everywhere without a tail
    #: budget); columns past it repeat column 0 (id and log-prob), which no reader counts
    topk_count: Tensor | None = None
    #: with ``detail``: log pi* of the actual next token, and its 1-based rank over the whole
    #: vocabulary (how many ids have log pi* >= it, itself included: vLLM's rank)
    next_logprobs: Tensor | None = None  # [N]
    next_ranks: Tensor | None = None     # [N] int64
    #: with ``extra_ids`` ``[N, m]``: log pi* at those ids (-inf where an id is -1: padding)
    extra_logprobs: Tensor | None = None  # [N, m]
    #: with ``detail``: pi*'s own top-k, whatever ids are kept (``dpo_top``), in float32
    pi_topk_ids: Tensor | None = None       # [N, k]
    pi_topk_logprobs: Tensor | None = None  # [N, k]
    #: with ``dense_rows`` (a bool mask over the N positions): the whole log pi* row of each
    #: flagged position, in order (what sampling the next token draws from)
    dense_logprobs: Tensor | None = None    # [flagged, V]


def compute_targets(dpo_logits: Tensor, other_logits: Tensor, next_ids: Tensor,
                    config: TargetConfig, *, detail: bool = False,
                    extra_ids: Tensor | None = None,
                    dense_rows: Tensor | None = None) -> SparseTargets:
    """Sparse teacher targets for N positions.

    ``dpo_logits`` and ``other_logits`` are ``[N, V]`` logits (any float dtype) at the response
    positions; ``other`` is the reverse model (modes ``adaptive``/``constant``) or the reference
    model (``vanilla``, ``vanilla-adaptive``). ``next_ids`` ``[N]`` are the tokens those positions predict. Outputs
    live on the logits' device.

    ``detail`` adds the actual next token's log pi* and rank; ``extra_ids`` ``[N, m]`` (int, -1
    for padding) adds log pi* at ids a client named (both for the scoring protocols of
    :mod:`teacher_service.protocol`; precompute asks for neither).
    """
    n, vocab, dtype = _check_logits(dpo_logits, other_logits)
    if config.top_k > vocab:
        raise ValueError(f"top_k = {config.top_k} exceeds the vocabulary size V = {vocab}")
    next_ids = _check_next_ids(next_ids, n, vocab, dpo_logits.device)
    k, device = config.top_k, dpo_logits.device

    alpha = torch.empty(n, dtype=dtype, device=device)
    topk_ids = torch.empty(n, k, dtype=torch.int64, device=device)
    topk_logprobs = torch.empty(n, k, dtype=dtype, device=device)
    topk_count = torch.full((n,), k, dtype=torch.int64, device=device)
    tail_logmass = torch.full((n,), -math.inf, dtype=dtype, device=device)
    dpo_logprobs = torch.empty(n, dtype=dtype, device=device)
    reverse_logprobs = torch.empty(n, dtype=dtype, device=device)
    next_logprobs = torch.empty(n, dtype=dtype, device=device) if detail else None
    next_ranks = torch.empty(n, dtype=torch.int64, device=device) if detail else None
    pi_ids = torch.empty(n, k, dtype=torch.int64, device=device) if detail else None
    pi_logprobs = torch.empty(n, k, dtype=dtype, device=device) if detail else None
    if extra_ids is not None:
        extra_ids = torch.as_tensor(extra_ids, dtype=torch.int64, device=device)
        if extra_ids.ndim != 2 or extra_ids.shape[0] != n:
            raise ValueError(f"extra_ids: expected shape [{n}, m], got {tuple(extra_ids.shape)}")
        if extra_ids.numel() and (extra_ids.max() >= vocab or extra_ids.min() < -1):
            raise ValueError(f"extra_ids: ids must lie in [0, {vocab}) (or be -1: padding)")
    extra_logprobs = torch.empty(extra_ids.shape, dtype=dtype, device=device) \
        if extra_ids is not None else None
    dense: list[Tensor] = []

    for start in range(0, n, config.chunk_size):
        rows = slice(start, start + config.chunk_size)
        log_star, a, log_d, log_o = _teacher_chunk(dpo_logits[rows], other_logits[rows],
                                                   config, dtype)
        alpha[rows] = a
        if dense_rows is not None:
            flagged = torch.as_tensor(dense_rows[rows], dtype=torch.bool, device=device)
            if flagged.any():
                dense.append(log_star[flagged].clone())
        ids = next_ids[rows].unsqueeze(-1)
        dpo_logprobs[rows] = log_d.gather(-1, ids).squeeze(-1)
        reverse_logprobs[rows] = log_o.gather(-1, ids).squeeze(-1)
        if detail:
            actual = log_star.gather(-1, ids)
            next_logprobs[rows] = actual.squeeze(-1)
            next_ranks[rows] = (log_star >= actual).sum(dim=-1)
        if extra_ids is not None:
            named = extra_ids[rows]
            extra_logprobs[rows] = log_star.gather(-1, named.clamp_min(0)).masked_fill(
                named < 0, -math.inf)
        if config.tail_budget:
            values, indices, counts = _kept_within_budget(log_star, log_d, config)
            topk_count[rows] = counts
            if detail:
                pi_logprobs[rows], pi_ids[rows] = torch.topk(log_star, k, dim=-1)
        elif config.dpo_top:
            values, indices = _kept_with_dpo_top(log_star, log_d, k, config.dpo_top)
            if detail:
                pi_logprobs[rows], pi_ids[rows] = torch.topk(log_star, k, dim=-1)
        else:
            values, indices = torch.topk(log_star, k, dim=-1, largest=True, sorted=True)
            if detail:
                pi_logprobs[rows], pi_ids[rows] = values, indices
        del log_d, log_o
        topk_logprobs[rows] = values
        topk_ids[rows] = indices
        if k < vocab or config.tail_budget:
            # Knock the kept ids out in place (log_star is ours and no longer needed); the
            # padding columns repeat column 0, so knocking them out again changes nothing.
            log_star.scatter_(-1, indices, -math.inf)
            # a mass, so <= 0: logsumexp may round a near-1 tail a hair above it
            tail_logmass[rows] = torch.logsumexp(log_star, dim=-1).clamp_(max=0.0)
    dense_logprobs = None
    if dense_rows is not None:
        dense_logprobs = torch.cat(dense) if dense else torch.empty(0, vocab, dtype=dtype,
                                                                      device=device)
    return SparseTargets(alpha, topk_ids, topk_logprobs, tail_logmass,
                         dpo_logprobs, reverse_logprobs, topk_count, next_logprobs, next_ranks,
                         extra_logprobs, pi_ids, pi_logprobs, dense_logprobs)


def teacher_logprobs(dpo_logits: Tensor, other_logits: Tensor,
                     config: TargetConfig) -> tuple[Tensor, Tensor]:
    """The dense teacher: ``log pi*`` ``[N, V]`` and ``alpha`` ``[N]``, computed chunk by chunk
    (for the ``exact`` loss, where the teacher is in-process, and for references)."""
    n, vocab, dtype = _check_logits(dpo_logits, other_logits)
    device = dpo_logits.device
    log_star = torch.empty(n, vocab, dtype=dtype, device=device)
    alpha = torch.empty(n, dtype=dtype, device=device)
    for start in range(0, n, config.chunk_size):
        rows = slice(start, start + config.chunk_size)
        log_star[rows], alpha[rows], _, _ = _teacher_chunk(dpo_logits[rows], other_logits[rows],
                                                           config, dtype)
    return log_star, alpha


# ---------------------------------------------------------------------------- internals

def _teacher_chunk(dpo: Tensor, other: Tensor, config: TargetConfig,
                   dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One chunk of rows: (log pi*, alpha, log p_dpo, log p_other), all in ``dtype``."""
    # Non-finite logits make z* undefined (-inf - -inf) or degenerate (+inf): refuse them here,
    # chunk by chunk, rather than with an [N, V] mask up front.
    for name, t in (("dpo_logits", dpo), ("other_logits", other)):
        if not torch.isfinite(t).all():
            raise ValueError(f"{name}: contains NaN or infinite values")
    log_d = torch.log_softmax(dpo.to(dtype), dim=-1)
    log_o = torch.log_softmax(other.to(dtype), dim=-1)
    if config.mode == "vanilla":
        w = config.beta0 / config.beta
        z_star = w * log_d + (1.0 - w) * log_o
        alpha = torch.full(log_d.shape[:1], w, dtype=dtype, device=log_d.device)
    elif config.mode == "vanilla-adaptive":
        # Theorem 1 with a per-position weight: z* = w z_dpo + (1 - w) z_ref (on log-probs:
        # the same up to a per-row constant), w = r * TVD(p_dpo, p_ref) + eps.
        alpha = config.r * _tvd(log_d, log_o, config.tvd_norm) + config.eps
        w = alpha.unsqueeze(-1)
        z_star = w * log_d + (1.0 - w) * log_o
    else:
        if config.mode == "adaptive":
            alpha = config.r * _tvd(log_d, log_o, config.tvd_norm) + config.eps
        else:  # constant
            alpha = torch.full(log_d.shape[:1], config.beta0 / config.beta, dtype=dtype,
                               device=log_d.device)
        # eq. 17 on log-probs: equal to z_dpo + alpha (z_dpo - z_rev) up to a per-row constant.
        z_star = log_d + alpha.unsqueeze(-1) * (log_d - log_o)
    return torch.log_softmax(z_star, dim=-1), alpha, log_d, log_o


def _kept_with_dpo_top(log_star: Tensor, log_d: Tensor, k: int, m: int) -> tuple[Tensor, Tensor]:
    """``(log pi*, ids)`` ``[n, k]`` of the kept ids: the dpo model's top ``m``, then pi*'s best
    ``k - m`` of the others; sorted by log pi* descending."""
    dpo_ids = torch.topk(log_d, m, dim=-1, largest=True, sorted=False).indices
    others = log_star.scatter(-1, dpo_ids, -math.inf)
    best_others = torch.topk(others, k - m, dim=-1, largest=True, sorted=False).indices
    kept = torch.cat([dpo_ids, best_others], dim=-1)
    values = log_star.gather(-1, kept)
    order = torch.sort(values, dim=-1, descending=True, stable=True).indices
    return values.gather(-1, order), kept.gather(-1, order)


def budget_counts(sorted_logprobs: Tensor, budget: float) -> Tensor:
    """Per row of log-probs sorted descending ``[n, m]``: the fewest leading entries whose mass
    reaches ``1 - budget`` (``m`` when the row never gets there). The comparison is on the mass
    left out (``1 - cumsum``), so float32 rounding of a cumsum near 1 does not decide it."""
    mass = sorted_logprobs.exp()
    left_out = (1.0 - mass.cumsum(dim=-1)).clamp_min_(0.0)
    # entries before the first one with left_out <= budget, plus that one
    return (left_out > budget).sum(dim=-1).add_(1).clamp_(max=sorted_logprobs.shape[-1])


def _kept_within_budget(log_star: Tensor, log_d: Tensor, config: TargetConfig
                        ) -> tuple[Tensor, Tensor, Tensor]:
    """``(log pi*, ids, count)`` under a tail budget EPS, padded to ``[n, top_k]``.

    Without ``dpo_top``: the fewest of pi*'s best ids whose mass reaches ``1 - EPS``. With
    ``dpo_top`` = m the student's likely ids count too (a student near the dpo model puts its
    mass on the dpo model's favourites, and the reverse KL weighs pi* there): the candidates
    are pi*'s best ``top_k`` and the dpo model's best m, taken in order of the larger of their
    two probabilities, and a position keeps the fewest of them that leave at most EPS of pi*'s
    mass AND of the dpo model's mass out. Either way at least ``min_k`` and at most ``top_k``
    ids; they are sorted by log pi* descending, and the columns past ``count`` repeat
    column 0."""
    k, m, eps = config.top_k, config.dpo_top, config.tail_budget
    pi_values, pi_ids = torch.topk(log_star, k, dim=-1, largest=True, sorted=True)
    slot = torch.arange(k, device=log_star.device)
    if not m:
        count = budget_counts(pi_values, eps).clamp_(min=config.min_k)
        values, ids = pi_values, pi_ids
    else:
        d_ids = torch.topk(log_d, m, dim=-1, largest=True, sorted=True).indices
        dup = (d_ids.unsqueeze(-1) == pi_ids.unsqueeze(-2)).any(-1)  # already a pi* candidate
        cand = torch.cat([pi_ids, d_ids], dim=-1)
        valid = torch.cat([torch.ones_like(pi_ids, dtype=torch.bool), ~dup], dim=-1)
        lp_star, lp_d = log_star.gather(-1, cand), log_d.gather(-1, cand)
        score = torch.maximum(lp_star, lp_d).masked_fill(~valid, -math.inf)
        order = torch.sort(score, dim=-1, descending=True, stable=True).indices
        cand, lp_star, lp_d = (t.gather(-1, order) for t in (cand, lp_star, lp_d))
        valid = valid.gather(-1, order)
        left_pi = (1.0 - (lp_star.exp() * valid).cumsum(-1)).clamp_min_(0.0)
        left_d = (1.0 - (lp_d.exp() * valid).cumsum(-1)).clamp_min_(0.0)
        need = torch.maximum((left_pi > eps).sum(-1), (left_d > eps).sum(-1)) + 1
        count = need.clamp_(min=config.min_k, max=k)
        # the first `count` candidates, then sorted by log pi* (the rest pushed to the end)
        first = torch.arange(cand.shape[-1], device=cand.device) < count.unsqueeze(-1)
        key = lp_star.masked_fill(~first, -math.inf)
        order = torch.sort(key, dim=-1, descending=True, stable=True).indices[:, :k]
        values, ids = lp_star.gather(-1, order), cand.gather(-1, order)
    pad = slot >= count.unsqueeze(-1)
    values = torch.where(pad, values[:, :1], values)
    ids = torch.where(pad, ids[:, :1], ids)
    return values, ids, count


def _tvd(log_d: Tensor, log_o: Tensor, norm: str) -> Tensor:
    """Per row: ``sum_v |p_d - p_o|`` (l1), halved for the paper's half-l1."""
    tvd = (log_d.exp() - log_o.exp()).abs_().sum(dim=-1)
    return 0.5 * tvd if norm == "half-l1" else tvd


def _check_logits(dpo: Tensor, other: Tensor) -> tuple[int, int, torch.dtype]:
    """Validate the two logit tensors; return (N, V, compute dtype)."""
    for name, t in (("dpo_logits", dpo), ("other_logits", other)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{name}: expected floating-point logits, got {t.dtype}")
        if t.ndim != 2:
            raise ValueError(f"{name}: expected shape [N, V], got {tuple(t.shape)}")
    if dpo.shape != other.shape:
        raise ValueError(f"other_logits: shape {tuple(other.shape)} differs from dpo_logits "
                         f"{tuple(dpo.shape)} (the two models must share one vocabulary)")
    if dpo.device != other.device:
        raise ValueError(f"other_logits: on {other.device}, dpo_logits on {dpo.device}")
    n, vocab = dpo.shape
    if vocab < 1:
        raise ValueError("dpo_logits: empty vocabulary dimension")
    dtype = torch.float64 if torch.float64 in (dpo.dtype, other.dtype) else torch.float32
    return n, vocab, dtype


def _check_next_ids(next_ids: Tensor, n: int, vocab: int, device: torch.device) -> Tensor:
    if not isinstance(next_ids, Tensor):
        raise TypeError(f"next_ids: expected a torch.Tensor, got {type(next_ids).__name__}")
    if next_ids.is_floating_point() or next_ids.is_complex() or next_ids.dtype == torch.bool:
        raise ValueError(f"next_ids: expected integer token ids, got {next_ids.dtype}")
    if tuple(next_ids.shape) != (n,):
        raise ValueError(f"next_ids: expected shape ({n},) to match the logits' N, got "
                         f"{tuple(next_ids.shape)}")
    next_ids = next_ids.to(device=device, dtype=torch.int64)
    if n and (int(next_ids.min()) < 0 or int(next_ids.max()) >= vocab):
        raise ValueError(f"next_ids: token ids must lie in [0, V = {vocab})")
    return next_ids


def _check_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name}: expected an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: must be >= {minimum}, got {value}")


def _check_real(name: str, value: object, limit: str, ok: Callable[[float], bool]) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name}: expected a number, got {value!r}")
    if not math.isfinite(value) or not ok(value):
        raise ValueError(f"{name}: must be finite and {limit}, got {value}")
