"""Runs the demo's stages (demo/stages.py) one after another in this process (`bash scripts/demo.sh [--fast]`).

Each stage runs its entry point as `python -m` would (runpy: torch & co. are imported once, not once per
stage); its output goes to `<out>/logs/<stage>.log`, whose first line is the command to rerun it by hand.
A finished stage leaves `<out>/.stages/<stage>.json` and is skipped next time; `--redo X` reruns X and
everything downstream of it, after deleting its outputs so no stale file survives.
"""
import argparse
import json
import re
import runpy
import shlex
import shutil
import sys
import time
import traceback
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from demo.stages import FAST, FULL, build_stages, make_config
from util.cli import finish_parser
from util.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_NAME = "demo_config.json"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("USP toy demo: pretrain, probe, generate, evaluate, report (CPU)")
    parser.add_argument("--out", default="demo_out", help="output folder (everything goes under it)")
    parser.add_argument("--fast", action="store_true", help="a few steps per stage (CI)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one field of the configuration in demo/stages.py (repeatable)")
    # --seeds N and --first-seed S are short for --set seeds=N and --set first_seed=S
    parser.add_argument("--seeds", dest="set", action="append", type=lambda n: f"seeds={n}", metavar="N",
                        help="paired seeds of pretraining, probes and generators (default 3; 2 with --fast)")
    parser.add_argument("--first-seed", dest="set", action="append", type=lambda s: f"first_seed={s}", metavar="S",
                        help="the first of those seeds (default 0)")
    parser.add_argument("--redo", action="append", default=[], metavar="STAGE",
                        help="rerun STAGE and everything after it (repeatable; 'all' = start over)")
    parser.add_argument("--only", action="append", default=[], metavar="STAGE",
                        help="run STAGE and what it needs only (repeatable; 'heldout' = every seed's heldout_s<s>)")
    parser.add_argument("--inception-weights", default=None,
                        help="weights-inception-2015-12-05-6726825d.pth: also compute FID/IS (adds minutes on CPU)")
    return finish_parser(parser)


def marker_path(out: Path, name: str) -> Path:
    return out / ".stages" / f"{name}.json"


def check_config(out: Path, config: dict, redo_all: bool) -> None:
    """Refuses to mix a --fast and a full run (or other settings) in one output folder."""
    path = out / CONFIG_NAME
    if path.is_file() and not redo_all and json.loads(path.read_text()) != config:
        raise UserError(f"{out} holds a demo run made with other settings; pass --redo all to start it over, "
                        "or choose another --out.")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=1))


def stages_to_run(stages, out: Path, redo: list) -> list:
    """Names of stages without a marker, those named in --redo, and everything downstream of either."""
    names = [stage.name for stage in stages]
    unknown = [name for name in redo if name != "all" and name not in names]
    if unknown:
        raise UserError(f"--redo {unknown[0]} is not a stage; choose 'all' or one of {', '.join(names)}.")
    pending = {name for name in names if "all" in redo or name in redo or not marker_path(out, name).is_file()}
    for stage in stages:  # the table is in dependency order, so one pass closes over dependents
        if any(need in pending for need in stage.needs):
            pending.add(stage.name)
    return [name for name in names if name in pending]


def needed_for(stages, targets: list) -> set:
    """The stages named in `targets` (a name without its `_s<seed>` suffix names every seed's stage) and,
    transitively, every stage they need."""
    matches = {target: {stage.name for stage in stages if re.fullmatch(re.escape(target) + r"(_s\d+)?", stage.name)}
               for target in targets}
    chosen, unknown = set().union(*matches.values()), [target for target, names in matches.items() if not names]
    if unknown:
        raise UserError(f"--only {unknown[0]} is not a stage; choose one of {', '.join(s.name for s in stages)} "
                        "(or a name without its _s<seed> suffix).")
    for stage in reversed(stages):  # the table is in dependency order: walk it backwards once
        if stage.name in chosen:
            chosen.update(stage.needs)
    return chosen


def run_command(argv: list) -> int:
    """`python <argv>` (["-m", module, *args] or [script, *args]) run in this process; returns its exit code.
    A crash prints its traceback (into the stage's log) and counts as exit code 1, as in a process of its own."""
    module = argv[0] == "-m"
    target, args = (argv[1], argv[2:]) if module else (str(REPO_ROOT / argv[0]), argv[1:])
    saved_argv, sys.argv = sys.argv, [target, *args]
    try:
        if module:
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(target, run_name="__main__")
    except SystemExit as stop:  # as the interpreter reads it: None is 0, a message is printed with 1
        if isinstance(stop.code, str):
            print(stop.code, file=sys.stderr)
        return stop.code if isinstance(stop.code, int) else 0 if stop.code is None else 1
    except Exception:
        traceback.print_exc()
        return 1
    finally:
        sys.argv = saved_argv
    return 0


def run_stage(stage, out: Path) -> None:
    """Deletes the stage's outputs, runs it with its output in `<out>/logs/<stage>.log`, leaves its marker."""
    marker_path(out, stage.name).unlink(missing_ok=True)
    for path in (out / relative for relative in stage.outputs):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    started, command = time.time(), None
    if stage.function is not None:  # the dataset: a plain function
        stage.function()
    else:
        try:
            command = stage.command()
        except FileNotFoundError as error:  # an input of the command is missing
            raise UserError(f"stage {stage.name} cannot start: {error}") from None
        log_path = out / "logs" / f"{stage.name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text("$ " + shlex.join(command) + "\n")  # copy-pasteable; the stage appends
        with open(log_path, "a") as log, redirect_stdout(log), redirect_stderr(log):
            returncode = run_command(command[1:])
        if returncode != 0:
            tail = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()][-25:]
            raise UserError(f"stage {stage.name} failed (exit code {returncode}); the end of {log_path}:\n"
                            + "\n".join(tail) + f"\ncommand: {shlex.join(command)}")
    marker_path(out, stage.name).parent.mkdir(parents=True, exist_ok=True)
    marker_path(out, stage.name).write_text(json.dumps({"seconds": round(time.time() - started), "command": command}))
    print(f"[demo] {stage.name} done in {time.time() - started:.1f}s", flush=True)


def main(args) -> int:
    started = time.time()
    cfg = make_config(FAST if args.fast else FULL, args.set)
    out = Path(args.out).resolve()
    if args.inception_weights and not Path(args.inception_weights).is_file():
        raise UserError(f"--inception-weights {args.inception_weights} does not exist; pass the file "
                        "weights-inception-2015-12-05-6726825d.pth (see README) or leave the flag out.")
    inception_weights = str(Path(args.inception_weights).resolve()) if args.inception_weights else None
    stages = build_stages(out, cfg, inception_weights)
    check_config(out, {**vars(cfg), "inception": bool(inception_weights)}, "all" in args.redo)
    wanted = needed_for(stages, args.only) if args.only else {stage.name for stage in stages}
    pending = [name for name in stages_to_run(stages, out, args.redo) if name in wanted]
    skipped = [stage.name for stage in stages if stage.name in wanted and stage.name not in pending]
    if skipped:
        print(f"[demo] skipping finished stages: {', '.join(skipped)} (use --redo STAGE to rerun one)")
    for stage in stages:
        if stage.name in pending:
            run_stage(stage, out)
    done = f"finished in {time.time() - started:.0f}s ({cfg.name} run)" if pending else "everything is up to date"
    print(f"[demo] {done}; " + (f"report: {out / 'report.md'}" if "report" in wanted else f"outputs under {out}"))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(get_args_parser().parse_args()))
    except UserError as error:
        sys.exit(f"demo: error: {error}")
