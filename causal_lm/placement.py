"""A teacher split across several devices: a device map for ``from_pretrained``.

``--dpo-devices cuda:0,cuda:1`` (and ``--reverse-devices``) place one model's decoder layers in
order over the listed devices, evenly (the first devices take one more when they do not divide),
with the embeddings on the first device and everything after the last layer (the final norm,
the LM head) on the last one, where the engine then applies the float32 head and the target
math. ``auto``, ``balanced``, ``balanced_low_0`` and ``sequential`` are handed to accelerate as
they are (it sizes the split from free memory). Loading a mapped model needs ``accelerate``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from storage.errors import UserError

#: Strategies accelerate computes a map for by itself.
ACCELERATE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


class PlacementError(UserError, ValueError):
    """A device list that cannot place a model; names the flag."""


def parse_devices(value: str, flag: str) -> list[str] | str:
    """``"cuda:0,cuda:1"`` -> ``["cuda:0", "cuda:1"]``; an accelerate strategy stays a string."""
    text = value.strip()
    if text in ACCELERATE_MAPS:
        return text
    devices = [d.strip() for d in text.split(",") if d.strip()]
    if not devices:
        raise PlacementError(f"{flag}: expected devices separated by commas (cuda:0,cuda:1) "
                             f"or one of {', '.join(ACCELERATE_MAPS)}; got {value!r}")
    for device in devices:
        try:
            torch.device(device)
        except RuntimeError:
            raise PlacementError(f"{flag}: {device!r} is not a device (cpu, cuda:N)") from None
    return devices


def layer_device_map(model_dir: str | Path, devices: list[str], *,
                     trust_remote_code: bool = False) -> dict[str, str]:
    """``{module name: device}`` for the model in ``model_dir`` (built on the meta device from
    its config: no weights are read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir, local_files_only=True,
                                        trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    layer_types = set(getattr(model, "_no_split_modules", None) or [])
    layers = [name for name, module in model.named_modules()
              if type(module).__name__ in layer_types]
    if not layers:
        raise PlacementError(f"{model_dir}: cannot find the decoder layers of "
                             f"{type(model).__name__} to place them; use auto")
    share, extra = divmod(len(layers), len(devices))
    placed: dict[str, str] = {}
    start = 0
    for i, device in enumerate(devices):
        count = share + (1 if i < extra else 0)
        for name in layers[start:start + count]:
            placed[name] = device
        start += count
    # The modules outside the layers, by where they come in the model: before the first layer
    # (embeddings) on the first device, after it (final norm, LM head) on the last.
    first_layer = next(i for i, (name, _) in enumerate(model.named_modules())
                       if name == layers[0])
    for i, (name, module) in enumerate(model.named_modules()):
        if not name or any(name == l or name.startswith(l + ".") or l.startswith(name + ".")
                           for l in layers):
            continue
        own = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        if own:
            placed[name] = devices[0] if i < first_layer else devices[-1]
    return placed


def input_device(model) -> torch.device:
    """Where a (possibly split) model takes its input ids: its embeddings' device."""
    return model.get_input_embeddings().weight.device
