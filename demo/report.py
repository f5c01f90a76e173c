"""Writes the demo's report.md, loss_curves.png and samples.png from what the stages left in --out.

    python -m demo.report --out demo_out

Reads: demo_config.json, timings.json, vae/vae_stats.json, and for every seed s seed<s>/pretrain/log.txt,
seed<s>/probe/{usp,random}/log.txt, seed<s>/gen/<run>/*/log.txt, seed<s>/heldout/<run>.json; once:
convergence_<family>.json (scripts/plot_convergence.py), samples/<run>.npz, toy_metrics.json,
toy_classifier/classifier.json and fid/<run>.json when FID was computed. Every number in the report
is read from those files; every "ahead"/"behind" comes from a paired interval over seeds
(demo/paired_stats.py).
"""
import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from demo import config as C
from demo.paired_stats import NO_DIFFERENCE, direction, format_interval, paired_interval, short_interval
from demo.report_plots import LABELS, fmt, plot_curves, plot_samples, probe_history, read_jsonl
from demo.run_demo import CONFIG_NAME, TIMINGS_NAME
from demo.stages import FAMILY_NAMES, RUNS, seed_dir
from util.cli import finish_parser

LOSS_KEYS = {"loss": "held-out loss", "ema_loss": "held-out loss of the EMA weights"}


def read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def demo_config(out: Path) -> C.DemoConfig:
    saved = read_json(out / CONFIG_NAME) or {}
    known = {key: value for key, value in saved.items() if key in C.FULL.to_dict()}
    return C.DemoConfig(**{**C.FULL.to_dict(), **known})


# ----------------------------------------------------------------------------------------------
# Measurements per seed and their paired comparison
# ----------------------------------------------------------------------------------------------

def collect(out: Path, cfg: C.DemoConfig) -> dict:
    """{seed: {"heldout": {run: curve}, "probe": {init: final top-1}}} for the seeds whose files exist."""
    measured = {}
    for seed in cfg.seed_list:
        folder = seed_dir(out, seed)
        heldout = {run: read_json(folder / "heldout" / f"{run}.json") for run in RUNS}
        probe = {init: (history[-1][1] if (history := probe_history(folder, init)) else None)
                 for init in ("usp", "random")}
        measured[seed] = {"heldout": {run: curve for run, curve in heldout.items() if curve}, "probe": probe}
    return measured


def generation_comparison(measured: dict, family: str, key: str) -> dict:
    """Per seed: (step, USP loss, scratch loss, relative advantage in % = 100 (scratch - USP) / scratch)."""
    rows = {}
    for seed, values in measured.items():
        usp, scratch = values["heldout"].get(f"{family}_usp"), values["heldout"].get(f"{family}_scratch")
        if not (usp and scratch) or usp["steps"][-1] != scratch["steps"][-1]:
            continue
        rows[seed] = (scratch["steps"][-1], usp[key][-1], scratch[key][-1],
                      100.0 * (scratch[key][-1] - usp[key][-1]) / scratch[key][-1])
    return rows


def probe_comparison(measured: dict) -> dict:
    """Per seed: (USP top-1, random top-1, advantage in points)."""
    return {seed: (v["probe"]["usp"], v["probe"]["random"], v["probe"]["usp"] - v["probe"]["random"])
            for seed, v in measured.items() if v["probe"]["usp"] is not None and v["probe"]["random"] is not None}


def convergence_by_seed(out: Path, family: str) -> dict:
    """{seed label: USP's steps to scratch's final held-out loss and the speed-up}, from plot_convergence's JSON."""
    data = read_json(out / f"convergence_{family}.json") or {"runs": {}}
    return {label.split("/")[0]: result for label, result in data["runs"].items() if label.endswith("/usp")}


def sentence(subject: str, interval, unit: str, what: str) -> str:
    verdict = direction(interval)
    head = f"USP is {verdict}" if verdict != NO_DIFFERENCE else NO_DIFFERENCE
    return f"- **{subject}: {head}.** {what}: {format_interval(interval, unit)}."


