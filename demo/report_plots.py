"""The demo report's pictures: loss curves of every seed (loss_curves.png) and sample grids (samples.png),
plus the log readers they share with demo/report.py."""
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from demo import config as C  # noqa: E402
from demo.stages import FAMILY_NAMES, RUNS, seed_dir  # noqa: E402

LABELS = {"dit_usp": "DiT, USP init", "dit_scratch": "DiT, scratch", "sit_usp": "SiT, USP init",
          "sit_scratch": "SiT, scratch"}
COLOURS = {"usp": "tab:red", "scratch": "tab:blue", "random": "tab:blue"}
SEED_STYLES = ("-", "--", ":", "-.")
SAMPLES_PER_CLASS = 8

def read_jsonl(path: Path) -> list:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip().startswith("{")]


def generation_log(folder: Path, run: str) -> list:
    """Training log lines ({"step", "loss", ...}) of a generation experiment under a seed's folder."""
    logs = sorted((folder / "gen" / run).glob("*/log.txt"))
    return [entry for entry in read_jsonl(logs[-1]) if "loss" in entry] if logs else []


def probe_history(folder: Path, init: str) -> list:
    """(epoch, top-1 %) after each probe epoch."""
    return [(entry["epoch"], entry["acc1"]) for entry in read_jsonl(folder / "probe" / init / "log.txt")
            if "acc1" in entry]

def fmt(value, digits: int = 4, percent: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{100 * value:.1f}%" if percent else f"{value:.{digits}f}"


def smooth(values: list, weight: float = 0.6) -> np.ndarray:
    """Exponential moving average (the training loss is one noisy batch per point), as TensorBoard draws it."""
    smoothed, last = [], values[0] if values else 0.0
    for value in values:
        last = weight * last + (1 - weight) * value
        smoothed.append(last)
    return np.asarray(smoothed)


def plot_curves(out: Path, measured: dict, path: Path) -> None:
    """2 x 3 panels: held-out loss of DiT and SiT (every seed) and training loss (first seed), USP vs scratch;
    MAE loss and probe accuracy of every seed. Line style = seed."""
    figure, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    seeds = list(measured)
    for column, family in enumerate(FAMILY_NAMES):
        for index, seed in enumerate(seeds):
            style = SEED_STYLES[index % len(SEED_STYLES)]
            for init in ("usp", "scratch"):
                run = f"{family}_{init}"
                curve = measured[seed]["heldout"].get(run)
                if curve:
                    axes[0, column].plot(curve["steps"], curve["loss"], style, marker="o", ms=3, color=COLOURS[init],
                                         label=f"{LABELS[run]}, seed {seed}")
                log = generation_log(seed_dir(out, seed), run) if index == 0 else []
                if log:
                    steps, losses = [e["step"] for e in log], [e["loss"] for e in log]
                    axes[1, column].plot(steps, losses, color=COLOURS[init], alpha=0.25)
                    axes[1, column].plot(steps, smooth(losses), color=COLOURS[init], label=f"{LABELS[run]}, seed {seed}")
        name = "DiT (MSE + VB)" if family == "dit" else "SiT (velocity MSE)"
        axes[0, column].set_title(f"{name}: held-out loss", fontsize=10)
        axes[1, column].set_title(f"{name}: training loss (smoothed)", fontsize=10)
        for row in range(2):
            axes[row, column].set_xlabel("optimizer step")
            if axes[row, column].get_legend_handles_labels()[0]:
                axes[row, column].legend(fontsize=7)
    for index, seed in enumerate(seeds):
        style = SEED_STYLES[index % len(SEED_STYLES)]
        pretrain = [e for e in read_jsonl(seed_dir(out, seed) / "pretrain" / "log.txt") if "loss" in e]
        if pretrain:
            axes[0, 2].plot([e["step"] for e in pretrain], [e["loss"] for e in pretrain], style, color=COLOURS["usp"],
                            label=f"seed {seed}")
        for init in ("usp", "random"):
            history = probe_history(seed_dir(out, seed), init)
            if history:
                axes[1, 2].plot([e + 1 for e, _ in history], [a for _, a in history], style, marker="o",
                                color=COLOURS[init], label=f"{'USP' if init == 'usp' else 'random'} encoder, seed {seed}")
    axes[0, 2].set_title("USP pretraining: masked latent modeling loss", fontsize=10)
    axes[0, 2].set_xlabel("optimizer step")
    axes[1, 2].set_title("Linear probe: val top-1 (%)", fontsize=10)
    axes[1, 2].set_xlabel("epoch")
    for axis in (axes[0, 2], axes[1, 2]):
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def class_grid(images: np.ndarray, labels: np.ndarray, num_classes: int, per_class: int) -> np.ndarray:
    """(N, H, W, 3) uint8 + labels -> one image: row k holds the first `per_class` samples of class k."""
    size = images.shape[1]
    grid = np.full((num_classes * (size + 2), per_class * (size + 2), 3), 255, dtype=np.uint8)
    for k in range(num_classes):
        for j, index in enumerate(np.flatnonzero(labels == k)[:per_class]):
            grid[k * (size + 2):k * (size + 2) + size, j * (size + 2):j * (size + 2) + size] = images[index]
    return grid


def plot_samples(out: Path, toy: dict, path: Path) -> bool:
    """One class-by-row grid per generator (cfg 1.0 samples from sample_ddp), titled with its toy metrics."""
    present = [run for run in RUNS if (out / "samples" / f"{run}.npz").is_file()]
    if not present:
        return False
    figure, axes = plt.subplots(1, len(present), figsize=(3.4 * len(present), 4.8))
    class_names = (toy or {}).get("classes") or [str(k) for k in range(C.NUM_CLASSES)]
    for column, (axis, run) in enumerate(zip(np.atleast_1d(axes), present)):
        with np.load(out / "samples" / f"{run}.npz") as npz:
            grid = class_grid(npz["arr_0"], npz["arr_1"], C.NUM_CLASSES, SAMPLES_PER_CLASS)
        axis.imshow(grid)
        metrics = (toy or {}).get("samples", {}).get(run)
        subtitle = f"\nclass acc {fmt(metrics['class_accuracy'], percent=True)}, toy FD {fmt(metrics['toy_fd'], 2)}" \
            if metrics else ""
        axis.set_title(LABELS[run] + subtitle, fontsize=9)
        axis.set_xticks([])
        axis.tick_params(length=0)
        row_height = grid.shape[0] / C.NUM_CLASSES
        axis.set_yticks((np.arange(C.NUM_CLASSES) + 0.5) * row_height, class_names if column == 0 else [],
                        fontsize=7)
        for spine in axis.spines.values():
            spine.set_visible(False)
    figure.suptitle("Generated samples (EMA weights, cfg 1.0), one class per row", fontsize=10)
    figure.tight_layout(rect=(0, 0, 1, 0.95))
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True
