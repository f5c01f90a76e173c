"""Checkpoints that are atomic on disk, safe to load, and rotated.

- `save_checkpoint` writes to a temporary file in the same directory, fsyncs it and renames it
  over the target, so a kill during a save leaves the previous file intact (never a torn one).
- `load_checkpoint` uses `torch.load(weights_only=True)`: tensors and plain containers only.
  The single extra class allowed is `argparse.Namespace`, which the official DiT/SiT/MAE
  scripts pickle as `args`; anything else that would run code is refused with one sentence.
- `CheckpointManager` keeps the last K files plus milestones; `resolve_resume` finds the newest
  checkpoint in a run directory that actually loads, skipping truncated ones.
"""
import argparse
import contextlib
import json
import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path

import torch

from util.disk import reporting_disk_full
from util.errors import UserError




def args_to_dict(args) -> dict:
    """argparse.Namespace (or dict) -> plain dict of str/int/float/bool/None/lists (weights_only-safe)."""
    values = vars(args) if isinstance(args, argparse.Namespace) else dict(args)

    def plain(value):
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, (list, tuple)):
            return [plain(item) for item in value]
        if isinstance(value, dict):
            return {str(key): plain(item) for key, item in value.items()}
        return str(value)  # Path, torch.device, enums: their text is what a reader needs

    return {str(key): plain(value) for key, value in values.items()}


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # some filesystems do not allow opening directories; the rename is still atomic
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Temporary names are ".<name>.tmp-<pid>"; util.run_dir removes the ones a killed run left.
TMP_PATTERN = re.compile(r"^\..+\.tmp-\d+$")


