"""The demo pipeline as a table of stages: what each runs, what it needs, where it writes.

Every stage but the first is a process running a real entry point exactly as a user would type it
(`python -m pretrain.main_pretrain ...`; each stage's log starts with the command); the commands are built
when the stage starts, so a stage can point at a file an earlier stage produced (e.g. the newest pretraining checkpoint).

Pipeline, for every seed s (USP vs scratch differ only in `--finetune`; seed, steps, batch and lr are shared):
  data -> vae -> cache_train, cache_val -> pretrain_s<s> -> probe_usp_s<s>, {dit,sit}_usp_s<s>
                                cache_train -> probe_random_s<s>, {dit,sit}_scratch_s<s>
  the four generators -> heldout_s<s> (held-out loss curves) -> convergence_<family> (scripts/plot_convergence.py)
and once, on the first seed's models: recon, samples_<run> (sample_ddp npz) -> toy_metrics (with the toy
classifier), [--inception-weights] fid_*;  all -> report.

Per-seed outputs live under `<out>/seed<s>/` (pretrain/, probe/, gen/<run>/, heldout/<run>.json[l]).
"""
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from demo import config as C

RUNS = ("dit_usp", "dit_scratch", "sit_usp", "sit_scratch")
FAMILY_NAMES = {"dit": "DiT", "sit": "SiT"}


@dataclass
class Stage:
    """One step of the demo.

    command: () -> [python, *argv] (a process of its own), or None when `function` runs in-process.
    outputs: paths (relative to the output folder) deleted before the stage (re)runs.
    exclusive: nothing else can run beside it (every later stage needs it), so it gets every CPU thread.
    """

    name: str
    needs: tuple
    outputs: tuple
    command: Optional[Callable[[], list]] = None
    function: Optional[Callable[[], None]] = None
    about: str = ""
    exclusive: bool = False


def newest(directory: Path, pattern: str) -> Path:
    """The file matching `pattern` under `directory` with the highest number in its name."""
    found = sorted(directory.glob(pattern), key=lambda p: [int(part) for part in _digits(p.name)])
    if not found:
        raise FileNotFoundError(f"no {pattern} under {directory}; rerun the stage that writes it (--redo).")
    return found[-1]


def _digits(name: str) -> list:
    return re.findall(r"\d+", name) or ["0"]


def seed_dir(out: Path, seed: int) -> Path:
    return out / f"seed{seed}"


