"""The REINFORCE baselines of the paper's Figure 2, as pure functions.

AlignDistil's claim to speed (Figure 2, Appendix E of the paper) is measured against policy
gradients on the same reward. DESIGN.md does not write those baselines down, so this module
states the form it implements. Every sampled response token ``y_t`` (state ``s_t``) earns

    r_t = beta0 * (log pi_dpo(y_t|s_t) - log pi_rev(y_t|s_t))      # the contrastive reward
          - beta * (log pi_theta(y_t|s_t) - log pi_dpo(y_t|s_t))   # KL penalty towards pi_dpo

so both baselines maximise ``E[sum_t r_t]``, the RLHF objective whose token-level optimum is
AlignDistil's teacher with ``alpha = beta0 / beta`` (DESIGN §2, eq. 17). The KL penalty is its
one-sample estimate from the sampled token (what the records carry); the exact per-position
``KL(pi_theta(.|s_t) || pi_dpo(.|s_t))`` would need pi_dpo's whole distribution in the record.

- ``sentence`` (eq. 42): every token of response b is credited with the response's return
  ``R_b = sum_t r_t`` minus a baseline, the mean ``R`` of the step's responses.
- ``token`` (eq. 43): token t is credited with its reward-to-go ``G_t = sum_{t' >= t} r_t'``
  minus a baseline, the mean ``G`` at the same position over the step's responses that reach it.

The surrogate loss is ``-(1/B) sum_b sum_t A_{b,t} log pi_theta(y_t|s_t)`` with the advantages
``A`` held constant, whose gradient is the REINFORCE estimate. Advantages depend on
``log pi_theta`` (the penalty) and on the whole step (the baselines), so the trainer computes
them from a pass without gradients before the step's backward passes, as PPO-style trainers do.
"""

from __future__ import annotations

import torch
from torch import Tensor


def token_rewards(logp: Tensor, dpo_logprobs: Tensor, reverse_logprobs: Tensor, *,
                  beta0: float, beta: float) -> Tensor:
    """``r_t`` of the module docstring for the sampled tokens (any shape, all equal)."""
    for name, x in (("dpo_logprobs", dpo_logprobs), ("reverse_logprobs", reverse_logprobs)):
        if x.shape != logp.shape:
            raise ValueError(f"{name} shape {tuple(x.shape)} must equal logp shape "
                             f"{tuple(logp.shape)}")
    logp, dpo, rev = (x.double() for x in (logp, dpo_logprobs, reverse_logprobs))
    return beta0 * (dpo - rev) - beta * (logp - dpo)


def returns(rewards: Tensor, mask: Tensor, level: str) -> Tensor:
    """``[B, T]`` per-token rewards -> the return each token is credited with: the response's
    total (``sentence``) or the reward-to-go (``token``); 0 on padding."""
    if level not in ("sentence", "token"):
        raise ValueError(f"level must be 'sentence' or 'token', got {level!r}")
    real = mask != 0
    r = torch.where(real, rewards, 0.0)
    if level == "sentence":
        total = r.sum(-1, keepdim=True).expand_as(r)
        return torch.where(real, total, 0.0)
    to_go = r.flip(-1).cumsum(-1).flip(-1)
    return torch.where(real, to_go, 0.0)


def baseline_sums(returns_list: list[Tensor], masks: list[Tensor], level: str,
                  length: int | None = None) -> tuple[Tensor, Tensor]:
    """``(sum, count)`` of the returns the baseline averages, from micro-batches' returns
    (``[B_i, T_i]`` each): scalars for ``sentence`` (one return per response), ``[length]``
    tensors for ``token`` (per position, over the responses that reach it; ``length`` defaults
    to the longest ``T_i``). Sums from several ranks add up to the whole step's."""
    if level == "sentence":
        totals = [g[:, 0][m[:, 0] != 0] for g, m in zip(returns_list, masks) if g.shape[1]]
        flat = torch.cat(totals).double() if totals else torch.zeros(0, dtype=torch.float64)
        return flat.sum(), torch.tensor(float(flat.numel()), dtype=torch.float64)
    if length is None:
        length = max((g.shape[1] for g in returns_list), default=0)
    device = returns_list[0].device if returns_list else None
    sums = torch.zeros(length, dtype=torch.float64, device=device)
    counts = torch.zeros(length, dtype=torch.float64, device=device)
    for g, m in zip(returns_list, masks):
        real = (m != 0).double()
        sums[:g.shape[1]] += (g.double() * real).sum(0)
        counts[:g.shape[1]] += real.sum(0)
    return sums, counts


def baseline(returns_list: list[Tensor], masks: list[Tensor], level: str) -> Tensor:
    """The baseline of a step from its micro-batches' returns (``[B_i, T_i]`` each): a scalar
    for ``sentence`` (mean return over responses), one value per position for ``token``
    (mean over the responses that reach it), as a ``[T_max]`` tensor."""
    return baseline_from_sums(*baseline_sums(returns_list, masks, level))


def baseline_from_sums(sums: Tensor, counts: Tensor) -> Tensor:
    return sums / counts.clamp_min(1.0)


def advantages(step_returns: Tensor, mask: Tensor, step_baseline: Tensor) -> Tensor:
    """``returns - baseline`` on real positions, 0 on padding (``[B, T]``)."""
    b = step_baseline if step_baseline.dim() == 0 else step_baseline[:step_returns.shape[1]]
    return torch.where(mask != 0, step_returns - b.to(step_returns.dtype), 0.0)


def policy_gradient_loss(logp: Tensor, adv: Tensor, mask: Tensor) -> Tensor:
    """``-(1/B) sum_b sum_t A_{b,t} log pi_theta(y_t|s_t)`` over real positions (``[B, T]``
    each; ``adv`` is treated as a constant)."""
    if not logp.shape == adv.shape == mask.shape:
        raise ValueError(f"logp {tuple(logp.shape)}, adv {tuple(adv.shape)} and mask "
                         f"{tuple(mask.shape)} must have one [B, T] shape")
    real = mask != 0
    terms = torch.where(real, adv.detach().to(logp.dtype) * logp, 0.0)
    return -terms.sum() / max(logp.shape[0], 1)
