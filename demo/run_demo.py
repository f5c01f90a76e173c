"""Runs the demo pipeline (see demo/stages.py) with markers, a progress line per stage and per-stage timings.

    python -m demo.run_demo [--out demo_out] [--redo STAGE|all ...] [--inception-weights PATH] [--fast]
                            [--seeds N] [--first-seed S] [--set KEY=VALUE ...] [--only STAGE ...]

- Stages run as plain `python -m ...` processes, `--jobs` at a time (default: one per CPU core, each
  single-threaded: the models are tiny, and two one-thread processes beat one two-thread process on a busy
  2-core machine; the tiny VAE's training, which nothing can run beside, gets every core). Each stage's
  output goes to `<out>/logs/<stage>.log`, whose first line is the command to rerun it by hand.
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
import shlex
import shutil
import subprocess
import sys
import time
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
    parser.add_argument("--jobs", type=int, default=None, help="stages run at once (default: CPU cores, max 2)")
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

class StageProcess:
    """A running stage: its `python -m ...` process and its log file."""

    def __init__(self, stage, out: Path, env: dict):
        self.stage = stage
        self.command = stage.command()
        self.log_path = out / "logs" / f"{stage.name}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path.write_text("$ " + shlex.join(self.command) + "\n")  # copy-pasteable; the child appends
        self.started = time.time()
        self.cpu_seconds = None
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)

    def poll(self):
        """The exit code once the child has exited (else None). Also records its CPU seconds: user + system of
        it and its reaped children, from wait4 (with two stages at once, RUSAGE_CHILDREN cannot tell them apart)."""
        if self.process.returncode is None:
            pid, status, usage = os.wait4(self.process.pid, os.WNOHANG)
            if pid:
                self.process.returncode = os.waitstatus_to_exitcode(status)
                self.cpu_seconds = usage.ru_utime + usage.ru_stime
        return self.process.returncode

    def stop(self) -> None:
        """Ends the child early (we are stopping) and waits for it."""
        if self.process.returncode is None:
            self.process.terminate()
            self.process.wait(timeout=60)


def child_env(threads: int) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    return env


def clear_outputs(out: Path, stage) -> None:
    marker_path(out, stage.name).unlink(missing_ok=True)
    for relative in stage.outputs:
        path = out / relative
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def write_marker(out: Path, stage, seconds: float, command, cpu_seconds: float | None = None) -> None:
    """`cpu_seconds`: user + system time of the stage's process tree (None for an in-process stage)."""
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
# The scheduler
# ----------------------------------------------------------------------------------------------

def run_pipeline(stages, out: Path, pending: list, jobs: int) -> dict:
    """Runs `pending` stages, up to `jobs` at once, each as soon as its needs are done."""
    by_name = {stage.name: stage for stage in stages}
    done = {stage.name for stage in stages if stage.name not in pending}
    waiting = list(pending)
    running: dict[str, StageProcess] = {}
    seconds = {}
    cpus = os.cpu_count() or 1
    env, exclusive_env = child_env(max(1, cpus // jobs)), child_env(cpus)
    overall = progress_bar(total=len(stages), initial=len(done), desc="demo stages".rjust(18), position=0,
                           dynamic_ncols=True, every=1 if not is_interactive(sys.stderr) else None)
    try:
        while waiting or running:
            for name in list(waiting):
                stage = by_name[name]
                if len(running) >= jobs or not all(need in done for need in stage.needs):
                    continue
                waiting.remove(name)
                clear_outputs(out, stage)
                if stage.function is not None:  # quick in-process stage (the dataset)
                    started = time.time()
                    stage.function()
                    seconds[name] = time.time() - started
                    write_marker(out, stage, seconds[name], None)
                    done.add(name)
                    overall.update(1)
                    continue
                try:
                    running[name] = StageProcess(stage, out, exclusive_env if stage.exclusive else env)
                except FileNotFoundError as error:  # an input of the command is missing
                    raise UserError(f"stage {name} cannot start: {error}") from None
            time.sleep(0.2)
            for name, child in list(running.items()):
                returncode = child.poll()
                if returncode is None:
                    continue
                del running[name]
                if returncode != 0:
                    raise UserError(f"stage {name} failed (exit code {returncode}); the end of {child.log_path}:\n"
                                    f"{log_tail(child.log_path)}\ncommand: {shlex.join(child.command)}")
                seconds[name] = time.time() - child.started
                write_marker(out, child.stage, seconds[name], child.command, child.cpu_seconds)
                done.add(name)
                overall.update(1)
                tqdm.write(f"[demo] {name} done in {seconds[name]:.1f}s ({child.stage.about})")
    finally:
        for child in running.values():  # stop our own children if we are stopping early
            child.stop()
        overall.close()
    return seconds


def record_timings(out: Path, stages, wall: float, ran: list, final: bool) -> dict:
    """Updates timings.json: every stage's last measured seconds + this invocation's wall time and the CPU
    seconds of its finished stages (user + system: on a busy machine the wall time says little, the CPU time
    says what a quiet one needs, about CPU seconds / jobs).

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
    jobs = args.jobs or max(1, min(2, os.cpu_count() or 1))
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
    run_pipeline(scheduled, out, before_report, jobs)
    record_timings(out, stages, time.time() - started, before_report, False)
    if "report" in pending:  # pending unless --only left it out: it depends on every other stage
        run_pipeline(stages, out, ["report"], jobs)
    record_timings(out, stages, time.time() - started, pending, True)
    result = f"report: {out / 'report.md'}" if "report" in pending else f"outputs under {out}"
    print(f"[demo] finished in {time.time() - started:.0f}s ({cfg.name} run); {result}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(get_args_parser().parse_args()))
    except UserError as error:
        sys.exit(f"demo: error: {error}")
