"""The project's one user-error type and the one command-line wrapper every entry point uses.

A `UserError` is a problem the person running the command can fix (a missing path, a flag that does not
fit a checkpoint, an image size the VAE cannot encode): `run_cli` prints its sentence once, on rank 0, and
exits with `EXIT_USER_ERROR` (2, the code argparse uses for a bad command line). A diverged loss
(`NonFiniteLossError`) is reported the same way with `EXIT_DIVERGED` (1): the command was
right, the run was not. Every other exception is a bug and keeps its traceback.

The project has four exception classes: `UserError`, `util.disk.DiskFullError` (a `UserError` that the
writers catch to remove a half-written file), `NonFiniteLossError` and the GPU check's
`CheckFailed`.
"""
import os
import sys
from typing import Callable, Optional

EXIT_USER_ERROR = 2
EXIT_DIVERGED = 1
EXIT_INTERRUPTED = 130  # the shell's code for a command stopped by Ctrl-C (128 + SIGINT)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf: training stops and no checkpoint is written after it (exit 1)."""


class UserError(ValueError):
    """A problem with the command line or the files it names, reported as one sentence, no traceback.

    A DataLoader re-raises a worker's exception in the main process as `type(error)(text)`, where the text is
    "Caught X in DataLoader worker process N. Original Traceback ...": 70 lines with the sentence last.
    Keeping only that sentence makes the error read the same with or without workers.
    """

    def __init__(self, message: str = ""):
        if isinstance(message, str) and "Original Traceback" in message:
            last = message.rstrip().splitlines()[-1]
            message = last.split(": ", 1)[1] if ": " in last else last
        super().__init__(message)


def _is_rank_zero() -> bool:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank() == 0
    except ImportError:
        pass
    return int(os.environ.get("RANK", 0)) == 0


def exit_with(error: BaseException, prog: str, code: int, cleanup: Optional[Callable[[], None]] = None):
    """Prints `<prog>: error: <sentence>` on rank 0, runs `cleanup`, and raises `SystemExit(code)`."""
    message = f"{prog}: error: {error}" if prog else f"error: {error}"
    if _is_rank_zero():
        print(message, file=sys.stderr, flush=True)
    if cleanup is not None:
        cleanup()
    raise SystemExit(code) from None


def run_cli(main_fn: Callable, *args, prog: str = "", cleanup: Optional[Callable[[], None]] = None, **kwargs):
    """Calls `main_fn(*args, **kwargs)`; a `UserError` or a diverged loss becomes one line and an exit code.

    prog: the name printed before `error:` (e.g. "generation.train"); `cleanup` (e.g. tearing down the
    process group) runs before exiting. Returns what `main_fn` returns.
    """
    try:
        return main_fn(*args, **kwargs)
    except UserError as error:
        exit_with(error, prog, EXIT_USER_ERROR, cleanup)
    except NonFiniteLossError as error:
        exit_with(error, prog, EXIT_DIVERGED, cleanup)
    except KeyboardInterrupt:
        # Ctrl-C before or after the training loop (inside it, util.preemption saves and stops cleanly).
        exit_with("interrupted (Ctrl-C)", prog, EXIT_INTERRUPTED, cleanup)
