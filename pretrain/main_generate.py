"""Reconstruction visualiser for a pretraining checkpoint (USP's main_generate.py).

For a few images it writes one PNG grid, one row per image:
    original | masked (removed patches painted grey) | reconstruction
where the reconstruction keeps the visible latent patches and fills the masked ones with the
model's predictions, decoded through the VAE (pixel models: shown directly). If the
reconstruction column looks like the original, masked latent modeling is learning.

    python -m pretrain.main_generate --checkpoint output_dir/checkpoint-799.pth \
        --data_path /imagenet --vae_path /path/to/sd-vae-ft-ema --num_images 8 --output recon.png

Model settings (preset, --model_kwargs, input size, VAE version, norm_pix_loss, norm_image) come
from the checkpoint's `args`; flags given here override them. Models trained with --add_noise are
shown clean latents (t = 1, the easiest end of their training range).
"""
import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torchvision.utils import save_image

from models.mae import is_pixel_model
from models.vae import LatentCodec
from pretrain.main_pretrain import CHECKPOINT_PATTERN, build_model
from util.checkpoint import resolve_resume
from util.cli import finish_parser, non_negative_int, number, positive_int
from util.data import IMAGENET_MEAN, IMAGENET_STD, build_image_folder, eval_transform
from util.disk import ensure_writable_image
from util.errors import run_cli

GREY = 0.5  # colour of removed patches in the "masked" column, in [0, 1]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("USP reconstruction visualiser")
    parser.add_argument("--checkpoint", "--resume", dest="checkpoint", required=True,
                        help="pretraining checkpoint file or run directory (newest checkpoint is used)")
    parser.add_argument("--data_path", required=True,
                        help="ImageFolder root; its val/ (else train/) split is used when present")
    parser.add_argument("--output", default=None, help="PNG path (default: reconstruction.png next to the checkpoint)")
    parser.add_argument("--num_images", default=8, type=positive_int)
    parser.add_argument("--mask_ratio", default=None, help="default: the checkpoint's",
                        type=number(float, low=0, high=1, low_open=True, high_open=True, what="a mask ratio"))
    parser.add_argument("--input_size", default=None, type=positive_int, help="default: the checkpoint's")
    parser.add_argument("--vae_version", default=None, choices=["d8", "d16", "vavae_f16d32"],
                        help="default: the checkpoint's")
    parser.add_argument("--vae_path", default=None, help="default: the checkpoint's --vae_path")
    parser.add_argument("--seed", default=0, type=non_negative_int, help="seed of the random masks")
    parser.add_argument("--device", default="cuda")
    return finish_parser(parser)


def model_settings(cli, checkpoint_args) -> SimpleNamespace:
    """The pretraining settings to rebuild the model: the checkpoint's args, overridden by the CLI."""
    saved = vars(checkpoint_args) if isinstance(checkpoint_args, argparse.Namespace) else dict(checkpoint_args or {})
    settings = {"model": "vit_base_patch_vae", "model_kwargs": "{}", "input_size": 224, "vae_version": "d8",
                "vae_path": None, "mask_ratio": 0.75, "norm_pix_loss": False, "norm_image": False, **saved}
    for name in ("mask_ratio", "input_size", "vae_version", "vae_path"):
        if getattr(cli, name) is not None:
            settings[name] = getattr(cli, name)
    return SimpleNamespace(**settings)


def pick_images(data_path, count: int, input_size: int, pixel: bool) -> torch.Tensor:
    """The first `count` images (one per class in turn) as (N, 3, H, W), centre-cropped and normalised."""
    root = Path(data_path)
    split = next((name for name in ("val", "train") if (root / name).is_dir()), None)
    folder = build_image_folder(root, split=split)
    transform = eval_transform(input_size, pixel=pixel)
    # Round-robin over classes so a small grid shows several kinds of images.
    by_class = {}
    for index, (_, label) in enumerate(folder.samples):
        by_class.setdefault(label, []).append(index)
    order = [indices[k] for k in range(max(map(len, by_class.values())))
             for indices in by_class.values() if k < len(indices)]
    return torch.stack([transform(folder.load(index)[0]) for index in order[:count]])


def reconstruct(model, inputs: torch.Tensor, mask_ratio: float, generator: torch.Generator):
    """inputs (N, C, h, w) -> (reconstruction (N, C, h, w), mask (N, L) 1 = masked).

    The model predicts in its training target space (`normalize_target`: per patch with
    norm_pix_loss, per image with norm_image as well). Predictions are mapped back with the
    statistics of the true patches (as MAE's visualisations do), then pasted into the masked positions.
    """
    noise = torch.rand(inputs.shape[0], model.patch_embed.num_patches, generator=generator)
    _, pred, mask = model(inputs, mask_ratio=mask_ratio, noise=noise)
    target_patches = model.patchify(inputs)  # (N, L, p*p*C)
    _, mean, std = model.normalize_target(target_patches)
    pred = pred.float() * std + mean
    mask_patches = mask.unsqueeze(-1)
    patches = target_patches * (1 - mask_patches) + pred * mask_patches
    reconstruction = model.unpatchify(patches)
    return reconstruction, mask


def to_unit_range(images: torch.Tensor, pixel: bool) -> torch.Tensor:
    """Model-space images -> [0, 1] for saving ([-1, 1] for the VAE, ImageNet statistics for pixels)."""
    if pixel:
        mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
        return (images * std + mean).clamp(0, 1)
    return ((images + 1) / 2).clamp(0, 1)


def paint_mask(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """images (N, 3, H, W) in [0, 1], mask (N, L) over a square patch grid -> masked patches grey."""
    grid = int(mask.shape[1] ** 0.5)
    pixel_mask = mask.view(-1, 1, grid, grid)
    pixel_mask = torch.nn.functional.interpolate(pixel_mask, size=images.shape[-2:], mode="nearest")
    return images * (1 - pixel_mask) + GREY * pixel_mask


@torch.no_grad()
def main(cli) -> Path:
    device = torch.device(cli.device if cli.device != "cuda" or torch.cuda.is_available() else "cpu")
    if cli.output:  # before the checkpoint; the default, beside it, right after
        ensure_writable_image(cli.output, "--output")
    path, checkpoint = resolve_resume(cli.checkpoint, CHECKPOINT_PATTERN)
    output = ensure_writable_image(cli.output or path.parent / "reconstruction.png", "--output")
    settings = model_settings(cli, checkpoint.get("args"))
    pixel = is_pixel_model(settings.model)
    model = build_model(settings)
    model.load_state_dict(checkpoint["model"])
    model.to(device).eval()
    codec = None if pixel else LatentCodec.load(settings.vae_version, settings.vae_path, device=device)

    images = pick_images(cli.data_path, cli.num_images, settings.input_size, pixel).to(device)
    inputs = images if codec is None else codec.encode(images, sample=False)
    generator = torch.Generator().manual_seed(cli.seed)
    reconstruction, mask = reconstruct(model, inputs.float(), settings.mask_ratio, generator)
    if codec is not None:
        reconstruction = codec.decode(reconstruction)

    original = to_unit_range(images, pixel)
    columns = [original, paint_mask(original, mask), to_unit_range(reconstruction, pixel)]
    grid = torch.stack(columns, dim=1).flatten(0, 1)  # (N * 3, 3, H, W), row-major: one image per row
    save_image(grid.cpu(), output, nrow=len(columns), padding=2, pad_value=1.0)
    print(f"wrote {output} ({images.shape[0]} rows: original | masked | reconstruction) from {path}")
    return output


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args(), prog="main_generate")
