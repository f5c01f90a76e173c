"""The demo's budget (the full and the --fast configuration) and its stages: what each runs, needs and writes.

  data -> vae -> cache_train, cache_val; for every seed s (USP and scratch differ only in `--finetune`):
  pretrain_s<s> -> {dit,sit}_{usp,scratch}_s<s>, probe_{usp,random}_s<s> -> heldout_s<s> -> convergence_<family>;
  on the first seed's models: recon, samples_<run> -> toy_metrics, [--inception-weights] fid_*; all -> report.

Generators train at lr 2e-3 (4x DiT's 5e-4) so that Adam opens the zero-initialised adaLN gates, through which
the USP weights act, sooner; the settings were chosen on a split the report never measures (`--set data_seed=10
--first-seed 100`). All networks share one tiny shape, so the USP encoder fits the probed ViT and the DiT/SiT.
"""
import json
import math
import re
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Optional

from demo.toy_dataset import write_toy_dataset
from util.errors import UserError

NUM_CLASSES = 10
VAE_VERSION = "d8"
PATCH_SIZE = 1
MAE_DECODER = dict(decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4)
MAE_MODEL = "vit_base_patch_vae"          # USP's latent MAE preset (d8)
VIT_MODEL = "vit_base_patch16_vae"        # the classifier preset the probe uses
GENERATORS = {"dit": "DiT-B/2-VAE-simple", "sit": "SiT-B/2-VAE-simple"}  # affine norms: MAE norms load
FAMILY_NAMES = {"dit": "DiT", "sit": "SiT"}
RUNS = ("dit_usp", "dit_scratch", "sit_usp", "sit_scratch")


FULL = dict(  # sized for about 10 minutes on 2 quiet CPU cores
    name="full", data_seed=0,  # the dataset, VAE and toy classifier (the val split is drawn from data_seed + 1)
    seeds=3, first_seed=0,  # paired seeds of pretraining, probes and generators: first_seed, first_seed + 1, ...
    train_per_class=300, val_per_class=50, image_size=32, vae_steps=400, vae_batch=8, vae_width=16,
    classifier_epochs=1, embed_dim=128, depth=4, num_heads=4, pretrain_steps=600, pretrain_batch=64,
    pretrain_lr=1e-3,  # MAE's blr 1.5e-4 is scaled for batch 4096; a 64-batch toy run takes 1e-3
    probe_epochs=5, probe_batch=256,
    probe_blr=20.0,  # LARS moves the head by ~lr x 0.001 of its norm per step: MAE's 0.1 needs its ~100K steps
    gen_steps=300, gen_batch=16, gen_lr=2e-3, ema_decay=0.99,
    gen_checkpoints=6, heldout_repeats=1,  # held-out loss at 6 evenly spaced checkpoints, 1 (t, noise) per latent
    num_samples=100, sampling_steps=25,  # generated images per model for the toy metrics (first seed only)
)
FAST = {**FULL, "name": "fast", "seeds": 2, "train_per_class": 24, "val_per_class": 8, "vae_steps": 6,
        "vae_batch": 16, "vae_width": 8, "pretrain_steps": 6, "pretrain_batch": 32, "probe_epochs": 1,
        "probe_batch": 64, "gen_steps": 6, "gen_batch": 32, "gen_checkpoints": 2, "gen_lr": 5e-4,
        "ema_decay": 0.9, "num_samples": 20, "sampling_steps": 5}  # every stage, a few steps each (the tests)


def make_config(base: dict, assignments: list) -> SimpleNamespace:
    """`base` with `KEY=VALUE` strings applied (parsed as the value's type), plus the derived `seed_list`."""
    cfg = dict(base)
    for assignment in assignments:
        key, _, value = assignment.partition("=")
        if key not in base or key == "name" or not value:
            raise UserError(f"--set {assignment}: expected KEY=VALUE with KEY one of "
                             f"{', '.join(k for k in base if k != 'name')}.")
        try:
            cfg[key] = type(base[key])(value)
        except ValueError:
            raise UserError(f"--set {assignment}: {value!r} is not a valid {type(base[key]).__name__}.") from None
    if cfg["seeds"] < 1:
        raise UserError(f"--seeds {cfg['seeds']}: need at least 1 (2 or more for an interval).")
    return SimpleNamespace(**cfg, seed_list=list(range(cfg["first_seed"], cfg["first_seed"] + cfg["seeds"])))


