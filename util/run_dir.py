"""One run per output folder: a lock while the run lives, and no silent reuse of another run's folder.

`claim_output_dir` is what every trainer calls on its main rank before building data or models:
1. the folder must be writable (`util.disk.ensure_writable_dir`);
2. the run takes an exclusive `fcntl.flock` on `<folder>/.run.lock`; a second run into the same folder is
   refused with one sentence. The kernel drops the lock with the process's file descriptor, so a run
   killed with -9 leaves no stale lock in the way of its `--resume`. Where the file system has no flock
   (Lustre mounted without it, NFS without a lock daemon) the run says so once and creates
   `<folder>/.run.lock.owner` exclusively instead, holding its host and pid; a file left by a dead process
   of the same host is taken over, one from another host must be deleted by hand;
3. a folder that already holds checkpoints is another run's: it is refused unless the user continues it
   (`--resume`) or says to overwrite it (`--overwrite`), in which case the old checkpoints are moved into
   `<folder>/overwritten-<time>/`, not deleted, so neither rotation nor a later `--resume <folder>` can
   confuse them with the new run's;
4. temporary files a killed save left behind (`.<name>.tmp-<pid>`, see `util.checkpoint.atomic_open`) are
   removed: holding the lock proves no other process is writing them.
"""
import contextlib
import errno
import fcntl
import os
import re
import socket
import time
from pathlib import Path
from typing import Iterable, Optional

from util.checkpoint import TMP_PATTERN
from util.disk import ensure_writable_dir
from util.errors import UserError

LOCK_NAME = ".run.lock"
OWNER_NAME = ".run.lock.owner"  # the lock where flock is not supported
NO_FLOCK = (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP)
# Checkpoint names of every trainer: MAE/USP "checkpoint-{epoch}.pth" (+ finetune's -last / -best),
# DiT/SiT "checkpoints/{step:07d}.pt".
CHECKPOINT_NAMES = (r"^checkpoint-(\d+|last|best)\.pth$", r"^\d+\.pt$")
CHECKPOINT_SUBFOLDERS = (".", "checkpoints")
_HELD: dict = {}  # folder -> the RunLock this process holds on it


def _in_use(folder, holder: str):
    return UserError(f"{folder} is in use by another running process ({holder or 'unknown pid'}); "
                     "wait for it to finish or choose another output folder.")


class RunLock:
    """An exclusive `flock` on `<folder>/.run.lock` (or, without flock, the file `<folder>/.run.lock.owner`),
    held until `release()` or the end of the process."""

    def __init__(self, folder):
        self.path = Path(folder) / LOCK_NAME
        self.owner_file: Optional[Path] = None
        self._fd: Optional[int] = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 200, 0).decode(errors="replace").strip()
            self._close()
            raise _in_use(folder, holder) from None
        except OSError as error:
            self._close()
            if error.errno not in NO_FLOCK:
                raise
            print(f"{folder} is on a file system without flock ({os.strerror(error.errno)}): locking it with the "
                  f"file {OWNER_NAME} instead.", flush=True)
            self.owner_file = _claim_owner_file(Path(folder) / OWNER_NAME)
            return
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)

    def _close(self) -> None:
        os.close(self._fd)
        self._fd = None

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        if self.owner_file is not None:
            self.owner_file.unlink(missing_ok=True)
            self.owner_file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _claim_owner_file(path: Path) -> Path:
    """Creates `path` exclusively with "pid <pid> on <host>"; takes over one whose process is gone (same host)."""
    host = socket.gethostname()
    for _ in range(2):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = path.read_text(errors="replace").strip()
            match = re.fullmatch(r"pid (\d+) on (\S+)", holder)
            if match is None or match.group(2) != host:
                raise UserError(f"{path.parent} is in use by another run ({holder or 'unknown pid'}); wait for it to "
                                f"finish, or delete {path} if that run is gone.") from None
            if _alive(int(match.group(1))):
                raise _in_use(path.parent, holder) from None
            path.unlink(missing_ok=True)  # left by a run that died on this host
            continue
        with os.fdopen(fd, "w") as owner:
            owner.write(f"pid {os.getpid()} on {host}\n")
        return path
    raise _in_use(path.parent, path.read_text(errors="replace").strip())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def existing_checkpoints(folder, names: Iterable[str] = CHECKPOINT_NAMES) -> list[Path]:
    """Checkpoint files in `folder` or its `checkpoints/` subfolder whose names match one of `names`."""
    regexes = [re.compile(name) for name in names]
    found = []
    for sub in CHECKPOINT_SUBFOLDERS:
        directory = Path(folder) / sub
        if directory.is_dir():
            found += sorted(p for p in directory.iterdir()
                            if p.is_file() and any(regex.match(p.name) for regex in regexes))
    return found


