"""Build a latent cache: encode an ImageFolder and its flips through the frozen VAE once.

Extraction is one DDP pass (shard k belongs to rank k % world_size). Each shard is written
atomically when complete and skipped if already present, so an interrupted extraction resumes
where it stopped; a shard's bytes depend only on its images and the batch size, not on the rank,
world size or resume point. The layout and the reader (`LatentCacheDataset`) are in util/latent_cache.py.

    torchrun --nproc_per_node=8 -m pretrain.cache_latents --data_path DIR --cached_path OUT --vae_version d8 \
        --vae_path VAE --input_size 256
    [--latent_stats]   also write OUT/latents_stats.pt (per-channel statistics for VA-VAE, see util/latent_stats.py)
"""
import argparse
import math
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import safetensors.torch
import torch

from models.latent_spec import get_latent_spec
from models.vae import LatentCodec, vae_identity
from util.checkpoint import atomic_open
from util.cli import finish_parser, non_negative_int, positive_float, positive_int
from util.data import build_image_folder
from util.disk import ensure_writable_dir
from util.distributed import DEFAULT_TIMEOUT_MINUTES, barrier, cleanup, init_distributed
from util.errors import UserError, run_cli
from util.latent_cache import (CHECKSUMS, CROPS, MANIFEST, CroppedImages, LatentCacheDataset, cache_transform,
                               files_digest, manifest_differences, read_manifest, read_shard_tensor, shard_crc32,
                               shard_path, write_manifest)
from util.latent_stats import LATENT_STATS_FILENAME, OFFICIAL_MAX_SAMPLES, compute_latent_stats, save_latent_stats
from util.precision import configure_cuda
from util.run_log import progress

CACHE_FORMAT = 1
MOMENTS_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


