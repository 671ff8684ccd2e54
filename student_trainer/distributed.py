"""The process's place in a ``torchrun`` job (or a single process), and the few collectives the
trainer needs. Without ``WORLD_SIZE > 1`` in the environment every helper is a local no-op."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  #: this process set the group up (and tears it down)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device, *, group_of_one: bool = False) -> DistEnv:
    """Join the process group ``torchrun`` describes (NCCL on GPUs, gloo on CPUs). ``device`` is
    this process's device from :func:`causal_lm.loading.resolve_device`: its GPU index is
    ``LOCAL_RANK`` modulo the GPUs this process sees, so one visible GPU per process (SLURM,
    Kubernetes) works as well as all of a node's GPUs per process.

    ``group_of_one``: a single process (no torchrun) still gets a process group of one, for
    code that needs collectives (FSDP on one process, e.g. to resume a sharded run there)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    owns = not dist.is_initialized()  # a caller's own group is left to the caller
    if world <= 1:
        if group_of_one and owns:
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                    store=dist.HashStore(), rank=0, world_size=1)
        return DistEnv(owns_group=group_of_one and owns)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if owns:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistEnv(rank=rank, world_size=world, local_rank=local, owns_group=owns)


def finish(env: DistEnv) -> None:
    """The end of a run that succeeded on every rank, before :func:`shutdown`: wait until every
    rank is done with every collective (none is still sending when a peer tears down), then
    free what the run left that holds the group (DDP's reducer, FSDP's units), so that the
    group is destroyed in :func:`shutdown` with nothing in flight and nothing left to free at
    interpreter exit."""
    import gc

    if dist.is_initialized():
        dist.barrier()
    gc.collect()


def shutdown(env: DistEnv) -> None:
    """Leave the process group this process set up (after :func:`finish` on success; on a
    failure, at once: a barrier could wait forever for a rank that died)."""
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()


def all_reduce_sum(env: DistEnv, values: torch.Tensor) -> torch.Tensor:
    """Sum a small float64 tensor over ranks (on the collective's device and back)."""
    if not env.enabled:
        return values
    buf = values.to(_collective_device())
    dist.all_reduce(buf)
    return buf.to(values.device)


def all_reduce_max(env: DistEnv, value: int) -> int:
    """The largest of one integer over ranks."""
    return max_over_group(value) if env.enabled else value


def max_over_group(value: int) -> int:
    """The largest of one integer over the default process group's ranks (collective)."""
    buf = torch.tensor([value], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(buf, op=dist.ReduceOp.MAX)
    return int(buf.item())


def _collective_device() -> torch.device:
    """Where the backend's tensors live: this process's current GPU for NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_objects(env: DistEnv, obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (on every rank)."""
    if not env.enabled:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out
