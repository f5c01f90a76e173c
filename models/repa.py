"""REPA's network pieces (Yu et al., 2025, "Representation Alignment for Generation", sihyun-yu/REPA).

REPA trains a DiT/SiT whose hidden tokens after block `encoder_depth` pass through one projector MLP per
target encoder and are pulled (cosine) towards that frozen encoder's patch tokens. The transformer is
ours (`models.dit.DiT` with `z_dims`, `projector_dim`, `encoder_depth`, `qk_norm`); this module holds
the projector, named as REPA names it (`build_mlp`), reads a REPA layout back from a state dict so a
checkpoint can be rebuilt without its training arguments, and builds the frozen target encoders.

Target encoders, as REPA's train.py `preprocess_raw_image` and utils.py `load_encoders` use them:
- the target is the frozen encoder's patch tokens after its final norm (DINOv2's `x_norm_patchtokens`:
  cls and register tokens excluded) on the clean training image, without gradients;
- DINOv2 input: uint8 / 255, ImageNet mean/std, then a bicubic resize (not antialiased) to 224 px per
  256 px of input, with the position table resampled once to that grid (`models.dinov2`, mode "repa").
Sizes other than REPA's 256/512 px: the encoder sees `image_size * 7 / 8` px (224 per 256), which must
be a multiple of the patch size 14; the encoder's token grid must equal the DiT/SiT token grid.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.dinov2 import DINOV2_MODELS, PATCH_SIZE, build_dinov2, file_sha256, normalize_imagenet, patch_tokens
from models.mae import create_mae
from util.checkpoint import load_checkpoint
from util.errors import UserError

DEFAULT_ENC_TYPE = "dinov2-vit-b"
USP_ENC_TYPE = "usp"  # the USP-pretrained encoder itself (its --repa-encoder-path is the pretraining checkpoint)

PROJECTOR_PREFIX = "projectors."


def build_mlp(hidden_size: int, projector_dim: int, z_dim: int) -> nn.Sequential:
    """REPA's projector: (..., hidden_size) -> (..., z_dim) through two SiLU hidden layers of projector_dim.

    Keys `0.*`, `2.*`, `4.*` (Linear, SiLU, Linear, SiLU, Linear), as in REPA's checkpoints.
    """
    return nn.Sequential(
        nn.Linear(hidden_size, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, z_dim),
    )


def layout_from_state_dict(state_dict: dict) -> dict:
    """Constructor kwargs of the REPA parts a DiT/SiT state dict holds (keys as saved, no `module.` prefix).

    Returns {"z_dims": [...], "projector_dim": int, "qk_norm": bool}; `z_dims` is empty (and projector_dim
    the default) for a plain DiT/SiT. `encoder_depth` is not in the weights (it only says where the
    projectors read, which sampling never does), so it is not returned.
    """
    z_dims, projector_dim = [], 2048
    index = 0
    while f"{PROJECTOR_PREFIX}{index}.4.weight" in state_dict:
        z_dims.append(int(state_dict[f"{PROJECTOR_PREFIX}{index}.4.weight"].shape[0]))
        projector_dim = int(state_dict[f"{PROJECTOR_PREFIX}{index}.0.weight"].shape[0])
        index += 1
    qk_norm = "blocks.0.attn.q_norm.weight" in state_dict
    return {"z_dims": z_dims, "projector_dim": projector_dim, "qk_norm": qk_norm}


def convert_time_convention(state_dict: dict, frequency_embedding_size: int = 256, max_period: float = 10000) -> dict:
    """REPA's SiT weights <-> weights for SiT's transport convention (its own inverse).

    REPA trains x_t = (1 - t) x + t eps and predicts eps - x (t = 1 is noise); SiT's transport (ours) has
    x_t = t x + (1 - t) eps and predicts x - eps (t = 1 is data). The same network serves both when its time
    input is 1 - t and its output is negated, and both changes are linear in the weights:
    - the timestep features [cos(w t), sin(w t)] of 1 - t are a reflection of those of t,
      cos(w(1-t)) = cos w cos wt + sin w sin wt, sin(w(1-t)) = sin w cos wt - cos w sin wt,
      folded into the first timestep Linear;
    - the final Linear is negated.
    So converted(x, t) = -original(x, 1 - t) up to float rounding, and REPA's checkpoints sample with our
    samplers (and ours with REPA's).
    """
    half = frequency_embedding_size // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64) / half)
    cos_w, sin_w = torch.cos(freqs), torch.sin(freqs)
    weight = state_dict["t_embedder.mlp.0.weight"]
    cos_part, sin_part = weight.double()[:, :half], weight.double()[:, half:2 * half]  # (D, half) each
    converted = dict(state_dict)
    converted["t_embedder.mlp.0.weight"] = torch.cat(
        [cos_part * cos_w + sin_part * sin_w, cos_part * sin_w - sin_part * cos_w, weight.double()[:, 2 * half:]],
        dim=1).to(weight.dtype)
    for name in ("final_layer.linear.weight", "final_layer.linear.bias"):
        converted[name] = -state_dict[name]
    return converted


def without_projectors(state_dict: dict) -> dict:
    """The state dict minus the training-only `projectors.*` entries (what sampling needs)."""
    return {key: value for key, value in state_dict.items() if not key.startswith(PROJECTOR_PREFIX)}


def encoder_resolution(image_size: int) -> int:
    """REPA's `224 * (resolution // 256)` generalised to 224 px per 256 px: 256 -> 224, 512 -> 448, 32 -> 28."""
    size, remainder = divmod(image_size * 224, 256)
    if remainder or size % PATCH_SIZE:
        raise UserError(f"--image-size {image_size} gives a DINOv2 input of {image_size * 224 / 256:g} px, not a "
                         f"multiple of its {PATCH_SIZE}-px patches; REPA needs an image size divisible by 16.")
    return size


def preprocess_raw_image(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """REPA's DINOv2 input: images (N, 3, H, W) in [0, 1] -> normalised, bicubic-resized (N, 3, h, h)."""
    size = encoder_resolution(image_size)
    return F.interpolate(normalize_imagenet(images), size=size, mode="bicubic")


class DinoV2Target(nn.Module):
    """One frozen DINOv2 alignment target: images (N, 3, H, W) in [-1, 1] -> patch tokens (N, T, z_dim)."""

    input_kind = "images"

    def __init__(self, enc_type: str, weights, image_size: int, model_kwargs: dict | None = None):
        super().__init__()
        if enc_type not in DINOV2_MODELS:
            raise UserError(f"--enc-type {enc_type!r} is not supported; choose from {', '.join(DINOV2_MODELS)}.")
        self.enc_type = enc_type
        self.image_size = image_size
        self.encoder = build_dinov2(DINOV2_MODELS[enc_type], weights, encoder_resolution(image_size),
                                    pos_embed_mode="repa", model_kwargs=model_kwargs)

    @property
    def z_dim(self) -> int:
        return self.encoder.embed_dim

    @property
    def num_tokens(self) -> int:
        return self.encoder.patch_embed.num_patches

    @property
    def name(self) -> str:
        return f"{self.enc_type} at {encoder_resolution(self.image_size)} px"

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return patch_tokens(self.encoder, preprocess_raw_image((images + 1) / 2, self.image_size))


class USPTarget(nn.Module):
    """The USP-pretrained latent MAE encoder itself as the alignment target (an ablation REPA does not offer):
    clean scaled latents (N, C, h, w) -> encoder tokens after its final norm, cls excluded, (N, T, D).

    checkpoint: a USP/MAE pretraining checkpoint ({"model": ..., "args": {"model": preset, "model_kwargs",
    "norm_image", "vae_version"}}) as pretrain/main_pretrain.py writes it. The encoder sees every patch in
    order (mask ratio 0); its fixed sin-cos position table is rebuilt for this run's grid (MAE's table is a
    function of the grid, so nothing is interpolated). Inputs are standardised per sample when USP was
    pretrained with --norm_image.
    """

    input_kind = "latents"  # what Alignment feeds it (DINOv2 targets take images)

    def __init__(self, checkpoint, image_size: int, vae_version: str = "d8", model_kwargs: dict | None = None):
        super().__init__()
        state = load_checkpoint(checkpoint)
        args = dict(state.get("args") or {}) if not isinstance(state.get("args"), argparse.Namespace) \
            else vars(state["args"])
        if "model" not in state or "model" not in args:
            raise UserError(f"{checkpoint} is not a USP pretraining checkpoint (it needs 'model' weights and the "
                             "'args' naming the MAE preset); pass the file pretrain/main_pretrain.py wrote.")
        saved_kwargs = args.get("model_kwargs") or {}
        saved_kwargs = json.loads(saved_kwargs) if isinstance(saved_kwargs, str) else dict(saved_kwargs)
        self.mae = create_mae(args["model"], image_size, vae_version=args.get("vae_version", vae_version),
                              norm_image=bool(args.get("norm_image", False)),
                              **{**saved_kwargs, **(model_kwargs or {})})
        fixed = ("pos_embed", "decoder_pos_embed")
        weights = {name: value for name, value in state["model"].items() if name not in fixed}
        missing, unexpected = self.mae.load_state_dict(weights, strict=False)
        if set(missing) - set(fixed) or unexpected:
            raise UserError(f"{checkpoint} does not fit the {args['model']} encoder (missing {sorted(missing)[:3]}, "
                             f"unexpected {sorted(unexpected)[:3]}).")
        self.mae.eval().requires_grad_(False)

    name = "the USP encoder"

    @property
    def z_dim(self) -> int:
        return self.mae.cls_token.shape[-1]

    @property
    def num_tokens(self) -> int:
        return self.mae.patch_embed.num_patches

    @torch.no_grad()
    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        # The encoder sees the latents as in pretraining (USP's --norm_image touches only the loss target).
        x = latents
        n, length = x.shape[0], self.mae.patch_embed.num_patches
        in_order = torch.arange(length, device=x.device, dtype=torch.float32).expand(n, length)  # keep every patch
        tokens, _, _ = self.mae.forward_encoder(x, 0.0, in_order)
        return tokens[:, 1:]


def build_target(enc_type: str, weights, image_size: int, vae_version: str = "d8",
                 model_kwargs: dict | None = None) -> nn.Module:
    """One frozen alignment target by REPA's --enc-type name ("dinov2-vit-b", ...) or "usp"."""
    if enc_type == USP_ENC_TYPE:
        return USPTarget(weights, image_size, vae_version, model_kwargs)
    return DinoV2Target(enc_type, weights, image_size, model_kwargs)


def encoder_identity(enc_type: str, weights) -> str:
    """"dinov2-vit-b:<sha256 of the weights file, 16 hex>" (or the hub tag): what a feature cache was made with."""
    return f"{enc_type}:{file_sha256(weights)[:16] if Path(str(weights)).is_file() else weights}"


def parse_encoder_list(enc_type: str, paths: str) -> list[tuple[str, str]]:
    """REPA's comma-separated --enc-type with a matching comma-separated --repa-encoder-path."""
    types = [name.strip() for name in enc_type.split(",") if name.strip()]
    weights = [path.strip() for path in (paths or "").split(",") if path.strip()]
    if len(types) != len(weights):
        raise UserError(f"--enc-type names {len(types)} encoder(s) but --repa-encoder-path gives {len(weights)} "
                         "weights; pass one local weights file (or timm hub tag) per encoder, comma-separated.")
    return list(zip(types, weights))
