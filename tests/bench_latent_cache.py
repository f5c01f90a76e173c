"""Benchmark (not a test): a training step fed from the latent cache vs encoding images online.

    python tests/bench_latent_cache.py [--device cuda] [--image_size 64] [--sd_vae] [--dit DiT-S/2]

Builds a toy ImageFolder, a VAE (tiny by default; `--sd_vae` = the SD-VAE architecture with random
weights, which costs the same FLOPs as sd-vae-ft-ema), extracts the cache, then times the same
denoising training step on latents from (a) the cache and (b) the VAE encoder, in images/s.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn as nn
from diffusers import AutoencoderKL

from models.latent_spec import get_latent_spec
from models.vae import LatentCodec
from util.data import SeededDataset, build_image_folder, build_loader, generation_transform
from util.latent_cache import LatentCacheDataset, extract_latent_cache
from util.precision import autocast
from util.sampler import ResumableDistributedSampler
from util.toy_dataset import write_toy_dataset


def build_model(name, latent_size, channels, device):
    if name:
        from models.dit import DiT_models
        return DiT_models[name](input_size=latent_size, in_channels=channels, num_classes=10).to(device)
    return nn.Sequential(nn.Conv2d(channels, 64, 3, padding=1), nn.GELU(), nn.Conv2d(64, 64, 3, padding=1),
                         nn.GELU(), nn.Conv2d(64, channels, 3, padding=1)).to(device)


def train_step(model, optimizer, latents, labels, dit, precision, device):
    noise = torch.randn_like(latents)
    t = torch.randint(0, 1000, (latents.shape[0],), device=device)
    alpha = (1 - t.float() / 1000).view(-1, 1, 1, 1)
    noisy = alpha.sqrt() * latents + (1 - alpha).sqrt() * noise
    with autocast(device, precision):
        pred = model(noisy, t, labels)[:, : latents.shape[1]] if dit else model(noisy)
        loss = (pred.float() - noise).pow(2).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def time_loop(loader, make_latents, model, optimizer, args, device):
    steps, images, start = 0, 0, None
    loss = torch.zeros((), device=device)
    while True:
        for batch, labels, _ in loader:
            if steps == args.warmup:
                loss.item()  # host sync so warm-up work is not timed
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start, images = time.perf_counter(), 0
            latents = make_latents(batch.to(device, non_blocking=True))
            loss += train_step(model, optimizer, latents, labels.to(device), args.dit, args.precision, device)
            steps += 1
            images += batch.shape[0]
            if steps == args.warmup + args.steps:
                loss.item()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                return images / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--num_workers", type=int, default=0)
    parser.add_argument("--images_per_class", type=int, default=32)
    parser.add_argument("--sd_vae", action="store_true", help="SD-VAE architecture (random weights)")
    parser.add_argument("--dit", default="", help="e.g. DiT-S/2; default a 3-layer conv net")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    spec = get_latent_spec("d8")
    if args.sd_vae:
        autoencoder = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                                    down_block_types=("DownEncoderBlock2D",) * 4,
                                    up_block_types=("UpDecoderBlock2D",) * 4)
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from conftest import build_tiny_autoencoder_kl
        autoencoder = build_tiny_autoencoder_kl()
    codec = LatentCodec.from_autoencoder(autoencoder, spec).to(device)
    with tempfile.TemporaryDirectory() as tmp:
        root = write_toy_dataset(Path(tmp) / "images", num_classes=10, train_per_class=args.images_per_class,
                                 val_per_class=1, image_size=args.image_size)
        start = time.perf_counter()
        extract_latent_cache(root / "train", Path(tmp) / "cache", codec, args.image_size, batch_size=64,
                             num_workers=args.num_workers, shard_size=256, show_progress=False)
        extraction = time.perf_counter() - start
        count = args.images_per_class * 10
        results = {}
        for source in ("cache", "online"):
            if source == "cache":
                dataset = LatentCacheDataset(Path(tmp) / "cache")
                make_latents = lambda latents: latents  # noqa: E731 - already scaled samples
            else:
                dataset = SeededDataset(build_image_folder(root / "train"), generation_transform(args.image_size))
                make_latents = lambda images: codec.encode(images, sample=True)  # noqa: E731
            torch.manual_seed(0)
            model = build_model(args.dit, spec.latent_size(args.image_size), spec.channels, device)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            sampler = ResumableDistributedSampler(len(dataset), seed=0)
            loader = build_loader(dataset, sampler, args.batch_size, num_workers=args.num_workers,
                                  pin_memory=device.type == "cuda", persistent_workers=True)
            results[source] = time_loop(loader, make_latents, model, optimizer, args, device)
    print(f"device={device} image_size={args.image_size} batch={args.batch_size} vae={'sd-vae' if args.sd_vae else 'tiny'} "
          f"model={args.dit or 'conv3'} precision={args.precision}")
    print(f"extraction: {count / extraction:.1f} images/s ({count} images, image + flip)")
    for source, rate in results.items():
        print(f"train step from {source:6s}: {rate:.1f} images/s")
    print(f"speed-up from the cache: {results['cache'] / results['online']:.2f}x")


if __name__ == "__main__":
    main()
