"""The trainer's evaluation hooks, run every --eval-every steps with the EMA weights (generation/train.py).

- `SampleGridHook`: a fixed-noise preview grid `<sample_dir>/<step>.png` (rank 0).
- `FIDEvalHook` / `fid_eval_hook(args, ...)`: --num-fid-samples images on all ranks into an ADM npz, scored
  with generation/evaluate.py when a reference batch and Inception weights are given; every number the
  evaluator returns goes to the log, so a new metric is added in the evaluator only.
Each hook is `hook(ema, step) -> dict` of metrics for the log, called on every rank, and `hook.finished(step)`:
whether that step's outputs exist (a resumed run redoes an evaluation a stop cut short) (`EvalHook`);
`build_eval_hooks(args, ...)` makes the trainer's list.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Protocol, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from torchvision.utils import save_image

from generation.objectives import Objective
from generation.sampling import (Guidance, ImageGenerator, create_npz_from_sample_folder, diffusion_sampler,
                                 sample_to_folder, transport_sampler)
from models.latent_spec import get_latent_spec
from util.distributed import barrier, is_dist
from util.precision import autocast


class EvalHook(Protocol):
    """Called on every rank with the EMA model at evaluation steps; returns metrics to log (rank 0's count).

    A hook that only writes files does its work on rank 0 and returns {} elsewhere; a distributed hook
    (e.g. FID over samples drawn on all ranks) may use collectives, since every rank calls it.
    """

    def __call__(self, ema: nn.Module, step: int) -> dict: ...

    def finished(self, step: int) -> bool: ...


class SampleGridHook:
    """Samples a few images with the EMA weights and writes `<sample_dir>/<step>.png` (rank 0 only).

    The noise and labels are fixed (drawn once from `seed`), so grids from different steps show how
    the same samples evolve. Returns {"eval_seconds": ...} for the log.
    """

    def __init__(self, objective: Objective, codec: nn.Module, sample_dir: Path, latent_shape: Sequence[int],
                 num_images: int, num_classes: int, cfg_scale: float, num_steps: int, seed: int,
                 device: torch.device, precision: str, is_main: bool):
        self.objective = objective
        self.codec = codec
        self.sample_dir = Path(sample_dir)
        self.cfg_scale = cfg_scale
        self.num_steps = num_steps
        self.device = device
        self.precision = precision
        self.is_main = is_main
        generator = torch.Generator().manual_seed(seed)
        self.z = torch.randn((num_images, *latent_shape), generator=generator)  # (n, C, h, w)
        self.y = torch.arange(num_images) % num_classes  # (n,): cycle through the classes

    def finished(self, step: int) -> bool:
        return (self.sample_dir / f"{step:07d}.png").is_file()

    def _wrap(self, fn):
        def wrapped(*args, **kwargs):
            with autocast(self.device, self.precision):
                return fn(*args, **kwargs).float()
        return wrapped

    @torch.no_grad()
    def __call__(self, ema: nn.Module, step: int) -> dict:
        if not self.is_main:
            return {}
        start = time.perf_counter()
        latents = self.objective.sample(ema, self.z.to(self.device), self.y.to(self.device), self.cfg_scale,
                                        self.num_steps, wrap=self._wrap)
        images = self.codec.decode(latents)  # (n, 3, H, W) in [-1, 1]
        self.sample_dir.mkdir(parents=True, exist_ok=True)
        path = self.sample_dir / f"{step:07d}.png"
        tmp = path.with_name(f".{path.name}.tmp")
        save_image(images, tmp, format="png", nrow=min(8, len(images)), normalize=True, value_range=(-1, 1))
        os.replace(tmp, path)  # a reader never sees a half-written grid
        return {"eval_seconds": time.perf_counter() - start}


def total_throughput(images: int, seconds: float, device) -> tuple[int, float, float]:
    """(images written by all ranks, the slowest rank's seconds, images/s over that wall time)."""
    count = torch.tensor([float(images)], device=device, dtype=torch.float64)
    wall = torch.tensor([float(seconds)], device=device, dtype=torch.float64)
    if is_dist():
        dist.all_reduce(count, op=dist.ReduceOp.SUM)
        dist.all_reduce(wall, op=dist.ReduceOp.MAX)
    total, wall_seconds = int(count.item()), float(wall.item())
    return total, wall_seconds, total / max(wall_seconds, 1e-9)


class FIDEvalHook:
    """Draws `num_samples` EMA images on every rank into `<sample_dir>/fid-<step>.npz` and, when a reference
    batch and Inception weights are configured, returns ADM's metrics (rank 0) for the training log.

    The sampler is USP's training-time evaluation (DiT: DDPM with --num-sampling-steps; SiT: `mode`, by
    default the Euler-Maruyama SDE with SiT's command-line defaults), in fp32 (TF32 allowed) whatever the
    training precision, without guidance unless `cfg_scale` > 1, as in USP's tables. The PNG folder is
    removed once the npz exists. When `stop_requested()` turns true (a SLURM stop) every rank finishes its current
    batch of samples and the hook returns {} without an npz; the PNGs stay for the resumed run to complete.
    """

    def __init__(self, objective, codec, sample_dir, latent_shape, *, num_samples: int, batch_size: int,
                 num_steps: int, num_classes: int, global_seed: int, dist_env, precision: str,
                 cfg_scale: float = 1.0, ref_batch=None, inception_weights=None, mode: str = "SDE",
                 stop_requested=lambda: False):
        self.objective = objective
        self.codec = codec
        self.sample_dir = Path(sample_dir)
        self.latent_shape = tuple(latent_shape)
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.num_steps = num_steps
        self.num_classes = num_classes
        self.global_seed = global_seed
        self.dist_env = dist_env
        self.precision = precision
        self.guidance = Guidance(scale=cfg_scale)
        self.ref_batch = ref_batch
        self.inception_weights = inception_weights
        self.mode = mode
        self.stop_requested = stop_requested

    def finished(self, step: int) -> bool:
        return (self.sample_dir / f"fid-{step:07d}.npz").is_file()

    def _sample_fn(self, ema):
        if hasattr(self.objective, "transport"):
            return transport_sampler(self.objective.transport, self.mode, self.num_steps), self.mode == "SDE"
        return diffusion_sampler(self.num_steps, "ddpm", learn_sigma=ema.learn_sigma), True

    def __call__(self, ema, step: int) -> dict:
        sample_fn, stochastic = self._sample_fn(ema)
        generator = ImageGenerator(ema, self.codec, sample_fn, num_classes=self.num_classes,
                                   latent_shape=self.latent_shape, device=self.dist_env.device,
                                   guidance=self.guidance, precision=self.precision, stochastic=stochastic)
        folder = self.sample_dir / f"fid-{step:07d}"
        result = sample_to_folder(generator, folder, self.num_samples, self.batch_size, self.global_seed,
                                  self.dist_env.rank, self.dist_env.world_size, stop_requested=self.stop_requested)
        _, _, rate = total_throughput(result["images"], result["seconds"], self.dist_env.device)
        stopped = torch.tensor([int(result["stopped"])], device=self.dist_env.device)
        if is_dist():
            dist.all_reduce(stopped, op=dist.ReduceOp.MAX)
        if stopped.item():
            return {}
        barrier()
        metrics = {}
        if self.dist_env.is_main:
            npz = create_npz_from_sample_folder(folder, self.num_samples)
            shutil.rmtree(folder)
            metrics = {"fid_sampling_images_per_s": rate}
            if self.ref_batch is not None and self.inception_weights is not None:
                # Imported here: torch-fidelity pulls in torchvision's model zoo, seconds of start-up that
                # plain sampling never needs.
                from generation.evaluate import evaluate_npz, write_json

                evaluation = evaluate_npz(self.ref_batch, npz, self.inception_weights, device=self.dist_env.device,
                                          log=lambda *parts: None)
                write_json(evaluation, npz.with_name(f"{npz.stem}.metrics.json"))
                metrics.update({key: value for key, value in evaluation.items()
                                if isinstance(value, (int, float)) and not isinstance(value, bool)})
        barrier()  # the other ranks wait for the evaluation instead of racing ahead into training
        return metrics


def fid_eval_hook(args, objective, codec, sample_dir, dist_env, stop_requested=lambda: False) -> FIDEvalHook:
    """The trainer's FID hook built from its arguments.

    The reference batch, Inception weights and guidance scale come from `--fid-ref-batch`,
    `--inception-weights` and `--cfg-scale` when the trainer defines them; without a reference batch
    the hook only writes the npz (evaluate it later with generation/evaluate.py).
    """
    spec = get_latent_spec(args.vae_version)
    latent_size = spec.latent_size(args.image_size)
    return FIDEvalHook(objective, codec, sample_dir, (spec.channels, latent_size, latent_size),
                       num_samples=args.num_fid_samples, batch_size=args.per_proc_batch_size,
                       num_steps=args.num_sampling_steps, num_classes=args.num_classes,
                       global_seed=args.global_seed, dist_env=dist_env, precision="fp32",
                       mode=getattr(args, "fid_mode", "SDE"),
                       cfg_scale=getattr(args, "cfg_scale", 1.0),
                       ref_batch=getattr(args, "fid_ref_batch", None),
                       inception_weights=getattr(args, "inception_weights", None), stop_requested=stop_requested)


def build_eval_hooks(args, objective, codec, experiment_dir: Path, latent_shape, dist_env,
                     stop_requested=lambda: False) -> list[EvalHook]:
    """The trainer's hooks, run every --eval-every steps with the EMA model: the preview grid, and the FID hook
    with --num-fid-samples (--per-proc-batch-size per rank, written under --sample-dir; it stops early when
    `stop_requested()`)."""
    if args.eval_every <= 0:
        return []
    hooks = [SampleGridHook(objective, codec, experiment_dir / args.sample_dir, latent_shape, args.eval_images,
                            args.num_classes, args.cfg_scale, args.num_sampling_steps, args.global_seed,
                            dist_env.device, args.precision, dist_env.is_main)]
    if args.num_fid_samples > 0:
        hooks.append(fid_eval_hook(args, objective, codec, experiment_dir / args.sample_dir, dist_env,
                                   stop_requested))
    return hooks