@torch.no_grad()
def extract_latent_cache(image_root, cache_dir, codec, image_size: int, crop: str = "center", batch_size: int = 64,
                         dist=None, num_workers: int = 0, shard_size: int = 1024, vae_identity: str = "",
                         vae_version: str | None = None, strict: bool = False, show_progress: bool = True,
                         moments_dtype: str = "fp32") -> dict:
    """Encodes every image of `image_root` (an ImageFolder) and its flip into `cache_dir`; returns the manifest.

    codec: a `models.vae.LatentCodec` (uses `encode_moments` and `spec`) already on `dist.device`.
    dist:  the `DistEnv` of this process (None = single process). All ranks must call this.
    vae_identity / vae_version: recorded in the manifest and checked when training reads the cache.
    Unreadable images are stored as invalid (skipped by training, counted in the manifest);
    `strict=True` raises instead. `moments_dtype` "fp16" stores mean/logvar in half precision.
    """
    if moments_dtype not in MOMENTS_DTYPES:
        raise UserError(f"unknown moments dtype {moments_dtype!r}; choose one of {sorted(MOMENTS_DTYPES)}.")
    for flag, value in (("batch_size", batch_size), ("shard_size", shard_size)):  # before the manifest records them
        if value < 1:
            raise UserError(f"--{flag} must be at least 1, got {value}.")
    store_dtype = MOMENTS_DTYPES[moments_dtype]
    rank, world_size = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    is_main = rank == 0
    spec = codec.spec
    latent_size = spec.latent_size(image_size)
    transform = cache_transform(image_size, crop)
    folder = build_image_folder(image_root, strict=strict)
    cache_dir = Path(cache_dir)
    settings = {
        "format": CACHE_FORMAT, "vae_identity": vae_identity, "vae_version": vae_version, "scale": spec.scale,
        "channels": spec.channels, "factor": spec.factor, "image_size": image_size, "latent_size": latent_size,
        "crop": crop, "batch_size": batch_size, "shard_size": shard_size, "num_images": len(folder),
        "classes": list(folder.classes), "files_sha256": files_digest(folder), "moments_dtype": moments_dtype,
    }
    # A manifest is kept (and must match) once a shard was written under it; before that it is only a plan.
    if (cache_dir / MANIFEST).is_file() and any(cache_dir.glob("shard-*.safetensors")):
        differences = manifest_differences({"moments_dtype": "fp32", **read_manifest(cache_dir)}, settings)
        if differences:
            raise UserError(f"{cache_dir} already holds a latent cache made with other settings "
                                   f"({', '.join(differences)}); choose another --cached_path or delete it.")
    elif is_main:
        write_manifest(cache_dir, {**settings, "complete": False})
    barrier()

    num_shards = math.ceil(len(folder) / shard_size)
    pending = [k for k in range(rank, num_shards, world_size) if not shard_path(cache_dir, k).is_file()]
    # Batches never straddle shards, so each shard's batches (hence bytes) are fixed by the data alone.
    batches = [list(range(start, min(start + batch_size, (k + 1) * shard_size, len(folder))))
               for k in pending for start in range(k * shard_size, min((k + 1) * shard_size, len(folder)), batch_size)]
    loader = torch.utils.data.DataLoader(CroppedImages(folder, transform, image_size), batch_sampler=batches,
                                         num_workers=num_workers, pin_memory=codec.device.type == "cuda")
    parts = {}
    for batch_indices, (images, labels, valid) in zip(batches, progress(loader, is_main and show_progress,
                                                                         desc="latent cache")):
        mean, logvar = codec.encode_moments(images)
        flip_mean, flip_logvar = codec.encode_moments(images.flip(-1))
        shard = batch_indices[0] // shard_size
        parts.setdefault(shard, []).append({
            "mean": torch.stack([mean, flip_mean], dim=1).to(store_dtype).cpu(),
            "logvar": torch.stack([logvar, flip_logvar], dim=1).to(store_dtype).cpu(),
            "label": labels.to(torch.int64), "valid": valid.to(torch.uint8),
        })
        if batch_indices[-1] == min((shard + 1) * shard_size, len(folder)) - 1:
            shard_parts = parts.pop(shard)
            tensors = {name: torch.cat([part[name] for part in shard_parts]).contiguous()
                       for name in ("mean", "logvar", "label", "valid")}
            with atomic_open(shard_path(cache_dir, shard)) as handle:
                handle.write(safetensors.torch.save(tensors))
    barrier()

    manifest = {**settings, "complete": True}
    if is_main:
        valid = np.concatenate([read_shard_tensor(shard_path(cache_dir, k), "valid") for k in range(num_shards)])
        skipped = [folder.samples[i][0] for i in np.flatnonzero(valid == 0)]
        manifest.update(count=int(valid.sum()), skipped=len(skipped), skipped_files=skipped[:100],
                        **{CHECKSUMS: [shard_crc32(shard_path(cache_dir, k)) for k in range(num_shards)]})
        write_manifest(cache_dir, manifest)
        print(f"latent cache {cache_dir}: {manifest['count']} images encoded, {len(skipped)} unreadable skipped")
    barrier()
    return manifest


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Extract a latent cache (posterior moments of each image and its flip)")
    parser.add_argument("--data_path", required=True, help="ImageFolder root (<class>/<image>)")
    parser.add_argument("--cached_path", required=True, help="output folder for shards + manifest.json")
    parser.add_argument("--vae_version", default="d8", choices=["d8", "d16", "vavae_f16d32"])
    parser.add_argument("--vae_path", default=None,
                        help="d8: diffusers folder or hub id; d16: kl16.ckpt; vavae_f16d32: the VA-VAE .pt (or folder)")
    parser.add_argument("--input_size", type=positive_int, default=256, help="image size (divisible by the VAE factor)")
    parser.add_argument("--crop", default="center", choices=sorted(CROPS))
    parser.add_argument("--batch_size", type=positive_int, default=64, help="images per encoder call per rank")
    parser.add_argument("--shard_size", type=positive_int, default=1024, help="images per shard file")
    parser.add_argument("--num_workers", type=non_negative_int, default=4)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--strict_data", action="store_true", help="fail on unreadable images instead of skipping")
    parser.add_argument("--latent_stats", action="store_true",
                        help=f"then compute per-channel statistics into <cached_path>/{LATENT_STATS_FILENAME} "
                             f"(LightningDiT's latent_norm, for VA-VAE users without the released file)")
    parser.add_argument("--stats_max_samples", type=non_negative_int, default=OFFICIAL_MAX_SAMPLES,
                        help="images the statistics use (a seeded random choice, as LightningDiT); 0 = all")
    parser.add_argument("--dist_timeout_minutes", type=positive_float, default=DEFAULT_TIMEOUT_MINUTES,
                        help="minutes a collective may wait before the process group aborts")
    parser.add_argument("--moments_dtype", default="fp32", choices=sorted(MOMENTS_DTYPES),
                        help="storage of mean/logvar: fp32 (exact) or fp16 (half the disk, rounding at most "
                             "2^-11 relative)")
    return finish_parser(parser)


def main(args) -> dict:
    # Cheap checks first: a bad size or folder costs seconds, not a VAE load.
    get_latent_spec(args.vae_version).latent_size(args.input_size)
    build_image_folder(args.data_path)
    ensure_writable_dir(args.cached_path, flag="--cached_path")
    env = init_distributed(args.device, args.dist_timeout_minutes)
    if env.device.type == "cuda":
        configure_cuda()  # TF32 as the trainers' online encoding; fixed-shape convs: cuDNN autotuning
    try:
        # The cache stores raw posterior moments, so VA-VAE's statistics are not needed to extract it.
        codec = LatentCodec.load(args.vae_version, args.vae_path, device=env.device, require_stats=False)
        manifest = extract_latent_cache(
            args.data_path, args.cached_path, codec, args.input_size, crop=args.crop, batch_size=args.batch_size,
            dist=env, num_workers=args.num_workers, shard_size=args.shard_size,
            vae_identity=vae_identity(args.vae_version, args.vae_path), vae_version=args.vae_version,
            strict=args.strict_data, moments_dtype=args.moments_dtype,
        )
        if args.latent_stats:
            mean, std = compute_latent_stats(LatentCacheDataset(args.cached_path), args.stats_max_samples or None,
                                             rank=env.rank, world_size=env.world_size, device=env.device)
            if env.is_main:
                path = save_latent_stats(Path(args.cached_path) / LATENT_STATS_FILENAME, mean, std)
                print(f"latent statistics -> {path} (mean {mean.flatten()[:3].tolist()}..., "
                      f"std {std.flatten()[:3].tolist()}...)")
        return manifest
    finally:
        cleanup()


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args(), prog="pretrain.cache_latents", cleanup=cleanup)
