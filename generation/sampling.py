"""Sampling library shared by `generation/sample_ddp.py` and the trainer's FID hook.

Three layers:
- latent samplers (`diffusion_sampler`, `transport_sampler`): fn(model_fn, z, model_kwargs, generators) -> x,
  wrapping DiT's DDPM/DDIM loops and SiT's ODE/SDE integrators;
- `ImageGenerator`: model + VAE + latent sampler -> uint8 images for (global seed, indices[, labels]);
- the sample folder (`sample_to_folder`, `create_npz_from_sample_folder`): PNGs `<dir>/<index:06d>.png`
  written atomically, then the ADM npz `<dir>.npz` (arr_0 uint8 N x H x W x 3, arr_1 labels).

Reproducibility (why image i is the same on 1 or 8 GPUs, and after a resume):
- Every random input of image i comes from generators keyed by (global seed, i) (`util.rng.sample_seed`):
  stream 0 (CPU) draws its class label, uniform over the classes as DiT's `torch.randint`, then its initial
  latent noise; stream 1 (on the sampling device) draws the per-step noise of DDPM / SDE sampling for the
  conditional half of the batch, stream 2 that of the null-class half under classifier-free guidance.
  Nothing depends on the rank, the world size, the batch size or on what ran before.
- Batches are global: batch b holds indices [b*B, (b+1)*B) for the per-process batch size B, and rank r
  takes batches r, r+W, ... The last batch is completed with the next indices (their images are dropped),
  so every forward pass has the same shape. Hence the floating-point work on image i is the same for any
  world size, even for adaptive ODE solvers (dopri5), whose step sizes depend on the whole batch.
  Changing B keeps every random input but may change the last bits (other GEMM kernels, other dopri5
  steps), so the sample folder records B and a resume must use the same one.
"""
from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
from PIL import Image, PngImagePlugin

from generation.diffusion import create_diffusion
from generation.transport import Sampler
from util.disk import reporting_disk_full
from util.precision import autocast
from util.rng import sample_seed
from util.errors import UserError

INPUT_STREAM, STEP_NOISE_STREAM, NULL_STEP_NOISE_STREAM = 0, 1, 2
SAMPLING_CONFIG_NAME = "sampling_config.json"
# Stored in every PNG's text chunk, so the npz's labels can be rebuilt from the folder alone.
LABEL_KEY = "class_label"

# fn(model_fn, z (N, C, h, w), model_kwargs, generators or None) -> latents (N, C, h, w)
LatentSampleFn = Callable[[Callable, torch.Tensor, dict, Optional[list]], torch.Tensor]




# ----------------------------------------------------------------------------------------------
# Latent samplers
# ----------------------------------------------------------------------------------------------

def diffusion_sampler(num_steps: int, method: str = "ddpm", learn_sigma: bool = True) -> LatentSampleFn:
    """DiT's samplers: DDPM ancestral sampling respaced to `num_steps` of the 1000 training steps
    (`create_diffusion(str(num_steps))`, as DiT's sample_ddp.py) or deterministic DDIM (eta = 0)."""
    if method not in ("ddpm", "ddim"):
        raise UserError(f"unknown DiT sampler {method!r}; use ddpm or ddim.")
    respacing = f"ddim{num_steps}" if method == "ddim" else str(num_steps)
    diffusion = create_diffusion(respacing, learn_sigma=learn_sigma)
    loop = diffusion.ddim_sample_loop if method == "ddim" else diffusion.p_sample_loop

    def sample(model_fn, z, model_kwargs, generators):
        return loop(model_fn, z.shape, noise=z, clip_denoised=False, model_kwargs=model_kwargs,
                    device=z.device, progress=False, generator=generators)

    return sample


ODE_DEFAULT_METHOD, SDE_DEFAULT_METHOD = "dopri5", "Euler"