@contextlib.contextmanager
def atomic_open(path):
    """Opens a temporary file next to `path` for binary writing; on success fsyncs it and renames it
    over `path`, so readers see either the old file or the complete new one, never a torn write.

    A full disk raises `util.disk.DiskFullError` ("disk full at PATH") and the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        with reporting_disk_full(path), open(tmp, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def save_checkpoint(state: dict, path) -> Path:
    """Atomically writes `state` to `path` (tmp file in the same dir, fsync, os.replace)."""
    with atomic_open(path) as handle:
        torch.save(state, handle)
    return Path(path)


def load_checkpoint(path, map_location="cpu", mmap: bool = True) -> dict:
    """Loads a checkpoint with weights_only=True; raises UserError with one clear sentence.

    `mmap=True` maps the file instead of reading it: tensors are paged in only when touched, so a
    sampler that keeps only `ema` never reads the optimizer state, and the ranks of one node share the
    page cache instead of each holding a private copy (DiT-XL's model + EMA + AdamW is about 11 GB).
    Files in torch's pre-1.6 (non-zip) format cannot be mapped and are read whole.
    """
    path = Path(path)
    if path.is_dir():
        newest = (_numbered_files(path, DEFAULT_PATTERN) + _numbered_files(path / "checkpoints", DEFAULT_PATTERN))
        example = f" such as {max(newest, key=lambda item: item[0])[1]}" if newest else ""
        raise UserError(f"{path} is a folder; a checkpoint file is needed here, so pass one{example}.")
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; check the --resume/--ckpt path.")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            if mmap and zipfile.is_zipfile(path):
                return torch.load(path, map_location=map_location, weights_only=True, mmap=True)
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        # The weights-only unpickler names the class or function it refused to import; any other
        # unpickling failure (unknown opcode, short read) means the bytes are damaged.
        found = re.search(r"GLOBAL (\S+?)[\s,]", str(error))
        culprit = found.group(1) if found else _code_running_global(path)
        if culprit is None:
            raise _corrupt(path, error) from error
        culprit = f" (it references {culprit})"
        raise UserError(
            f"checkpoint {path} refused: it would run code when loaded{culprit}; "
            "only tensors and plain Python values are loaded, so re-save it from a trusted environment "
            "as a state dict."
        ) from error
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as error:
        raise _corrupt(path, error) from error


# What a plain state dict may reference; anything else in a pickle is a callable that would run on load.
_PLAIN_GLOBALS = ("torch.", "collections.OrderedDict", "argparse.Namespace", "_codecs.encode", "numpy.")


def _code_running_global(path: Path):
    """First global a raw (non-zip) pickle file references that a state dict never needs, else None.

    torch's weights-only unpickler rejects protocol-4+ pickles on their first opcode, before it reaches the
    global that would run code; reading the opcodes (which executes nothing) tells a malicious file from a
    damaged one.
    """
    import pickletools

    strings = []
    try:
        with open(path, "rb") as handle:
            for opcode, argument, _ in pickletools.genops(handle):
                if isinstance(argument, str):
                    strings.append(argument)
                name = None
                if opcode.name in ("GLOBAL", "INST"):
                    name = argument.replace(" ", ".")
                elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                    name = f"{strings[-2]}.{strings[-1]}"
                if name and not name.startswith(_PLAIN_GLOBALS):
                    return name
    except Exception:  # damaged bytes: pickletools stops where the opcodes stop making sense
        return None
    return None


def require_training_state(checkpoint, path, keys=("model",), hint: str = "") -> dict:
    """`checkpoint` if it is a dict holding `keys`; else one sentence saying it is not a training checkpoint
    (e.g. a bare state dict, parameter name -> tensor, passed to --resume)."""
    missing = [key for key in keys if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        bare = isinstance(checkpoint, dict) and checkpoint and all(torch.is_tensor(v) for v in checkpoint.values())
        kind = "a bare state dict" if bare else f"a file without {', '.join(repr(k) for k in missing)}"
        raise UserError(f"--resume {path} is not a training checkpoint (it is {kind}); "
                              f"{hint or 'resume from a checkpoint this script wrote.'}")
    return checkpoint


def require_same_args(checkpoint: dict, args, keys, path, *, allow: bool = False, log=print, dashes: bool = True,
                      also=()) -> None:
    """One sentence if the command changes an argument in `keys` that the --resume checkpoint was trained with
    (its network shapes, its objective, or the order and content of its batches): the exact run could not
    continue. `also`: further (name, old, new) values the caller derived (e.g. the global batch). With `allow`
    (the trainers' --allow_changed_args) the run continues and `log` says what changed.

    Keys the checkpoint or this command lacks (an older checkpoint, another trainer's flag) are not compared.
    """
    saved, current = dict(checkpoint.get("args") or {}), args_to_dict(args)
    for values in (saved, current):  # compare JSON overrides by value, not by their spelling
        if isinstance(values.get("model_kwargs"), str):
            values["model_kwargs"] = json.loads(values["model_kwargs"])
    spell = (lambda key: "--" + key.replace("_", "-")) if dashes else (lambda key: "--" + key)
    changes = [(spell(key), saved[key], current[key]) for key in keys
               if key in saved and key in current and saved[key] != current[key]]
    changes += [(name, old, new) for name, old, new in also if old is not None and old != new]
    if not changes:
        return
    listing = "; ".join(f"{name} {old!r} -> {new!r}" for name, old, new in changes)
    if allow:
        log(f"{spell('allow_changed_args')}: continuing {path} with changed settings: {listing}")
        return
    (name, old, new), more = changes[0], f" (and {len(changes) - 1} more: {listing})" if len(changes) > 1 else ""
    raise UserError(f"--resume {path} was trained with {name} {old!r} but this command says {new!r}{more}; use the "
                    f"original value to continue that run, or pass {spell('allow_changed_args')} to change it on "
                    "purpose.")


def require_fitting_weights(module, state_dict: dict, path, fix: str) -> None:
    """One sentence naming the differing keys (not torch's list of every mismatch) when `state_dict` does not
    load strictly into `module`; `fix` says what to pass instead."""
    own = module.state_dict()
    problems = [f"{name} {tuple(tensor.shape)} vs {tuple(own[name].shape)}" for name, tensor in state_dict.items()
                if name in own and tensor.shape != own[name].shape]
    problems += [f"missing {name}" for name in own if name not in state_dict]
    problems += [f"unexpected {name}" for name in state_dict if name not in own]
    if problems:
        raise UserError(f"checkpoint {path} does not fit {fix} ({len(problems)} differences, e.g. "
                        f"{'; '.join(problems[:2])}); pass the model settings the checkpoint was trained with.")


def _corrupt(path: Path, error: Exception) -> UserError:
    # torch's weights-only errors wrap the useful line in boilerplate; keep the specific one.
    lines = [line.strip() for line in str(error).splitlines()
             if line.strip() and not line.startswith(("Weights only load failed", "Check the documentation"))]
    detail = (lines[-1] if isinstance(error, pickle.UnpicklingError) and lines else (lines or [""])[0])[:100]
    return UserError(f"checkpoint {path} is truncated or corrupt ({type(error).__name__}"
                           f"{': ' + detail if detail else ''}); delete it or resume from an earlier checkpoint.")


# Checkpoint names used by the official scripts: MAE/USP "checkpoint-{epoch}.pth", DiT/SiT "{step:07d}.pt".
DEFAULT_PATTERN = r"^(?:checkpoint-)?(\d+)\.pth?$"


def _numbered_files(directory: Path, pattern: str) -> list[tuple[int, Path]]:
    """Files in `directory` whose name matches `pattern` (one group: the number), oldest first."""
    regex = re.compile(pattern)
    found = []
    if directory.is_dir():
        for entry in directory.iterdir():
            match = regex.match(entry.name)
            if match and entry.is_file():
                found.append((int(match.group(1)), entry))
    return sorted(found, key=lambda item: (item[0], item[1].stat().st_mtime))


def _newest_loadable(candidates: list[tuple[int, Path]], map_location):
    for _, path in reversed(candidates):
        try:
            return path, load_checkpoint(path, map_location)
        except UserError as error:
            warnings.warn(f"skipping unusable checkpoint: {error}")
    return None


class CheckpointManager:
    """Saves numbered checkpoints in `directory`, keeping the newest `keep_last` plus milestones.

    `filename_fn(step_or_epoch) -> name`, e.g. `lambda e: f"checkpoint-{e}.pth"` (MAE) or
    `lambda s: f"{s:07d}.pt"` (DiT). `is_milestone(step_or_epoch) -> bool` marks files that are
    never rotated away. `keep_last=None` keeps everything. Only the main rank writes.
    """

    _PROBE = 987654321  # wider than any zero padding, so it shows where the number sits in a name

    def __init__(self, directory, filename_fn=lambda epoch: f"checkpoint-{epoch}.pth", keep_last: int | None = 3,
                 is_milestone=None, is_main: bool = True):
        self.directory = Path(directory)
        self.filename_fn = filename_fn
        self.keep_last = keep_last
        self.is_milestone = is_milestone or (lambda _: False)
        self.is_main = is_main
        probe_name = filename_fn(self._PROBE)
        self.pattern = "^" + re.escape(probe_name).replace(str(self._PROBE), r"(\d+)") + "$"

    def path_for(self, step_or_epoch: int) -> Path:
        return self.directory / self.filename_fn(step_or_epoch)

    def save(self, state: dict, step_or_epoch: int) -> Path | None:
        """Writes the checkpoint (main rank only), then rotates old ones; returns its path."""
        if not self.is_main:
            return None
        path = save_checkpoint(state, self.path_for(step_or_epoch))
        self._rotate(step_or_epoch)
        return path

    def _rotate(self, newest: int) -> None:
        """Deletes the oldest non-milestone checkpoints numbered below `newest`, the one just written.

        Only lower numbers are candidates: a higher-numbered file was not written by this run (an older run
        left it; `util.run_dir` refuses such a folder at start), and keeping "the highest K" would delete the
        file this run has just saved.
        """
        if not self.keep_last:
            return
        older = [path for number, path in _numbered_files(self.directory, self.pattern)
                 if number < newest and not self.is_milestone(number)]
        keep_older = self.keep_last - (0 if self.is_milestone(newest) else 1)
        for path in older[: max(0, len(older) - keep_older)]:
            path.unlink(missing_ok=True)


def resolve_resume(path_or_dir, pattern: str = DEFAULT_PATTERN, map_location="cpu"):
    """(path, state) for --resume given a checkpoint file or a run directory.

    A file must load (UserError otherwise). A directory (or its `checkpoints/` subfolder,
    DiT's layout) yields its newest checkpoint that loads; truncated ones are skipped with a
    warning, and finding none is a UserError.
    """
    target = Path(path_or_dir)
    if target.is_file():
        return target, load_checkpoint(target, map_location)
    if not target.is_dir():
        raise UserError(f"--resume {target} is neither a checkpoint file nor a run directory.")
    candidates = _numbered_files(target, pattern) + _numbered_files(target / "checkpoints", pattern)
    candidates.sort(key=lambda item: (item[0], item[1].stat().st_mtime))
    found = _newest_loadable(candidates, map_location)
    if found is None:
        raise UserError(f"no loadable checkpoint matching {pattern!r} in {target}"
                              f"{' (all candidates were corrupt)' if candidates else ''}; "
                              "check the --resume path or start a fresh run.")
    return found
