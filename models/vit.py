"""ViT classifier for fine-tuning and linear probing (MAE `models_vit.py` on timm's VisionTransformer).

MAE's subclass turns a boolean `global_pool` into: average of the patch tokens followed by
`fc_norm` (and no final `norm`), or the cls token after the final `norm`. timm's own
VisionTransformer builds exactly those modules for `global_pool="avg"` / `"token"` (fc_norm is
created for "avg", norm otherwise; pooling excludes the cls token), so the subclass only maps the
boolean onto timm's string and the parameter names come out as in MAE's fine-tuned checkpoints:
cls_token, pos_embed (1, 1 + L, D), patch_embed.proj, blocks.i.*, fc_norm | norm, head.

Latent presets (`*_vae`) read SD-VAE latents: 28x28x4 for 224 px images, 2x2 latent patches
(the "patch16" in the name is the pixel footprint of one token). `vit_xlarge_patch16_vae` has
no MAE/ViT counterpart; it uses DiT-XL's size (1152 wide, 28 deep, 16 heads) so the same USP
encoder (`mae.vit_xlarge_patch_vae`) initialises both it and DiT-XL/SiT-XL.
"""
from functools import partial

import timm.models.vision_transformer
import torch.nn as nn

from models.latent_spec import get_latent_spec
from models.sizes import size_kwargs
from models.vit_lightningdit import LIGHTNINGDIT_VIT_MODELS
from util.errors import UserError


class VisionTransformer(timm.models.vision_transformer.VisionTransformer):
    """timm ViT with MAE's `global_pool` switch.

    global_pool=True: logits = head(fc_norm(mean of patch tokens)); False: head(norm(x)[:, 0]).
    forward(x (N, C, H, W)) -> (N, num_classes). Other kwargs go to timm (drop_path_rate, ...).
    """

    def __init__(self, global_pool: bool = False, **kwargs):
        if not isinstance(global_pool, bool):
            raise UserError(f"global_pool must be True (average pool + fc_norm) or False (cls token), got {global_pool!r}.")
        img_size, patch_size = kwargs.get("img_size", 224), kwargs.get("patch_size", 16)
        if isinstance(img_size, int) and isinstance(patch_size, int) and img_size % patch_size != 0:
            raise UserError(
                f"input side {img_size} is not divisible by the patch size {patch_size}; "
                f"choose an input size whose (latent) side is a multiple of {patch_size}."
            )
        super().__init__(global_pool="avg" if global_pool else "token", **kwargs)


_LN = partial(nn.LayerNorm, eps=1e-6)
_LATENT = dict(img_size=28, in_chans=4, patch_size=2)  # SD-VAE latents of 224 px images


def _build(defaults: dict, kwargs: dict) -> VisionTransformer:
    """`skip_depth` k builds the preset with its last k blocks left out (USP's linear probe of block depth - k)."""
    config = {"mlp_ratio": 4, "qkv_bias": True, "norm_layer": _LN, **defaults, **kwargs}
    skip_depth = config.pop("skip_depth", 0)
    if not 0 <= skip_depth < config["depth"]:
        raise UserError(f"--skip_depth must be in 0..{config['depth'] - 1} for a {config['depth']}-block ViT, "
                        f"got {skip_depth}.")
    return VisionTransformer(**{**config, "depth": config["depth"] - skip_depth})


def vit_base_patch16(**kwargs):
    """Pixel ViT-B/16: 768 wide, 12 deep, 12 heads."""
    return _build(dict(patch_size=16, **size_kwargs("B")), kwargs)


def vit_large_patch16(**kwargs):
    """Pixel ViT-L/16: 1024 wide, 24 deep, 16 heads."""
    return _build(dict(patch_size=16, **size_kwargs("L")), kwargs)


def vit_huge_patch14(**kwargs):
    """Pixel ViT-H/14: 1280 wide, 32 deep, 16 heads."""
    return _build(dict(patch_size=14, **size_kwargs("H")), kwargs)


def vit_base_patch16_vae(**kwargs):
    """Latent ViT-B (768/12/12) on 2x2 latent patches."""
    return _build(dict(_LATENT, **size_kwargs("B")), kwargs)


def vit_large_patch16_vae(**kwargs):
    """Latent ViT-L (1024/24/16) on 2x2 latent patches."""
    return _build(dict(_LATENT, **size_kwargs("L")), kwargs)


def vit_xlarge_patch16_vae(**kwargs):
    """Latent ViT-XL sized like DiT-XL (1152/28/16) on 2x2 latent patches (see module docstring)."""
    return _build(dict(_LATENT, **size_kwargs("XL")), kwargs)


PIXEL_MODELS = {
    "vit_base_patch16": vit_base_patch16,
    "vit_large_patch16": vit_large_patch16,
    "vit_huge_patch14": vit_huge_patch14,
}
LATENT_MODELS = {
    "vit_base_patch16_vae": vit_base_patch16_vae,
    "vit_large_patch16_vae": vit_large_patch16_vae,
    "vit_xlarge_patch16_vae": vit_xlarge_patch16_vae,
    **LIGHTNINGDIT_VIT_MODELS,  # classifiers on LightningDiT blocks, for the lightningdit_*_patch_vae encoders
}
VIT_MODEL_NAMES = sorted([*PIXEL_MODELS, *LATENT_MODELS])


def is_pixel_model(name: str) -> bool:
    """True for the RGB presets, False for the latent ones (and the DiT backbones of
    models/dit_classifier.py, which read latents too); unknown name -> UserError."""
    from models.dit_classifier import DIT_CLASSIFIERS

    if name not in PIXEL_MODELS and name not in LATENT_MODELS and name not in DIT_CLASSIFIERS:
        names = ", ".join([*VIT_MODEL_NAMES, *DIT_CLASSIFIERS])
        raise UserError(f"unknown ViT model {name!r}; choose one of: {names}.")
    return name in PIXEL_MODELS


def create_vit(
    name: str,
    input_size: int,
    vae_version: str = None,
    num_classes: int = 1000,
    drop_path_rate: float = 0.0,
    global_pool: bool = True,
    **kwargs,
) -> VisionTransformer:
    """Builds a classifier preset for `input_size`-pixel images.

    Pixel presets: img_size = input_size, in_chans = 3 (`vae_version` is not used).
    Latent presets: with the VAE's spec (default "d8"), img_size = input_size // factor,
    in_chans = spec.channels, patch_size = 16 // factor. kwargs override any of these.
    """
    common = dict(num_classes=num_classes, drop_path_rate=drop_path_rate, global_pool=global_pool)
    if is_pixel_model(name):
        return PIXEL_MODELS[name](**{"img_size": input_size, "in_chans": 3, **common, **kwargs})
    spec = get_latent_spec(vae_version or "d8")
    derived = dict(img_size=spec.latent_size(input_size), in_chans=spec.channels, patch_size=max(1, 16 // spec.factor))
    return LATENT_MODELS[name](**{**derived, **common, **kwargs})
