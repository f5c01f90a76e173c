"""Issue 18, items 1, 2 and 6: nothing a user trained is lost to rotation, a re-run, a second run or a full disk.

Each test states the fault as a user met it and checks the outcome against what the user expects (the file
they were told was saved exists; the folder they reused is refused with one sentence), not against our
own output.
"""
import errno
import io
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from util.checkpoint import CheckpointManager, atomic_open, resolve_resume, save_checkpoint
from util.disk import DiskFullError, ensure_writable_dir, ensure_writable_file
from util.run_dir import LOCK_NAME, RunLock, claim_output_dir
from util.errors import UserError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _old_run(folder, epochs):
    """What an earlier run leaves behind: checkpoint-{epoch}.pth files and a log."""
    folder.mkdir(parents=True, exist_ok=True)
    for epoch in epochs:
        save_checkpoint({"model": {}, "epoch": epoch, "run": "old"}, folder / f"checkpoint-{epoch}.pth")
    (folder / "log.txt").write_text('{"epoch": 12}\n')


# ------------------------------------------------------------------------------------------- item 1

def test_item1_rotation_never_deletes_the_checkpoint_just_written(tmp_path):
    """An older run left checkpoint-10..12; a new run with --keep_last 2 saves checkpoint-0: it must exist."""
    _old_run(tmp_path, [10, 11, 12])
    manager = CheckpointManager(tmp_path, lambda epoch: f"checkpoint-{epoch}.pth", keep_last=2)
    path = manager.save({"model": {}, "epoch": 0, "run": "new"}, 0)
    assert path.is_file(), "the new run printed 'saved checkpoint-0.pth' and the file is gone"
    manager.save({"model": {}, "epoch": 1, "run": "new"}, 1)
    manager.save({"model": {}, "epoch": 2, "run": "new"}, 2)
    names = sorted(p.name for p in tmp_path.glob("checkpoint-*.pth"))
    # keep_last=2 among this run's files: 0 rotated away, 1 and 2 kept; the old run's files are not ours to delete
    assert names == ["checkpoint-1.pth", "checkpoint-10.pth", "checkpoint-11.pth", "checkpoint-12.pth",
                     "checkpoint-2.pth"]


def test_item1_rotation_still_keeps_the_newest_k_of_one_run(tmp_path):
    manager = CheckpointManager(tmp_path, lambda step: f"{step:07d}.pt", keep_last=2, is_milestone=lambda s: s == 2)
    for step in range(1, 6):
        manager.save({"step": step}, step)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0000002.pt", "0000004.pt", "0000005.pt"]


def test_item1_folder_with_another_runs_checkpoints_is_refused(tmp_path):
    """The same scenario is stopped before any training: the folder belongs to the old run."""
    _old_run(tmp_path, [10, 11, 12])
    with pytest.raises(UserError) as info:
        claim_output_dir(tmp_path)
    message = str(info.value)
    assert "already holds another run's checkpoints" in message and f"--resume {tmp_path}" in message
    assert "\n" not in message
    # ... and nothing was touched: the old run can still be resumed exactly where it was.
    path, state = resolve_resume(tmp_path)
    assert path.name == "checkpoint-12.pth" and state["run"] == "old"


# ------------------------------------------------------------------------------------------- item 2

def test_item2_rerun_is_refused_unless_resume_or_overwrite(tmp_path):
    folder = tmp_path / "finetune"
    folder.mkdir()
    save_checkpoint({"acc1": 58.3}, folder / "checkpoint-best.pth")  # finetune's best-so-far file
    with pytest.raises(UserError, match="already holds another run's checkpoints"):
        claim_output_dir(folder)
    lock = claim_output_dir(folder, resume=str(folder))  # continuing the run is fine
    lock.release()
    lines = []
    lock = claim_output_dir(folder, overwrite=True, log=lines.append)  # starting over moves, never deletes
    lock.release()
    assert not (folder / "checkpoint-best.pth").exists()
    kept = list(folder.glob("overwritten-*/checkpoint-best.pth"))
    assert len(kept) == 1 and torch.load(kept[0], weights_only=True)["acc1"] == 58.3
    assert lines and lines[0].startswith("--overwrite: moved 1 checkpoints")


def test_item2_second_run_into_the_same_folder_is_refused_while_the_first_runs(tmp_path):
    first = claim_output_dir(tmp_path)
    with pytest.raises(UserError, match="is in use by another running process"):
        claim_output_dir(tmp_path)
    first.release()
    claim_output_dir(tmp_path).release()  # free again once the first run ends


