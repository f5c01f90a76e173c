"""Command-line value parsing that several entry points share."""
import argparse
import functools
import json
import math
import os
import re
import shlex
import sys
from pathlib import Path

from util.disk import DiskFullError
from util.errors import EXIT_USER_ERROR, UserError, exit_with


def parse_json_object(text: str, flag: str, example: str = '{"depth": 2}') -> dict:
    """`text` parsed as a JSON object (e.g. --model_kwargs overrides of a preset's constructor).

    Raises `UserError` with one sentence naming `flag` when the text is not JSON or not an object.
    """
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(f"{flag} is not valid JSON ({error.msg}); pass an object such as '{example}'.") from None
    if not isinstance(value, dict):
        raise UserError(f"{flag} must be a JSON object of constructor arguments, e.g. '{example}'.")
    return value


# argparse reads "-1e-3", "-inf" or "-nan" after a flag as another flag ("expected one argument"); this
# pattern makes them values, so `--blr -1e-3` reaches its check and is refused as negative.
_NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE)


def finish_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """What every entry point's parser gets last: both spellings of each long flag, and defaults in --help.

    MAE/USP's pretraining flags use underscores (`--data_path`), DiT/SiT's use dashes (`--data-path`); each
    command accepts both, so a command pasted from either upstream style works. "(default: X)" is appended to
    the help of every option that has a default (argparse's ArgumentDefaultsHelpFormatter skips options
    without help text); on/off switches are left alone, their name says their default. A negative number
    in any spelling (`-1e-3`, `-inf`) is read as a value, so the flag's own check names it. A bad command
    line is one line on stderr (rank 0 only), exit 2, like every other user error: not argparse's usage block.
    """
    parser._negative_number_matcher = _NEGATIVE_NUMBER
    parser.error = lambda message: exit_with(f"{message} (see --help)", parser.prog, EXIT_USER_ERROR)
    for action in parser._actions:
        for name in list(action.option_strings):
            if not name.startswith("--"):
                continue
            other = "--" + (name[2:].replace("_", "-") if "_" in name else name[2:].replace("-", "_"))
            if other not in parser._option_string_actions:  # parsed, not listed: --help stays one line a flag
                parser._option_string_actions[other] = action
        if (action.help == argparse.SUPPRESS or action.default in (None, argparse.SUPPRESS)
                or isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction,
                                       argparse._HelpAction, argparse._VersionAction))
                or "%(default)" in (action.help or "")):
            continue
        action.help = f"{action.help} (default: %(default)s)" if action.help else "(default: %(default)s)"
    return parser


def default_num_workers(preferred: int = 10) -> int:
    """Data-loading workers: the official recipes' `preferred` count, or fewer on a machine with fewer CPUs
    (more workers than CPUs only adds a warning and context switches)."""
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no sched_getaffinity
        available = os.cpu_count() or 1
    return max(1, min(preferred, available))


def check_model_builds(build, flag: str, model: str, overrides: dict) -> None:
    """Builds the model on the meta device (no memory, no weights, about a second) so that a --model_kwargs
    the constructor rejects (an unknown argument, heads that do not divide the width) is one sentence before
    any data or VAE is loaded, not a traceback after."""
    import torch

    try:
        with torch.device("meta"):
            build()
    except (TypeError, AssertionError) as error:
        raise UserError(f"{flag} {json.dumps(overrides)} does not fit --model {model} "
                        f"({error or type(error).__name__}); check the constructor argument names and that "
                        "every width is divisible by its number of heads.") from None


def continue_command(folder, module) -> str:
    """How to continue the run whose checkpoints are in `folder`: "continue the run with `CMD`", CMD being this
    process's command line with `--resume <folder>` (replacing any --resume it had), started as it was (python
    or torchrun, `-m module`). When this process is not `module`'s command (None, or an in-process call, e.g. the
    demo) the advice names the flag instead of a command; a folder without checkpoints (a fresh run that stopped
    before its first save) needs no --resume, the same command starts it again.
    """
    from util.run_dir import existing_checkpoints  # imported here: it loads torch, and every parser imports util.cli

    if not folder or not existing_checkpoints(folder):
        return "rerun the same command"
    if module is None or not Path(sys.argv[0]).with_suffix("").as_posix().endswith(module.replace(".", "/")):
        return f"continue the run with the same command plus --resume {folder}"
    argv, kept = sys.argv[1:], []
    while argv:
        item = argv.pop(0)
        if item == "--resume" and argv:
            argv.pop(0)
        elif not item.startswith("--resume="):
            kept.append(item)
    nproc, world = os.environ.get("LOCAL_WORLD_SIZE"), os.environ.get("WORLD_SIZE", "1")
    if "TORCHELASTIC_RUN_ID" in os.environ and nproc:
        nodes = int(world) // int(nproc)
        launcher = ["torchrun", *([f"--nnodes={nodes}"] if nodes > 1 else []), f"--nproc_per_node={nproc}"]
    else:
        launcher = [sys.executable]
    return f"continue the run with `{shlex.join([*launcher, '-m', module, *kept, '--resume', str(folder)])}`"


def advising_resume(function, folder, module):
    """`function` whose full-disk error names the command that continues the run in `folder` (`continue_command`),
    not "rerun the same command", which would start the run over or be refused; for `util.errors.run_cli`."""
    @functools.wraps(function)
    def advised(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except DiskFullError as error:
            raise DiskFullError(error.where, f"free some space, then {continue_command(folder, module)}") from error
    return advised


# Values checked where the flag is declared (`type=`): a bad number is argparse's one sentence naming the
# flag, the value and the valid range, exit 2, before any data or weights load (not AdamW's traceback at the
# first step, nor a NaN run reported as diverged).
def number(kind=float, low=None, high=None, low_open=False, high_open=False, what="a number"):
    """An argparse `type=` that reads a finite `kind` (int or float) within [low, high] (ends open when
    `low_open` / `high_open`); `what` names the class in the error (e.g. "a probability")."""
    left = "-inf" if low is None else low
    right = "inf" if high is None else high
    bounds = f"{'(' if low_open or low is None else '['}{left}, {right}{')' if high_open or high is None else ']'}"
    valid = f"an integer in {bounds}" if kind is int else f"a finite number in {bounds}"

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if (value is None or not math.isfinite(value)
                or (low is not None and (value < low or (low_open and value == low)))
                or (high is not None and (value > high or (high_open and value == high)))):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}; pass {valid}")
        return value

    parse.__name__ = what
    return parse


positive_int = number(int, low=1, what="a positive count")
non_negative_int = number(int, low=0, what="a non-negative integer")
finite_float = number(float, what="a finite number")
positive_float = number(float, low=0, low_open=True, what="a positive number")
non_negative_float = number(float, low=0, what="a non-negative number")
probability = number(float, low=0, high=1, what="a probability")
decay = number(float, low=0, high=1, high_open=True, what="a decay")
fraction_below_one = number(float, low=0, high=1, high_open=True, what="a fraction below 1")  # 1 leaves nothing
