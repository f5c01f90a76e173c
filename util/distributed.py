"""Process-group setup shared by every entry point.

torchrun (single or multi-node: `--nnodes/--node_rank/--master_addr`) exports RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT; we read those and pick NCCL on CUDA, gloo on CPU.
`srun python -m ...` without torchrun (one SLURM task per GPU) gives SLURM_PROCID, SLURM_LOCALID and
SLURM_STEP_NUM_TASKS instead, which are read the same way (MASTER_ADDR/MASTER_PORT must be exported).
Without either the run is a plain single process and every collective below is a no-op, so the
same entry point works under `python file.py`, torchrun and srun.
"""
import builtins
import datetime
import os
import random
import signal
import threading
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from util.errors import UserError


@dataclass
class DistEnv:
    """Where this process sits in the job and which device it drives."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None for a single process without torchrun

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


DEFAULT_TIMEOUT_MINUTES = 30.0


def init_distributed(device: str = "cuda", timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES) -> DistEnv:
    """Initialises the default process group from torchrun's or srun's environment (or nothing without them).

    `device` is what the user asked for ("cuda" or "cpu"); "cuda" without a GPU warns and falls
    back to CPU so laptops and CI run the same command lines. `timeout_minutes` bounds every
    collective (rank 0 alone may pack 50K PNGs and run the evaluator inside a training run's FID
    hook while the other ranks wait in a barrier, which can outlast NCCL's default 30 minutes).
    """
    if not timeout_minutes > 0:
        raise ValueError(f"the process-group timeout must be positive minutes, got {timeout_minutes}.")
    want_cuda = str(device).startswith("cuda")
    if want_cuda and not torch.cuda.is_available():
        warnings.warn("--device cuda was requested but no GPU is visible; running on CPU instead.")
        want_cuda = False
    restore_default_sigterm()
    rank, world_size, local_rank, launched = launch_ranks(os.environ)
    if want_cuda:
        # srun --gpus-per-task (or --gpu-bind) shows each task only its own GPU.
        device_index = local_rank if torch.cuda.device_count() > 1 else 0
        torch.cuda.set_device(device_index)
        run_device = torch.device("cuda", device_index)
    else:
        run_device = torch.device("cpu")
    backend = None
    if launched:
        backend = "nccl" if want_cuda else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(
                backend=backend, rank=rank, world_size=world_size,
                timeout=datetime.timedelta(minutes=timeout_minutes),
                device_id=run_device if want_cuda else None,
            )
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=run_device, backend=backend)


def launch_ranks(env) -> tuple[int, int, int, bool]:
    """(rank, world size, local rank, launched as several processes) from torchrun's or srun's variables."""
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), True
    # SLURM_STEP_NUM_TASKS is set by srun only, not in the batch script itself (where SLURM_NTASKS may be > 1
    # while a single process runs).
    tasks = int(env.get("SLURM_STEP_NUM_TASKS", 1))
    if tasks <= 1 or "SLURM_PROCID" not in env:
        return 0, 1, 0, False
    if not env.get("MASTER_ADDR") or not env.get("MASTER_PORT"):
        raise UserError(f"srun started {tasks} tasks without torchrun but MASTER_ADDR/MASTER_PORT are not set; export "
                        "MASTER_ADDR (the first node's host name) and MASTER_PORT before srun, or run one torchrun "
                        "per node as scripts/slurm/train.sbatch does.")
    return int(env["SLURM_PROCID"]), tasks, int(env.get("SLURM_LOCALID", 0)), True


def restore_default_sigterm() -> None:
    """scripts/launch.sh starts torchrun with SIGTERM ignored (so that a SLURM stop cannot kill it before its
    workers save); the workers inherit that and get the default back here (a trainer then installs its
    graceful-stop handler, util/preemption.py)."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_IGN:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of `tensor` over ranks (a new tensor; the input is left untouched)."""
    if not is_dist():
        return tensor.detach().clone()
    reduced = tensor.detach().clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced / get_world_size()


def cleanup() -> None:
    """Tears the process group down so torchrun sees a clean exit."""
    if is_dist():
        dist.destroy_process_group()


def rank_seed(global_seed: int, rank: int) -> int:
    """Per-rank seed (MAE's `seed + rank`): ranks draw different dropout/noise, runs stay repeatable."""
    return int(global_seed) + int(rank)


def seed_everything(seed: int) -> None:
    """Seeds Python, NumPy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def setup_for_distributed_printing(is_main: bool) -> None:
    """Silences print() on non-main ranks; `print(..., force=True)` still prints everywhere."""
    builtin_print = builtins.print

    def rank_aware_print(*args, **kwargs):
        force = kwargs.pop("force", False)
        if is_main or force:
            builtin_print(*args, **kwargs)

    builtins.print = rank_aware_print
