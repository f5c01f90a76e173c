"""Convergence curves of several runs and the speed-up to reach a target value (USP's headline metric).

    python scripts/plot_convergence.py --run usp=results/000-DiT-XL-2-VAE-simple-usp \
        --run scratch=results/001-DiT-XL-2-VAE-simple-scratch --metric fid --reference scratch \
        [--target 20] [--x steps|images --images-per-step 256] [--output convergence.png] [--json out.json]

USP reports "11.7x faster" for DiT-XL: the ratio of the training steps at which the scratch run and the
USP-initialised run reach the same FID. This tool computes that ratio from any runs' logs:

- A run is `LABEL=PATH`. PATH is a JSON-lines log (the trainers' `log.txt`: `{"step": s, "<metric>": v}`
  lines; lines without the metric are skipped), a TensorBoard event file, or a run folder holding
  either (`log.txt` / `*.jsonl` first, else `events.out.tfevents.*`). In TensorBoard files the metric is
  the tag (`eval/fid`) or any tag ending in `/<metric>`. A step logged twice (a resumed run) keeps its last value.
- Steps to reach the target: the first logged point at or below it (`--higher-is-better`: at or above),
  linearly interpolated between it and the point before. A run that never gets there is "not reached";
  nothing is extrapolated beyond the logged points.
- The target is `--target`, or by default the reference run's last logged value ("reach scratch's final
  FID"). Speed-up of a run = reference's steps to the target / the run's steps to the target.
- Groups: a label `GROUP/NAME` (e.g. `s0/usp`, `s0/scratch`) is compared with the reference of its own
  group (`GROUP/<--reference>`), so one call handles paired runs of several seeds.

Prints one line per run and writes the plot (--output) and the numbers (--json).
"""
import argparse
import json
import sys
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from util.cli import finish_parser
from util.errors import UserError

EVENT_GLOB = "events.out.tfevents.*"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Convergence curves and speed-up factors from training/evaluation logs")
    parser.add_argument("--run", action="append", required=True, metavar="LABEL=PATH",
                        help="a run's JSON-lines log, TensorBoard event file or run folder (repeatable)")
    parser.add_argument("--metric", default="fid", help="metric name (JSON key or TensorBoard tag); default fid")
    parser.add_argument("--reference", default=None,
                        help="label (or NAME within each GROUP/NAME) of the baseline run (default: the first run)")
    parser.add_argument("--target", type=float, default=None,
                        help="value to reach (default: the reference run's last logged value)")
    parser.add_argument("--higher-is-better", action="store_true", help="e.g. Inception Score or accuracy")
    parser.add_argument("--x", choices=("steps", "images"), default="steps", help="x axis: optimizer steps or images")
    parser.add_argument("--images-per-step", type=float, action="append", default=[],
                        help="global batch size: once for all runs or once per --run (needed for --x images)")
    parser.add_argument("--title", default=None, help="plot title")
    parser.add_argument("--output", default=None, help="PNG of the curves (default: none)")
    parser.add_argument("--json", default=None, help="write the speed-ups and curves to this JSON file")
    return finish_parser(parser)


# ----------------------------------------------------------------------------------------------
# Reading logs
# ----------------------------------------------------------------------------------------------

def read_jsonl(path: Path, metric: str) -> dict:
    points = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip().startswith("{"):
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{path}, line {number}, is not valid JSON; pass a JSON-lines log.") from None
        if metric in entry and "step" in entry:
            points[int(entry["step"])] = float(entry[metric])
    return points


def read_events(paths: list, metric: str) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points = {}
    for path in sorted(paths):  # event files of one run in the order they were written
        accumulator = EventAccumulator(str(path), size_guidance={"scalars": 0})
        accumulator.Reload()
        tags = accumulator.Tags().get("scalars", [])
        tag = metric if metric in tags else next((t for t in tags if t.endswith("/" + metric)), None)
        if tag is not None:
            points.update({int(event.step): float(event.value) for event in accumulator.Scalars(tag)})
    return points