def transport_sampler(transport, mode: str = "ODE", num_steps: int = 250, sampling_method: Optional[str] = None,
                      atol: float = 1e-6, rtol: float = 1e-3, reverse: bool = False, diffusion_form: str = "sigma",
                      diffusion_norm: float = 1.0, last_step: Optional[str] = "Mean",
                      last_step_size: float = 0.04, timestep_shift: float = 0.0) -> LatentSampleFn:
    """SiT's samplers over `transport` (a `generation.transport.Transport`), with SiT's defaults.

    ODE: probability-flow ODE with torchdiffeq (`sampling_method` dopri5 by default; fixed-step euler/heun/...
    take num_steps - 1 steps). SDE: Euler-Maruyama or Heun (`sampling_method` Euler by default) with a final
    Mean/Tweedie/Euler step of size last_step_size; its noise comes from the per-sample generators.
    timestep_shift: LightningDiT's ODE grid warp s t / (1 + (s - 1) t) (0 = SiT's even grid; ODE only).
    """
    sampler = Sampler(transport)
    if mode == "ODE":
        ode_fn = sampler.sample_ode(sampling_method=sampling_method or ODE_DEFAULT_METHOD, num_steps=num_steps,
                                    atol=atol, rtol=rtol, reverse=reverse, timestep_shift=timestep_shift)

        def sample(model_fn, z, model_kwargs, generators):
            return ode_fn(z, model_fn, **model_kwargs)[-1]

        return sample
    if mode == "SDE":
        sde_fn = sampler.sample_sde(sampling_method=sampling_method or SDE_DEFAULT_METHOD,
                                    diffusion_form=diffusion_form, diffusion_norm=diffusion_norm,
                                    last_step=last_step, last_step_size=last_step_size, num_steps=num_steps)

        def sample(model_fn, z, model_kwargs, generators):
            return sde_fn(z, model_fn, generator=generators, **model_kwargs)[-1]

        return sample
    raise UserError(f"unknown SiT sampling mode {mode!r}; use ODE or SDE.")


# ----------------------------------------------------------------------------------------------
# Per-index randomness
# ----------------------------------------------------------------------------------------------

