"""Whole ImageFolder splits as in-memory tensors: the demo's datasets are small enough to hold at once."""
from pathlib import Path

import numpy as np
import torch

from generation.sampling import to_uint8
from util.data import build_image_folder
from util.progress import progress_bar as tqdm


def load_split(data_path, split: str, show_progress: bool = False) -> tuple[torch.Tensor, torch.Tensor, list]:
    """`<data_path>/<split>` -> (images (N, 3, H, W) uint8, labels (N,) int64, class names).

    Every image must already be square and of one size (the toy dataset is); the order is the
    ImageFolder's sorted order, the same one the latent cache uses.
    """
    folder = build_image_folder(Path(data_path), split=split)
    images = [np.asarray(folder.load(index)[0].convert("RGB"))
              for index in tqdm(range(len(folder)), desc=f"load {split}", disable=not show_progress, leave=False)]
    array = np.stack(images)  # (N, H, W, 3)
    labels = torch.tensor([label for _, label in folder.samples], dtype=torch.int64)
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous(), labels, list(folder.classes)


def to_signed_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float in [-1, 1], the range the VAE reads and writes."""
    return images.float() / 127.5 - 1.0



@torch.no_grad()
def vae_reconstructions(vae_path, images: torch.Tensor, batch_size: int = 250) -> torch.Tensor:
    """uint8 images (N, 3, H, W) -> uint8 images decoded from their posterior-mean latents (d8 codec)."""
    from models.vae import LatentCodec

    codec = LatentCodec.load("d8", vae_path)
    parts = [to_uint8(codec.decode(codec.encode(to_signed_unit(images[start:start + batch_size])))).permute(0, 3, 1, 2)
             for start in range(0, len(images), batch_size)]
    return torch.cat(parts)
