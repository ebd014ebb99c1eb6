"""Where a process runs under torchrun (rank, world, device) and the few collectives the stages use;
seeding, DDP/FSDP wrapping and stop signals for training. The one place that reads WORLD_SIZE/RANK."""

from __future__ import annotations

import datetime
import os
import random
import signal
import threading
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Env:
    """Where this process runs: device, rank, world size; small object collectives between the ranks."""

    device: torch.device
    rank: int = 0
    world: int = 1
    owns_group: bool = False            # this run created the process group (and destroys it at the end)
    local_rank: int = 0
    local_world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        """Destroy the process group if this run started it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_group = False


def join_ranks(device: str | None, backend: str | None = None, timeout_hours: float | None = None) -> Env:
    """Join torchrun's process group when WORLD_SIZE > 1 (NCCL on CUDA, gloo on CPU, unless `backend`);
    each rank takes cuda:LOCAL_RANK when the device is CUDA."""
    from fastkd.teacher import resolve_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = resolve_device(device)
    if world == 1:
        return Env(dev)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    owns = not dist.is_initialized()
    if owns:
        timeout = {"timeout": datetime.timedelta(hours=timeout_hours)} if timeout_hours else {}
        dist.init_process_group(backend or ("nccl" if dev.type == "cuda" else "gloo"), **timeout)
    return Env(dev, rank, world, owns, local, int(os.environ.get("LOCAL_WORLD_SIZE", world)))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def wrap_distributed(module: nn.Module, config, env: Env) -> nn.Module:
    """DDP (default) or FSDP2 (config.distributed) around the student + loss when running under torchrun."""
    if env.world == 1:
        return module
    if config.distributed == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in getattr(module.student.base_model, "layers", []):
            fully_shard(layer)
        return fully_shard(module)
    from torch.nn.parallel import DistributedDataParallel

    ids = [env.device.index] if env.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)


class StopSignals:
    """SIGTERM / SIGINT while training: remembered, so the loop saves a checkpoint and stops after the
    current step; a second SIGINT stops at once. Handlers are restored on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self._old = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def agree(env: Env, *flags: bool) -> list[bool]:
    """Each flag true on any rank becomes true on every rank (one small all-reduce), so all ranks
    checkpoint or stop at the same step."""
    if env.world == 1:
        return list(flags)
    t = torch.tensor([float(f) for f in flags], device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(x) for x in t.tolist()]
