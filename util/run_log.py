"""Run logging: console, TensorBoard, a JSON-lines metrics file (MAE's `log.txt` format) and, with
`wandb_run` (--wandb, as SiT's train.py), Weights & Biases when the package is installed.

Metrics arrive as floats (or tensors read once here): the training loop accumulates losses on
the device and calls `.item()` only at log intervals, so steps in between never wait on the host.
"""
import json
import os
import resource
import sys
import time
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

from util.errors import UserError
from util.progress import progress_bar


class RunLogger:
    """Writes `{"step": step, **metrics}` lines to `<output_dir>/<jsonl_name>`, TensorBoard and stdout.

    Only the main rank writes anything; other ranks get a logger whose methods do nothing, so
    callers do not need `if is_main` around every call.
    """

    def __init__(self, output_dir, is_main: bool, tensorboard: bool = True, jsonl_name: str = "log.txt",
                 log_dir=None, wandb_run=None, resume_step: int | None = None):
        """wandb_run: None, or {"project": ..., "name": ..., "config": {...}} to log to W&B as well.
        resume_step: the step of the checkpoint a resumed run continues from. Lines logged after it by the
        interrupted run describe work that was lost and is about to be redone, so they are dropped from the
        JSON-lines file (and TensorBoard's events purged) instead of appearing twice."""
        self.is_main = is_main
        self.writer = None
        self.jsonl = None
        self.wandb = None
        if not is_main:
            return
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        jsonl_path = self.output_dir / jsonl_name
        if resume_step is not None and jsonl_path.is_file():
            _drop_lines_after(jsonl_path, resume_step)
        self.jsonl = open(jsonl_path, "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                warnings.warn("tensorboard is not installed; metrics go to the JSON-lines log only.")
            else:
                purge = None if resume_step is None else resume_step + 1
                self.writer = SummaryWriter(log_dir=str(log_dir or self.output_dir), purge_step=purge)
        if wandb_run is not None:
            self.wandb = require_wandb()
            self.wandb.init(dir=str(self.output_dir), **wandb_run)

    def log(self, step: int, metrics: dict, prefix: str = "train") -> None:
        """Records `metrics` (name -> number) at `step` in all three sinks."""
        if not self.is_main:
            return
        values = {name: float(value.item() if torch.is_tensor(value) else value) for name, value in metrics.items()}
        self.jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(f"{prefix}/{name}", value, step)
        if self.wandb is not None:
            self.wandb.log({f"{prefix}/{name}": value for name, value in values.items()}, step=int(step))
        text = " ".join(f"{name}={value:.6g}" for name, value in values.items())
        tqdm.write(f"[{prefix} step {step}] {text}", file=sys.stdout)

    def report_skips(self, report, step: int) -> None:
        """Prints a data skip report (`SafeImageFolder.skip_report()`) on stderr, as a warning, and logs its
        counts at `step`; no-op for None."""
        if report is None:
            return
        if self.is_main:
            tqdm.write(f"warning: {report['message']}", file=sys.stderr)
        self.log(step, {key: report[key] for key in ("skipped_images", "too_large_images")}, prefix="data")

    def info(self, message: str) -> None:
        """A plain message on the main rank's console."""
        if self.is_main:
            tqdm.write(message, file=sys.stdout)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.wandb is not None:
            self.wandb.finish()


def require_wandb():
    """The wandb module, or a one-sentence error when it is not installed (it is an optional dependency)."""
    try:
        import wandb
    except ImportError:
        raise UserError("--wandb needs the Weights & Biases package; `pip install wandb` (and `wandb login`) or drop "
                        "--wandb.") from None
    return wandb


def _drop_lines_after(path: Path, step: int) -> None:
    """Rewrites the JSON-lines file `path` without the lines whose "step" is above `step` (atomically)."""
    kept = []
    for line in path.read_text().splitlines():
        try:
            logged_step = json.loads(line).get("step")
        except (json.JSONDecodeError, AttributeError):
            logged_step = None  # a torn last line of a killed run, or a foreign line: keep unless torn
            if not line.rstrip().endswith("}"):
                continue
        if logged_step is None or logged_step <= step:
            kept.append(line)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def progress(iterable, is_main: bool, **kwargs):
    """Progress on the main rank only: a tqdm bar in a terminal, plain lines in a log (util/progress.py)."""
    return progress_bar(iterable, disable=not is_main, dynamic_ncols=True, **kwargs)


class Throughput:
    """Images per second between `rate()` calls; read it at log steps (after the `.item()` sync)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.count = 0

    def update(self, images: int) -> None:
        self.count += images

    def rate(self, reset: bool = True) -> float:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        images_per_second = self.count / elapsed
        if reset:
            self.reset()
        return images_per_second


def peak_memory_mb(device) -> float:
    """Peak allocated CUDA memory on `device`, or the process's peak RSS on CPU, in MiB."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
