"""Output locations: checked writable before any work starts, and a full disk named as such.

A run that trains for an hour and then cannot write its checkpoint, or an evaluation that computes every
statistic and then fails to write its JSON, loses the user's time; `ensure_writable_dir` tries a real
write into the folder first. A write that fails because the disk (or quota) is full surfaces deep inside
torch or PIL ("enforce fail at inline_container.cc", a bare OSError); `reporting_disk_full` turns it into
"disk full at PATH" and the writers that use it remove their partial files.
"""
import contextlib
import errno
import os
import shutil
import uuid
from pathlib import Path

from util.errors import UserError

# ENOSPC: the device is full; EDQUOT: the user's quota is (same remedy for the user).
_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


class DiskFullError(UserError):
    """A write that failed because the disk or the user's quota is full: "disk full at `where`; `remedy`."
    (a trainer replaces the remedy by the command that continues its run, `util.cli.advising_resume`)."""

    def __init__(self, where: str, remedy: str = "free some space or choose another output folder, then rerun the "
                                                 "same command"):
        self.where = where
        super().__init__(f"disk full at {where}; {remedy}.")


def is_disk_full(error: BaseException) -> bool:
    """True if `error`, or an exception it was raised from or during, is ENOSPC / EDQUOT."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _FULL_ERRNOS:
            return True
        if "No space left on device" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def disk_full_error(path) -> DiskFullError:
    """The one sentence for a full disk at `path`, with the free space left there when it can be read."""
    path = Path(path)
    folder = next((p for p in (path, *path.parents) if p.is_dir()), Path("."))
    try:
        free = f" ({shutil.disk_usage(folder).free / 2**20:.0f} MiB free)"
    except OSError:
        free = ""
    return DiskFullError(f"{path}{free}")


@contextlib.contextmanager
def reporting_disk_full(path):
    """Re-raises a disk-full failure inside the block as `DiskFullError` naming `path`; others pass through."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as error:
        if is_disk_full(error):
            raise disk_full_error(path) from error
        raise


def ensure_writable_dir(path, flag: str = "--output_dir", create: bool = True) -> Path:
    """Creates `path` if needed and proves it writable with a real one-byte file; raises one sentence if not.

    Call it before building data or models, so a typo or a read-only mount costs seconds. Returns the path.
    create=False proves the same in the nearest existing folder and leaves a missing `path` uncreated (for a
    command whose later checks must leave no output behind).
    """
    path = Path(path).expanduser()
    blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise UserError(f"{flag} {path} cannot be created because {blocker} is a file, not a folder; "
                              "choose another path or move that file away.")
    folder = path if create else next(p for p in (path, *path.parents) if p.exists())
    probe = folder / f".write-test-{uuid.uuid4().hex[:8]}"
    try:
        with reporting_disk_full(path):
            folder.mkdir(parents=True, exist_ok=True)
            with open(probe, "wb") as handle:
                handle.write(b"\0")
                handle.flush()
                os.fsync(handle.fileno())
    except DiskFullError:
        raise
    except OSError as error:
        raise UserError(f"{flag} {path} is not writable ({error.strerror or error}); choose a folder you "
                              "can write to.") from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    return path


def ensure_writable_image(path, flag: str) -> Path:
    """`ensure_writable_file` for an image PIL will save: its suffix must name a format PIL writes (.png, .jpg)."""
    from PIL import Image

    path = Path(path).expanduser()
    Image.init()
    if Image.registered_extensions().get(path.suffix.lower()) not in Image.SAVE:
        raise UserError(f"{flag} {path} does not end in an image suffix PIL can write ({path.suffix or 'no suffix'}); "
                        "use .png or .jpg.")
    return ensure_writable_file(path, flag)


def ensure_writable_file(path, flag: str) -> Path:
    """`ensure_writable_dir` for the folder that will hold the output file `path` (e.g. an evaluation JSON)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; pass a file name for the output.")
    ensure_writable_dir(path.parent if str(path.parent) else Path("."), flag=flag)
    return path