def encoder_kwargs(cfg) -> dict:
    """The USP encoder's and the probed ViT's shape (the MAE adds MAE_DECODER)."""
    return dict(embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads, patch_size=PATCH_SIZE)


def generator_kwargs(cfg) -> dict:
    return dict(hidden_size=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads, patch_size=PATCH_SIZE)


@dataclass
class Stage:
    """One step: `command()` -> [python, *argv] (or `function()`: the dataset); `outputs` are deleted first."""

    name: str
    needs: tuple
    outputs: tuple
    command: Optional[Callable[[], list]] = None
    function: Optional[Callable[[], None]] = None


def seed_dir(out: Path, seed: int) -> Path:
    return out / f"seed{seed}"


def newest(directory: Path, pattern: str) -> Path:
    """The file matching `pattern` under `directory` with the highest numbers in its name."""
    found = sorted(directory.glob(pattern), key=lambda p: [int(part) for part in re.findall(r"\d+", p.name) or [0]])
    if not found:
        raise FileNotFoundError(f"no {pattern} under {directory}; rerun the stage that writes it (--redo).")
    return found[-1]


class Commands:
    """The command line of every stage, built when the stage starts (so it can name a file an earlier stage wrote)."""

    def __init__(self, out: Path, cfg: SimpleNamespace, inception_weights: Optional[str]):
        self.out, self.cfg, self.inception_weights = out, cfg, inception_weights
        self.py = sys.executable
        self.data, self.vae = out / "data", out / "vae"
        self.cache_train, self.cache_val = out / "cache" / "train", out / "cache" / "val"
        self.size = str(cfg.image_size)
        self.vae_flags = ["--vae_version", VAE_VERSION, "--vae_path", str(self.vae), "--input_size", self.size]
        self.cpu = ["--device", "cpu", "--precision", "fp32"]
        self.first = cfg.seed_list[0]
        self.pretrain_epochs = math.ceil(cfg.pretrain_steps / (NUM_CLASSES * cfg.train_per_class // cfg.pretrain_batch))
        self.ckpt_every = max(1, cfg.gen_steps // cfg.gen_checkpoints)

    def write_data(self) -> None:
        cfg = self.cfg
        write_toy_dataset(self.data, NUM_CLASSES, cfg.train_per_class, cfg.val_per_class, cfg.image_size, cfg.data_seed)

    def train_vae(self) -> list:
        cfg = self.cfg
        return [self.py, "-m", "demo.train_vae", "--data_path", str(self.data), "--output", str(self.vae),
                "--steps", str(cfg.vae_steps), "--batch_size", str(cfg.vae_batch), "--width", str(cfg.vae_width),
                "--seed", str(cfg.data_seed)]

    def cache(self, split: str) -> list:
        return [self.py, "-m", "pretrain.cache_latents", "--data_path", str(self.data / split),
                "--cached_path", str(self.out / "cache" / split), *self.vae_flags, "--batch_size", "250",
                "--shard_size", "4096", "--num_workers", "0", "--device", "cpu"]

    def pretrain(self, seed: int) -> list:
        cfg, epochs, folder = self.cfg, self.pretrain_epochs, str(seed_dir(self.out, seed) / "pretrain")
        return [self.py, "-m", "pretrain.main_pretrain", "--model", MAE_MODEL,
                "--model_kwargs", json.dumps({**encoder_kwargs(cfg), **MAE_DECODER}), *self.vae_flags, "--use_cached",
                "--cached_path", str(self.cache_train), "--data_path", str(self.data),
                "--batch_size", str(cfg.pretrain_batch), "--epochs", str(epochs),
                "--max_steps", str(cfg.pretrain_steps), "--warmup_epochs", str(max(1, epochs // 10)),
                "--lr", str(cfg.pretrain_lr), "--weight_decay", "0.05", "--mask_ratio", "0.75",
                "--output_dir", folder, "--log_dir", folder, "--save_every", str(epochs), "--log_every", "10",
                *self.cpu, "--num_workers", "0", "--seed", str(seed)]

    def usp_checkpoint(self, seed: int) -> str:
        return str(newest(seed_dir(self.out, seed) / "pretrain", "checkpoint-*.pth"))

    def finetune(self, init: str, seed: int) -> list:
        return ["--finetune", self.usp_checkpoint(seed)] if init == "usp" else []

    def recon(self) -> list:
        return [self.py, "-m", "pretrain.main_generate", "--checkpoint", self.usp_checkpoint(self.first),
                "--data_path", str(self.data), "--vae_path", str(self.vae), "--num_images", "10",
                "--output", str(self.out / "recon" / "reconstruction.png"), "--device", "cpu"]

    def probe(self, init: str, seed: int) -> list:
        cfg, target = self.cfg, str(seed_dir(self.out, seed) / "probe" / init)
        return [self.py, "-m", "pretrain.main_linprobe", "--model", VIT_MODEL,
                "--model_kwargs", json.dumps(encoder_kwargs(cfg)), *self.vae_flags, "--cls_token",
                *self.finetune(init, seed), "--use_cached", "--cached_path", str(self.cache_train),
                "--data_path", str(self.data), "--nb_classes", str(NUM_CLASSES), "--batch_size", str(cfg.probe_batch),
                "--epochs", str(cfg.probe_epochs), "--warmup_epochs", "1",
                "--eval_freq", str(cfg.probe_epochs),  # the report reads the final top-1 only
                "--blr", str(cfg.probe_blr), "--weight_decay", "0.0", "--output_dir", target, "--log_dir", target,
                *self.cpu, "--num_workers", "0", "--seed", str(seed), "--log_every", "5"]

    def model_flags(self, family: str) -> list:
        return ["--model", GENERATORS[family], "--model-kwargs", json.dumps(generator_kwargs(self.cfg)),
                "--image-size", self.size, "--num-classes", str(NUM_CLASSES), "--vae-version", VAE_VERSION,
                "--vae-path", str(self.vae)]

    def generator(self, run: str, seed: int) -> list:
        cfg = self.cfg
        family, init = run.split("_")
        return [self.py, "-m", "generation.train", *self.model_flags(family),
                "--cached-path", str(self.cache_train), "--results-dir", str(seed_dir(self.out, seed) / "gen" / run),
                "--exp-name", init, *self.finetune(init, seed), "--global-batch-size", str(cfg.gen_batch),
                "--max-steps", str(cfg.gen_steps), "--epochs", "100000", "--ckpt-every", str(self.ckpt_every),
                # previews only for the first seed: the grids are pictures, not measurements
                "--eval-every", str(cfg.gen_steps if seed == self.first else 0),
                "--log-every", str(max(1, self.ckpt_every // 4)), "--eval-images", "20", "--cfg-scale", "1.0",
                "--num-sampling-steps", str(cfg.sampling_steps), "--lr", str(cfg.gen_lr),
                "--ema-decay", str(cfg.ema_decay), "--milestone-every", "0", "--keep-last", "0",
                "--global-seed", str(seed), *self.cpu, "--num-workers", "0"]

    def heldout(self, seed: int) -> list:
        # The (t, noise) draws change with the seed, so the interval over seeds includes the evaluation's noise.
        folder = seed_dir(self.out, seed)
        experiments = sum((["--experiment", str(folder / "gen" / run)] for run in RUNS), [])
        return [self.py, "-m", "demo.heldout_loss", *experiments, "--output_dir", str(folder / "heldout"),
                "--cached_path", str(self.cache_val), "--repeats", str(self.cfg.heldout_repeats),
                "--seed", str(1234 + seed)]

    def convergence(self, family: str) -> list:
        runs = [f"--run=s{seed}/{init}={seed_dir(self.out, seed) / 'heldout' / f'{family}_{init}.jsonl'}"
                for seed in self.cfg.seed_list for init in ("usp", "scratch")]
        return [self.py, "scripts/plot_convergence.py", *runs, "--metric", "heldout_loss", "--reference", "scratch",
                "--title", f"{FAMILY_NAMES[family]}: held-out loss",
                "--output", str(self.out / f"convergence_{family}.png"),
                "--json", str(self.out / f"convergence_{family}.json")]

    def samples(self, run: str) -> list:
        cfg, family = self.cfg, run.split("_")[0]
        sampler = ["--sampler", "ddpm"] if family == "dit" else ["--mode", "ODE", "--sampling-method", "euler"]
        checkpoint = newest(seed_dir(self.out, self.first) / "gen" / run, "*/checkpoints/*.pt")
        return [self.py, "-m", "generation.sample_ddp", *self.model_flags(family), "--ckpt", str(checkpoint),
                *sampler, "--sample-dir", str(self.out / "samples" / run), "--num-fid-samples", str(cfg.num_samples),
                "--per-proc-batch-size", str(min(cfg.num_samples, 250)), "--cfg-scale", "1.0",
                "--num-sampling-steps", str(cfg.sampling_steps), "--global-seed", str(self.first),
                *self.cpu, "--npz-workers", "2"]

    def toy_metrics(self) -> list:
        return [self.py, "-m", "demo.toy_metrics", "--data_path", str(self.data), "--vae_path", str(self.vae),
                "--samples", *[str(self.out / "samples" / f"{run}.npz") for run in RUNS],
                "--epochs", str(self.cfg.classifier_epochs), "--seed", str(self.cfg.data_seed),
                "--output", str(self.out / "toy_metrics.json")]

    def fid_reference(self) -> list:
        return [self.py, "scripts/make_reference_batch.py", "--data-path", str(self.data / "val"),
                "--image-size", self.size, "--inception-weights", self.inception_weights,
                "--output", str(self.out / "fid" / "reference.npz"), "--device", "cpu", "--num-workers", "0"]

    def fid(self, run: str) -> list:
        return [self.py, "-m", "generation.evaluate", str(self.out / "fid" / "reference.npz"),
                str(self.out / "samples" / f"{run}.npz"), "--inception-weights", self.inception_weights,
                "--device", "cpu", "--output-json", str(self.out / "fid" / f"{run}.json")]

    def report(self) -> list:
        return [self.py, "-m", "demo.report", "--out", str(self.out)]


def build_stages(out: Path, cfg: SimpleNamespace, inception_weights: Optional[str] = None) -> list:
    """The stage table, in dependency order (the order they run in)."""
    c, first = Commands(out, cfg, inception_weights), cfg.seed_list[0]
    stages = [Stage("data", (), ("data",), function=c.write_data),
              Stage("vae", ("data",), ("vae",), c.train_vae),
              Stage("cache_train", ("vae",), ("cache/train",), partial(c.cache, "train")),
              Stage("cache_val", ("vae",), ("cache/val",), partial(c.cache, "val"))]
    for seed in cfg.seed_list:
        pretrain, folder = f"pretrain_s{seed}", f"seed{seed}"
        stages.append(Stage(pretrain, ("cache_train",), (f"{folder}/pretrain",), partial(c.pretrain, seed)))
        for run in RUNS:
            needs = (pretrain,) if run.endswith("usp") else ("cache_train",)
            stages.append(Stage(f"{run}_s{seed}", needs, (f"{folder}/gen/{run}",), partial(c.generator, run, seed)))
        for init in ("usp", "random"):
            needs = (pretrain,) if init == "usp" else ("cache_train",)
            stages.append(Stage(f"probe_{init}_s{seed}", needs, (f"{folder}/probe/{init}",),
                                partial(c.probe, init, seed)))
        stages.append(Stage(f"heldout_s{seed}", (*(f"{run}_s{seed}" for run in RUNS), "cache_val"),
                            (f"{folder}/heldout",), partial(c.heldout, seed)))
    stages.append(Stage("recon", (f"pretrain_s{first}",), ("recon",), c.recon))
    stages += [Stage(f"convergence_{family}", tuple(f"heldout_s{seed}" for seed in cfg.seed_list),
                     (f"convergence_{family}.png", f"convergence_{family}.json"), partial(c.convergence, family))
               for family in FAMILY_NAMES]
    stages += [Stage(f"samples_{run}", (f"{run}_s{first}",), (f"samples/{run}", f"samples/{run}.npz"),
                     partial(c.samples, run)) for run in RUNS]
    stages.append(Stage("toy_metrics", ("vae", *(f"samples_{run}" for run in RUNS)), ("toy_metrics.json",),
                        c.toy_metrics))
    if inception_weights:
        stages.append(Stage("fid_reference", ("data",), ("fid/reference.npz",), c.fid_reference))
        stages += [Stage(f"fid_{run}", ("fid_reference", f"samples_{run}"), (f"fid/{run}.json",), partial(c.fid, run))
                   for run in RUNS]
    stages.append(Stage("report", tuple(stage.name for stage in stages), ("report.md", "loss_curves.png",
                                                                         "samples.png"), c.report))
    return stages
