"""The demo pipeline as a table of stages: what each runs, what it needs, where it writes.

Every stage but the first runs a real entry point exactly as a user would type it (`python -m
pretrain.main_pretrain ...`, which demo/run_demo.py runs in its own process; each stage's log starts with the
command); the commands are built when the stage starts, so a stage can point at a file an earlier stage
produced (e.g. the newest pretraining checkpoint).

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
from functools import partial
from pathlib import Path
from typing import Callable, Optional

from demo import config as C

RUNS = ("dit_usp", "dit_scratch", "sit_usp", "sit_scratch")
FAMILY_NAMES = {"dit": "DiT", "sit": "SiT"}


@dataclass
class Stage:
    """One step of the demo.

    command: () -> [python, *argv] (an entry point's command line), or None when `function` is the stage.
    outputs: paths (relative to the output folder) deleted before the stage (re)runs.
    """

    name: str
    needs: tuple
    outputs: tuple
    command: Optional[Callable[[], list]] = None
    function: Optional[Callable[[], None]] = None
    about: str = ""


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


class Commands:
    """The command line of every stage, built when the stage starts, so it can name a file an earlier stage
    wrote (e.g. the newest pretraining checkpoint)."""

    def __init__(self, out: Path, cfg: C.DemoConfig, inception_weights: Optional[str]):
        self.out, self.cfg, self.inception_weights = out, cfg, inception_weights
        self.py = sys.executable
        self.data, self.vae = out / "data", out / "vae"
        self.cache_train, self.cache_val = out / "cache" / "train", out / "cache" / "val"
        self.image_size = str(cfg.image_size)
        self.vae_flags = ["--vae_version", C.VAE_VERSION, "--vae_path", str(self.vae), "--input_size", self.image_size]
        self.first = cfg.seed_list[0]
        self.pretrain_epochs = math.ceil(cfg.pretrain_steps / (C.NUM_CLASSES * cfg.train_per_class // cfg.pretrain_batch))
        self.ckpt_every = max(1, cfg.gen_steps // cfg.gen_checkpoints)

    def write_data(self) -> None:
        from demo.toy_dataset import write_toy_dataset

        cfg = self.cfg
        write_toy_dataset(self.data, C.NUM_CLASSES, cfg.train_per_class, cfg.val_per_class, cfg.image_size,
                          cfg.data_seed)

    def train_vae(self) -> list:
        cfg = self.cfg
        return [self.py, "-m", "demo.train_vae", "--data_path", str(self.data), "--output", str(self.vae),
                "--steps", str(cfg.vae_steps), "--batch_size", str(cfg.vae_batch), "--width", str(cfg.vae_width),
                "--seed", str(cfg.data_seed)]

    def cache(self, split: str, target: Path) -> list:
        return [self.py, "-m", "pretrain.cache_latents", "--data_path", str(self.data / split),
                "--cached_path", str(target), *self.vae_flags, "--batch_size", "250", "--shard_size", "4096",
                "--num_workers", "0", "--device", "cpu"]

    def pretrain(self, seed: int) -> list:
        cfg, epochs, folder = self.cfg, self.pretrain_epochs, str(seed_dir(self.out, seed) / "pretrain")
        return [self.py, "-m", "pretrain.main_pretrain", "--model", C.MAE_MODEL,
                "--model_kwargs", json.dumps(C.mae_kwargs(cfg)), *self.vae_flags, "--use_cached",
                "--cached_path", str(self.cache_train), "--data_path", str(self.data),
                "--batch_size", str(cfg.pretrain_batch), "--epochs", str(epochs),
                "--max_steps", str(cfg.pretrain_steps), "--warmup_epochs", str(max(1, epochs // 10)),
                "--lr", str(cfg.pretrain_lr), "--weight_decay", "0.05", "--mask_ratio", "0.75",
                "--output_dir", folder, "--log_dir", folder, "--save_every", str(epochs), "--log_every", "10",
                "--device", "cpu", "--precision", "fp32", "--num_workers", "0", "--seed", str(seed)]

    def usp_checkpoint(self, seed: int) -> str:
        return str(newest(seed_dir(self.out, seed) / "pretrain", "checkpoint-*.pth"))

    def recon(self) -> list:
        return [self.py, "-m", "pretrain.main_generate", "--checkpoint", self.usp_checkpoint(self.first),
                "--data_path", str(self.data), "--vae_path", str(self.vae), "--num_images", "10",
                "--output", str(self.out / "recon" / "reconstruction.png"), "--device", "cpu"]

    def probe(self, init: str, seed: int) -> list:
        cfg = self.cfg
        finetune = ["--finetune", self.usp_checkpoint(seed)] if init == "usp" else []
        target = str(seed_dir(self.out, seed) / "probe" / init)
        return [self.py, "-m", "pretrain.main_linprobe", "--model", C.VIT_MODEL,
                "--model_kwargs", json.dumps(C.vit_kwargs(cfg)), *self.vae_flags, "--cls_token", *finetune,
                "--use_cached", "--cached_path", str(self.cache_train), "--data_path", str(self.data),
                "--nb_classes", str(C.NUM_CLASSES), "--batch_size", str(cfg.probe_batch),
                "--epochs", str(cfg.probe_epochs), "--warmup_epochs", "1",
                "--eval_freq", str(cfg.probe_epochs),  # the report reads the final top-1 only
                "--blr", str(cfg.probe_blr), "--weight_decay", "0.0", "--output_dir", target, "--log_dir", target,
                "--device", "cpu", "--precision", "fp32", "--num_workers", "0", "--seed", str(seed),
                "--log_every", "5"]

    def generator(self, run: str, seed: int) -> list:
        cfg = self.cfg
        family, init = run.split("_")
        finetune = ["--finetune", self.usp_checkpoint(seed)] if init == "usp" else []
        return [self.py, "-m", "generation.train", "--model", C.GENERATORS[family],
                "--model-kwargs", json.dumps(C.generator_kwargs(cfg)), "--image-size", self.image_size,
                "--num-classes", str(C.NUM_CLASSES), "--vae-version", C.VAE_VERSION, "--vae-path", str(self.vae),
                "--cached-path", str(self.cache_train), "--results-dir", str(seed_dir(self.out, seed) / "gen" / run),
                "--exp-name", init, *finetune, "--global-batch-size", str(cfg.gen_batch),
                "--max-steps", str(cfg.gen_steps), "--epochs", "100000", "--ckpt-every", str(self.ckpt_every),
                # previews only for the first seed: the grids are pictures, not measurements
                "--eval-every", str(cfg.gen_steps if seed == self.first else 0),
                "--log-every", str(max(1, self.ckpt_every // 4)), "--eval-images", "20", "--cfg-scale", "1.0",
                "--num-sampling-steps", str(cfg.sampling_steps), "--lr", str(cfg.gen_lr),
                "--ema-decay", str(cfg.ema_decay), "--milestone-every", "0", "--keep-last", "0",
                "--global-seed", str(seed), "--device", "cpu", "--precision", "fp32", "--num-workers", "0"]

    def heldout(self, seed: int) -> list:
        # The (t, noise) draws change with the seed, so the interval over seeds includes the evaluation's noise.
        folder = seed_dir(self.out, seed)
        pairs = [["--experiment", str(folder / "gen" / run), "--output", str(folder / "heldout" / f"{run}.json")]
                 for run in RUNS]
        return [self.py, "-m", "demo.heldout_loss", *sum(pairs, []), "--cached_path", str(self.cache_val),
                "--repeats", str(self.cfg.heldout_repeats), "--seed", str(1234 + seed)]

    def samples(self, run: str) -> list:
        cfg = self.cfg
        family = run.split("_")[0]
        sampler = ["--sampler", "ddpm"] if family == "dit" else ["--mode", "ODE", "--sampling-method", "euler"]
        checkpoint = newest(seed_dir(self.out, self.first) / "gen" / run, "*/checkpoints/*.pt")
        return [self.py, "-m", "generation.sample_ddp", "--model", C.GENERATORS[family], "--ckpt", str(checkpoint),
                "--model-kwargs", json.dumps(C.generator_kwargs(cfg)), "--image-size", self.image_size,
                "--num-classes", str(C.NUM_CLASSES), "--vae-version", C.VAE_VERSION, "--vae-path", str(self.vae),
                *sampler, "--sample-dir", str(self.out / "samples" / run), "--num-fid-samples", str(cfg.num_samples),
                "--per-proc-batch-size", str(min(cfg.num_samples, 250)), "--cfg-scale", "1.0",
                "--num-sampling-steps", str(cfg.sampling_steps), "--global-seed", str(self.first),
                "--device", "cpu", "--precision", "fp32", "--npz-workers", "2"]

    def convergence(self, family: str) -> list:
        runs = [f"--run=s{seed}/{init}={seed_dir(self.out, seed) / 'heldout' / f'{family}_{init}.jsonl'}"
                for seed in self.cfg.seed_list for init in ("usp", "scratch")]
        return [self.py, "scripts/plot_convergence.py", *runs, "--metric", "heldout_loss", "--reference", "scratch",
                "--title", f"{FAMILY_NAMES[family]}: held-out loss",
                "--output", str(self.out / f"convergence_{family}.png"),
                "--json", str(self.out / f"convergence_{family}.json")]

    def classifier(self) -> list:
        return [self.py, "-m", "demo.toy_classifier", "--data_path", str(self.data), "--vae_path", str(self.vae),
                "--output", str(self.out / "toy_classifier"), "--epochs", str(self.cfg.classifier_epochs),
                "--seed", str(self.cfg.data_seed)]

    def toy_metrics(self) -> list:
        return [self.py, "-m", "demo.toy_metrics", "--data_path", str(self.data),
                "--classifier", str(self.out / "toy_classifier"), "--vae_path", str(self.vae),
                "--samples", *[str(self.out / "samples" / f"{run}.npz") for run in RUNS],
                "--output", str(self.out / "toy_metrics.json")]

    def fid_reference(self) -> list:
        return [self.py, "scripts/make_reference_batch.py", "--data-path", str(self.data / "val"),
                "--image-size", self.image_size, "--inception-weights", self.inception_weights,
                "--output", str(self.out / "fid" / "reference.npz"), "--device", "cpu", "--num-workers", "0"]

    def fid(self, run: str) -> list:
        return [self.py, "-m", "generation.evaluate", str(self.out / "fid" / "reference.npz"),
                str(self.out / "samples" / f"{run}.npz"), "--inception-weights", self.inception_weights,
                "--device", "cpu", "--output-json", str(self.out / "fid" / f"{run}.json")]

    def report(self) -> list:
        return [self.py, "-m", "demo.report", "--out", str(self.out)]


def build_stages(out: Path, cfg: C.DemoConfig, inception_weights: Optional[str] = None) -> list:
    """The ordered stage table; the order is also the scheduler's priority among ready stages."""
    c = Commands(out, cfg, inception_weights)
    first = c.first
    stages = [
        Stage("data", (), ("data",), function=c.write_data,
              about=f"toy dataset (10 shape classes, {cfg.image_size} px)"),
        Stage("vae", ("data",), ("vae",), c.train_vae, about="tiny AutoencoderKL + latent scale"),
        Stage("cache_train", ("vae",), ("cache/train",), partial(c.cache, "train", c.cache_train),
              about="latent cache (train)"),
        Stage("cache_val", ("vae",), ("cache/val",), partial(c.cache, "val", c.cache_val), about="latent cache (val)"),
    ]
    for seed in cfg.seed_list:
        folder = f"seed{seed}"
        stages.append(Stage(f"pretrain_s{seed}", ("cache_train",), (f"{folder}/pretrain",), partial(c.pretrain, seed),
                            about=f"USP masked latent modeling, seed {seed}"))
        for run in RUNS:
            needs = (f"pretrain_s{seed}",) if run.endswith("usp") else ("cache_train",)
            stages.append(Stage(f"{run}_s{seed}", needs, (f"{folder}/gen/{run}",), partial(c.generator, run, seed),
                                about=f"{run.replace('_', ' from ')}, seed {seed}"))
        for init in ("usp", "random"):
            needs = (f"pretrain_s{seed}",) if init == "usp" else ("cache_train",)
            stages.append(Stage(f"probe_{init}_s{seed}", needs, (f"{folder}/probe/{init}",), partial(c.probe, init, seed),
                                about=f"linear probe, {'USP' if init == 'usp' else 'random'} encoder, seed {seed}"))
        stages.append(Stage(f"heldout_s{seed}", (*(f"{run}_s{seed}" for run in RUNS), "cache_val"),
                            (f"{folder}/heldout",), partial(c.heldout, seed), about=f"held-out loss curves, seed {seed}"))
    stages += [
        Stage("recon", (f"pretrain_s{first}",), ("recon",), c.recon, about="reconstruction grid"),
        Stage("classifier", ("vae",), ("toy_classifier",), c.classifier, about="toy metric classifier"),
    ]
    for family in FAMILY_NAMES:
        stages.append(Stage(f"convergence_{family}", tuple(f"heldout_s{seed}" for seed in cfg.seed_list),
                            (f"convergence_{family}.png", f"convergence_{family}.json"), partial(c.convergence, family),
                            about=f"convergence speed-up, {FAMILY_NAMES[family]}"))
    for run in RUNS:
        stages.append(Stage(f"samples_{run}", (f"{run}_s{first}",), (f"samples/{run}", f"samples/{run}.npz"),
                            partial(c.samples, run), about=f"samples, {run}, seed {first}"))
    stages.append(Stage("toy_metrics", ("classifier", "vae", *(f"samples_{run}" for run in RUNS)),
                        ("toy_metrics.json",), c.toy_metrics, about="toy quality metrics"))
    if inception_weights:
        stages.append(Stage("fid_reference", ("data",), ("fid/reference.npz",), c.fid_reference,
                            about="Inception reference batch (val)"))
        stages += [Stage(f"fid_{run}", ("fid_reference", f"samples_{run}"), (f"fid/{run}.json",), partial(c.fid, run),
                         about=f"FID/IS, {run}") for run in RUNS]
    stages.append(Stage("report", tuple(stage.name for stage in stages), ("report.md", "loss_curves.png", "samples.png"),
                        c.report, about="report.md and plots"))
    return stages
