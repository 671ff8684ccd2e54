"""AdamW and its learning-rate schedule: linear warmup, then linear or cosine decay.

The schedule is a pure function of the step (:func:`lr_multiplier`), wrapped in a ``LambdaLR``
so its state is just the step counter and a checkpoint restores it exactly.

Parameters are split into two groups: matrices get weight decay, while biases, norm weights and
other 1-D parameters do not (decaying a norm's gain towards zero only fights the model).
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

SCHEDULES = ("linear", "cosine", "constant")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters in two AdamW groups: decayed (>= 2-D) and not decayed (1-D:
    biases, norm gains). Tied weights appear once."""
    decay, no_decay, seen = [], [], set()
    for _, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, *, lr: float, weight_decay: float = 0.0,
                    betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8
                    ) -> torch.optim.AdamW:
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    # foreach=False keeps CPU runs bitwise reproducible across resume (same kernels each step).
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps,
                             foreach=False)


def warmup_steps_for(total_steps: int, warmup_ratio: float) -> int:
    """Warmup length from a ratio of the run (the paper: 0.1), rounded up."""
    if not 0.0 <= warmup_ratio < 1.0:
        raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
    return math.ceil(total_steps * warmup_ratio)


def lr_multiplier(step: int, *, warmup_steps: int, total_steps: int, schedule: str = "cosine",
                  min_lr_ratio: float = 0.0) -> float:
    """The factor on the peak lr for the update at 0-based ``step``.

    Warmup: ``(step + 1) / warmup_steps`` so the first update already moves (a 0 lr step would
    be wasted). Decay from the end of warmup to ``total_steps``: ``linear`` or ``cosine`` down to
    ``min_lr_ratio``; ``constant`` stays at 1.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule: expected one of {SCHEDULES}, got {schedule!r}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if schedule == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int,
                    schedule: str = "cosine", min_lr_ratio: float = 0.0
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    lr_multiplier(0, warmup_steps=warmup_steps, total_steps=total_steps, schedule=schedule,
                  min_lr_ratio=min_lr_ratio)  # validate the arguments now, not at step 1

    def factor(step: int) -> float:
        return lr_multiplier(step, warmup_steps=warmup_steps, total_steps=total_steps,
                             schedule=schedule, min_lr_ratio=min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def clip_grad_norm(parameters: Iterable[torch.Tensor], max_norm: float | None) -> float:
    """Clip in place when ``max_norm`` is set; returns the total norm before clipping."""
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return 0.0
    if hasattr(params[0].grad, "full_tensor"):  # FSDP's sharded gradients (DTensors)
        total = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=False)
        if max_norm is not None and max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=False)
        return float(total.full_tensor())
    if max_norm is None or max_norm <= 0:
        norms = torch.stack([p.grad.detach().float().norm() for p in params])
        return float(norms.norm())
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=False))
