"""Process-group set-up: torchrun's environment or a single process, GPU or CPU, on one code path.

A single process still gets a gloo group of one, so DeepSpeed (which always talks to a process group)
works unchanged; it needs no MASTER_ADDR because we pick a free local port for it.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from distill.logging import quiet_console


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job and what it computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def dtype(self, bf16: bool) -> torch.dtype:
        """bf16 only on CUDA and only when asked; CPU always computes in fp32."""
        return torch.bfloat16 if bf16 and self.cuda else torch.float32


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_s: int) -> DistEnv:
    """Join (or create) the default process group; idempotent within a process.

    `timeout_s` bounds every collective, so a rank that dies makes the others fail instead of
    hanging the job forever.
    """
    launched = "WORLD_SIZE" in os.environ  # torchrun (or srun with its variables) started us
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.setdefault("LOCAL_RANK", "0"))  # DeepSpeed insists on it
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        # Alone, we rendezvous with ourselves on a free port and leave os.environ untouched, so
        # subprocesses we start do not inherit a rendezvous address that is already taken.
        init = "env://" if launched else f"tcp://127.0.0.1:{_free_port()}"
        dist.init_process_group(backend, init_method=init, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
        quiet_console(dist.get_rank())
    return DistEnv(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                   device=device, backend=backend)


def prepare_deepspeed(cuda: bool) -> None:
    """Call before the first deepspeed.initialize. On CPU, skip DeepSpeed's shared-memory
    all-reduce op: it JIT-compiles for ~80 s on first use and only speeds up DeepSpeed's own CPU
    collectives, which gloo already does for us."""
    if not cuda:
        import importlib
        # (not `import deepspeed.comm.torch as m`: deepspeed.comm.torch is also the torch package)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a small tensor over ranks (in place and returned); a no-op for one rank."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s picklable object on every rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
