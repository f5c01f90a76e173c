"""Writes the demo's report.md, loss_curves.png and samples.png from what the stages left in --out.

    python -m demo.report --out demo_out

Each seed trains a USP-initialised and a scratch model on the same batches and noise, so the per-seed
differences are paired; their mean gets a two-sided 95% t-interval (the seeds as independent draws of the
whole run; with 3 seeds t = 4.303: wide on purpose). A verdict says "USP is ahead" or "behind" only when
the interval excludes zero.
"""
import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Optional, Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from matplotlib.figure import Figure  # no pyplot: files only, no display or backend state
from scipy import stats

from demo import stages as S
from demo.run_demo import CONFIG_NAME
from util.cli import finish_parser

NO_DIFFERENCE = "no measurable difference at this scale"
LOSS_KEYS = {"loss": "held-out loss", "ema_loss": "held-out loss of the EMA weights"}
LABELS = {run: f"{S.FAMILY_NAMES[run[:3]]}, {'USP init' if run.endswith('usp') else 'scratch'}" for run in S.RUNS}
COLOURS = {"usp": "tab:red", "scratch": "tab:blue", "random": "tab:blue"}
SEED_STYLES = ("-", "--", ":", "-.")


@dataclass(frozen=True)
class PairedInterval:
    mean: float
    low: Optional[float]      # None with fewer than 2 seeds
    high: Optional[float]
    n: int


def paired_interval(differences: Sequence[float]) -> PairedInterval:
    """Two-sided 95% t-interval of the mean of `differences` (one per seed)."""
    values = [float(d) for d in differences]
    n, mean = len(values), sum(values) / len(values)
    if n < 2:
        return PairedInterval(mean, None, None, n)
    half = float(stats.t.ppf(0.975, n - 1)) * math.sqrt(sum((d - mean) ** 2 for d in values) / (n - 1) / n)
    return PairedInterval(mean, mean - half, mean + half, n)


def direction(interval: PairedInterval) -> str:
    """'ahead' / 'behind' only when the interval excludes zero (positive = USP better), else NO_DIFFERENCE."""
    if interval.low is None or interval.low <= 0 <= interval.high:
        return NO_DIFFERENCE
    return "ahead" if interval.low > 0 else "behind"


def format_interval(interval: PairedInterval, unit: str, short: bool = False) -> str:
    """'+1.2% (95% t-interval over 3 seeds: +0.3% to +2.1%)', or for a table cell '+1.2% [+0.3%, +2.1%]'."""
    text = f"{interval.mean:+.1f}{unit}"
    if interval.low is None:
        return text + (" [1 seed]" if short else " (1 seed: no interval; run with --seeds 2 or more)")
    low, high = f"{interval.low:+.1f}{unit}", f"{interval.high:+.1f}{unit}"
    return text + (f" [{low}, {high}]" if short else f" (95% t-interval over {interval.n} seeds: {low} to {high})")


def sentence(subject: str, interval: PairedInterval, unit: str) -> str:
    head = NO_DIFFERENCE if direction(interval) == NO_DIFFERENCE else f"USP is {direction(interval)}"
    return f"- **{subject}: {head}.** Mean paired advantage: {format_interval(interval, unit)}."


def read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def read_jsonl(path: Path, key: str) -> list:
    """The entries of a JSON-lines log that hold `key`."""
    lines = path.read_text().splitlines() if path.is_file() else []
    return [entry for line in lines if line.strip().startswith("{") and key in (entry := json.loads(line))]


def probe_history(out: Path, seed: int, init: str) -> list:
    """(epoch, top-1 %) after each evaluated probe epoch."""
    return [(e["epoch"], e["acc1"]) for e in read_jsonl(S.seed_dir(out, seed) / "probe" / init / "log.txt", "acc1")]


