"""Data parallelism: the process group from torchrun's environment, and the few collectives the trainer needs.

`torchrun --nproc_per_node=N -m dgemma.cli train ...` starts N processes with RANK / WORLD_SIZE / LOCAL_RANK set;
each builds the same model, DDP broadcasts rank 0's weights and averages gradients (gloo on CPU, nccl on CUDA).
A single process (no torchrun) runs with world size 1 and never touches torch.distributed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist


@dataclass
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "DistEnv":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        return cls(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))

    def init(self, device: torch.device) -> None:
        if self.world > 1 and not tdist.is_initialized():
            tdist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    def barrier(self) -> None:
        if self.world > 1:
            tdist.barrier()

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            t = t.clone()
            tdist.all_reduce(t)
        return t

    def broadcast_object(self, obj):
        if self.world == 1:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        """Tear the group down on a clean finish. Every rank meets at a barrier first: a rank that reaches
        destroy_process_group while another is still busy (rank 0 printing its summary) can hang there
        (pytorch/pytorch#75097)."""
        if self.world > 1 and tdist.is_initialized():
            tdist.barrier()
            tdist.destroy_process_group()