def build_stages(out: Path, cfg: C.DemoConfig, inception_weights: Optional[str] = None) -> list:
    """The ordered stage table; the order is also the scheduler's priority among ready stages."""
    py = sys.executable
    data, vae = out / "data", out / "vae"
    cache_train, cache_val = out / "cache" / "train", out / "cache" / "val"
    num_train = C.NUM_CLASSES * cfg.train_per_class
    image_size = str(cfg.image_size)
    common_vae = ["--vae_version", C.VAE_VERSION, "--vae_path", str(vae), "--input_size", image_size]
    first = cfg.seed_list[0]

    def write_data():
        from demo.toy_dataset import write_toy_dataset

        write_toy_dataset(data, C.NUM_CLASSES, cfg.train_per_class, cfg.val_per_class, cfg.image_size,
                          cfg.data_seed)

    def cache(split: str, target: Path):
        return lambda: [py, "-m", "pretrain.cache_latents", "--data_path", str(data / split), "--cached_path", str(target),
                        *common_vae, "--batch_size", "250", "--shard_size", "4096", "--num_workers", "0",
                        "--device", "cpu"]

    steps_per_epoch = num_train // cfg.pretrain_batch
    pretrain_epochs = math.ceil(cfg.pretrain_steps / steps_per_epoch)

    def pretrain(seed: int):
        return lambda: [
            py, "-m", "pretrain.main_pretrain", "--model", C.MAE_MODEL, "--model_kwargs", json.dumps(C.mae_kwargs(cfg)),
            *common_vae, "--use_cached", "--cached_path", str(cache_train), "--data_path", str(data),
            "--batch_size", str(cfg.pretrain_batch), "--epochs", str(pretrain_epochs),
            "--max_steps", str(cfg.pretrain_steps), "--warmup_epochs", str(max(1, pretrain_epochs // 10)),
            "--lr", str(cfg.pretrain_lr), "--weight_decay", "0.05", "--mask_ratio", "0.75",
            "--output_dir", str(seed_dir(out, seed) / "pretrain"), "--log_dir", str(seed_dir(out, seed) / "pretrain"),
            "--save_every", str(pretrain_epochs), "--log_every", "10", "--device", "cpu", "--precision", "fp32",
            "--num_workers", "0", "--seed", str(seed)]

    def usp_checkpoint(seed: int) -> str:
        return str(newest(seed_dir(out, seed) / "pretrain", "checkpoint-*.pth"))

    def recon():
        return [py, "-m", "pretrain.main_generate", "--checkpoint", usp_checkpoint(first), "--data_path", str(data),
                "--vae_path", str(vae), "--num_images", "10", "--output", str(out / "recon" / "reconstruction.png"),
                "--device", "cpu"]

    def probe(init: str, seed: int):
        def command():
            finetune = ["--finetune", usp_checkpoint(seed)] if init == "usp" else []
            target = seed_dir(out, seed) / "probe" / init
            return [py, "-m", "pretrain.main_linprobe", "--model", C.VIT_MODEL, "--model_kwargs",
                    json.dumps(C.vit_kwargs(cfg)), *common_vae, "--cls_token", *finetune, "--use_cached",
                    "--cached_path", str(cache_train), "--data_path", str(data), "--nb_classes", str(C.NUM_CLASSES),
                    "--batch_size", str(cfg.probe_batch), "--epochs", str(cfg.probe_epochs), "--warmup_epochs", "1",
                    "--eval_freq", str(cfg.probe_epochs),  # the report reads the final top-1 only
                    "--blr", str(cfg.probe_blr), "--weight_decay", "0.0", "--output_dir", str(target),
                    "--log_dir", str(target), "--device", "cpu", "--precision", "fp32",
                    "--num_workers", "0", "--seed", str(seed), "--log_every", "5"]
        return command

    ckpt_every = max(1, cfg.gen_steps // cfg.gen_checkpoints)

    def generator(run: str, seed: int):
        family, init = run.split("_")

        def command():
            finetune = ["--finetune", usp_checkpoint(seed)] if init == "usp" else []
            return [py, "-m", "generation.train", "--model", C.GENERATORS[family],
                    "--model-kwargs", json.dumps(C.generator_kwargs(cfg)), "--image-size", image_size,
                    "--num-classes", str(C.NUM_CLASSES), "--vae-version", C.VAE_VERSION, "--vae-path", str(vae),
                    "--cached-path", str(cache_train), "--results-dir", str(seed_dir(out, seed) / "gen" / run),
                    "--exp-name", init, *finetune, "--global-batch-size", str(cfg.gen_batch),
                    "--max-steps", str(cfg.gen_steps), "--epochs", "100000", "--ckpt-every", str(ckpt_every),
                    # previews only for the first seed: the grids are pictures, not measurements
                    "--eval-every", str(cfg.gen_steps if seed == first else 0),
                    "--log-every", str(max(1, ckpt_every // 4)), "--eval-images", "20", "--cfg-scale", "1.0",
                    "--num-sampling-steps", str(cfg.sampling_steps), "--lr", str(cfg.gen_lr),
                    "--ema-decay", str(cfg.ema_decay), "--milestone-every", "0", "--keep-last", "0",
                    "--global-seed", str(seed), "--device", "cpu", "--precision", "fp32", "--num-workers", "0"]
        return command

    def final_generator_checkpoint(run: str) -> str:
        return str(newest(seed_dir(out, first) / "gen" / run, "*/checkpoints/*.pt"))

    def heldout(seed: int):
        # The (t, noise) draws change with the seed, so the interval over seeds includes the evaluation's noise.
        def command():
            folder = seed_dir(out, seed)
            pairs = [["--experiment", str(folder / "gen" / run), "--output", str(folder / "heldout" / f"{run}.json")]
                     for run in RUNS]
            return [py, "-m", "demo.heldout_loss", *sum(pairs, []), "--cached_path", str(cache_val),
                    "--repeats", str(cfg.heldout_repeats), "--seed", str(1234 + seed)]
        return command

    def samples(run: str):
        family = run.split("_")[0]
        sampler = ["--sampler", "ddpm"] if family == "dit" else ["--mode", "ODE", "--sampling-method", "euler"]

        def command():
            return [py, "-m", "generation.sample_ddp", "--model", C.GENERATORS[family],
                    "--ckpt", final_generator_checkpoint(run), "--model-kwargs", json.dumps(C.generator_kwargs(cfg)),
                    "--image-size", image_size, "--num-classes", str(C.NUM_CLASSES),
                    "--vae-version", C.VAE_VERSION, "--vae-path", str(vae), *sampler,
                    "--sample-dir", str(out / "samples" / run), "--num-fid-samples", str(cfg.num_samples),
                    "--per-proc-batch-size", str(min(cfg.num_samples, 250)), "--cfg-scale", "1.0",
                    "--num-sampling-steps", str(cfg.sampling_steps), "--global-seed", str(first),
                    "--device", "cpu", "--precision", "fp32", "--npz-workers", "2"]
        return command

    def convergence(family: str):
        def command():
            runs = [f"--run=s{seed}/{init}={seed_dir(out, seed) / 'heldout' / f'{family}_{init}.jsonl'}"
                    for seed in cfg.seed_list for init in ("usp", "scratch")]
            return [py, "scripts/plot_convergence.py", *runs, "--metric", "heldout_loss", "--reference", "scratch",
                    "--title", f"{FAMILY_NAMES[family]}: held-out loss", "--output", str(out / f"convergence_{family}.png"),
                    "--json", str(out / f"convergence_{family}.json")]
        return command

    stages = [
        Stage("data", (), ("data",), function=write_data, about=f"toy dataset (10 shape classes, {image_size} px)"),
        Stage("vae", ("data",), ("vae",), lambda: [
            py, "-m", "demo.train_vae", "--data_path", str(data), "--output", str(vae), "--steps", str(cfg.vae_steps),
            "--batch_size", str(cfg.vae_batch), "--width", str(cfg.vae_width), "--seed", str(cfg.data_seed)],
            about="tiny AutoencoderKL + latent scale", exclusive=True),
        Stage("cache_train", ("vae",), ("cache/train",), cache("train", cache_train), about="latent cache (train)"),
        Stage("cache_val", ("vae",), ("cache/val",), cache("val", cache_val), about="latent cache (val)"),
    ]
    for seed in cfg.seed_list:
        folder = f"seed{seed}"
        stages.append(Stage(f"pretrain_s{seed}", ("cache_train",), (f"{folder}/pretrain",), pretrain(seed),
                            about=f"USP masked latent modeling, seed {seed}"))
        for run in RUNS:
            needs = (f"pretrain_s{seed}",) if run.endswith("usp") else ("cache_train",)
            stages.append(Stage(f"{run}_s{seed}", needs, (f"{folder}/gen/{run}",), generator(run, seed),
                                about=f"{run.replace('_', ' from ')}, seed {seed}"))
        for init in ("usp", "random"):
            needs = (f"pretrain_s{seed}",) if init == "usp" else ("cache_train",)
            stages.append(Stage(f"probe_{init}_s{seed}", needs, (f"{folder}/probe/{init}",), probe(init, seed),
                                about=f"linear probe, {'USP' if init == 'usp' else 'random'} encoder, seed {seed}"))
        stages.append(Stage(f"heldout_s{seed}", (*(f"{run}_s{seed}" for run in RUNS), "cache_val"),
                            (f"{folder}/heldout",), heldout(seed), about=f"held-out loss curves, seed {seed}"))
    stages += [
        Stage("recon", (f"pretrain_s{first}",), ("recon",), recon, about="reconstruction grid"),
        Stage("classifier", ("vae",), ("toy_classifier",), lambda: [
            py, "-m", "demo.toy_classifier", "--data_path", str(data), "--vae_path", str(vae),
            "--output", str(out / "toy_classifier"),
            "--epochs", str(cfg.classifier_epochs), "--seed", str(cfg.data_seed)], about="toy metric classifier"),
    ]
    for family in FAMILY_NAMES:
        stages.append(Stage(f"convergence_{family}", tuple(f"heldout_s{seed}" for seed in cfg.seed_list),
                            (f"convergence_{family}.png", f"convergence_{family}.json"), convergence(family),
                            about=f"convergence speed-up, {FAMILY_NAMES[family]}"))
    for run in RUNS:
        stages.append(Stage(f"samples_{run}", (f"{run}_s{first}",), (f"samples/{run}", f"samples/{run}.npz"),
                            samples(run), about=f"samples, {run}, seed {first}"))
    stages.append(Stage("toy_metrics", ("classifier", "vae", *(f"samples_{r}" for r in RUNS)),
                        ("toy_metrics.json",), lambda: [
                            py, "-m", "demo.toy_metrics", "--data_path", str(data),
                            "--classifier", str(out / "toy_classifier"), "--vae_path", str(vae),
                            "--samples", *[str(out / "samples" / f"{r}.npz") for r in RUNS],
                            "--output", str(out / "toy_metrics.json")], about="toy quality metrics"))
    if inception_weights:
        stages.append(Stage("fid_reference", ("data",), ("fid/reference.npz",), lambda: [
            py, "scripts/make_reference_batch.py", "--data-path", str(data / "val"), "--image-size", image_size,
            "--inception-weights", inception_weights, "--output", str(out / "fid" / "reference.npz"),
            "--device", "cpu", "--num-workers", "0"], about="Inception reference batch (val)"))
        for run in RUNS:
            stages.append(Stage(f"fid_{run}", ("fid_reference", f"samples_{run}"), (f"fid/{run}.json",), lambda run=run: [
                py, "-m", "generation.evaluate", str(out / "fid" / "reference.npz"), str(out / "samples" / f"{run}.npz"),
                "--inception-weights", inception_weights, "--device", "cpu",
                "--output-json", str(out / "fid" / f"{run}.json")], about=f"FID/IS, {run}"))
    stages.append(Stage("report", tuple(s.name for s in stages), ("report.md", "loss_curves.png", "samples.png"),
                        lambda: [py, "-m", "demo.report", "--out", str(out)], about="report.md and plots"))
    return stages
