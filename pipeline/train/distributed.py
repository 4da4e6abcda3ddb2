"""One fold on several processes (torchrun): the process group, its rank and world, and which device each uses."""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

from pipeline.core.device import resolve_device


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def from_main(self, value: float) -> float:
        """Rank 0's `value` on every rank."""
        if self.world == 1:
            return value
        t = torch.tensor([value if self.main else 0.0], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item())

    def mean(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item()) / self.world


@contextmanager
def distributed(device_spec: str) -> Iterator[tuple[Dist, torch.device]]:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK), else run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        yield Dist(), resolve_device(device_spec)
        return
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_spec)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield Dist(rank, world, local_rank), device
    finally:
        dist.destroy_process_group()
