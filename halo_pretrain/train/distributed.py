"""Rank discovery: the same entry point under deepspeed, torchrun, mpirun, srun, or as a plain process.

`discover(env)` reads one launcher's variables and returns the ranks; `init(info)` exports the
torch.distributed variables and starts the process group (gloo on CPU, nccl on CUDA).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
from dataclasses import dataclass
from typing import Mapping


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torch" (deepspeed launcher / torchrun), "mpi", "slurm" or "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise ValueError(f"environment variable {key}={env[key]!r} is not an integer") from None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_slurm_host(nodelist: str) -> str:
    """The first host of a Slurm node list: 'scontrol show hostnames', or parse 'node[03-05,7],x'."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             check=True, timeout=30).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    first = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if not first:
        raise ValueError(f"cannot read the first host of SLURM_JOB_NODELIST={nodelist!r}; export MASTER_ADDR")
    base, ranges = first.groups()
    if not ranges:
        return base
    start = ranges.split(",")[0].split("-")[0]
    return base + start


def discover(env: Mapping[str, str] = os.environ, mpi_comm=None) -> RankInfo:
    """Ranks from the launcher's environment. Order: torch-style (deepspeed, torchrun), Open MPI / PMI
    (mpirun, through mpi4py for the master address), Slurm (srun), else a single process."""
    port = lambda default: _int(env, "MASTER_PORT") if "MASTER_PORT" in env else default  # noqa: E731
    if "RANK" in env and "WORLD_SIZE" in env:
        return RankInfo(_int(env, "RANK"), _int(env, "WORLD_SIZE"), _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
                        env.get("MASTER_ADDR", "127.0.0.1"), port(29500), "torch")
    if "OMPI_COMM_WORLD_RANK" in env or "PMI_RANK" in env:
        rank = _int(env, "OMPI_COMM_WORLD_RANK" if "OMPI_COMM_WORLD_RANK" in env else "PMI_RANK")
        world = _int(env, "OMPI_COMM_WORLD_SIZE" if "OMPI_COMM_WORLD_SIZE" in env else "PMI_SIZE")
        local = _int(env, "OMPI_COMM_WORLD_LOCAL_RANK") if "OMPI_COMM_WORLD_LOCAL_RANK" in env else \
            _int(env, "MPI_LOCALRANKID") if "MPI_LOCALRANKID" in env else 0
        addr, master_port = env.get("MASTER_ADDR"), port(None)
        if addr is None or master_port is None:
            addr, master_port = _mpi_master(rank, addr, master_port, mpi_comm)
        return RankInfo(rank, world, local, addr, master_port, "mpi")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        addr = env.get("MASTER_ADDR") or first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1"))
        default_port = 20000 + _int(env, "SLURM_JOB_ID") % 20000 if "SLURM_JOB_ID" in env else 29500
        return RankInfo(_int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS"),
                        _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0, addr, port(default_port), "slurm")
    return RankInfo(0, 1, 0, env.get("MASTER_ADDR", "127.0.0.1"), port(None) or free_port(), "single")


def _mpi_master(rank: int, addr: str | None, master_port: int | None, comm) -> tuple[str, int]:
    """Rank 0 picks its host and a free port; mpi4py broadcasts them."""
    if comm is None:
        try:
            from mpi4py import MPI
        except ImportError as e:
            raise RuntimeError("running under mpirun without MASTER_ADDR/MASTER_PORT needs mpi4py "
                               "(pip install mpi4py) to share rank 0's address; or export both") from e
        comm = MPI.COMM_WORLD
    mine = (addr or socket.gethostname(), master_port or free_port()) if rank == 0 else None
    return comm.bcast(mine, root=0)


def collective_device():
    """Where a tensor handed to a collective must live: the current GPU under NCCL (which refuses CPU
    tensors), the CPU under gloo or without a process group."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init(info: RankInfo, device_type: str) -> None:
    """Export the torch.distributed variables and start the process group through DeepSpeed."""
    import deepspeed

    os.environ.update(RANK=str(info.rank), WORLD_SIZE=str(info.world_size), LOCAL_RANK=str(info.local_rank),
                      MASTER_ADDR=info.master_addr, MASTER_PORT=str(info.master_port))
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cpu":
        skip_cpu_shm_op()
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)


def skip_cpu_shm_op() -> None:
    """DeepSpeed's CPU backend compiles a shared-memory allreduce op as it starts (a minute or more on
    2 cores; again each time another Python environment, with other include paths, rebuilt it in the
    same cache, ~/.cache/torch_extensions) and maps a 66 MB /dev/shm file per rank that it never
    removes. Only its inference tensor-parallel allreduce uses the op; training collectives go
    through gloo. Marked incompatible in DeepSpeed's own table of ops, it is neither built nor mapped."""
    import deepspeed.ops

    compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
    if isinstance(compatible, dict):
        compatible["deepspeed_shm_comm"] = False