def remove_orphaned_tmp_files(folder) -> list[Path]:
    """Deletes `.<name>.tmp-<pid>` files a killed save left in `folder` (and `checkpoints/`); returns them."""
    removed = []
    for sub in CHECKPOINT_SUBFOLDERS:
        directory = Path(folder) / sub
        if directory.is_dir():
            for path in directory.iterdir():
                if TMP_PATTERN.match(path.name) and path.is_file():
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                        removed.append(path)
    return removed


def _move_aside(folder: Path, checkpoints: list[Path]) -> Path:
    """Moves `checkpoints` (and the old log.txt) into `<folder>/overwritten-<time>/`, keeping sub-paths."""
    target = folder / f"overwritten-{time.strftime('%Y%m%d-%H%M%S')}"
    for path in checkpoints + [p for p in (folder / "log.txt",) if p.is_file()]:
        destination = target / path.relative_to(folder)
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, destination)
    return target


def release_output_dir(folder) -> None:
    """Releases this process's lock on `folder` at the end of a run (a later run in the same process, e.g. a
    test or the demo, can then claim it); a process that dies releases it anyway."""
    lock = _HELD.pop(str(Path(folder).resolve()), None)
    if lock is not None:
        lock.release()


def discard_unused_dir(folder) -> bool:
    """Releases and removes a folder this run created and claimed but never wrote to (nothing in it besides
    the lock file), e.g. when the run stops on bad input right after claiming it; returns whether it went."""
    folder = Path(folder)
    release_output_dir(folder)
    if not folder.is_dir() or any(path.name != LOCK_NAME for path in folder.iterdir()):
        return False
    (folder / LOCK_NAME).unlink(missing_ok=True)
    folder.rmdir()
    return True


@contextlib.contextmanager
def discard_on_failure(folder, enabled: bool = True):
    """Runs the block; if it raises, a freshly created `folder` that is still empty is removed
    (`discard_unused_dir`), so a run refused on bad input leaves no empty experiment folder behind."""
    try:
        yield
    except BaseException:
        if enabled:
            discard_unused_dir(folder)
        raise


def claim_output_dir(folder, resume: Optional[str] = None, overwrite: bool = False, is_main: bool = True,
                     flag: str = "--output_dir", names: Iterable[str] = CHECKPOINT_NAMES,
                     log=print) -> Optional[RunLock]:
    """Checks and locks `folder` for this run (see the module docstring); returns the lock (None off rank 0).

    resume: the run's --resume value (a folder being continued may hold checkpoints); overwrite: the
    user's --overwrite. Raises `UserError` with one sentence when the folder cannot be used.
    """
    if not is_main:
        return None
    folder = ensure_writable_dir(folder, flag=flag)
    lock = RunLock(folder)
    try:
        previous = existing_checkpoints(folder, names)
        if previous and not resume:
            if not overwrite:
                raise UserError(
                    f"{flag} {folder} already holds another run's checkpoints ({previous[-1].name}, "
                    f"{len(previous)} in all); continue that run with --resume {folder}, choose another "
                    "folder, or pass --overwrite to start over (the old files are moved aside, not deleted).")
            aside = _move_aside(folder, previous)
            log(f"--overwrite: moved {len(previous)} checkpoints of the previous run to {aside}")
        removed = remove_orphaned_tmp_files(folder)
        _HELD[str(folder.resolve())] = lock  # held for the life of the process, whoever keeps the return value
        if removed:
            log(f"removed {len(removed)} unfinished checkpoint files left by an interrupted save "
                f"(first: {removed[0].name})")
    except BaseException:
        lock.release()
        raise
    return lock


def claim_numbered_dir(parent, name: str, flag: str) -> Path:
    """A fresh `<parent>/NNN-<name>` (NNN = entries already in `parent`, as DiT numbers its experiments),
    created with mkdir(exist_ok=False) and claimed: a run that takes a number at the same moment makes the
    next one, so two runs never share (and interleave) one folder."""
    parent = ensure_writable_dir(parent, flag=flag)
    index = sum(1 for entry in parent.iterdir() if not entry.name.startswith("."))  # as glob("*") counts
    while True:
        folder = parent / f"{index:03d}-{name}"
        try:
            folder.mkdir(exist_ok=False)
            break
        except FileExistsError:
            index += 1
    claim_output_dir(folder, flag=flag)
    return folder