def fmt(value, digits: int = 4, percent: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{100 * value:.1f}%" if percent else f"{value:.{digits}f}"


def collect(out: Path, cfg: SimpleNamespace) -> dict:
    """{seed: {"heldout": {run: curve}, "probe": {init: final top-1}}} for the seeds whose files exist."""
    measured = {}
    for seed in cfg.seed_list:
        heldout = {run: read_json(S.seed_dir(out, seed) / "heldout" / f"{run}.json") for run in S.RUNS}
        probe = {init: (history[-1][1] if (history := probe_history(out, seed, init)) else None)
                 for init in ("usp", "random")}
        measured[seed] = {"heldout": {run: curve for run, curve in heldout.items() if curve}, "probe": probe}
    return measured


def generation_rows(measured: dict, family: str, key: str) -> dict:
    """Per seed: (step, USP loss, scratch loss, relative advantage in % = 100 (scratch - USP) / scratch)."""
    rows = {}
    for seed, values in measured.items():
        usp, scratch = values["heldout"].get(f"{family}_usp"), values["heldout"].get(f"{family}_scratch")
        if usp and scratch and usp["steps"][-1] == scratch["steps"][-1]:
            rows[seed] = (scratch["steps"][-1], usp[key][-1], scratch[key][-1],
                          100.0 * (scratch[key][-1] - usp[key][-1]) / scratch[key][-1])
    return rows


def generation_section(out: Path, measured: dict) -> tuple[list, list]:
    """Markdown table rows (per family and seed, then the mean with its interval) and the verdict sentences."""
    lines, verdicts = [], []
    for family, name in S.FAMILY_NAMES.items():
        rows = {key: generation_rows(measured, family, key) for key in LOSS_KEYS}
        if not rows["loss"]:
            continue
        intervals = {key: paired_interval([row[3] for row in rows[key].values()]) for key in LOSS_KEYS}
        convergence = (read_json(out / f"convergence_{family}.json") or {"runs": {}})["runs"]
        step = next(iter(rows["loss"].values()))[0]
        lines += [f"**{name}**, held-out loss after {step} steps (advantage = (scratch - USP) / scratch: "
                  "positive = USP lower):", "",
                  "| seed | USP | scratch | USP advantage | USP (EMA) | scratch (EMA) | USP advantage (EMA) "
                  "| step at which USP reaches scratch's final loss | speed-up |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for seed, (_, usp, scratch, gain) in rows["loss"].items():
            _, usp_ema, scratch_ema, gain_ema = rows["ema_loss"][seed]
            reach = convergence.get(f"s{seed}/usp", {})
            reached = "n/a" if not reach else "not reached" if reach["x_to_target"] is None \
                else f"{reach['x_to_target']:.0f}"
            speedup = f"{reach['speedup']:.2f}x" if reach.get("speedup") else "n/a"
            lines.append(f"| {seed} | {fmt(usp)} | {fmt(scratch)} | {gain:+.1f}% | {fmt(usp_ema)} | {fmt(scratch_ema)} "
                         f"| {gain_ema:+.1f}% | {reached} | {speedup} |")
        lines += [f"| mean, 95% t-interval | | | {format_interval(intervals['loss'], '%', True)} | | | "
                  f"{format_interval(intervals['ema_loss'], '%', True)} | | |", ""]
        verdicts += [sentence(f"{name}, {title} after {step} steps", intervals[key], "%")
                     for key, title in LOSS_KEYS.items()]
    return lines, verdicts


def probe_section(measured: dict) -> tuple[list, list]:
    rows = {seed: (v["probe"]["usp"], v["probe"]["random"]) for seed, v in measured.items()
            if None not in v["probe"].values()}
    if not rows:
        return ["(no probe results)"], []
    interval = paired_interval([usp - random for usp, random in rows.values()])
    lines = ["| seed | USP-pretrained encoder | randomly initialised encoder | USP advantage |", "|---|---|---|---|"]
    lines += [f"| {seed} | {usp:.1f}% | {random:.1f}% | {usp - random:+.1f} points |"
              for seed, (usp, random) in rows.items()]
    lines.append(f"| mean, 95% t-interval | | | {format_interval(interval, ' points', True)} |")
    return lines, [sentence("Understanding, linear-probe top-1", interval, " points")]


def samples_table(toy: dict, fid: dict) -> list:
    """The four generators of the first seed side by side: toy sample metrics (and FID/IS)."""
    samples = (toy or {}).get("samples", {})
    metrics = [("toy class accuracy of samples (chance 10%)", samples, "class_accuracy", 1, True),
               ("toy FD of samples vs val (lower is better)", samples, "toy_fd", 3, False)]
    if fid:
        metrics += [("FID (Inception, vs val)", fid, "fid", 2, False),
                    ("Inception Score", fid, "inception_score", 2, False)]
    return ["| | " + " | ".join(LABELS[run] for run in S.RUNS) + " |", "|" + "---|" * (len(S.RUNS) + 1)] + [
        f"| {name} | " + " | ".join(fmt(source.get(run, {}).get(key), digits, percent) for run in S.RUNS) + " |"
        for name, source, key, digits, percent in metrics]


def setup_section(out: Path, cfg: SimpleNamespace) -> list:
    vae = read_json(out / "vae" / "vae_stats.json") or {}
    trend = ", ".join(f"{log[0]['loss']:.3f} -> {log[-1]['loss']:.3f}" for seed in cfg.seed_list
                      if (log := read_jsonl(S.seed_dir(out, seed) / "pretrain" / "log.txt", "loss")))
    return [
        f"- Data: {S.NUM_CLASSES} procedural shape classes at {cfg.image_size} px, "
        f"{cfg.train_per_class} train + {cfg.val_per_class} val images per class (`data/`, data seed {cfg.data_seed}).",
        f"- VAE: a diffusers `AutoencoderKL` (SD-VAE layout: factor 8, 4 channels, {vae.get('parameters', 0):,} "
        f"parameters) trained for {vae.get('steps')} steps; latents {vae.get('latent_shape')}; latent std "
        f"{fmt(vae.get('latent_std'), 3)} -> scale **{fmt(vae.get('scale'), 4)}** (1/std, as SD's 0.18215); "
        f"val reconstruction PSNR {fmt(vae.get('val_psnr_db'), 1)} dB.",
        f"- USP pretraining (per seed): `{S.MAE_MODEL}` with {json.dumps({**S.encoder_kwargs(cfg), **S.MAE_DECODER})},"
        f" mask ratio 0.75, {cfg.pretrain_steps} steps of batch {cfg.pretrain_batch} at lr {cfg.pretrain_lr} on cached "
        f"posterior means; loss {trend}.",
        f"- Generators: `{S.GENERATORS['dit']}` / `{S.GENERATORS['sit']}` resized to "
        f"{json.dumps(S.generator_kwargs(cfg))}, batch {cfg.gen_batch}, {cfg.gen_steps} steps, lr {cfg.gen_lr}, "
        f"EMA decay {cfg.ema_decay}; the USP and scratch runs of a seed differ only in `--finetune`.",
        f"- Samples (seed {cfg.seed_list[0]} only, pictures and toy metrics): {cfg.num_samples} per generator from "
        f"`generation.sample_ddp` (EMA, cfg 1.0, {cfg.sampling_steps} steps: DiT DDPM, SiT Euler ODE).",
    ]


def toy_section(toy: dict, cfg: SimpleNamespace) -> list:
    """Why the toy numbers may differ from the paper's, and the toy metrics' references."""
    side = cfg.image_size // 8
    lines = [
        "Why the toy numbers may differ from the paper's (read this before drawing conclusions):",
        f"- Scale: the paper pretrains ViT-B..XL for 800-1600 ImageNet epochs and finetunes for 400K steps; here a "
        f"{cfg.depth}-block, {cfg.embed_dim}-wide transformer pretrains for {cfg.pretrain_steps} steps and DiT/SiT "
        f"train for {cfg.gen_steps}. USP's speed-up grows with model size and training length.",
        "- adaLN-Zero: DiT/SiT gate every block's residual branch to zero at the start (as the official code and "
        "USP), so the transferred weights act only once the gates open, a large share of a few hundred steps.",
        f"- The latents are tiny ({side}x{side}x4 of a VAE trained for about a minute, {(side // S.PATCH_SIZE) ** 2} "
        "tokens): little for masked latent modeling to learn.",
        "- Noise: within a seed USP and scratch see the same latents, t and noise; across seeds everything random "
        "changes, and the interval says how far the mean can be trusted.", "",
        "## Toy metrics (clearly toy: not FID)", "",
        "A small CNN trained on the train images and their tiny-VAE reconstructions (`demo/toy_metrics.py`) scores "
        "the samples: *class accuracy* = share assigned to the class they were generated for; *toy FD* = Fréchet "
        "distance of its 64-d penultimate features to the real val images'.", "",
        "| reference | class accuracy | toy FD |", "|---|---|---|"]
    for name, key in (("real val images", "real_val"), ("val images through the tiny VAE (best reachable)",
                                                         "vae_reconstruction")) if toy else ():
        lines.append(f"| {name} | {fmt(toy[key]['class_accuracy'], percent=True)} | {fmt(toy[key]['toy_fd'], 3)} |")
    return lines + ([f"| chance | {fmt(toy['chance_accuracy'], percent=True)} | |"] if toy else [])


def pictures_section(out: Path, has_samples: bool) -> list:
    lines = ["", "## Pictures", "", "Loss curves of every seed (held-out loss, MAE loss, probe accuracy):", "",
             "![loss curves](loss_curves.png)", ""]
    for family, name in S.FAMILY_NAMES.items():
        if (out / f"convergence_{family}.png").is_file():
            lines += [f"{name} convergence (`scripts/plot_convergence.py`; circles: where USP reaches scratch's "
                      "final loss):", "", f"![{name} convergence](convergence_{family}.png)", ""]
    if has_samples:
        lines += ["Samples, one class per row (in the order of `data/train`):", "", "![samples](samples.png)", ""]
    if (out / "recon" / "reconstruction.png").is_file():
        lines += ["USP reconstruction (original | masked latent patches | reconstruction, decoded by the tiny VAE):",
                  "", "![reconstruction](recon/reconstruction.png)", ""]
    return lines


def plot_curves(out: Path, measured: dict) -> None:
    """2 x 2 panels: held-out loss of DiT and SiT, USP vs scratch; MAE loss; probe accuracy. Line style = seed."""
    figure = Figure(figsize=(11, 8.5))
    axes = figure.subplots(2, 2)
    for index, seed in enumerate(measured):
        style = SEED_STYLES[index % len(SEED_STYLES)]
        for column, family in enumerate(S.FAMILY_NAMES):
            for init in ("usp", "scratch"):
                if curve := measured[seed]["heldout"].get(f"{family}_{init}"):
                    axes[0, column].plot(curve["steps"], curve["loss"], style, marker="o", ms=3, color=COLOURS[init],
                                         label=f"{LABELS[f'{family}_{init}']}, seed {seed}")
        if pretrain := read_jsonl(S.seed_dir(out, seed) / "pretrain" / "log.txt", "loss"):
            axes[1, 0].plot([e["step"] for e in pretrain], [e["loss"] for e in pretrain], style, color=COLOURS["usp"],
                            label=f"seed {seed}")
        for init in ("usp", "random"):
            if history := probe_history(out, seed, init):
                axes[1, 1].plot([e + 1 for e, _ in history], [a for _, a in history], style, marker="o",
                                color=COLOURS[init], label=f"{init.replace('usp', 'USP')} encoder, seed {seed}")
    titles = ("DiT (MSE + VB): held-out loss", "SiT (velocity MSE): held-out loss",
              "USP pretraining: masked latent modeling loss", "Linear probe: val top-1 (%)")
    for axis, title in zip(axes.flat, titles):
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("epoch" if axis is axes[1, 1] else "optimizer step")
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out / "loss_curves.png", dpi=90)


def plot_samples(out: Path, toy: dict, per_class: int = 8) -> bool:
    """One class-by-row grid per generator (cfg 1.0 samples from sample_ddp), titled with its toy metrics."""
    present = [run for run in S.RUNS if (out / "samples" / f"{run}.npz").is_file()]
    if not present:
        return False
    figure = Figure(figsize=(3.4 * len(present), 4.8))
    axes = figure.subplots(1, len(present))
    for axis, run in zip(np.atleast_1d(axes), present):
        with np.load(out / "samples" / f"{run}.npz") as npz:
            images, labels = npz["arr_0"], npz["arr_1"]
        size = images.shape[1] + 2  # a 2-pixel white gap between images
        grid = np.full((S.NUM_CLASSES * size, per_class * size, 3), 255, dtype=np.uint8)
        for k in range(S.NUM_CLASSES):
            for j, index in enumerate(np.flatnonzero(labels == k)[:per_class]):
                grid[k * size:k * size + size - 2, j * size:j * size + size - 2] = images[index]
        axis.imshow(grid)
        metrics = (toy or {}).get("samples", {}).get(run)
        subtitle = f"\nclass acc {fmt(metrics['class_accuracy'], percent=True)}, toy FD {fmt(metrics['toy_fd'], 2)}" \
            if metrics else ""
        axis.set_title(LABELS[run] + subtitle, fontsize=9)
        axis.axis("off")
    figure.suptitle("Generated samples (EMA weights, cfg 1.0), one class per row", fontsize=10)
    figure.tight_layout(rect=(0, 0, 1, 0.95))
    figure.savefig(out / "samples.png", dpi=110)
    return True


def write_report(out: Path) -> Path:
    cfg = SimpleNamespace(**json.loads((out / CONFIG_NAME).read_text()))
    measured = collect(out, cfg)
    toy = read_json(out / "toy_metrics.json")
    fid = {run: value for run in S.RUNS if (value := read_json(out / "fid" / f"{run}.json"))}
    plot_curves(out, measured)
    has_samples = plot_samples(out, toy)
    generation_lines, generation_verdicts = generation_section(out, measured)
    probe_lines, probe_verdicts = probe_section(measured)
    mode = "--fast (a few steps per stage: a smoke test, the numbers mean nothing)" if cfg.name == "fast" else "full"
    lines = [
        "# USP toy demo: pretraining, understanding and generation on CPU", "",
        f"Run mode: **{mode}**, seeds {', '.join(map(str, cfg.seed_list))}. Everything below was measured by this "
        "run on this machine (toy scale, CPU); none of it is a paper number.", "",
        "## What this run shows", "",
        "USP init vs scratch, paired by seed (same batches, timesteps and noise within a seed); the interval is a "
        "two-sided 95% t-interval of the mean paired difference over the seeds (`demo/report.py`). "
        "\"Ahead\"/\"behind\" only when it excludes zero.", "",
        *generation_verdicts, *probe_verdicts, "",
        "## Setup", "", *setup_section(out, cfg), "",
        "## Generation: USP init vs scratch", "", *generation_lines,
        "Held-out loss: the training objective on the val split's latents with the same (t, noise) per latent "
        "at every checkpoint and for both runs of a seed (`demo/heldout_loss.py`). Step at which USP reaches "
        "scratch's final loss: linear interpolation between checkpoints, \"not reached\" if it never does "
        "(`scripts/plot_convergence.py`); speed-up = scratch's steps / USP's steps.", "",
        f"Samples of seed {cfg.seed_list[0]}'s models:", "", *samples_table(toy, fid), "",
        "## Understanding: linear probe", "", *probe_lines, "",
        f"Frozen `{S.VIT_MODEL}` encoder ({json.dumps(S.encoder_kwargs(cfg))}), BatchNorm + linear head on the cls "
        f"token, LARS (blr {cfg.probe_blr}), {cfg.probe_epochs} epochs on cached train latents, evaluated on the val "
        "images (`pretrain.main_linprobe`).", "",
        *toy_section(toy, cfg), *pictures_section(out, has_samples),
        "Commands of every stage: `logs/<stage>.log` (first line). Rerun one stage (and what depends on it) "
        "with `bash scripts/demo.sh --out <this folder> --redo <stage>`.", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    print(f"wrote {report}, {out / 'loss_curves.png'}" + (f", {out / 'samples.png'}" if has_samples else ""))
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser("Write the demo report")
    parser.add_argument("--out", required=True, help="the demo's output folder")
    write_report(Path(finish_parser(parser).parse_args().out))
