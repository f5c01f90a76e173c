"""Build a REPA feature cache: the frozen target encoder's tokens of every image and its flip (layout and
reader: util/feature_cache.py).

Images go through the latent cache's crop (`util.latent_cache.cache_transform`) so both caches see the same
pixels. Size: T * D * 2 orientations * 2 bytes per image; DINOv2-B at 256 px is 256 * 768 * 4 B = 786 KB, about
1 TB for ImageNet-1k. Extraction is one pass under torchrun (shard k belongs to rank k % world size), each shard
written atomically and skipped when present, so an interrupted extraction resumes.

    torchrun --nproc_per_node=8 -m generation.cache_features --data_path DIR --cached_path OUT \
        --enc_type dinov2-vit-b --encoder_path dinov2_vitb14_pretrain.pth --input_size 256
"""
import argparse
import math
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import safetensors.torch
import torch

from models.repa import DinoV2Target, encoder_identity, encoder_resolution
from util.checkpoint import atomic_open
from util.cli import finish_parser, non_negative_int, positive_int
from util.data import build_image_folder
from util.distributed import barrier, cleanup, init_distributed
from util.disk import ensure_writable_dir
from util.errors import UserError, run_cli
from util.feature_cache import FeatureCache, read_manifest
from util.latent_cache import (CHECKSUMS, MANIFEST, CroppedImages, cache_transform, files_digest,
                               manifest_differences, shard_crc32, shard_path, write_manifest)
from util.precision import PRECISIONS, autocast
from util.run_log import progress

FEATURE_CACHE_FORMAT = 1
DTYPES = {"float16": torch.float16, "float32": torch.float32}


@torch.no_grad()
def extract_feature_cache(image_root, cache_dir, encoder, encoder_identity: str, image_size: int,
                          crop: str = "center", batch_size: int = 64, dist=None, num_workers: int = 0,
                          shard_size: int = 1024, dtype: str = "float16", precision: str = "fp32",
                          show_progress: bool = True) -> dict:
    """Writes `encoder(images in [-1, 1]) -> (B, T, D)` of every image and its flip to `cache_dir`.

    encoder: a frozen target (e.g. `models.repa.DinoV2Target`) on `dist.device`; encoder_identity names it
    in the manifest (training refuses a cache of another encoder). All ranks must call this.
    """
    rank, world_size = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    device = dist.device if dist is not None else torch.device("cpu")
    transform = cache_transform(image_size, crop)
    folder = build_image_folder(image_root)
    cache_dir = Path(cache_dir)
    settings = {"format": FEATURE_CACHE_FORMAT, "encoder": encoder_identity, "image_size": image_size, "crop": crop,
                "dtype": dtype, "shard_size": shard_size, "num_images": len(folder), "classes": list(folder.classes),
                "files_sha256": files_digest(folder)}
    if (cache_dir / MANIFEST).is_file():
        differences = manifest_differences(read_manifest(cache_dir), settings)
        if differences:
            raise UserError(f"{cache_dir} already holds a feature cache made with other settings "
                                    f"({', '.join(differences)}); choose another --cached_path or delete it.")
    elif rank == 0:
        cache_dir.mkdir(parents=True, exist_ok=True)
        write_manifest(cache_dir, {**settings, "complete": False})
    barrier()

    num_shards = math.ceil(len(folder) / shard_size)
    pending = [k for k in range(rank, num_shards, world_size) if not shard_path(cache_dir, k).is_file()]
    for shard in progress(pending, rank == 0 and show_progress, desc="feature cache"):
        indices = list(range(shard * shard_size, min((shard + 1) * shard_size, len(folder))))
        # Fixed batches inside the shard: its bytes depend on its images and the batch size only.
        batches = [indices[start:start + batch_size] for start in range(0, len(indices), batch_size)]
        shard_loader = torch.utils.data.DataLoader(CroppedImages(folder, transform, image_size),
                                                   batch_sampler=batches, num_workers=num_workers)
        features, valid = [], []
        for images, _, ok in shard_loader:
            images = images.to(device)
            with autocast(device, precision):
                both = [encoder(images), encoder(images.flip(-1))]  # each (B, T, D)
            features.append(torch.stack(both, dim=1).to(DTYPES[dtype]).cpu())
            valid.append(ok.to(torch.uint8))
        tensors = {"features": torch.cat(features).contiguous(), "valid": torch.cat(valid)}
        with atomic_open(shard_path(cache_dir, shard)) as handle:
            handle.write(safetensors.torch.save(tensors))
    barrier()

    manifest = {**settings, "complete": True}
    if rank == 0:
        first = FeatureCache.open_shard(shard_path(cache_dir, 0))
        tokens, dim = first.get_slice("features").get_shape()[2:]
        count = sum(int(FeatureCache.open_shard(shard_path(cache_dir, k)).get_tensor("valid").sum())
                    for k in range(num_shards))
        checksums = [shard_crc32(shard_path(cache_dir, k), "feature cache") for k in range(num_shards)]
        manifest.update(tokens=int(tokens), dim=int(dim), count=count, **{CHECKSUMS: checksums})
        write_manifest(cache_dir, manifest)
        print(f"feature cache {cache_dir}: {count} images ({tokens} tokens x {dim}) for {encoder_identity}")
    barrier()
    return manifest


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Extract a REPA feature cache (target encoder tokens of each image and its flip)")
    parser.add_argument("--data_path", required=True, help="ImageFolder root (the latent cache's)")
    parser.add_argument("--cached_path", required=True, help="output folder for shards + manifest.json")
    parser.add_argument("--enc_type", default="dinov2-vit-b", help="REPA's encoder name (models.dinov2.DINOV2_MODELS)")
    parser.add_argument("--encoder_path", required=True, help="local encoder weights (or a timm hub tag when online)")
    parser.add_argument("--input_size", type=positive_int, default=256, help="image size of the training run")
    parser.add_argument("--crop", default="center", choices=["center", "eval"], help="the latent cache's crop")
    parser.add_argument("--dtype", default="float16", choices=sorted(DTYPES), help="stored feature dtype")
    parser.add_argument("--batch_size", type=positive_int, default=64)
    parser.add_argument("--shard_size", type=positive_int, default=1024)
    parser.add_argument("--num_workers", type=non_negative_int, default=4)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", default="fp32", choices=sorted(PRECISIONS), help="autocast dtype of the encoder")
    return finish_parser(parser)


def main(args) -> dict:
    encoder_resolution(args.input_size)  # cheap checks before loading anything
    build_image_folder(args.data_path)
    ensure_writable_dir(args.cached_path, flag="--cached_path", create=False)  # nothing written yet
    env = init_distributed(args.device)
    try:
        target = DinoV2Target(args.enc_type, args.encoder_path, args.input_size).to(env.device)
        return extract_feature_cache(
            args.data_path, args.cached_path, target, encoder_identity(args.enc_type, args.encoder_path),
            args.input_size, crop=args.crop, batch_size=args.batch_size, dist=env, num_workers=args.num_workers,
            shard_size=args.shard_size, dtype=args.dtype, precision=args.precision)
    finally:
        cleanup()


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args(), prog="generation.cache_features", cleanup=cleanup)