def read_curve(path, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of `metric` in the log at `path`, sorted by step."""
    path = Path(path)
    if path.is_dir():
        jsonl = [p for p in (path / "log.txt", *sorted(path.glob("*.jsonl"))) if p.is_file()]
        events = sorted(path.glob(EVENT_GLOB))
        points = read_jsonl(jsonl[0], metric) if jsonl else {}
        if not points and events:
            points = read_events(events, metric)
    elif path.is_file():
        points = read_events([path], metric) if path.name.startswith("events.out.tfevents") \
            else read_jsonl(path, metric)
    else:
        raise UserError(f"{path} does not exist; pass a log.txt / .jsonl file, an event file or a run folder.")
    if not points:
        raise UserError(f"{path} has no '{metric}' values; check --metric (e.g. fid, loss, heldout_loss).")
    steps = np.array(sorted(points), dtype=float)
    return steps, np.array([points[int(step)] for step in steps], dtype=float)


# ----------------------------------------------------------------------------------------------
# Speed-up
# ----------------------------------------------------------------------------------------------

def steps_to_reach(steps, values, target: float, higher_is_better: bool = False) -> Optional[float]:
    """Step at which the curve first reaches `target` (linear between logged points), None if it never does.

    Before the first logged point nothing is known, so a curve whose first point already reaches the
    target returns that point's step.
    """
    sign = -1.0 if higher_is_better else 1.0  # compare as "lower is better"
    values = sign * np.asarray(values, dtype=float)
    goal = sign * target
    reached = np.flatnonzero(values <= goal)
    if len(reached) == 0:
        return None
    index = int(reached[0])
    if index == 0:
        return float(steps[0])
    x0, x1, y0, y1 = steps[index - 1], steps[index], values[index - 1], values[index]
    return float(x0 + (x1 - x0) * (y0 - goal) / (y0 - y1))  # y0 > goal >= y1, so y0 != y1


def split_label(label: str) -> tuple[str, str]:
    group, _, name = label.rpartition("/")
    return group, name


def parse_runs(specs: list) -> dict:
    runs = {}
    for spec in specs:
        label, sep, path = spec.partition("=")
        if not sep or not label or not path:
            raise UserError(f"--run {spec}: expected LABEL=PATH, e.g. --run usp=results/000-DiT-XL-2-usp.")
        if label in runs:
            raise UserError(f"--run label {label!r} is used twice; give every run its own label.")
        runs[label] = path
    return runs


def images_per_step(args, count: int) -> list:
    given = args.images_per_step
    if args.x == "images" and not given:
        raise UserError("--x images needs --images-per-step (the global batch size), once or once per --run.")
    if len(given) not in (0, 1, count):
        raise UserError(f"--images-per-step was given {len(given)} times for {count} runs; give it once "
                               "for all runs or once per --run.")
    return (given * count if len(given) == 1 else given) or [1.0] * count


def compare(curves: dict, reference: Optional[str], target: Optional[float], higher_is_better: bool,
            scales: dict) -> dict:
    """Per run: its reference, the target, x (steps or images) to reach it, and the speed-up factor."""
    results = {}
    for label, (steps, values) in curves.items():
        group, name = split_label(label)
        reference_name = reference if reference is not None else split_label(next(iter(curves)))[1]
        reference_label = f"{group}/{reference_name}" if group else reference_name
        if reference_label not in curves:
            raise UserError(f"--reference {reference_name}: no run labelled {reference_label!r} "
                                   f"(labels: {', '.join(curves)}).")
        ref_steps, ref_values = curves[reference_label]
        goal = target if target is not None else float(ref_values[-1])
        mine = steps_to_reach(steps, values, goal, higher_is_better)
        theirs = steps_to_reach(ref_steps, ref_values, goal, higher_is_better)
        results[label] = {
            "reference": reference_label, "target": goal,
            "x_to_target": None if mine is None else mine * scales[label],
            "reference_x_to_target": None if theirs is None else theirs * scales[reference_label],
            "speedup": None if (mine is None or theirs is None or mine <= 0)
            else theirs * scales[reference_label] / (mine * scales[label]),
            "final": float(values[-1]), "last_x": float(steps[-1] * scales[label]),
        }
    return results


def describe(label: str, result: dict, unit: str) -> str:
    head = f"{label}: target {result['target']:.6g} "
    if result["x_to_target"] is None:
        return head + f"not reached (last {unit} {result['last_x']:.6g}, last value {result['final']:.6g})"
    text = head + f"reached at {unit} {result['x_to_target']:.6g}"
    if result["reference"] == label:
        return text + " (reference)"
    if result["speedup"] is None:
        return text + f"; the reference {result['reference']} does not reach it, so no speed-up"
    return text + f"; {result['speedup']:.2f}x the speed of {result['reference']}"


# ----------------------------------------------------------------------------------------------
# Plot
# ----------------------------------------------------------------------------------------------

def plot(curves: dict, results: dict, scales: dict, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({split_label(label)[1] for label in curves})
    groups = sorted({split_label(label)[0] for label in curves})
    colours = {name: f"C{k}" for k, name in enumerate(names)}
    styles = ["-", "--", ":", "-."]
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for label, (steps, values) in curves.items():
        group, name = split_label(label)
        axis.plot(steps * scales[label], values, styles[groups.index(group) % len(styles)], marker=".",
                  color=colours[name], label=label)
        reached = results[label]["x_to_target"]
        if reached is not None and results[label]["reference"] != label:
            axis.plot([reached], [results[label]["target"]], "o", mfc="none", color=colours[name])
    for target in sorted({result["target"] for result in results.values()}):
        axis.axhline(target, color="grey", lw=0.6, alpha=0.5)
    axis.set_xlabel("images seen" if args.x == "images" else "optimizer step")
    axis.set_ylabel(args.metric)
    speedups = [r["speedup"] for label, r in results.items() if r["reference"] != label and r["speedup"]]
    title = args.title or f"{args.metric} vs {args.x}"
    if speedups and len(groups) == 1:
        title += f" (speed-up {speedups[0]:.2f}x)"
    axis.set_title(title, fontsize=10)
    axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)


def main(argv=None) -> dict:
    args = get_args_parser().parse_args(argv)
    runs = parse_runs(args.run)
    per_step = images_per_step(args, len(runs))
    scales = dict(zip(runs, per_step if args.x == "images" else [1.0] * len(runs)))
    curves = {label: read_curve(path, args.metric) for label, path in runs.items()}
    results = compare(curves, args.reference, args.target, args.higher_is_better, scales)
    unit = "images" if args.x == "images" else "step"
    for label, result in results.items():
        print(describe(label, result, unit))
    if args.output:
        plot(curves, results, scales, args, Path(args.output))
    if args.json:
        payload = {"metric": args.metric, "x": args.x, "higher_is_better": args.higher_is_better, "runs": {
            label: {**results[label], "steps": curves[label][0].tolist(), "values": curves[label][1].tolist()}
            for label in runs}}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(payload, indent=1))
    return results


if __name__ == "__main__":
    try:
        main()
    except UserError as error:
        sys.exit(f"plot_convergence: error: {error}")
