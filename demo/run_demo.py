"""Runs the demo pipeline (see demo/stages.py) with markers, a progress line per stage and per-stage timings.

    python -m demo.run_demo [--out demo_out] [--redo STAGE|all ...] [--inception-weights PATH] [--fast]
                            [--seeds N] [--first-seed S] [--set KEY=VALUE ...] [--only STAGE ...]

- Stages run one after another in this process, each a real entry point run as `python -m ...` would run it
  (runpy: torch & co. are imported once, not once per stage, which on the --fast run is most of the time).
  Each stage's output goes to `<out>/logs/<stage>.log`, whose first line is the command to rerun it by hand.
- `--seeds N` / `--first-seed S`: pretraining, probes and generators run for the seeds S..S+N-1
  (paired: USP and scratch share each seed's batches and noise); the report gives intervals over them.
- `--set KEY=VALUE` changes one field of the configuration (demo/config.py), for experiments.
- `--only STAGE` runs that stage and what it needs, nothing else (repeatable; a name without its seed
  suffix, e.g. `heldout`, means the stage of every seed). The report runs only when named.
- A finished stage leaves `<out>/.stages/<stage>.json` (wall and CPU seconds, command) and is skipped next
  time. `--redo X` reruns X and everything downstream of it; a stage whose inputs were rerun is
  rerun too. A stage that is (re)run first deletes its outputs, so no stale file survives.
- `<out>/timings.json` records every stage's seconds and the wall time of each invocation.
"""
import argparse
import json
import os
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

from tqdm import tqdm

from demo.config import FAST, FULL
from demo.stages import build_stages
from util.cli import finish_parser
from util.errors import UserError
from util.progress import is_interactive, progress_bar

REPO_ROOT = Path(__file__).resolve().parents[1]
MARKERS = ".stages"
CONFIG_NAME = "demo_config.json"
TIMINGS_NAME = "timings.json"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("USP toy demo: pretrain, probe, generate, evaluate, report (CPU)")
    parser.add_argument("--out", default="demo_out", help="output folder (everything goes under it)")
    parser.add_argument("--redo", action="append", default=[], metavar="STAGE",
                        help="rerun STAGE and everything after it (repeatable; 'all' = start over)")
    parser.add_argument("--inception-weights", default=None,
                        help="weights-inception-2015-12-05-6726825d.pth: also compute FID/IS (adds minutes on CPU)")
    parser.add_argument("--fast", action="store_true", help="a few steps per stage (CI)")
    parser.add_argument("--seeds", type=int, default=None,
                        help="paired seeds of pretraining, probes and generators (default 3; 2 with --fast)")
    parser.add_argument("--first-seed", type=int, default=None, help="the first of those seeds (default 0)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one field of demo/config.py's configuration (experiments; repeatable)")
    parser.add_argument("--only", action="append", default=[], metavar="STAGE",
                        help="run only STAGE and the stages it needs (repeatable; 'heldout' = every seed's heldout_s<s>)")
    return finish_parser(parser)


# ----------------------------------------------------------------------------------------------
# Which stages to run
# ----------------------------------------------------------------------------------------------

def marker_path(out: Path, name: str) -> Path:
    return out / MARKERS / f"{name}.json"


def check_config(out: Path, config: dict, redo_all: bool) -> None:
    """Refuses to mix a --fast and a full run (or other settings) in one output folder."""
    path = out / CONFIG_NAME
    if path.is_file() and not redo_all:
        saved = json.loads(path.read_text())
        if saved != config:
            raise UserError(f"{out} holds a {saved.get('name', 'different')} demo run made with other settings; "
                            f"pass --redo all to start it over, or choose another --out.")
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
    by_name = {stage.name: stage for stage in stages}
    chosen = {name for name in by_name for target in targets
              if name == target or re.fullmatch(re.escape(target) + r"_s\d+", name)}
    unknown = [target for target in targets if not any(name == target or name.startswith(target + "_s")
                                                       for name in chosen)]
    if unknown:
        raise UserError(f"--only {unknown[0]} is not a stage; choose one of {', '.join(by_name)} "
                        "(or a name without its _s<seed> suffix).")
    for stage in reversed(stages):  # the table is in dependency order: walk it backwards once
        if stage.name in chosen:
            chosen.update(stage.needs)
    return chosen


# ----------------------------------------------------------------------------------------------
# Running one stage
# ----------------------------------------------------------------------------------------------

def run_command(argv: list) -> int:
    """`python <argv>` (["-m", module, *args] or [script, *args]) run in this process; returns its exit code.
    A crash prints its traceback (into the stage's log) and counts as exit code 1, as in a process of its own."""
    module = argv[0] == "-m"
    target, args = (argv[1], argv[2:]) if module else (str(REPO_ROOT / argv[0]), argv[1:])
    saved_argv = sys.argv
    sys.argv = [target, *args]
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


def run_stage(stage, out: Path) -> tuple:
    """Runs the stage's command with its output in `<out>/logs/<stage>.log`; returns (the command, the CPU
    seconds it took)."""
    try:
        command = stage.command()
    except FileNotFoundError as error:  # an input of the command is missing
        raise UserError(f"stage {stage.name} cannot start: {error}") from None
    log_path = out / "logs" / f"{stage.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text("$ " + shlex.join(command) + "\n")  # copy-pasteable; the stage appends
    started = time.process_time()
    with open(log_path, "a") as log, redirect_stdout(log), redirect_stderr(log):
        returncode = run_command(command[1:])
    if returncode != 0:
        raise UserError(f"stage {stage.name} failed (exit code {returncode}); the end of {log_path}:\n"
                        f"{log_tail(log_path)}\ncommand: {shlex.join(command)}")
    return command, time.process_time() - started


