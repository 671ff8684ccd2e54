"""``--strategy fsdp``: PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``) for the student.

DDP keeps the whole model, its gradients and AdamW's two moments on every rank: 16 bytes per
parameter (float32 weights and gradients, two float32 moments). FSDP2 shards all four over the
ranks (about 16 / N bytes per parameter per rank), gathering one decoder layer's parameters at a
time for its forward and backward. What is sharded:

- each decoder layer (the classes a Hugging Face model lists in ``_no_split_modules``) is its
  own FSDP unit;
- the root unit is the :class:`~student_trainer.modeling.StudentForward` around the model, so
  the embeddings, the final norm and the LM head are gathered when the loss runs, including
  the chunked sparse loss that reads the head's weight directly (``--loss-chunk-size``);
- on CUDA with bf16 on, parameters are gathered in bf16 and gradients reduced in float32
  (``MixedPrecisionPolicy``); the sharded master weights and AdamW stay float32.

Checkpoints are sharded with ``torch.distributed.checkpoint`` (every rank writes its own
part of the model and optimizer into ``checkpoint-N/distributed/``); ``final/`` is a
consolidated Hugging Face folder, and :func:`consolidate` makes one from any checkpoint.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from storage.errors import UserError

#: The folder of a checkpoint that holds the sharded model and optimizer.
DCP_DIR = "distributed"


class ShardingError(UserError, RuntimeError):
    """A model FSDP cannot be applied to; names the model."""


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's decoder layers: modules of the classes in ``model._no_split_modules``."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ShardingError(f"--strategy fsdp: cannot find the decoder layers of "
                            f"{type(model).__name__} (no module of its _no_split_modules "
                            f"{sorted(names) or '[]'}); use --strategy ddp")
    return layers


def shard(root: nn.Module, model: nn.Module, *, device: torch.device, bf16: bool) -> nn.Module:
    """Apply FSDP2 in place: each decoder layer of ``model``, then ``root`` (the module whose
    forward the trainer calls, holding ``model``). Returns ``root``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if bf16 and device.type == "cuda" else MixedPrecisionPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(root, mesh=mesh, mp_policy=policy)
    return root


def settle_root(root: nn.Module, device: torch.device) -> None:
    """Call after :func:`shard` when ``root`` is a
    :class:`~student_trainer.modeling.StudentForward` and the model will ``generate``.

    FSDP2 makes the first FSDP unit that runs forward the root of the tree. Hugging Face
    ``generate`` (on-policy sampling) calls the model, not ``root``, so its first forward
    would start at a decoder layer and the real root would then be refused. One forward of a
    two-token sequence through ``root``, without gradients, settles it. The root keeps its
    parameters gathered after a forward (FSDP2 expects its backward next): they are sharded
    again, so the optimizer is built on the sharded parameters. Collective."""
    ids = torch.zeros((1, 2), dtype=torch.long, device=device)
    one = torch.zeros(1, dtype=torch.long, device=device)
    with torch.no_grad():
        root(ids, torch.ones_like(ids), one, one, mode="logprobs", target_ids=one)
    root.reshard()


