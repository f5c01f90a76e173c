"""Writes the demo's report.md, loss_curves.png and samples.png from what the stages left in --out.

    python -m demo.report --out demo_out

Reads: demo_config.json, timings.json, vae/vae_stats.json, pretrain/log.txt, probe/{usp,random}/log.txt,
gen/<run>/*/log.txt, heldout/<run>.json, samples/<run>.npz, toy_metrics.json, toy_classifier/classifier.json
and fid/<run>.json when FID was computed. Every number in the report is read from those files.
"""
import argparse
import json
import math
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from demo import config as C  # noqa: E402
from demo.run_demo import CONFIG_NAME, TIMINGS_NAME  # noqa: E402
from demo.stages import RUNS  # noqa: E402

LABELS = {"dit_usp": "DiT, USP init", "dit_scratch": "DiT, scratch", "sit_usp": "SiT, USP init",
          "sit_scratch": "SiT, scratch"}
COLOURS = {"usp": "tab:red", "scratch": "tab:blue", "random": "tab:blue"}
FAMILIES = {"dit": "DiT", "sit": "SiT"}
SAMPLES_PER_CLASS = 8


def read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def read_jsonl(path: Path) -> list:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip().startswith("{")]


def generation_log(out: Path, run: str) -> list:
    """Training log lines ({"step", "loss", ...}) of a generation experiment."""
    logs = sorted((out / "gen" / run).glob("*/log.txt"))
    return [entry for entry in read_jsonl(logs[-1]) if "loss" in entry] if logs else []


def probe_history(out: Path, init: str) -> list:
    """(epoch, top-1 %) after each probe epoch."""
    return [(entry["epoch"], entry["acc1"]) for entry in read_jsonl(out / "probe" / init / "log.txt") if "acc1" in entry]


def steps_to_reach(curve: dict, target: float):
    """First checkpoint step whose held-out loss is <= target, or None."""
    for step, loss in zip(curve["steps"], curve["loss"]):
        if loss <= target:
            return step
    return None


