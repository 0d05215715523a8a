"""More than one process: torchrun sets the environment, we join its process group and wrap the model.

lmtune runs under PyTorch's own launcher and engines (`torchrun`, DDP, FSDP2 `fully_shard`); nothing
here is a distributed system of its own. Rank 0 alone logs, shows progress and writes files. With
`--distributed ddp|fsdp` and no torchrun, a process group of one is made, so the same code path (and
the same checkpoint format) also runs in a single process.
"""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    mode: str = "none"   # none | ddp | fsdp
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_WORLD = World()


def world() -> World:
    return _WORLD


def setup(mode: str) -> World:
    """Join torchrun's process group (gloo on the CPU, NCCL on GPUs) when asked or when launched by it."""
    global _WORLD
    launched = "WORLD_SIZE" in os.environ and "RANK" in os.environ
    if mode == "none" and launched and int(os.environ["WORLD_SIZE"]) > 1:
        mode = "ddp"  # torchrun with several processes and no choice made: the plain data-parallel engine
    if mode == "none":
        _WORLD = World()
        return _WORLD
    if not launched:  # a group of one, so that single-process runs share the code path
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    local = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    _WORLD = World(mode, dist.get_rank(), dist.get_world_size(), local)
    return _WORLD


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _LossModule(torch.nn.Module):
    """The model with the task's loss as its forward, so that DDP sees (and syncs) the real computation."""

    def __init__(self, model, loss_fn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch):
        return self.loss_fn(self.model, batch)


def wrap(model, w: World, loss_fn):
    """The engine for `w.mode`, called as engine(batch) -> (loss sum, targets): DDP around (model + loss),
    or FSDP2 sharding (model + loss) in place, one shard group per transformer block and one for the
    rest (embeddings, final norm, output layer, tied or not), or in one process the loss itself."""
    if w.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        gpu = [w.local_rank] if torch.cuda.is_available() else None
        return DistributedDataParallel(_LossModule(model, loss_fn), device_ids=gpu)
    if w.mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        for layer in base.get_decoder().layers:
            fully_shard(layer)
        return fully_shard(_LossModule(model, loss_fn))
    return _LossModule(model, loss_fn)


@contextlib.contextmanager
def gathered(engine):
    """Outside the engine's forward (validation), FSDP2's root shard group must be gathered by hand."""
    if world().mode != "fsdp":
        yield
        return
    engine.unshard()
    try:
        yield
    finally:
        engine.reshard()


def unwrap(model):
    """The model under a DDP wrapper (FSDP2 shards in place, so there is nothing to unwrap)."""
    return model.module.model if isinstance(getattr(model, "module", None), _LossModule) else model


def place(model, device=None):
    """Move the model to `device` (lmtune.device.resolve: under torchrun, cuda is this rank's GPU), before
    the optimizer is built; without one, to this rank's GPU when there is one."""
    if device is None:
        device = torch.device("cuda", world().local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if all(p.device == device for p in model.parameters()):  # there already (a 4-bit model is placed on load)
        return model
    return model.to(device)


def all_sum(values: list[float]) -> list[float]:
    """Sum numbers over all ranks (identity in one process)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def teardown() -> None:
    global _WORLD
    if dist.is_initialized():
        dist.destroy_process_group()
    _WORLD = World()
