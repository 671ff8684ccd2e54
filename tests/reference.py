"""An independent dense float64 implementation of DESIGN §2, for end-to-end tests.

Written straight from the formulas with numpy, sharing no code with ``teacher_service``:
the engine and the server are checked against it.
"""

from __future__ import annotations

import numpy as np


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def dense_targets(z_dpo, z_other, next_ids, *, top_k, r=20.0, eps=1e-3, tvd_norm="half-l1",
                  mode="adaptive", beta0=0.1, beta=0.05):
    """Reference targets from [N, V] logits: a dict of float64 arrays plus the dense log pi*."""
    z_d = np.asarray(z_dpo, dtype=np.float64)
    z_o = np.asarray(z_other, dtype=np.float64)
    lp_d, lp_o = _log_softmax(z_d), _log_softmax(z_o)
    if mode == "adaptive":
        l1 = np.abs(np.exp(lp_d) - np.exp(lp_o)).sum(-1)
        alpha = r * (0.5 * l1 if tvd_norm == "half-l1" else l1) + eps
        z_star = z_d + alpha[:, None] * (z_d - z_o)
    elif mode == "constant":
        alpha = np.full(z_d.shape[0], beta0 / beta)
        z_star = z_d + alpha[:, None] * (z_d - z_o)
    elif mode == "vanilla-adaptive":  # per-position weight from TVD(p_dpo, p_ref)
        l1 = np.abs(np.exp(lp_d) - np.exp(lp_o)).sum(-1)
        alpha = r * (0.5 * l1 if tvd_norm == "half-l1" else l1) + eps
        z_star = alpha[:, None] * z_d + (1 - alpha[:, None]) * z_o
    else:  # vanilla: interpolate/extrapolate from the reference model
        w = beta0 / beta
        alpha = np.full(z_d.shape[0], w)
        z_star = w * z_d + (1 - w) * z_o
    log_pi = _log_softmax(z_star)
    order = np.argsort(-log_pi, axis=-1, kind="stable")[:, :top_k]
    top = np.take_along_axis(log_pi, order, axis=-1)
    rest = log_pi.copy()
    np.put_along_axis(rest, order, -np.inf, axis=-1)
    m = rest.max(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        tail = np.where(np.isinf(m[:, 0]), -np.inf,
                        (m + np.log(np.exp(rest - np.where(np.isinf(m), 0, m)).sum(-1,
                         keepdims=True)))[:, 0])
    idx = np.asarray(next_ids)
    rows = np.arange(len(idx))
    return {
        "alpha": alpha, "topk_ids": order, "topk_logprobs": top, "tail_logmass": tail,
        "dpo_logprobs": lp_d[rows, idx], "reverse_logprobs": lp_o[rows, idx], "log_pi": log_pi,
    }


def full_logits(model, input_ids) -> np.ndarray:
    """A plain full forward of one sequence: [L, V] float64 logits (the naive way)."""
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.tensor([list(input_ids)]))
    return out.logits[0].double().numpy()
