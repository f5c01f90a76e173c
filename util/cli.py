"""Command-line value parsing that several entry points share."""
import argparse
import functools
import json
import os
import shlex
import sys
from pathlib import Path

from util.disk import DiskFullError
from util.errors import UserError


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


def finish_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """What every entry point's parser gets last: both spellings of each long flag, and defaults in --help.

    MAE/USP's pretraining flags use underscores (`--data_path`), DiT/SiT's use dashes (`--data-path`); each
    command accepts both, so a command pasted from either upstream style works. "(default: X)" is appended to
    the help of every option that has a default (argparse's ArgumentDefaultsHelpFormatter skips options
    without help text); on/off switches are left alone, their name says their default.
    """
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