def index_inputs(global_seed: int, indices: Sequence[int], num_classes: int, latent_shape: Sequence[int],
                 labels: Optional[Sequence[int]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(z (N, *latent_shape) float32, y (N,) int64) on the CPU for images `indices`.

    The label is drawn before the noise, so explicit `labels` leave each image's noise unchanged.
    """
    noises, drawn = [], []
    for index in indices:
        generator = torch.Generator().manual_seed(sample_seed(global_seed, INPUT_STREAM, index))
        drawn.append(int(torch.randint(0, num_classes, (1,), generator=generator)))
        noises.append(torch.randn(tuple(latent_shape), generator=generator))
    y = torch.tensor(drawn if labels is None else [int(label) for label in labels], dtype=torch.long)
    if labels is not None and (len(y) != len(indices) or y.min() < 0 or y.max() >= num_classes):
        raise UserError(f"labels must be one class in 0..{num_classes - 1} per index; got {len(y)} labels "
                            f"for {len(indices)} indices.")
    return torch.stack(noises), y


def step_generators(global_seed: int, indices: Sequence[int], device: torch.device, stream: int) -> list:
    """One generator per image on `device` for the noise drawn during sampling (DDPM / SDE steps)."""
    return [torch.Generator(device=device).manual_seed(sample_seed(global_seed, stream, index)) for index in indices]


# ----------------------------------------------------------------------------------------------
# Model + VAE + sampler -> images
# ----------------------------------------------------------------------------------------------

def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8 on the CPU, with DiT's sample_ddp.py rounding."""
    return torch.clamp(127.5 * images + 128.0, 0, 255).permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8)


@dataclass
class Guidance:
    """Classifier-free guidance: scale (1 = off), guided channels (3 = DiT/SiT legacy, None = all the
    predicted channels) and an optional (lo, hi) interval in the model's own t units."""

    scale: float = 1.0
    channels: Optional[int] = 3
    interval: Optional[tuple] = None

    @property
    def enabled(self) -> bool:
        return self.scale > 1.0


class ImageGenerator:
    """uint8 images for (global seed, indices): noise -> latent sampler -> VAE decode.

    model: a DiT/SiT (eval mode); codec: a `models.vae.LatentCodec` (anything with `.decode(latents)` in
    [-1, 1]); latent_shape: (C, h, w); stochastic: whether the sampler draws noise per step (DDPM / SDE).
    """

    def __init__(self, model: nn.Module, codec, sample_fn: LatentSampleFn, *, num_classes: int,
                 latent_shape: Sequence[int], device: torch.device, guidance: Optional[Guidance] = None,
                 precision: str = "fp32", stochastic: bool = True):
        self.model = model
        self.codec = codec
        self.sample_fn = sample_fn
        self.num_classes = num_classes
        self.latent_shape = tuple(latent_shape)
        self.device = torch.device(device)
        self.guidance = guidance or Guidance()
        self.precision = precision
        self.stochastic = stochastic

    def _model_fn(self):
        network = self.model.forward
        if self.guidance.enabled:
            network = partial(self.model.forward_with_cfg, cfg_scale=self.guidance.scale,
                              guidance_channels=self.guidance.channels, guidance_interval=self.guidance.interval)

        def model_fn(x, t, **kwargs):
            # Autocast covers only the network; the sampler's update arithmetic stays fp32.
            with autocast(self.device, self.precision):
                return network(x, t, **kwargs).float()

        return model_fn

    @torch.no_grad()
    def latents(self, global_seed: int, indices: Sequence[int], labels=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Sampled latents (N, C, h, w) on the device and their labels (N,) on the CPU."""
        z, y = index_inputs(global_seed, indices, self.num_classes, self.latent_shape, labels)
        z_dev, y_dev = z.to(self.device), y.to(self.device)
        generators = None
        if self.stochastic:
            generators = step_generators(global_seed, indices, self.device, STEP_NOISE_STREAM)
        if self.guidance.enabled:
            # As the official samplers: the second half carries the null class; only the first is kept.
            z_dev = torch.cat([z_dev, z_dev], dim=0)
            y_dev = torch.cat([y_dev, torch.full_like(y_dev, self.num_classes)], dim=0)
            if generators is not None:
                generators += step_generators(global_seed, indices, self.device, NULL_STEP_NOISE_STREAM)
        samples = self.sample_fn(self._model_fn(), z_dev, dict(y=y_dev), generators)
        if self.guidance.enabled:
            samples = samples[: len(indices)]
        return samples, y

    @torch.no_grad()
    def generate(self, global_seed: int, indices: Sequence[int], labels=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(images (N, H, W, 3) uint8 CPU, labels (N,) int64 CPU) for `indices` (one VAE decode per batch)."""
        latents, y = self.latents(global_seed, indices, labels)
        # The VAE decodes in fp32 whatever the sampling precision: bf16 would move FID away from sample_ddp's
        # fp32 reference, and SD-VAE's decoder can overflow in fp16 (diffusers upcasts it for that reason).
        images = self.codec.decode(latents.float())
        return to_uint8(images.float()), y


# ----------------------------------------------------------------------------------------------
# The sample folder
# ----------------------------------------------------------------------------------------------

def png_path(sample_dir, index: int) -> Path:
    return Path(sample_dir) / f"{index:06d}.png"


def write_png(path: Path, image: np.ndarray, label: int) -> None:
    """Writes an (H, W, 3) uint8 image with its label in a text chunk; tmp file + rename, so a killed run
    never leaves a truncated PNG that a resume would take for a finished one."""
    info = PngImagePlugin.PngInfo()
    info.add_text(LABEL_KEY, str(int(label)))
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with reporting_disk_full(path):
            Image.fromarray(image).save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # a failed write (full disk) leaves no 0-byte or partial PNG behind


def read_png(path: Path) -> tuple[np.ndarray, int]:
    """(image (H, W, 3) uint8, label) of a PNG written by `write_png`."""
    try:
        with Image.open(path) as image:
            image.load()
            label = image.text.get(LABEL_KEY)
            array = np.asarray(image.convert("RGB"))
    except OSError as error:
        raise UserError(f"{path} is not a readable PNG ({error}); delete it and rerun to regenerate it.")
    if label is None:
        raise UserError(f"{path} has no {LABEL_KEY!r} text chunk, so it was not written by this sampler; "
                            "delete it and rerun to regenerate it.")
    return array, int(label)


def global_batches(num_samples: int, batch_size: int, rank: int, world_size: int) -> list[list[int]]:
    """This rank's batches: batch b = indices [b*B, (b+1)*B), rank r takes batches r, r+W, ...

    The last batch runs past num_samples so all batches have B indices (see the module docstring).
    """
    num_batches = -(-num_samples // batch_size)
    return [list(range(b * batch_size, (b + 1) * batch_size)) for b in range(rank, num_batches, world_size)]


def check_sample_folder(sample_dir, config: dict, is_main: bool) -> None:
    """Refuses to sample into a folder sampled with other settings; the main rank records `config`.

    The record is created atomically (written to a temporary file, then hard-linked to its name, which
    fails if the name exists), so of two runs started together into one folder exactly one records its
    settings and the other compares against them and is refused if they differ. Every rank reads an
    existing record, so all of them stop on a mismatch.
    """
    sample_dir = Path(sample_dir)
    record = sample_dir / SAMPLING_CONFIG_NAME
    if record.is_file():
        _compare_sampling_config(sample_dir, json.loads(record.read_text()), config)
    if not is_main:
        return
    sample_dir.mkdir(parents=True, exist_ok=True)
    tmp = record.with_name(f".{record.name}.tmp-{os.getpid()}")
    with reporting_disk_full(record):
        tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    try:
        os.link(tmp, record)
    except FileExistsError:  # recorded before us (an earlier run, or one started at the same moment)
        _compare_sampling_config(sample_dir, json.loads(record.read_text()), config)
    finally:
        tmp.unlink()


def _compare_sampling_config(sample_dir: Path, saved: dict, config: dict) -> None:
    changed = sorted(key for key in set(saved) | set(config) if saved.get(key) != config.get(key))
    if changed:
        key = changed[0]
        raise UserError(
            f"{sample_dir} holds samples made with {key}={saved.get(key)!r} but this run has "
            f"{key}={config.get(key)!r}{f' (and {len(changed) - 1} more differences)' if len(changed) > 1 else ''}; "
            "use another --sample-dir or the original settings to resume it.")


def sample_to_folder(generator: ImageGenerator, sample_dir, num_samples: int, batch_size: int, global_seed: int,
                     rank: int = 0, world_size: int = 1, progress: bool = False, log=print,
                     stop_requested=lambda: False) -> dict:
    """Writes PNGs for indices 0..num_samples-1 (this rank's share), skipping batches already complete.

    A batch with any missing PNG is recomputed whole (its composition fixes its floating-point result) and
    only the missing files are written. `stop_requested()` is asked after every batch: when true (a SLURM stop
    during a training run's FID hook) the rest is left for a later call. Returns {"images": written here,
    "seconds": wall time, "stopped": whether batches were left}.
    """
    sample_dir = Path(sample_dir)
    sample_dir.mkdir(parents=True, exist_ok=True)
    batches = global_batches(num_samples, batch_size, rank, world_size)
    todo = []
    for indices in batches:
        missing = {i for i in indices if i < num_samples and not png_path(sample_dir, i).exists()}
        if missing:
            todo.append((indices, missing))
    if rank == 0 and len(todo) < len(batches):
        log(f"resuming: {len(batches) - len(todo)} of rank 0's {len(batches)} batches are already complete")
    iterator = todo
    if progress:
        from util.progress import progress_bar as tqdm
        iterator = tqdm(todo, desc="sampling", unit="batch")
    start, written, done = time.perf_counter(), 0, 0
    for indices, missing in iterator:
        if stop_requested():
            break
        images, labels = generator.generate(global_seed, indices)
        images = images.numpy()
        for position, index in enumerate(indices):
            if index in missing:
                write_png(png_path(sample_dir, index), images[position], int(labels[position]))
                written += 1
        done += 1
    return {"images": written, "seconds": time.perf_counter() - start, "stopped": done < len(todo)}


def npz_path_for(sample_dir) -> Path:
    """`<sample_dir>.npz`, next to the folder (DiT's create_npz_from_sample_folder)."""
    sample_dir = Path(sample_dir)
    return sample_dir.with_name(sample_dir.name + ".npz")


def create_npz_from_sample_folder(sample_dir, num_samples: int, workers: int = 8) -> Path:
    """Packs PNGs 0..num_samples-1 into `<sample_dir>.npz`: arr_0 (N, H, W, 3) uint8 in index order,
    arr_1 (N,) int64 labels. Written to a temporary name and renamed, so the npz is never partial."""
    sample_dir = Path(sample_dir)
    missing = [i for i in range(num_samples) if not png_path(sample_dir, i).exists()]
    if missing:
        raise UserError(f"{len(missing)} of {num_samples} samples are missing in {sample_dir} (first: "
                            f"{png_path(sample_dir, missing[0]).name}); rerun the same command to generate them.")
    first, _ = read_png(png_path(sample_dir, 0))
    images = np.empty((num_samples, *first.shape), dtype=np.uint8)
    labels = np.empty((num_samples,), dtype=np.int64)

    def load(index):
        image, label = read_png(png_path(sample_dir, index))
        if image.shape != first.shape:
            raise UserError(f"{png_path(sample_dir, index)} is {image.shape} but sample 0 is {first.shape}; "
                                "the folder mixes runs, so sample into an empty --sample-dir.")
        images[index], labels[index] = image, label

    # PNG decoding releases the GIL, so threads read the folder several times faster than one loop.
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        list(pool.map(load, range(num_samples)))
    out = npz_path_for(sample_dir)
    tmp = out.with_name(f".{out.stem}.tmp-{os.getpid()}.npz")
    try:
        with reporting_disk_full(out):
            np.savez(tmp, arr_0=images, arr_1=labels)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
