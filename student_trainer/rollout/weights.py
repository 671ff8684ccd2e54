"""The student's whole weights for a rollout engine: gathered from DDP or FSDP, by the names
the checkpoint uses, and copied when a rollout runs ahead of training (``--max-staleness``)."""

from __future__ import annotations

from typing import Iterable

import torch


def full_state_items(model: torch.nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    """``(checkpoint name, whole tensor)`` for each entry of ``model``'s state dict, lazily: a
    DDP wrapper is looked through, and FSDP's sharded tensors (DTensor) are gathered one at a
    time (``full_tensor``, a collective: every rank must iterate in step)."""
    while isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    for name, tensor in model.state_dict().items():
        if hasattr(tensor, "full_tensor"):
            tensor = tensor.full_tensor()
        yield _checkpoint_name(name), tensor.detach()


def weights_snapshot(model: torch.nn.Module, device: torch.device | str = "cpu"
                     ) -> dict[str, torch.Tensor]:
    """A copy of the student's whole weights (checkpoint names) on ``device``: what a rollout
    ``--max-staleness`` steps ahead samples from while training changes the live ones."""
    with torch.no_grad():
        return {name: tensor.to(device, copy=True) for name, tensor in full_state_items(model)}


def _checkpoint_name(name: str) -> str:
    """A parameter name as the checkpoint spells it (no DDP / torch.compile prefix)."""
    for prefix in ("module.", "_orig_mod."):
        while name.startswith(prefix):
            name = name[len(prefix):]
    return name