def clear_outputs(out: Path, stage) -> None:
    marker_path(out, stage.name).unlink(missing_ok=True)
    for relative in stage.outputs:
        path = out / relative
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def write_marker(out: Path, stage, seconds: float, command, cpu_seconds: float | None = None) -> None:
    """`cpu_seconds`: user + system time of the stage (None for the dataset, a plain function)."""
    path = marker_path(out, stage.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"seconds": round(seconds, 2), "cpu_seconds": None if cpu_seconds is None else round(cpu_seconds, 2),
              "finished": time.time(), "command": command}
    path.write_text(json.dumps(record, indent=1))


def log_tail(path: Path, lines: int = 25) -> str:
    text = path.read_bytes().decode(errors="replace").replace("\r", "\n")
    kept = [line for line in text.splitlines() if line.strip()]
    return "\n".join(kept[-lines:])


# ----------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------

def run_pipeline(stages, out: Path, pending: list) -> None:
    """Runs the `pending` stages in table order (the table is in dependency order)."""
    overall = progress_bar(total=len(stages), initial=len(stages) - len(pending), desc="demo stages".rjust(18),
                           dynamic_ncols=True, every=1 if not is_interactive(sys.stderr) else None)
    try:
        for stage in stages:
            if stage.name not in pending:
                continue
            clear_outputs(out, stage)
            started = time.time()
            if stage.function is not None:  # the dataset: a plain function, no command
                stage.function()
                write_marker(out, stage, time.time() - started, None)
            else:
                command, cpu_seconds = run_stage(stage, out)
                write_marker(out, stage, time.time() - started, command, cpu_seconds)
            overall.update(1)
            tqdm.write(f"[demo] {stage.name} done in {time.time() - started:.1f}s ({stage.about})")
    finally:
        overall.close()


def record_timings(out: Path, stages, wall: float, ran: list, final: bool) -> dict:
    """Updates timings.json: every stage's last measured seconds + this invocation's wall time and the CPU
    seconds of its finished stages (user + system: on a busy machine the wall time says little, the CPU time
    says what a quiet one needs).

    The report runs inside the invocation, so it sees a provisional entry (`in_progress`) that the
    final call replaces.
    """
    path = out / TIMINGS_NAME
    timings = json.loads(path.read_text()) if path.is_file() else {"invocations": []}
    if timings["invocations"] and timings["invocations"][-1].get("in_progress"):
        timings["invocations"].pop()
    markers = {stage.name: json.loads(marker_path(out, stage.name).read_text())
               for stage in stages if marker_path(out, stage.name).is_file()}
    timings["stages"] = {name: marker["seconds"] for name, marker in markers.items()}
    timings["stage_cpu_seconds"] = {name: marker.get("cpu_seconds") for name, marker in markers.items()}
    cpu_seconds = sum(timings["stage_cpu_seconds"].get(name) or 0.0 for name in ran)
    timings["invocations"].append({"wall_seconds": round(wall, 2), "ran": ran, "finished": time.time(),
                                   "cpu_seconds": round(cpu_seconds, 2),
                                   "load_average": [round(load, 2) for load in os.getloadavg()],
                                   "in_progress": not final})
    path.write_text(json.dumps(timings, indent=1))
    return timings


def resolve_config(args):
    """FULL or FAST with --seeds, --first-seed and --set applied; a bad value stops here with one sentence."""
    overrides = list(args.set)
    if args.seeds is not None:
        overrides.append(f"seeds={args.seeds}")
    if args.first_seed is not None:
        overrides.append(f"first_seed={args.first_seed}")
    try:
        return (FAST if args.fast else FULL).with_overrides(overrides)
    except ValueError as error:
        raise UserError(str(error)) from None


def main(args) -> int:
    started = time.time()
    cfg = resolve_config(args)
    out = Path(args.out).resolve()
    if args.inception_weights and not Path(args.inception_weights).is_file():
        raise UserError(f"--inception-weights {args.inception_weights} does not exist; pass the file "
                        "weights-inception-2015-12-05-6726825d.pth (see README) or leave the flag out.")
    inception_weights = str(Path(args.inception_weights).resolve()) if args.inception_weights else None
    stages = build_stages(out, cfg, inception_weights)
    check_config(out, {**cfg.to_dict(), "inception": bool(args.inception_weights)}, "all" in args.redo)
    pending = stages_to_run(stages, out, args.redo)
    # --only: the scheduler (and its progress count) sees the named stages and what they need, nothing else
    wanted = needed_for(stages, args.only) if args.only else {stage.name for stage in stages}
    scheduled = [stage for stage in stages if stage.name in wanted]
    pending = [name for name in pending if name in wanted]
    skipped = [stage.name for stage in scheduled if stage.name not in pending]
    if skipped:
        print(f"[demo] skipping finished stages: {', '.join(skipped)} (use --redo STAGE to rerun one)")
    if not pending:
        where = f"the report is {out / 'report.md'}" if scheduled[-1].name == "report" else f"outputs under {out}"
        print(f"[demo] everything is up to date; {where}")
        return 0
    # The report reads the timings, so they are written before it runs and again at the very end.
    before_report = [name for name in pending if name != "report"]
    run_pipeline(scheduled, out, before_report)
    record_timings(out, stages, time.time() - started, before_report, False)
    if "report" in pending:  # pending unless --only left it out: it depends on every other stage
        run_pipeline(stages, out, ["report"])
    record_timings(out, stages, time.time() - started, pending, True)
    result = f"report: {out / 'report.md'}" if "report" in pending else f"outputs under {out}"
    print(f"[demo] finished in {time.time() - started:.0f}s ({cfg.name} run); {result}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(get_args_parser().parse_args()))
    except UserError as error:
        sys.exit(f"demo: error: {error}")