def test_item2_lock_dies_with_a_killed_process(tmp_path):
    """kill -9 of the lock holder leaves no stale lock that would block the --resume."""
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {REPO_ROOT!r})
        from util.run_dir import RunLock
        lock = RunLock({str(tmp_path)!r})
        print("locked", flush=True)
        time.sleep(60)
    """)
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=f"pid {holder.pid}"):
            RunLock(tmp_path)
        holder.kill()
        holder.wait(timeout=30)
        RunLock(tmp_path).release()
    finally:
        holder.kill()
    assert (tmp_path / LOCK_NAME).exists()  # the file stays; only a held flock blocks


def test_item2_orphaned_checkpoint_tmp_files_are_removed_on_start(tmp_path):
    orphan = tmp_path / ".checkpoint-3.pth.tmp-424242"  # what atomic_open leaves when killed mid-write
    orphan.write_bytes(b"partial")
    nested = tmp_path / "checkpoints" / ".0000100.pt.tmp-424243"
    nested.parent.mkdir()
    nested.write_bytes(b"partial")
    unrelated = tmp_path / "notes.tmp"
    unrelated.write_text("user file")
    lines = []
    claim_output_dir(tmp_path, log=lines.append).release()
    assert not orphan.exists() and not nested.exists() and unrelated.exists()
    assert lines == [f"removed 2 unfinished checkpoint files left by an interrupted save (first: {orphan.name})"]


# ------------------------------------------------------------------------------------------- item 6

class _FullDisk(io.FileIO):
    """A file whose writes fail as on a full disk (ENOSPC), after the file has been created."""

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_item6_full_disk_during_checkpoint_save_is_named_and_leaves_nothing(tmp_path, monkeypatch):
    import util.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "open", lambda path, mode: _FullDisk(path, "w"), raising=False)
    target = tmp_path / "checkpoint-0.pth"
    with pytest.raises(DiskFullError) as info:
        save_checkpoint({"model": {"w": torch.zeros(1000)}}, target)
    assert str(info.value).startswith(f"disk full at {target}")
    assert "enforce fail" not in str(info.value)
    assert list(tmp_path.iterdir()) == []  # neither the checkpoint nor its .tmp file


def test_item6_atomic_open_keeps_other_errors(tmp_path):
    with pytest.raises(KeyError):
        with atomic_open(tmp_path / "x.bin") as handle:
            handle.write(b"abc")
            raise KeyError("a bug keeps its traceback")
    assert list(tmp_path.iterdir()) == []


def test_item6_file_where_a_folder_should_be_is_one_sentence(tmp_path):
    blocker = tmp_path / "output"
    blocker.write_text("a file")
    with pytest.raises(UserError) as info:
        ensure_writable_dir(blocker / "run1", flag="--output_dir")
    assert str(info.value) == (f"--output_dir {blocker / 'run1'} cannot be created because {blocker} is a file, "
                               "not a folder; choose another path or move that file away.")
    with pytest.raises(UserError, match="is a folder; pass a file name"):
        ensure_writable_file(tmp_path, "--output-json")


def test_item6_unwritable_folder_is_one_sentence(tmp_path, monkeypatch):
    """A read-only mount (simulated: the tests run as root, for whom chmod does not block writes)."""
    import util.disk as disk

    real_open = open

    def read_only(path, mode="r", *args, **kwargs):
        if "w" in mode and str(path).startswith(str(tmp_path)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(disk, "open", read_only, raising=False)
    with pytest.raises(UserError, match=r"is not writable \(Read-only file system\); choose a folder"):
        ensure_writable_dir(tmp_path / "out", flag="--results-dir")
    assert [p.name for p in (tmp_path / "out").iterdir()] == []  # the probe file is not left behind


# ------------------------------------------------------------------------------------------- item 10 (log)

def test_item10_resumed_log_drops_the_lines_of_lost_steps(tmp_path):
    """The interrupted run logged steps 1-5 but its checkpoint is at step 3: the resumed run redoes 4-5."""
    from util.run_log import RunLogger

    first = RunLogger(tmp_path, is_main=True, tensorboard=False)
    for step in range(1, 6):
        first.log(step, {"loss": 1.0 / step})
    first.close()
    with open(tmp_path / "log.txt", "a") as handle:
        handle.write('{"step": 6, "lo')  # the torn last line of a kill -9
    resumed = RunLogger(tmp_path, is_main=True, tensorboard=False, resume_step=3)
    for step in range(4, 7):
        resumed.log(step, {"loss": 0.5})
    resumed.close()
    import json

    steps = [json.loads(line)["step"] for line in (tmp_path / "log.txt").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
