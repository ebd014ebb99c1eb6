"""Where a training process runs: device, rank and world size under torchrun, seeding, DDP/FSDP wrapping."""

from __future__ import annotations

import os
import random
import signal
import threading
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from fastkd.train_config import TrainConfig


@dataclass
class Env:
    """Where this process runs: device, rank, world size."""

    device: torch.device
    rank: int = 0
    world: int = 1
    owns_group: bool = False            # this run created the process group (and destroys it at the end)

    @property
    def is_main(self) -> bool:
        return self.rank == 0



def setup_env(config: TrainConfig) -> Env:
    """Join torchrun's process group when WORLD_SIZE > 1 (NCCL on CUDA, gloo on CPU)."""
    from fastkd.teacher import resolve_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(config.device)
    if world == 1:
        return Env(device)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Env(device, rank, world, owns)



def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)



def wrap_distributed(module: nn.Module, config: TrainConfig, env: Env) -> nn.Module:
    """DDP (default) or FSDP2 around the student + loss when running under torchrun."""
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
