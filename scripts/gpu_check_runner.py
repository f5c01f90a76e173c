"""Runs the steps of scripts/gpu_check.py as a dependency graph and records every result as it lands.

Steps whose dependencies are done run in parallel (`jobs` at a time); an `exclusive` step (the
benchmark, whose timings must not share the GPU) runs alone. A failed step fails only itself: the
steps that need it are recorded as skipped with the reason, everything else still runs. After every
change `<out>/gpu_check.json` and `<out>/gpu_check.txt` are rewritten atomically, so a run killed at
its time limit still leaves every finished figure behind.
"""
import json
import math
import os
import threading
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from scripts.gpu_check_steps import CheckFailed


@dataclass
class Step:
    name: str
    run: Callable[[], dict]
    deps: tuple = ()
    exclusive: bool = False


class Record:
    """The JSON summary: meta + {step: {status, seconds, result | error}}, rewritten on every update."""

    def __init__(self, out: Path, meta: dict, order: list):
        self.out = out
        self.data = {"meta": meta, "steps": {name: {"status": "pending"} for name in order}}
        self.lock = threading.Lock()
        self.started = time.perf_counter()

    def status(self, name: str) -> str:
        return self.data["steps"][name]["status"]

    def update(self, name: str, **entry) -> None:
        with self.lock:
            self.data["steps"][name] = {**self.data["steps"][name], **entry}
            self.data["meta"]["elapsed_seconds"] = round(time.perf_counter() - self.started, 1)
            self._write("gpu_check.json", json.dumps(self.data, indent=1, default=str) + "\n")
            self._write("gpu_check.txt", format_table(self.data))

    def _write(self, name: str, text: str) -> None:
        tmp = self.out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, self.out / name)

    def all_passed(self) -> bool:
        """Every selected step ran and passed (a step left out by --only/--skip does not count)."""
        return all(step["status"] == "ok" or step.get("reason") == "not selected"
                   for step in self.data["steps"].values())


def _needed(graph: list, only) -> set:
    """The steps named in `only` and, transitively, what they depend on."""
    by_name = {step.name: step for step in graph}
    unknown = sorted(set(only) - set(by_name))
    if unknown:
        raise SystemExit(f"gpu_check: unknown step(s) {', '.join(unknown)}; choose from {', '.join(by_name)}.")
    needed, todo = set(), list(only)
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            todo.extend(by_name[name].deps)
    return needed


def run_steps(graph: list, out: Path, meta: dict, jobs: int, budget_seconds=None, only=None, skip=()) -> Record:
    selected = _needed(graph, only) if only else {step.name for step in graph}
    record = Record(out, meta, [step.name for step in graph])
    for step in graph:
        if step.name not in selected or step.name in skip:
            record.update(step.name, status="skipped", reason="not selected")
    pending = [step for step in graph if record.status(step.name) == "pending"]
    running = {}
    deadline = None if budget_seconds is None else time.perf_counter() + budget_seconds

    def execute(step: Step) -> None:
        began = time.perf_counter()
        print(f"[gpu_check] {step.name} ...", flush=True)
        try:
            result = step.run()
        except CheckFailed as error:
            record.update(step.name, status="failed", error=str(error), seconds=round(time.perf_counter() - began, 1))
        except Exception as error:  # a bug or an environment problem: keep the traceback's end for the JSON
            record.update(step.name, status="failed", error=f"{type(error).__name__}: {error}",
                          traceback=traceback.format_exc()[-3000:], seconds=round(time.perf_counter() - began, 1))
        else:
            record.update(step.name, status="ok", result=result, seconds=round(time.perf_counter() - began, 1))
        print(f"[gpu_check] {step.name}: {record.status(step.name)}", flush=True)

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        while pending or running:
            for step in list(pending):
                blocked = [dep for dep in step.deps if record.status(dep) in ("failed", "skipped")]
                if blocked:
                    record.update(step.name, status="skipped", reason=f"needs {', '.join(blocked)}")
                    pending.remove(step)
            exclusive_running = any(step.exclusive for step in running.values())
            for step in list(pending):
                if exclusive_running or len(running) >= jobs:
                    break
                if any(record.status(dep) != "ok" for dep in step.deps):
                    continue
                if step.exclusive and running:
                    break  # wait for the GPU to be free; later steps wait behind it, keeping the order
                if deadline is not None and time.perf_counter() > deadline:
                    record.update(step.name, status="skipped", reason="time budget spent")
                    pending.remove(step)
                    continue
                pending.remove(step)
                record.update(step.name, status="running")
                running[pool.submit(execute, step)] = step
                exclusive_running = step.exclusive
            if running:
                done, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for future in done:
                    running.pop(future)
    return record


# ----------------------------------------------------------------------------------------------
# The readable table
# ----------------------------------------------------------------------------------------------

def _number(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    return "nan" if math.isnan(value) else f"{value:.4g}"


def summarize(name: str, result: dict) -> str:
    """One line of the figures that matter for each kind of step."""
    if name == "environment":
        return ", ".join(f"{key} {result.get(key)}" for key in ("gpu", "driver", "torch", "cuda_build", "cudnn", "nccl")
                         if result.get(key) is not None)
    if name == "sdpa":
        return "; ".join(f"{p}: {'/'.join(k)}" for p, k in result["backend_by_precision"].items()) + \
            f" ({result['model']}, head dim {result['head_dim']})"
    if name.endswith("-agreement"):
        return "; ".join(f"{label} rel {_number(entry['relative_difference'])}" for label, entry in result.items())
    if name.endswith("-resume"):
        text = f"stopped at {result['checkpointed_at_step']} -> resumed to {result['resumed_to_step']}"
        if "max_abs_loss_difference_vs_uninterrupted" in result:
            text += f", |dloss| vs uninterrupted {_number(result['max_abs_loss_difference_vs_uninterrupted'])}"
        return text
    if name == "benchmark":
        parts = [f"{row['workload']} {row['mode']} [{row['argv'].split('--batch-size ')[-1]}] "
                 f"{_number(row['images_per_sec'])} img/s MFU {_number(row['mfu'])}"
                 for row in result["figures"] if row.get("images_per_sec") is not None]
        return f"{result['rows']} rows, {result['failed_calls']} failed calls; " + " | ".join(parts)
    if "losses" in result:
        return f"loss step1 {_number(result['losses'][0])} last {_number(result['losses'][-1])}, " \
               f"peak {_number(result['peak_mem_mb'])} MiB"
    scalars = [(key, value) for key, value in result.items() if isinstance(value, (int, float, str))]
    return ", ".join(f"{key} {_number(value)}" for key, value in scalars[:6])


def format_table(data: dict) -> str:
    meta = data["meta"]
    lines = [f"gpu_check ({meta['mode']}), started {meta['started']}, {meta.get('elapsed_seconds', 0)} s so far",
             f"{'step':<28} {'status':<8} {'secs':>6}  figures"]
    for name, entry in data["steps"].items():
        status = entry["status"]
        if status == "ok":
            figures = summarize(name, entry["result"])
        else:
            figures = entry.get("error") or entry.get("reason") or ""
        seconds = _number(entry["seconds"]) if "seconds" in entry else ""
        lines.append(f"{name:<28} {status:<8} {seconds:>6}  {figures[:400]}")
    return "\n".join(lines) + "\n"
