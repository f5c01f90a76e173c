"""Frozen DINOv2 ViTs (Oquab et al., 2023) through timm's definitions, loaded from a local weights file.

Two users: REPA's alignment target (DINOv2-B/14 patch tokens, `generation/repa.py`) and FD_DINOv2
(DINOv2-L/14 class token, `generation/fd_dinov2.py`). Both built the network with the official
torch.hub code; timm's `vit_*_patch14[_reg4]_dinov2` is the same network (same parameter names up to
the register/layer-scale renames that timm's `checkpoint_filter_fn` applies), so either file layout
loads: the official `dinov2_vitb14_pretrain.pth` (torch.hub) or timm's `model.safetensors`.

The one thing that differs between the two users is how the 518-px position table (37 x 37 patches)
is brought to the grid of the input:
- "repa":  REPA overwrites the table once with timm's `resample_abs_pos_embed` (bicubic, antialiased, to
           the exact grid), which is also what timm does on load;
- "hub":   the hub model interpolates on every forward with bicubic, no antialias and the legacy scale
           factor (grid + 0.1) / 37; dgm-eval and EDM2's FD_DINOv2 run that model at 224 px.
Either way the table is fixed at load time for one input size (the interpolation is deterministic).

Nothing is downloaded unless `weights` is a timm hub tag (e.g. "vit_base_patch14_dinov2.lvd142m").
"""
import hashlib
import math
from pathlib import Path

import safetensors.torch
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import checkpoint_filter_fn

from util.checkpoint import load_checkpoint
from util.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PATCH_SIZE = 14
HUB_INTERPOLATE_OFFSET = 0.1  # dinov2/hub/backbones.py: interpolate_offset=0.1, interpolate_antialias=False

# REPA's --enc-type spelling -> timm model name. (REPA: "dinov2-vit-b" = torch.hub dinov2_vitb14.)
DINOV2_MODELS = {
    f"dinov2{reg}-vit-{size}": f"vit_{name}_patch14{'_reg4' if reg else ''}_dinov2"
    for reg in ("", "reg") for size, name in (("s", "small"), ("b", "base"), ("l", "large"), ("g", "giant"))
}



def file_sha256(path) -> str:
    """SHA-256 of a weights file (it names the encoder in caches, whatever the file is called)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_state_dict(weights: Path) -> dict:
    if weights.suffix == ".safetensors":
        return safetensors.torch.load_file(str(weights))
    state = load_checkpoint(weights)
    for key in ("model", "state_dict", "teacher"):  # wrappers some DINOv2 exports use
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


def _hub_interpolated_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """The hub model's `interpolate_pos_encoding` for a square `grid`, applied once.

    pos_embed (1, P + M*M, D) -> (1, P + grid^2, D); P = 1 (cls, hub layout) or 0 (timm's register models).
    """
    prefix = pos_embed.shape[1] - math.isqrt(pos_embed.shape[1]) ** 2  # 1 (cls) for the hub layout, 0 for timm-reg
    side = math.isqrt(pos_embed.shape[1] - prefix)
    if side == grid:
        return pos_embed
    dim = pos_embed.shape[-1]
    patches = pos_embed[:, prefix:].float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    scale = (grid + HUB_INTERPOLATE_OFFSET) / side
    patches = F.interpolate(patches, scale_factor=(scale, scale), mode="bicubic", antialias=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid * grid, dim).to(pos_embed.dtype)
    return torch.cat([pos_embed[:, :prefix], patches], dim=1)


def weights_source(model_name: str, weights) -> str:
    """"file" for an existing file, "hub" for a timm hub tag of `model_name` (only for online users), else a
    one-sentence UserError (checked before any network is built)."""
    if Path(str(weights)).is_file():
        return "file"
    if str(weights).split(".")[0] == model_name or str(weights).startswith("hf-hub:"):
        return "hub"
    raise UserError(f"DINOv2 weights {weights} do not exist; pass a local file (e.g. "
                              f"{model_name.replace('vit_', 'dinov2_')}.pth or timm's model.safetensors) or, when "
                              f"online, the timm hub tag {model_name}.lvd142m.")


def build_dinov2(model_name: str, weights, image_size: int, pos_embed_mode: str = "repa",
                 model_kwargs: dict | None = None) -> nn.Module:
    """A frozen timm DINOv2 (`model_name`, e.g. "vit_base_patch14_dinov2") for square inputs of `image_size` px.

    weights: local file (official .pth or timm .safetensors) or a timm hub tag ("<model_name>.lvd142m",
    downloaded by timm: only for users who are online); None = random weights (for cost measurements).
    `model_kwargs` overrides timm's constructor (tests build tiny random networks this way). Returns the model in eval mode without gradients.
    """
    if pos_embed_mode not in ("repa", "hub"):
        raise ValueError(f"pos_embed_mode {pos_embed_mode!r} is neither 'repa' nor 'hub'.")
    if image_size % PATCH_SIZE != 0:
        raise ValueError(f"DINOv2 input size {image_size} is not a multiple of its patch size {PATCH_SIZE}.")
    kwargs = dict(img_size=image_size, num_classes=0, **(model_kwargs or {}))
    if weights is None:  # random weights: the network's shapes and cost only (scripts/benchmark.py)
        model = timm.create_model(model_name, pretrained=False, **kwargs)
    elif weights_source(model_name, weights) == "file":
        path = Path(str(weights))
        model = timm.create_model(model_name, pretrained=False, **kwargs)
        state = _read_state_dict(path)
        if pos_embed_mode == "hub" and "pos_embed" in state:
            state = {**state, "pos_embed": _hub_interpolated_pos_embed(state["pos_embed"], image_size // PATCH_SIZE)}
        state = checkpoint_filter_fn(state, model)  # hub -> timm names; "repa": timm's antialiased resample
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise UserError(f"{path} does not hold {model_name} weights (missing {sorted(missing)[:3]}, "
                                      f"unexpected {sorted(unexpected)[:3]}); pass the matching DINOv2 file.")
    else:
        if pos_embed_mode == "hub":
            raise UserError(f"{weights}: the hub's position interpolation needs the weights as a file; "
                                      "download them once and pass the path.")
        model = timm.create_model(str(weights), pretrained=True, **kwargs)
    return model.eval().requires_grad_(False)


def normalize_imagenet(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] -> ImageNet mean/std normalised."""
    mean = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images - mean) / std


def final_tokens(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """All tokens after the final LayerNorm: (N, prefix + T, D), prefix = cls [+ registers]."""
    return model.forward_features(images)


def patch_tokens(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """DINOv2's `x_norm_patchtokens`: (N, T, D), cls and register tokens excluded."""
    return final_tokens(model, images)[:, model.num_prefix_tokens:]


def class_token(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """DINOv2's `x_norm_clstoken` (what the hub model's forward returns): (N, D)."""
    return final_tokens(model, images)[:, 0]