def generation_section(out: Path, measured: dict) -> tuple[list, list]:
    """Markdown table rows (per family and seed, then the mean with its interval) and the verdict sentences."""
    lines, verdicts = [], []
    for family, name in FAMILY_NAMES.items():
        comparisons = {key: generation_comparison(measured, family, key) for key in LOSS_KEYS}
        if not comparisons["loss"]:
            continue
        intervals = {key: paired_interval([row[3] for row in rows.values()]) for key, rows in comparisons.items()}
        convergence = convergence_by_seed(out, family)
        step = next(iter(comparisons["loss"].values()))[0]
        lines += [f"**{name}**, held-out loss after {step} steps (advantage = (scratch - USP) / scratch: "
                  "positive = USP lower):", "",
                  "| seed | USP | scratch | USP advantage | USP (EMA) | scratch (EMA) | USP advantage (EMA) "
                  "| step at which USP reaches scratch's final loss | speed-up |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for seed, (_, usp, scratch, gain) in comparisons["loss"].items():
            _, usp_ema, scratch_ema, gain_ema = comparisons["ema_loss"][seed]
            reach = convergence.get(f"s{seed}", {})
            reached = "n/a" if not reach else "not reached" if reach["x_to_target"] is None \
                else f"{reach['x_to_target']:.0f}"
            speedup = f"{reach['speedup']:.2f}x" if reach.get("speedup") else "n/a"
            lines.append(f"| {seed} | {fmt(usp)} | {fmt(scratch)} | {gain:+.1f}% | {fmt(usp_ema)} | {fmt(scratch_ema)} "
                         f"| {gain_ema:+.1f}% | {reached} | {speedup} |")
        lines += [f"| mean, 95% t-interval | | | {short_interval(intervals['loss'], '%')} | | | "
                  f"{short_interval(intervals['ema_loss'], '%')} | | |", ""]
        verdicts += [sentence(f"{name}, {title} after {step} steps", intervals[key], "%", "Mean paired advantage")
                     for key, title in LOSS_KEYS.items()]
    return lines, verdicts


def probe_section(measured: dict) -> tuple[list, list]:
    rows = probe_comparison(measured)
    if not rows:
        return ["(no probe results)"], []
    interval = paired_interval([row[2] for row in rows.values()])
    lines = ["| seed | USP-pretrained encoder | randomly initialised encoder | USP advantage |", "|---|---|---|---|"]
    lines += [f"| {seed} | {usp:.1f}% | {random:.1f}% | {gain:+.1f} points |" for seed, (usp, random, gain) in rows.items()]
    lines.append(f"| mean, 95% t-interval | | | {short_interval(interval, ' points')} |")
    return lines, [sentence("Understanding, linear-probe top-1", interval, " points", "Mean paired advantage")]

# ----------------------------------------------------------------------------------------------
# Text
# ----------------------------------------------------------------------------------------------

def samples_table(toy: dict, fid: dict) -> list:
    """The four generators of the first seed side by side: toy sample metrics (and FID/IS)."""
    rows = ["| | " + " | ".join(LABELS[run] for run in RUNS) + " |", "|" + "---|" * (len(RUNS) + 1)]
    samples = (toy or {}).get("samples", {})
    rows.append("| toy class accuracy of samples (chance 10%) | " + " | ".join(
        fmt(samples[run]["class_accuracy"], percent=True) if run in samples else "n/a" for run in RUNS) + " |")
    rows.append("| toy FD of samples vs val (lower is better) | " + " | ".join(
        fmt(samples[run]["toy_fd"], 3) if run in samples else "n/a" for run in RUNS) + " |")
    for key, name in (("fid", "FID (Inception, vs val)"), ("inception_score", "Inception Score")):
        if fid:
            rows.append(f"| {name} | " + " | ".join(fmt(fid.get(run, {}).get(key), 2) for run in RUNS) + " |")
    return rows


def why_toy(cfg: C.DemoConfig) -> str:
    tokens = (cfg.image_size // 8 // C.PATCH_SIZE) ** 2
    return f"""\
Why the toy numbers may differ from the paper's (read this before drawing conclusions):
- Scale: the paper pretrains ViT-B..XL for 800-1600 epochs on ImageNet and finetunes for 400K steps;
  here a {cfg.depth}-block, {cfg.embed_dim}-wide transformer pretrains for {cfg.pretrain_steps} steps on a few thousand
  procedural images, and DiT/SiT train for {cfg.gen_steps} steps. The effect USP reports is a
  convergence speed-up that grows with model size and training length.
- adaLN-Zero: DiT/SiT start with every block's residual branch gated to zero (the adaLN modulation is
  zero-initialised, as in the official code and in USP), so the transferred attention/MLP weights only
  start to act once the gates have learned to open; in a few hundred steps this delay is a large
  share of the run.
- The latent space is tiny ({cfg.image_size // 8}x{cfg.image_size // 8}x4 latents of a VAE trained for about a minute, {tokens}
  tokens), so there is little structure for masked latent modeling to learn.
- Noise: the held-out curves use common random numbers within a seed (the same latents, t and noise for
  USP and scratch), so a seed's difference is due to the weights; across seeds everything random
  (pretraining, initialisation, batches, noise, the held-out draws) changes, and the interval says how
  far the mean difference can be trusted. "Ahead" / "behind" are written only when it excludes zero.
"""


def timing_section(timings: dict) -> list:
    if not timings:
        return ["(no timings recorded)"]
    cpu = timings.get("stage_cpu_seconds", {})
    lines = ["| stage | wall seconds | CPU seconds |", "|---|---|---|"]
    lines += [f"| {name} | {seconds:.1f} | {'' if cpu.get(name) is None else f'{cpu[name]:.1f}'} |"
              for name, seconds in timings.get("stages", {}).items()]
    full = [entry for entry in timings.get("invocations", []) if "vae" in entry["ran"]
            and any(name.startswith("pretrain") for name in entry["ran"])]
    if full:
        lines.append("")
        entry = full[-1]
        lines.append(f"Wall time of the run that computed every stage (up to the report): "
                     f"**{entry['wall_seconds']:.0f} s**; the stages run one after another in one process.")
        if "cpu_seconds" in entry:
            lines.append(f"CPU time of those stages: {entry['cpu_seconds']:.0f} s "
                         f"(user + system); load average at the end {', '.join(f'{x:.1f}' for x in entry['load_average'])} (1, 5, 15 min). On a "
                         "busy machine the wall time grows with the load; the CPU time does not (much).")
    return lines


def setup_section(out: Path, cfg: C.DemoConfig) -> list:
    vae = read_json(out / "vae" / "vae_stats.json") or {}
    pretrain_losses = [[e["loss"] for e in read_jsonl(seed_dir(out, seed) / "pretrain" / "log.txt") if "loss" in e]
                       for seed in cfg.seed_list]
    pretrain_losses = [losses for losses in pretrain_losses if losses]
    first = cfg.seed_list[0]
    return [
        f"- Data: {C.NUM_CLASSES} procedural shape classes at {cfg.image_size} px, "
        f"{cfg.train_per_class} train + {cfg.val_per_class} val images per class (`data/`, data seed {cfg.data_seed}).",
        f"- VAE: a diffusers `AutoencoderKL` (SD-VAE layout: factor 8, 4 channels, {vae.get('parameters', 0):,} "
        f"parameters) trained for {vae.get('steps')} steps; latents {vae.get('latent_shape')}; latent std "
        f"{fmt(vae.get('latent_std'), 3)} -> scale **{fmt(vae.get('scale'), 4)}** (1/std, as SD's 0.18215); "
        f"val reconstruction PSNR {fmt(vae.get('val_psnr_db'), 1)} dB.",
        f"- USP pretraining (once per seed): `{C.MAE_MODEL}` with {json.dumps(C.mae_kwargs(cfg))}, mask ratio 0.75, "
        f"{cfg.pretrain_steps} steps of batch {cfg.pretrain_batch} at lr {cfg.pretrain_lr} on cached posterior means; "
        "loss " + ", ".join(f"{losses[0]:.3f} -> {losses[-1]:.3f}" for losses in pretrain_losses) + ".",
        f"- Generators: `{C.GENERATORS['dit']}` / `{C.GENERATORS['sit']}` resized to "
        f"{json.dumps(C.generator_kwargs(cfg))}; USP and scratch runs of a seed share it, the batch "
        f"({cfg.gen_batch}), steps ({cfg.gen_steps}), lr ({cfg.gen_lr}) and EMA decay ({cfg.ema_decay}); only "
        "`--finetune` differs.",
        f"- Samples (seed {first} only, pictures and toy metrics): {cfg.num_samples} per generator from "
        f"`generation.sample_ddp` (EMA, cfg 1.0, {cfg.sampling_steps} steps: DiT DDPM, SiT Euler ODE).",
    ]


def toy_metrics_section(out: Path) -> list:
    toy = read_json(out / "toy_metrics.json")
    classifier = read_json(out / "toy_classifier" / "classifier.json") or {}
    lines = [
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
    return lines


def pictures_section(out: Path, first: int, has_samples: bool) -> list:
    lines = ["", "## Pictures", "", "Loss curves (held-out loss of every seed, training loss of the first seed, "
             "MAE loss, probe accuracy):", "", "![loss curves](loss_curves.png)", ""]
    for family, name in FAMILY_NAMES.items():
        if (out / f"convergence_{family}.png").is_file():
            lines += [f"{name} convergence (`scripts/plot_convergence.py`; circles: where USP reaches scratch's final "
                      "loss):", "", f"![{name} convergence](convergence_{family}.png)", ""]
    if has_samples:
        lines += ["Samples, one class per row (classes in the order of `data/train`):", "", "![samples](samples.png)", ""]
    if (out / "recon" / "reconstruction.png").is_file():
        lines += ["USP reconstruction (original | masked latent patches | reconstruction, decoded by the tiny VAE):",
                  "", "![reconstruction](recon/reconstruction.png)", ""]
    previews = sorted(seed_dir(out, first).glob("gen/*/*/samples/*.png"))
    if previews:
        lines += ["EMA preview grids written by `generation.train` at the end of training: " +
                  ", ".join(f"[{p.relative_to(seed_dir(out, first)).parts[1]}]({p.relative_to(out)})"
                            for p in previews), ""]
    return lines


def write_report(out: Path) -> Path:
    cfg = demo_config(out)
    saved = read_json(out / CONFIG_NAME) or {}
    measured = collect(out, cfg)
    toy = read_json(out / "toy_metrics.json")
    fid = {run: read_json(out / "fid" / f"{run}.json") for run in RUNS}
    fid = {run: value for run, value in fid.items() if value}
    first = cfg.seed_list[0]
    plot_curves(out, measured, out / "loss_curves.png")
    has_samples = plot_samples(out, toy, out / "samples.png")
    generation_lines, generation_verdicts = generation_section(out, measured)
    probe_lines, probe_verdicts = probe_section(measured)
    mode = "--fast (a few steps per stage: a smoke test, the numbers mean nothing)" \
        if saved.get("name") == "fast" else "full"
    seeds = ", ".join(str(seed) for seed in cfg.seed_list)
    lines = [
        "# USP toy demo: pretraining, understanding and generation on CPU",
        "",
        f"Run mode: **{mode}**, seeds {seeds}. Everything below was measured by this run on this machine "
        "(toy scale, CPU); none of it is a paper number.",
        "",
        "## What this run shows",
        "",
        "USP init vs scratch, paired by seed (same batches, timesteps and noise within a seed); the interval is a "
        "two-sided 95% t-interval of the mean paired difference over the seeds (`demo/paired_stats.py`). "
        "\"Ahead\"/\"behind\" only when it excludes zero.",
        "",
        *generation_verdicts,
        *probe_verdicts,
        "",
        "## Setup",
        "",
        *setup_section(out, cfg),
        "",
        "## Generation: USP init vs scratch",
        "",
        *generation_lines,
        "Held-out loss: the training objective on the val split's latents with the same (t, noise) per latent "
        "at every checkpoint and for both runs of a seed (`demo/heldout_loss.py`). Step at which USP reaches "
        "scratch's final loss: linear interpolation between checkpoints, \"not reached\" if it never does "
        "(`scripts/plot_convergence.py`, which also draws `convergence_dit.png` and `convergence_sit.png`); "
        "speed-up = scratch's steps / USP's steps.",
        "",
        f"Samples of seed {first}'s models:",
        "",
        *samples_table(toy, fid),
        "",
        "## Understanding: linear probe",
        "",
        *probe_lines,
        "",
        f"Frozen `{C.VIT_MODEL}` encoder ({json.dumps(C.vit_kwargs(cfg))}), BatchNorm + linear head on the cls token, "
        f"LARS (blr {cfg.probe_blr}: LARS moves the head by about lr x 0.001 of its norm per step, so "
        f"a probe of ~100 steps needs a far larger lr than MAE's 0.1 over ~100K steps), {cfg.probe_epochs} "
        "epochs on cached train latents, evaluated on the val images (`pretrain.main_linprobe`).",
        "",
        why_toy(cfg),
        *toy_metrics_section(out),
    ]
    lines += pictures_section(out, first, has_samples)
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
    write_report(Path(finish_parser(parser).parse_args().out))


if __name__ == "__main__":
    main()