def fmt(value, digits: int = 4, percent: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{100 * value:.1f}%" if percent else f"{value:.{digits}f}"


# ----------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------

def smooth(values: list, weight: float = 0.6) -> np.ndarray:
    """Exponential moving average (the training loss is one noisy batch per point), as TensorBoard draws it."""
    smoothed, last = [], values[0] if values else 0.0
    for value in values:
        last = weight * last + (1 - weight) * value
        smoothed.append(last)
    return np.asarray(smoothed)


def plot_curves(out: Path, heldout: dict, path: Path) -> None:
    """2 x 3 panels: held-out and training loss of DiT and SiT (USP vs scratch), MAE loss, probe accuracy."""
    figure, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    for column, family in enumerate(("dit", "sit")):
        for init in ("usp", "scratch"):
            run = f"{family}_{init}"
            curve = heldout.get(run)
            if curve:
                axes[0, column].plot(curve["steps"], curve["loss"], "o-", color=COLOURS[init], label=LABELS[run])
                axes[0, column].plot(curve["steps"], curve["ema_loss"], ":", color=COLOURS[init],
                                     label=f"{LABELS[run]} (EMA)")
            log = generation_log(out, run)
            if log:
                steps, losses = [e["step"] for e in log], [e["loss"] for e in log]
                axes[1, column].plot(steps, losses, color=COLOURS[init], alpha=0.25)
                axes[1, column].plot(steps, smooth(losses), color=COLOURS[init], label=LABELS[run])
        name = "DiT (MSE + VB)" if family == "dit" else "SiT (velocity MSE)"
        axes[0, column].set_title(f"{name}: held-out loss", fontsize=10)
        axes[1, column].set_title(f"{name}: training loss (smoothed)", fontsize=10)
        for row in range(2):
            axes[row, column].set_xlabel("optimizer step")
            axes[row, column].legend(fontsize=8)
    pretrain = [e for e in read_jsonl(out / "pretrain" / "log.txt") if "loss" in e]
    if pretrain:
        axes[0, 2].plot([e["step"] for e in pretrain], [e["loss"] for e in pretrain], ".-", color=COLOURS["usp"])
    axes[0, 2].set_title("USP pretraining: masked latent modeling loss", fontsize=10)
    axes[0, 2].set_xlabel("optimizer step")
    for init in ("usp", "random"):
        history = probe_history(out, init)
        if history:
            axes[1, 2].plot([e + 1 for e, _ in history], [a for _, a in history], "o-", color=COLOURS[init],
                            label=f"{'USP' if init == 'usp' else 'random'} encoder")
    axes[1, 2].set_title("Linear probe: val top-1 (%)", fontsize=10)
    axes[1, 2].set_xlabel("epoch")
    axes[1, 2].legend(fontsize=8)
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


# ----------------------------------------------------------------------------------------------
# Text
# ----------------------------------------------------------------------------------------------

def generation_table(heldout: dict, toy: dict, fid: dict) -> tuple[list, dict]:
    """Markdown rows comparing the four generators, and the comparison numbers per family."""
    header = "| | " + " | ".join(LABELS[run] for run in RUNS) + " |"
    rows = [header, "|" + "---|" * (len(RUNS) + 1)]
    summary = {}

    def row(name, values):
        rows.append(f"| {name} | " + " | ".join(values) + " |")

    steps = {run: heldout[run]["steps"] for run in RUNS if run in heldout}
    middle = {}
    for family in ("dit", "sit"):
        usp, scratch = heldout.get(f"{family}_usp"), heldout.get(f"{family}_scratch")
        if not (usp and scratch):
            continue
        common = [s for s in usp["steps"] if s in scratch["steps"]]
        middle[family] = common[(len(common) - 1) // 2] if common else None
        reached = steps_to_reach(usp, scratch["loss"][-1])
        summary[family] = {
            "final_step": scratch["steps"][-1], "usp_final": usp["loss"][-1], "scratch_final": scratch["loss"][-1],
            "steps_to_scratch_final": reached,
            "speedup": scratch["steps"][-1] / reached if reached else None,
        }

    def at(run, step, key="loss"):
        curve = heldout.get(run)
        if not curve or step is None or step not in curve["steps"]:
            return None
        return curve[key][curve["steps"].index(step)]

    mids = {family: middle.get(family) for family in ("dit", "sit")}
    row("held-out loss at mid-run step (" + ", ".join(f"{FAMILIES[f]} {s}" for f, s in mids.items() if s) + ")",
        [fmt(at(run, mids.get(run.split("_")[0]))) for run in RUNS])
    row("held-out loss at the last step (" + ", ".join(
        f"{FAMILIES[f]} {v['final_step']}" for f, v in summary.items()) + ")",
        [fmt(heldout[run]["loss"][-1]) if run in heldout else "n/a" for run in RUNS])
    row("held-out loss of the EMA weights, last step",
        [fmt(heldout[run]["ema_loss"][-1]) if run in heldout else "n/a" for run in RUNS])

    def reach(run):
        family, init = run.split("_")
        if init != "usp" or family not in summary:
            return "(reference)" if family in summary else "n/a"
        value = summary[family]
        if value["steps_to_scratch_final"] is None:
            return "not reached"
        return f"{value['steps_to_scratch_final']} ({value['speedup']:.1f}x fewer)"

    row("steps to reach scratch's final held-out loss", [reach(run) for run in RUNS])
    samples = (toy or {}).get("samples", {})
    row("toy class accuracy of samples (chance 10%)",
        [fmt(samples[run]["class_accuracy"], percent=True) if run in samples else "n/a" for run in RUNS])
    row("toy FD of samples vs val (lower is better)",
        [fmt(samples[run]["toy_fd"], 3) if run in samples else "n/a" for run in RUNS])
    if fid:
        for key, name in (("fid", "FID (Inception, vs val)"), ("inception_score", "Inception Score")):
            row(name, [fmt(fid.get(run, {}).get(key), 2) for run in RUNS])
    return rows, summary


def verdict(summary: dict, probe: dict) -> list:
    """Plain sentences saying which way each comparison came out (no threshold tuning: just the sign)."""
    lines = []
    for family, value in summary.items():
        name = FAMILIES[family]
        difference = value["scratch_final"] - value["usp_final"]
        relative = difference / value["scratch_final"] if value["scratch_final"] else float("nan")
        if difference > 0:
            reached = value["steps_to_scratch_final"]
            when = (f"USP reached scratch's final loss at step {reached} ({value['speedup']:.1f}x fewer steps, "
                    "at checkpoint resolution)" if reached is not None and reached < value["final_step"] else
                    "the gap is smaller than one checkpoint interval of training")
            lines.append(f"- **{name}: USP init is ahead.** Held-out loss after {value['final_step']} steps: "
                         f"{value['usp_final']:.4f} (USP) vs {value['scratch_final']:.4f} (scratch), "
                         f"{100 * relative:.1f}% lower; {when}.")
        else:
            lines.append(f"- **{name}: USP init did not help here.** Held-out loss after {value['final_step']} steps: "
                         f"{value['usp_final']:.4f} (USP) vs {value['scratch_final']:.4f} (scratch).")
    usp, random = probe.get("usp"), probe.get("random")
    if usp is not None and random is not None:
        better = "above" if usp > random else "not above"
        lines.append(f"- **Understanding:** the linear probe on the USP encoder scores {usp:.1f}% top-1, {better} "
                     f"the same probe on a randomly initialised encoder ({random:.1f}%).")
    return lines


WHY_TOY = """\
Why the toy numbers may differ from the paper's (read this before drawing conclusions):
- Scale: the paper pretrains ViT-B..XL for 800-1600 epochs on ImageNet and finetunes for 400K steps;
  here a 4-block, 128-wide transformer pretrains for a few hundred steps on a few thousand
  procedural images, and DiT/SiT train for a few hundred steps. The effect USP reports is a
  convergence speed-up that grows with model size and training length.
- adaLN-Zero: DiT/SiT start with every block's residual branch gated to zero (the adaLN modulation is
  zero-initialised, as in the official code and in USP), so the transferred attention/MLP weights only
  start to act once the gates have learned to open; in a few hundred steps this delay is a large
  share of the run.
- The latent space is tiny (4x4x4 latents of a VAE trained for about a minute), so there is little
  structure for masked latent modeling to learn, and the probe/generator see 16 tokens.
- The held-out curves use common random numbers (the same latents, t and noise at every checkpoint
  and for both runs), so differences are due to the weights, but single-seed runs still carry noise
  of the order of the step-to-step wiggles of each curve.
"""


def timing_section(timings: dict) -> list:
    if not timings:
        return ["(no timings recorded)"]
    lines = ["| stage | seconds |", "|---|---|"]
    lines += [f"| {name} | {seconds:.1f} |" for name, seconds in timings.get("stages", {}).items()]
    full = [entry for entry in timings.get("invocations", []) if "pretrain" in entry["ran"] and "vae" in entry["ran"]]
    if full:
        lines.append("")
        lines.append(f"Wall time of the run that computed every stage (up to the report): "
                     f"**{full[-1]['wall_seconds']:.0f} s**. Stages run two at a time, one thread each, so the "
                     f"per-stage seconds add up to more than the wall time.")
    return lines


def write_report(out: Path) -> Path:
    cfg = read_json(out / CONFIG_NAME) or {}
    heldout = {run: read_json(out / "heldout" / f"{run}.json") for run in RUNS}
    heldout = {run: curve for run, curve in heldout.items() if curve}
    toy = read_json(out / "toy_metrics.json")
    fid = {run: read_json(out / "fid" / f"{run}.json") for run in RUNS}
    fid = {run: value for run, value in fid.items() if value}
    vae = read_json(out / "vae" / "vae_stats.json") or {}
    classifier = read_json(out / "toy_classifier" / "classifier.json") or {}
    probe = {init: (history[-1][1] if (history := probe_history(out, init)) else None) for init in ("usp", "random")}
    pretrain = [e for e in read_jsonl(out / "pretrain" / "log.txt") if "loss" in e]

    plot_curves(out, heldout, out / "loss_curves.png")
    has_samples = plot_samples(out, toy, out / "samples.png")
    rows, summary = generation_table(heldout, toy, fid)
    mode = "--fast (a few steps per stage: a smoke test, the numbers mean nothing)" \
        if cfg.get("name") == "fast" else "full"
    lines = [
        "# USP toy demo: pretraining, understanding and generation on CPU",
        "",
        f"Run mode: **{mode}**. Everything below was measured by this run on this machine "
        "(toy scale, CPU); none of it is a paper number.",
        "",
        "## Setup",
        "",
        f"- Data: {C.NUM_CLASSES} procedural shape classes at {C.IMAGE_SIZE} px, "
        f"{cfg.get('train_per_class')} train + {cfg.get('val_per_class')} val images per class (`data/`).",
        f"- VAE: a diffusers `AutoencoderKL` (SD-VAE layout: factor 8, 4 channels, {vae.get('parameters', 0):,} "
        f"parameters) trained for {vae.get('steps')} steps; latents {vae.get('latent_shape')}; latent std "
        f"{fmt(vae.get('latent_std'), 3)} -> scale **{fmt(vae.get('scale'), 4)}** (1/std, as SD's 0.18215); "
        f"val reconstruction PSNR {fmt(vae.get('val_psnr_db'), 1)} dB.",
        f"- USP pretraining: `{C.MAE_MODEL}` with {json.dumps(C.mae_kwargs())}, mask ratio 0.75, "
        f"{cfg.get('pretrain_steps')} steps of batch {cfg.get('pretrain_batch')} on cached posterior means; "
        f"loss {fmt(pretrain[0]['loss'] if pretrain else None, 3)} -> {fmt(pretrain[-1]['loss'] if pretrain else None, 3)}.",
        f"- Generators: `{C.GENERATORS['dit']}` / `{C.GENERATORS['sit']}` resized to {json.dumps(C.generator_kwargs())}; "
        f"USP and scratch runs share seed, batch ({cfg.get('gen_batch')}), steps ({cfg.get('gen_steps')}), lr "
        f"({cfg.get('gen_lr')}) and EMA decay ({cfg.get('ema_decay')}); only `--finetune` differs.",
        f"- Samples: {cfg.get('num_samples')} per generator from `generation.sample_ddp` (EMA, cfg 1.0, "
        f"{cfg.get('sampling_steps')} steps: DiT DDPM, SiT Euler ODE).",
        "",
        "## Generation: USP init vs scratch",
        "",
        *rows,
        "",
        "Held-out loss: the training objective on the val split's latents with the same (t, noise) per latent "
        "at every checkpoint and for both runs (`demo/heldout_loss.py`).",
        "",
        "## Understanding: linear probe",
        "",
        "| encoder | val top-1 |",
        "|---|---|",
        f"| USP-pretrained | {fmt(probe['usp'], 1)}% |",
        f"| randomly initialised | {fmt(probe['random'], 1)}% |",
        "",
        f"Frozen `{C.VIT_MODEL}` encoder ({json.dumps(C.vit_kwargs())}), BatchNorm + linear head on the cls token, "
        f"LARS (blr {cfg.get('probe_blr')}: LARS moves the head by about lr x 0.001 of its norm per step, so "
        f"a probe of ~100 steps needs a far larger lr than MAE's 0.1 over ~100K steps), {cfg.get('probe_epochs')} "
        "epochs on cached train latents, evaluated on the val images (`pretrain.main_linprobe`).",
        "",
        "## What this run shows",
        "",
        *verdict(summary, probe),
        "",
        WHY_TOY,
        "## Toy metrics (clearly toy: not FID)",
        "",
        "A small CNN trained on the training images and on their reconstructions by the tiny VAE "
        f"(`demo/toy_classifier.py`; val accuracy {fmt(classifier.get('val_accuracy'), percent=True)} on real images, "
        f"{fmt(classifier.get('val_reconstruction_accuracy'), percent=True)} on their VAE reconstructions) "
        "scores the samples: *class accuracy* = share of "
        "samples it assigns to the class they were generated for; *toy FD* = Fréchet distance between its "
        "64-d penultimate features of the samples and of the real val images.",
        "",
        "| reference | class accuracy | toy FD |",
        "|---|---|---|",
    ]
    if toy:
        for name, key in (("real val images", "real_val"), ("val images through the tiny VAE (best reachable)",
                                                             "vae_reconstruction")):
            lines.append(f"| {name} | {fmt(toy[key]['class_accuracy'], percent=True)} | {fmt(toy[key]['toy_fd'], 3)} |")
        lines.append(f"| chance | {fmt(toy['chance_accuracy'], percent=True)} | |")
    lines += ["", "## Pictures", "", "Loss curves (held-out and training loss, MAE loss, probe accuracy):", "",
              "![loss curves](loss_curves.png)", ""]
    if has_samples:
        lines += ["Samples, one class per row (classes in the order of `data/train`):", "", "![samples](samples.png)", ""]
    if (out / "recon" / "reconstruction.png").is_file():
        lines += ["USP reconstruction (original | masked latent patches | reconstruction, decoded by the tiny VAE):",
                  "", "![reconstruction](recon/reconstruction.png)", ""]
    previews = sorted(out.glob("gen/*/*/samples/*.png"))
    if previews:
        lines += ["EMA preview grids written by `generation.train` at the end of training: " +
                  ", ".join(f"[{p.relative_to(out).parts[1]}]({p.relative_to(out)})" for p in previews), ""]
    lines += ["## Time per stage", "", *timing_section(read_json(out / TIMINGS_NAME)), "",
              "Commands of every stage: `logs/<stage>.log` (first line). Rerun one stage (and what depends on it) "
              "with `bash scripts/demo.sh --out <this folder> --redo <stage>`.", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    print(f"wrote {report}, {out / 'loss_curves.png'}" + (f", {out / 'samples.png'}" if has_samples else ""))
    return report



def main() -> None:
    parser = argparse.ArgumentParser("Write the demo report")
    parser.add_argument("--out", required=True, help="the demo's output folder")
    write_report(Path(parser.parse_args().out))


if __name__ == "__main__":
    main()