def load_for_sharding(weights: str | Path, *, rank: int, trust_remote_code: bool = False,
                      attn_implementation: str | None = None
                      ) -> tuple[nn.Module, Any, dict[str, torch.Tensor] | None]:
    """``(model, tokenizer, full weights)`` for :func:`shard` without a whole copy per GPU.

    Rank 0 loads the weights on the CPU (its ``full weights``: the state dict, kept for
    :func:`broadcast_weights`); every other rank builds the architecture on the meta device,
    which allocates nothing. :func:`shard` then moves each unit to the rank's device as it
    shards it, so no GPU ever holds more than its shards and one unit being sharded, and only
    rank 0's host memory holds the whole model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from causal_lm.loading import (check_model_dir, check_vocab, load_model_and_tokenizer,
                                   load_tokenizer)

    if rank == 0:
        model, tokenizer = load_model_and_tokenizer(weights, device=torch.device("cpu"),
                                                    train=True,
                                                    trust_remote_code=trust_remote_code,
                                                    attn_implementation=attn_implementation)
        return model, tokenizer, {k: v for k, v in model.state_dict().items()}
    path = check_model_dir(weights, "--model", trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code, flag="--model")
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code,
                                        local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            config, dtype=torch.float32, trust_remote_code=trust_remote_code,
            **({"attn_implementation": attn_implementation} if attn_implementation else {}))
    check_vocab(model, tokenizer, "--model", path)
    return model.train(), tokenizer, None


def broadcast_weights(model: nn.Module, full: dict[str, torch.Tensor] | None,
                      device: torch.device) -> None:
    """After :func:`shard` of a model from :func:`load_for_sharding`: the ranks that built it
    on the meta device allocate their shards, and every rank's shards and buffers are filled
    from rank 0's weights. Buffers that are not in the state dict (e.g. rotary frequencies)
    are sent too. Collective."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if full is None:
        model.to_empty(device=device)
    set_model_state_dict(model, full or {}, options=StateDictOptions(
        full_state_dict=True, broadcast_from_rank0=True))
    for _, buffer in sorted(model.named_buffers()):
        dist.broadcast(buffer, src=0)


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def gradient_sync(module: nn.Module, enabled: bool):
    """A context for one micro-batch's backward: gradients are synchronised over the ranks only
    when ``enabled`` (the step's last micro-batch), for DDP and FSDP alike."""
    if isinstance(module, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext() if enabled else module.no_sync()
    if is_sharded(module):
        module.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict on the CPU of rank 0 (empty elsewhere). Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))


def save_sharded(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every rank writes its shards of the model and optimizer into ``folder``. Collective; the
    folder must be one filesystem for all ranks (shared across nodes)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(folder))


def save_sharded_checkpoint(dest: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                            tokenizer, state: dict[str, Any], rank: int,
                            consolidated: bool = False) -> None:
    """A checkpoint folder ``dest`` whose model and optimizer are sharded: every rank writes its
    shards into ``dest/distributed/`` (one filesystem all ranks see); with ``consolidated`` the
    folder also gets the full Hugging Face weights. Rank 0 adds the config, tokenizer and
    ``state`` and renames the folder into place. Collective."""
    import torch.distributed as dist

    from student_trainer.checkpoint import begin_checkpoint, finish_checkpoint

    tmp = dest.parent / f".tmp-{dest.name}-sharded"
    if rank == 0:
        tmp = begin_checkpoint(dest, tag="sharded")
    dist.barrier()
    save_sharded(tmp / DCP_DIR, model, optimizer)
    full = full_model_state(model) if consolidated else None
    if rank == 0:
        if full is not None:
            model.save_pretrained(tmp, state_dict=full, safe_serialization=True)
        else:
            model.config.save_pretrained(tmp)
        finish_checkpoint(tmp, dest, tokenizer=tokenizer, state={**state, "strategy": "fsdp"})


def load_sharded(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Restore the model and optimizer shards written by :func:`save_sharded` (any number of
    ranks can load what another number wrote). Collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])


def consolidate(checkpoint: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """The full model weights of a sharded checkpoint, read in one process (no process group):
    ``model`` (unsharded, the run's architecture) gives the keys and shapes."""
    import torch.distributed.checkpoint as dcp

    import warnings

    state = {"model": {k: v.clone() for k, v in model.state_dict().items()}}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": yes
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(Path(checkpoint) / DCP_DIR), no_dist=True)
    return state["model"]


def local_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes this rank holds of parameters, gradients and optimizer states (a DTensor counts
    its local shard only)."""
    def size(t: Any) -> int:
        if not isinstance(t, torch.Tensor):
            return 0
        local = t.to_local() if hasattr(t, "to_local") else t
        return local.numel() * local.element_size()

    params = list(model.parameters())
    return {"parameters": sum(size(p) for p in params),
            "gradients": sum(size(p.grad) for p in params if p.grad is not None),
            "optimizer": sum(size(v) for s in optimizer.state.values() for v in s.values()
                             if isinstance(v, torch.Tensor) and v.dim() > 0)}
