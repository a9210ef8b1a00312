"""Data parallelism under torchrun: DDP (the default) or FSDP2, on PyTorch's own engine.

A run is distributed when torchrun starts it with WORLD_SIZE > 1 (`run.distributed` picks the
mode). Every rank builds the same model from the same seed and reads its own equal slice of each
global batch. What each mode shards:

- ddp: nothing. Every rank holds the whole model and optimizer state; gradients are all-reduced.
- fsdp: parameters, gradients and optimizer state. Each block is one `fully_shard` unit, and the
  embedding, head and final norm form the root unit. An NF4 weight is sharded when its 4-bit
  blocks and scales split evenly over the ranks; otherwise it stays whole on every rank (it is
  frozen, so it has no gradient or optimizer state to shard).

Backend: nccl on CUDA (one GPU per rank, cuda:LOCAL_RANK), gloo on CPU. See docs/distributed.md.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from stackwise.model import quant

MODES = ("ddp", "fsdp")


@dataclass(frozen=True)
class DistContext:
    """Who this process is: `mode` is "single" unless torchrun started several ranks."""

    mode: str = "single"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.mode == "fsdp"


def pick_device(name: str, ctx: DistContext) -> torch.device:
    """The device of `run.device` for this rank (cuda:LOCAL_RANK under torchrun)."""
    from stackwise.training.errors import TrainingError

    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("run.device is 'cuda' but no CUDA device is available; use run.device=cpu or auto")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", ctx.local_rank) if ctx.active else torch.device("cuda")


def check_run(ctx: DistContext, config: Any, schedule: Any, given_model: bool) -> None:
    """What a distributed run needs of its config, checked before anything is built: no
    run.compile, no model object under FSDP, every phase's batch split evenly over the ranks
    and micro-batches."""
    from stackwise.training.errors import TrainingError
    from stackwise.training.schedule import resolve_data

    if not ctx.active:
        return
    if config.run.compile:
        raise TrainingError("run.compile is not supported in a distributed run yet; set run.compile=false")
    if ctx.sharded and given_model:
        raise TrainingError("run.distributed=fsdp rebuilds the model from the config at each phase; "
                            "pass the model through the config, not as an object")
    parts = config.training.grad_accum_steps * ctx.world_size
    for phase in schedule.phases:
        size = resolve_data(config, phase, tau=None)["batch_size"]
        if size % parts:
            raise TrainingError(
                f"phase {phase.name!r}: batch size {size} does not split into {ctx.world_size} ranks × "
                f"{config.training.grad_accum_steps} micro-batches; make training.batch_size (and any "
                f"phase data_config.batch_size) a multiple of {parts}")


def launched_world_size() -> int:
    """Ranks torchrun started (1 when run as a plain process)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(mode: str, device: str) -> DistContext:
    """Join torchrun's process group (created once per process) and say who this rank is."""
    world = launched_world_size()
    if world <= 1:
        return DistContext()
    if mode not in MODES:
        raise ValueError(f"run.distributed must be one of {', '.join(MODES)}, got {mode!r}")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistContext(mode, rank, world, local_rank)


def shutdown(together: bool = True) -> None:
    """Leave the process group. After a clean finish the ranks leave together: one tearing it
    down while another still talks (rank 0 writing its plot, say) can abort the process. After
    an error a rank leaves at once, so torchrun sees it fail and stops the others."""
    if dist.is_initialized():
        # Free the run's objects now, while the interpreter is whole: tensors that gloo's worker
        # threads still reference, freed during interpreter teardown, abort the process (SIGABRT,
        # "terminate called without an active exception"; pytorch/pytorch#179291).
        gc.collect()
        if together:
            dist.barrier()
        dist.destroy_process_group()
        gc.collect()


def _on() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


# ---- collectives (no-ops in a single process) ----------------------------------------------


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In place over all ranks: "sum", "mean", "min" or "max". Returns `tensor`."""
    if not _on():
        return tensor
    reduce_op = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN,
                 "max": dist.ReduceOp.MAX}[op]
    dist.all_reduce(tensor, op=reduce_op)  # gloo has no AVG: sum, then divide
    if op == "mean":
        tensor /= dist.get_world_size()
    return tensor


def all_true(flag: bool, device: torch.device) -> bool:
    """True when `flag` holds on every rank (one small collective)."""
    if not _on():
        return flag
    return bool(all_reduce(torch.tensor(int(flag), device=device), "min"))


def any_true(flag: bool, device: torch.device) -> bool:
    if not _on():
        return flag
    return bool(all_reduce(torch.tensor(int(flag), device=device), "max"))


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if not _on():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if _on():
        dist.barrier()


# ---- wrapping ---------------------------------------------------------------------------------


def wrap(module: nn.Module, blocks: Iterable[nn.Module], ctx: DistContext, device: torch.device,
         find_unused: bool = False) -> nn.Module:
    """`module` (whose forward is one micro-batch's loss) made data-parallel for `ctx.mode`.

    ddp: a DistributedDataParallel around it. fsdp: `fully_shard` on each of `blocks`, then on
    `module` as the root unit, in place."""
    if not ctx.active:
        return module
    if ctx.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(module, find_unused_parameters=find_unused)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (ctx.world_size,))
    whole = {p for p in module.parameters() if quant.is_nf4(p) and not quant.nf4_shardable(p, ctx.world_size)}
    for block in blocks:
        kept = whole & set(block.parameters())
        fully_shard(block, mesh=mesh, ignored_params=kept or None)
    fully_shard(module, mesh=mesh, ignored_params=whole or None)
    return module


def no_gradient_sync(wrapped: nn.Module, ctx: DistContext, sync: bool) -> Any:
    """Skip the gradient reduction for a micro-batch that is not the last of its step."""
    import contextlib

    if not ctx.active or sync:
        if ctx.sharded:
            wrapped.set_requires_gradient_sync(True)
        return contextlib.nullcontext()
    if ctx.mode == "ddp":
        return wrapped.no_sync()
    wrapped.set_requires_gradient_sync(False)
    return contextlib.nullcontext()


# ---- sharded tensors --------------------------------------------------------------------------


def is_sharded(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded tensor (the tensor itself otherwise)."""
    return t.to_local() if is_sharded(t) else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor, gathered from every rank when sharded (a collective)."""
    return t.full_tensor() if is_sharded(t) else t


def shard_like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A whole tensor laid out like `param` (this rank's shard when `param` is sharded). Every
    rank holds the same whole tensor, so each cuts its own piece without communicating."""
    if not is_sharded(param) or is_sharded(value):
        return value
    from torch.distributed.tensor import distribute_tensor

    value = value.to(device=param.device, dtype=param.dtype)
    return distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model.state_dict()` with every sharded tensor gathered whole (a collective per tensor)."""
    return {name: full(t).detach() for name, t in model.state_dict().items()}
