"""REPA's training signal: frozen target encoders on the clean image and the alignment loss.

Facts from sihyun-yu/REPA (train.py `preprocess_raw_image`, utils.py `load_encoders`, loss.py `SILoss`):
- the target is the frozen encoder's patch tokens after its final norm (DINOv2's `x_norm_patchtokens`:
  cls and register tokens excluded) on the clean training image, computed without gradients under the
  run's autocast;
- DINOv2 input: uint8 / 255, ImageNet mean/std, then a bicubic resize (not antialiased) to 224 px per
  256 px of input, with the position table resampled once to that grid (`models.dinov2`, mode "repa");
- the loss: for every encoder, every image and every token, -cos(projector output, target token),
  averaged over tokens, images and encoders, and added to the diffusion loss times `proj_coeff` (0.5).

Sizes other than REPA's 256/512 px: the encoder sees `image_size * 7 / 8` px (224 per 256), which must
be a multiple of the patch size 14; the encoder's token grid must equal the DiT/SiT token grid.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.dinov2 import DINOV2_MODELS, PATCH_SIZE, build_dinov2, normalize_imagenet, patch_tokens

DEFAULT_ENC_TYPE = "dinov2-vit-b"
DEFAULT_PROJ_COEFF = 0.5


def encoder_resolution(image_size: int) -> int:
    """REPA's `224 * (resolution // 256)` generalised to 224 px per 256 px: 256 -> 224, 512 -> 448, 32 -> 28."""
    size, remainder = divmod(image_size * 224, 256)
    if remainder or size % PATCH_SIZE:
        raise ValueError(f"--image-size {image_size} gives a DINOv2 input of {image_size * 224 / 256:g} px, not a "
                         f"multiple of its {PATCH_SIZE}-px patches; REPA needs an image size divisible by 16.")
    return size


def preprocess_raw_image(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """REPA's DINOv2 input: images (N, 3, H, W) in [0, 1] -> normalised, bicubic-resized (N, 3, h, h)."""
    size = encoder_resolution(image_size)
    return F.interpolate(normalize_imagenet(images), size=size, mode="bicubic")


def projection_loss(targets: list[torch.Tensor], projections: list[torch.Tensor]) -> torch.Tensor:
    """Per-sample REPA loss (N,): -cos(projection, target) averaged over tokens and encoders.

    targets[i], projections[i]: (N, T, z_dim_i). REPA's batch value is the mean of this over the batch.
    """
    if len(targets) != len(projections):
        raise ValueError(f"{len(projections)} projectors but {len(targets)} target encoders; build the model with "
                         "one z_dim per encoder.")
    per_encoder = []
    for target, projection in zip(targets, projections):
        if target.shape != projection.shape:
            raise ValueError(f"target tokens {tuple(target.shape)} do not match the projected tokens "
                             f"{tuple(projection.shape)}; the encoder grid must equal the DiT/SiT token grid.")
        cosine = (F.normalize(target.float(), dim=-1) * F.normalize(projection.float(), dim=-1)).sum(dim=-1)
        per_encoder.append(-cosine.mean(dim=1))  # (N,)
    return torch.stack(per_encoder).mean(dim=0)


class DinoV2Target(nn.Module):
    """One frozen DINOv2 alignment target: images (N, 3, H, W) in [-1, 1] -> patch tokens (N, T, z_dim)."""

    def __init__(self, enc_type: str, weights, image_size: int, model_kwargs: dict | None = None):
        super().__init__()
        if enc_type not in DINOV2_MODELS:
            raise ValueError(f"--enc-type {enc_type!r} is not supported; choose from {', '.join(DINOV2_MODELS)}.")
        self.enc_type = enc_type
        self.image_size = image_size
        self.encoder = build_dinov2(DINOV2_MODELS[enc_type], weights, encoder_resolution(image_size),
                                    pos_embed_mode="repa", model_kwargs=model_kwargs)

    @property
    def z_dim(self) -> int:
        return self.encoder.embed_dim

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return patch_tokens(self.encoder, preprocess_raw_image((images + 1) / 2, self.image_size))


def parse_encoder_list(enc_type: str, paths: str) -> list[tuple[str, str]]:
    """REPA's comma-separated --enc-type with a matching comma-separated --repa-encoder-path."""
    types = [name.strip() for name in enc_type.split(",") if name.strip()]
    weights = [path.strip() for path in (paths or "").split(",") if path.strip()]
    if len(types) != len(weights):
        raise ValueError(f"--enc-type names {len(types)} encoder(s) but --repa-encoder-path gives {len(weights)} "
                         "weights; pass one local weights file (or timm hub tag) per encoder, comma-separated.")
    return list(zip(types, weights))
