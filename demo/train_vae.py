"""Trains the demo's tiny VAE: a diffusers `AutoencoderKL` with the SD-VAE layout (factor 8, 4 channels).

    python -m demo.train_vae --data_path demo_out/data --output demo_out/vae --steps 600

The SD-VAE's class and encode/decode path, only narrower, trained with MSE + L1 and a small KL term (no
LPIPS/GAN: a toy). Its latent scale is then measured as Stable Diffusion's 0.18215 was (LDM's
`scale_by_std`: 1 / std of posterior samples of training images) and stored as `scaling_factor` in the
saved config.json, where `models.vae.LatentCodec.load` reads it, so every entry point uses it through
`--vae_path`. Also writes `<output>/vae_stats.json` (scale, latent std, reconstruction PSNR on val).
"""
import argparse
import json
import math
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from demo.toy_dataset import fit, load_split, to_signed_unit
from models.latent_spec import get_latent_spec
from util.cli import finish_parser

VAE_VERSION = "d8"  # the SD-VAE latent space: 4 channels, factor 8
LR = 2e-3
KL_WEIGHT = 1e-4  # per-element KL to N(0, 1), small as SD-VAE's so the latents stay informative
GROUPS = 8  # GroupNorm groups


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Train the demo's tiny AutoencoderKL and measure its latent scale")
    parser.add_argument("--data_path", required=True, help="ImageFolder root with train/ and val/")
    parser.add_argument("--output", required=True, help="folder for save_pretrained + vae_stats.json")
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps")
    parser.add_argument("--batch_size", type=int, default=8, help="small: in a CPU minute more updates win")
    parser.add_argument("--width", type=int, default=16, help="channels of the full-resolution block")
    parser.add_argument("--seed", type=int, default=0)
    return finish_parser(parser)


def build_autoencoder(width: int):
    """A factor-8, 4-latent-channel AutoencoderKL (4 levels like SD's) with channels (w, 2w, 4w, 4w): width goes
    to the coarse levels, where a whole 8x8 patch is coded; the full-resolution one dominates the cost."""
    from diffusers import AutoencoderKL

    spec = get_latent_spec(VAE_VERSION)
    levels = int(math.log2(spec.factor)) + 1  # factor 8 = 3 downsamplings = 4 blocks
    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(width * min(2 ** level, 4) for level in range(levels)), layers_per_block=1,
        latent_channels=spec.channels, norm_num_groups=GROUPS,
    )


def vae_loss(autoencoder, images: torch.Tensor, kl_weight: float) -> torch.Tensor:
    """images (N, 3, H, W) in [-1, 1] -> MSE + L1 + kl_weight x KL, a scalar."""
    posterior = autoencoder.encode(images).latent_dist
    reconstruction = autoencoder.decode(posterior.sample()).sample
    mse = torch.nn.functional.mse_loss(reconstruction, images)
    l1 = (reconstruction - images).abs().mean()
    # Per-element KL to N(0, I): 0.5 * (mu^2 + var - 1 - logvar).
    kl = 0.5 * (posterior.mean.pow(2) + posterior.var - 1.0 - posterior.logvar).mean()
    return mse + l1 + kl_weight * kl


@torch.no_grad()
def measure_scale(autoencoder, images: torch.Tensor, batch_size: int = 256) -> tuple[float, float]:
    """(scale, std): std of posterior samples over all of `images` (uint8) and scale = 1 / std (LDM)."""
    generator = torch.Generator().manual_seed(0)
    latents = []
    for start in range(0, len(images), batch_size):
        posterior = autoencoder.encode(to_signed_unit(images[start:start + batch_size])).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=generator)
        latents.append(posterior.mean + posterior.std * noise)
    std = torch.cat(latents).flatten().std().item()
    return 1.0 / std, std


@torch.no_grad()
def reconstruction_psnr(autoencoder, images: torch.Tensor, batch_size: int = 256) -> float:
    """PSNR (dB, images in [0, 1]) of mean-latent reconstructions of uint8 `images`."""
    squared_error, count = 0.0, 0
    for start in range(0, len(images), batch_size):
        batch = to_signed_unit(images[start:start + batch_size])
        reconstruction = autoencoder.decode(autoencoder.encode(batch).latent_dist.mean).sample.clamp(-1, 1)
        squared_error += ((reconstruction - batch) / 2).pow(2).sum().item()
        count += batch.numel()
    return 10 * math.log10(1.0 / (squared_error / count))


def train(args) -> dict:
    torch.manual_seed(args.seed)
    train_images, _, _ = load_split(args.data_path, "train")
    val_images, _, _ = load_split(args.data_path, "val")
    spec = get_latent_spec(VAE_VERSION)
    spec.latent_size(train_images.shape[-1])  # the image size must be divisible by the factor
    autoencoder = build_autoencoder(args.width)
    optimizer = torch.optim.AdamW(autoencoder.parameters(), lr=LR, weight_decay=0.0)
    # Cosine decay: a short run still ends on a small lr, which sharpens the reconstructions.
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)
    fit(lambda batch, _: vae_loss(autoencoder, batch, KL_WEIGHT), optimizer, schedule, train_images, args.steps,
        args.batch_size, args.seed, "tiny VAE")
    autoencoder.eval()
    scale, std = measure_scale(autoencoder, train_images)
    stats = {"scale": scale, "latent_std": std, "val_psnr_db": reconstruction_psnr(autoencoder, val_images),
             "steps": args.steps,
             "parameters": sum(p.numel() for p in autoencoder.parameters()),
             "latent_shape": [spec.channels, *(2 * [train_images.shape[-1] // spec.factor])]}
    # diffusers keeps a VAE's latent scale in its config (SD-VAE: 0.18215); LatentCodec.load reads it.
    autoencoder.register_to_config(scaling_factor=scale)
    output = Path(args.output)
    autoencoder.save_pretrained(output)
    (output / "vae_stats.json").write_text(json.dumps(stats, indent=1))
    print(f"tiny VAE: {stats['parameters']:,} parameters, latents {stats['latent_shape']}, std {std:.3f} -> "
          f"scale {scale:.4f}, val PSNR {stats['val_psnr_db']:.1f} dB; saved to {output}")
    return stats


if __name__ == "__main__":
    train(get_args_parser().parse_args())
