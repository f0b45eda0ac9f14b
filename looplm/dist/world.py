"""The process group of a run, from the environment `torchrun` or `srun` provides.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. srun sets SLURM_PROCID,
SLURM_NTASKS and SLURM_LOCALID; MASTER_ADDR defaults to the first host of SLURM_JOB_NODELIST and
MASTER_PORT to a port derived from the job id, so `srun python -m looplm.run ...` needs no wrapper.
Backend: nccl on CUDA, gloo on the CPU. One process without either environment is world size 1.
"""

import os
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist

from looplm.hooks import sum_over_ranks

PARALLEL = ("none", "ddp", "fsdp")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0 writes Aim, the progress bar, config.gin, summary.json and checkpoints."""
        return self.rank == 0

    def rows(self, batch_size: int) -> slice:
        """This rank's rows of a global batch: contiguous, equal shares, in rank order."""
        share = batch_size // self.size
        return slice(self.rank * share, (self.rank + 1) * share)

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over the ranks (the values themselves in one process)."""
        return sum_over_ranks(values)

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on one (e.g. a pre-emption signal one rank received)."""
        return self.sum([float(flag)])[0] > 0 if self.size > 1 else flag

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


def _env_int(*names, default=None):
    for name in names:
        if os.environ.get(name, "") != "":
            return int(os.environ[name])
    return default


def env_rank() -> int:
    """This process's rank as torchrun or srun sets it (0 without a launcher): what a process may
    read before it joins the group, e.g. to leave shared files to rank 0."""
    return _env_int("RANK", "SLURM_PROCID", default=0)


def _slurm_master() -> str | None:
    nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodes:
        return None
    try:
        return subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True,
                              check=True).stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return nodes.split(",")[0]


def init(parallel: str, device: str) -> tuple[World, str]:
    """Join the process group the environment describes; returns the world and this rank's
    device ("cuda" becomes "cuda:<local rank>")."""
    if parallel not in PARALLEL:
        raise ValueError(f"train.parallel={parallel!r}; choose one of {PARALLEL}")
    size = _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
    if parallel == "none":
        if size > 1:
            raise ValueError(f"{size} processes were started (WORLD_SIZE/SLURM_NTASKS) but "
                             "train.parallel='none': bind train.parallel = 'ddp' or 'fsdp'")
        return World(), device
    rank = env_rank()
    local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", _slurm_master() or "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(20000 + _env_int("SLURM_JOB_ID", default=9500) % 20000))
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=size)
    return World(rank=rank, size=size, local_rank=local_rank), device


def shutdown(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
