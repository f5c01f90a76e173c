"""util/run_dir.py without flock (Lustre mounted without it: ENOSYS; NFS without a lock daemon: ENOLCK): one
sentence, then an exclusively created owner file with host and pid; and util/distributed.py's ranks under srun."""
import errno
import os
import fcntl
import socket
import subprocess
import sys

import pytest

from util.distributed import launch_ranks
from util.errors import UserError
from util.run_dir import OWNER_NAME, RunLock


@pytest.fixture(params=[errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP])
def no_flock(request, monkeypatch):
    def unsupported(fd, operation):
        raise OSError(request.param, "flock unsupported")
    monkeypatch.setattr(fcntl, "flock", unsupported)


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_without_flock_an_owner_file_locks_the_folder(no_flock, tmp_path, capsys):
    lock = RunLock(tmp_path)
    said = capsys.readouterr().out.strip()
    assert "without flock" in said and "\n" not in said
    owner = tmp_path / OWNER_NAME
    assert owner.read_text() == f"pid {os.getpid()} on {socket.gethostname()}\n"
    with pytest.raises(UserError, match="in use"):  # this process is alive: a second run is refused
        RunLock(tmp_path)
    lock.release()
    assert not owner.exists()
    RunLock(tmp_path).release()


def test_without_flock_a_dead_owner_on_this_host_is_taken_over(no_flock, tmp_path):
    (tmp_path / OWNER_NAME).write_text(f"pid {dead_pid()} on {socket.gethostname()}\n")
    lock = RunLock(tmp_path)
    assert (tmp_path / OWNER_NAME).read_text().startswith(f"pid {os.getpid()} ")
    lock.release()


def test_without_flock_another_hosts_owner_must_be_deleted_by_hand(no_flock, tmp_path):
    (tmp_path / OWNER_NAME).write_text(f"pid {dead_pid()} on another-node-17\n")
    with pytest.raises(UserError, match=f"delete {tmp_path / OWNER_NAME}"):
        RunLock(tmp_path)


def test_other_flock_errors_are_not_hidden(monkeypatch, tmp_path):
    def broken(fd, operation):
        raise OSError(errno.EIO, "I/O error")
    monkeypatch.setattr(fcntl, "flock", broken)
    with pytest.raises(OSError, match="I/O error"):
        RunLock(tmp_path)


def test_ranks_come_from_torchrun_then_srun_else_one_process():
    torchrun = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2"}
    assert launch_ranks(torchrun) == (3, 8, 3, True)
    srun = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_TASKS": "8", "MASTER_ADDR": "node0",
            "MASTER_PORT": "29500"}
    assert launch_ranks(srun) == (5, 8, 1, True)
    # The batch script itself: SLURM_NTASKS may be 8, but no step variables: one process.
    assert launch_ranks({"SLURM_PROCID": "0", "SLURM_NTASKS": "8"}) == (0, 1, 0, False)
    assert launch_ranks({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1"}) == (0, 1, 0, False)
    with pytest.raises(UserError, match="MASTER_ADDR"):
        launch_ranks({"SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_TASKS": "4"})
