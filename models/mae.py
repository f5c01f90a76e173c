"""Masked autoencoder (He et al., 2022) for pixels and for VAE latents (USP's masked latent modeling).

Parameter names and shapes follow facebookresearch/mae `models_mae.py` (cls_token, pos_embed,
patch_embed.proj, blocks.i.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}, norm, decoder_embed,
mask_token, decoder_pos_embed, decoder_blocks, decoder_norm, decoder_pred), so
mae_pretrain_vit_base.pth-style and USP pretraining checkpoints load with `strict=True`.

Additions over the official module:
- `noise` (N, L) uniform values may be passed in, so the mask can depend on the sample (seeded by
  its data index) rather than on the rank's RNG stream;
- `target` may differ from the encoder input (e.g. clean latents while the input is noised);
- `in_chans` is honoured by patchify/unpatchify (latents have 4 or 16 channels, not 3);
- `normalize_target` exposes the loss's target normalisation (for reconstructions).

`norm_image` is USP's flag: together with `norm_pix_loss` the target is normalised per image (mean and
unbiased variance over all its patches) instead of per patch; on its own it does nothing, and the
encoder input is never normalised (as in USP's models_mae.py).

Latent presets (`vit_*_patch_vae*`) default to SD-VAE latents of 224 px images: 28x28x4 with
2x2 latent patches (= 16x16 pixel patches), 196 tokens like pixel ViT-B/16; `_2` means 4x4 latent
patches. Their decoders use MAE's default 512-wide, 8-deep, 16-head decoder.

`MaskedAutoencoderLightningDiT` (presets `lightningdit_{base,large,xlarge}_patch_vae`): the same MAE whose
encoder blocks are LightningDiT's (SwiGLU, RMSNorm, 2-D RoPE; models/lightningdit_layers.py), so every
encoder tensor (`patch_embed.proj`, `pos_embed`, `blocks.i.*`) has the name and shape of its LightningDiT
counterpart and `models.transfer` initialises LightningDiT-{B,L,XL}/1 block for block. Under masking each
kept token is rotated by the RoPE angles of its own grid position and the cls token is not rotated, so
attention sees the relative positions LightningDiT sees on the full grid; the RoPE tables are rebuilt from
the grid, not saved. The presets default to VA-VAE latents of 256 px images (16x16x32, patch 1, LightningDiT's
/1 token grid) and the released block configuration (SwiGLU, RoPE, RMSNorm on; QK-norm off).
"""
from functools import partial

import torch
import torch.nn as nn
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block

from models.latent_spec import get_latent_spec
from models.layers import get_2d_sincos_pos_embed
from models.lightningdit_layers import LightningEncoderBlock, RMSNorm, apply_rope, rope_tables
from models.sizes import size_kwargs
from util.errors import UserError


class MaskedAutoencoderViT(nn.Module):
    """ViT encoder on the visible patches + lightweight decoder predicting the masked ones.

    forward(imgs (N, C, H, W), mask_ratio, target=None, noise=None) ->
        loss (scalar, mean squared error over masked patches only),
        pred (N, L, p*p*C) patch predictions for every position,
        mask (N, L) with 1 = masked (predicted), 0 = visible.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_layer=nn.LayerNorm,
        norm_pix_loss: bool = False,
        norm_image: bool = False,
    ):
        super().__init__()
        if img_size % patch_size != 0:
            raise UserError(
                f"input side {img_size} is not divisible by the patch size {patch_size}; "
                f"choose an input size whose (latent) side is a multiple of {patch_size}."
            )
        self.in_chans = in_chans
        self.img_size = img_size

        # --- encoder ---
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)  # fixed sin-cos
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer) for _ in range(depth)]
        )
        self.norm = norm_layer(embed_dim)

        # --- decoder ---
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            [Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
             for _ in range(decoder_depth)]
        )
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * in_chans, bias=True)

        self.norm_pix_loss = norm_pix_loss
        self.norm_image = norm_image
        self.initialize_weights()

    def initialize_weights(self):
        """Official MAE init: sin-cos positions, xavier patch/linears, N(0, 0.02) cls/mask tokens."""
        grid_size = int(self.patch_embed.num_patches ** 0.5)
        pos_embed = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid_size, cls_token=True)
        self.pos_embed.data.copy_(torch.from_numpy(pos_embed).float().unsqueeze(0))
        decoder_pos_embed = get_2d_sincos_pos_embed(self.decoder_pos_embed.shape[-1], grid_size, cls_token=True)
        self.decoder_pos_embed.data.copy_(torch.from_numpy(decoder_pos_embed).float().unsqueeze(0))

        # Patch embedding like nn.Linear (xavier over the flattened kernel).
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    # ------------------------------------------------------------------ patches
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, L, p*p*C), patch pixels ordered (p, q, c) as in MAE."""
        p = self.patch_embed.patch_size[0]
        n, c, h_px, w_px = imgs.shape
        h, w = h_px // p, w_px // p
        x = imgs.reshape(n, c, h, p, w, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(n, h * w, p * p * c)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, L, p*p*C) -> (N, C, H, W) for a square grid."""
        p = self.patch_embed.patch_size[0]
        h = w = int(x.shape[1] ** 0.5)
        c = self.in_chans
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    # ------------------------------------------------------------------ masking
    def random_masking(self, x: torch.Tensor, mask_ratio: float, noise: torch.Tensor = None):
        """Keeps int(L * (1 - mask_ratio)) tokens per sample, those with the smallest `noise`.

        x (N, L, D), noise (N, L) (uniform; drawn here when None) ->
        x_masked (N, L_keep, D), mask (N, L) 1 = removed, ids_restore (N, L) to undo the shuffle.
        """
        n, length, dim = x.shape
        len_keep = int(length * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(n, length, device=x.device)
        elif noise.shape != (n, length):
            raise ValueError(
                f"masking noise has shape {tuple(noise.shape)} but the batch needs ({n}, {length}) "
                f"(one value per sample and patch)."
            )
        noise = noise.to(x.device)
        ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small values are kept
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).expand(-1, -1, dim))

        mask = torch.ones([n, length], device=x.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, dim=1, index=ids_restore)  # back to patch order
        return x_masked, mask, ids_restore

    # ------------------------------------------------------------------ passes
    def forward_encoder(self, x: torch.Tensor, mask_ratio: float, noise: torch.Tensor = None):
        """(N, C, H, W) -> latent (N, 1 + L_keep, D) incl. cls token, mask (N, L), ids_restore (N, L)."""
        x = self.patch_embed(x)  # (N, L, D)
        x = x + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
        cls_token = self.cls_token + self.pos_embed[:, :1, :]
        x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent (N, 1 + L_keep, D) -> predictions (N, L, p*p*C) for every patch position."""
        x = self.decoder_embed(x)  # (N, 1 + L_keep, Dd)
        num_masked = ids_restore.shape[1] + 1 - x.shape[1]
        mask_tokens = self.mask_token.expand(x.shape[0], num_masked, -1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # (N, L, Dd), shuffled order
        x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, 1:, :]  # drop the cls position

    def normalize_target(self, target: torch.Tensor):
        """target patches (N, L, p*p*C) -> (normalised target, mean, std), target = normalised * std + mean.

        norm_pix_loss: mean / unbiased variance per patch (MAE); with norm_image as well, per image over
        all patches and channels (USP). Otherwise the target is unchanged (mean 0, std 1).
        """
        if not self.norm_pix_loss:
            return target, 0.0, 1.0
        dims = (-2, -1) if self.norm_image else -1
        mean = target.mean(dim=dims, keepdim=True)
        std = (target.var(dim=dims, keepdim=True) + 1.0e-6) ** 0.5
        return (target - mean) / std, mean, std

    def forward_loss(self, target_imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean over masked patches of the per-patch MSE; target_imgs (N, C, H, W), pred (N, L, p*p*C)."""
        target, _, _ = self.normalize_target(self.patchify(target_imgs))
        loss = ((pred.float() - target.float()) ** 2).mean(dim=-1)  # (N, L); fp32 so bf16 runs sum safely
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75, target: torch.Tensor = None, noise: torch.Tensor = None):
        """imgs (N, C, H, W); target (N, C, H, W) defaults to imgs; noise (N, L) optional masking noise."""
        self._check_input(imgs, "input")
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1) to have both visible and masked patches, got {mask_ratio}.")
        if target is None:
            target = imgs
        else:
            self._check_input(target, "target")
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)  # (N, L, p*p*C)
        loss = self.forward_loss(target, pred, mask)
        return loss, pred, mask

    def _check_input(self, x: torch.Tensor, what: str):
        expected = (self.in_chans, self.img_size, self.img_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise UserError(
                f"MAE {what} has shape {tuple(x.shape)} but the model was built for (N, {expected[0]}, "
                f"{expected[1]}, {expected[2]}); match --input_size / --vae_version to the data."
            )


class MaskedAutoencoderLightningDiT(MaskedAutoencoderViT):
    """MaskedAutoencoderViT whose encoder blocks are LightningDiT's; same forward contract.

    forward(latents (N, C, H, W), mask_ratio, target=None, noise=None) -> (loss, pred (N, L, p*p*C), mask (N, L)).
    """

    def __init__(self, img_size: int = 16, patch_size: int = 1, in_chans: int = 32, embed_dim: int = 1152,
                 depth: int = 28, num_heads: int = 16, decoder_embed_dim: int = 512, decoder_depth: int = 8,
                 decoder_num_heads: int = 16, mlp_ratio: float = 4.0, norm_pix_loss: bool = False,
                 norm_image: bool = False, use_qknorm: bool = False, use_swiglu: bool = True, use_rope: bool = True,
                 use_rmsnorm: bool = True):
        # MaskedAutoencoderViT builds the patch embedding, positions, cls token and decoder; depth=0 skips its blocks.
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, depth=0,
                         num_heads=num_heads, decoder_embed_dim=decoder_embed_dim, decoder_depth=decoder_depth,
                         decoder_num_heads=decoder_num_heads, mlp_ratio=mlp_ratio,
                         norm_layer=partial(nn.LayerNorm, eps=1e-6), norm_pix_loss=norm_pix_loss,
                         norm_image=norm_image)
        self.blocks = nn.ModuleList([
            LightningEncoderBlock(embed_dim, num_heads, mlp_ratio, use_qknorm=use_qknorm, use_swiglu=use_swiglu,
                                  use_rmsnorm=use_rmsnorm)
            for _ in range(depth)
        ])
        self.norm = RMSNorm(embed_dim) if use_rmsnorm else nn.LayerNorm(embed_dim, eps=1e-6)
        self.use_rope = use_rope
        if use_rope:
            cos, sin = rope_tables(embed_dim // num_heads, img_size // patch_size)
            self.register_buffer("rope_cos", cos, persistent=False)  # (L, head_dim)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.initialize_weights()

    def _masked_rope(self, ids_keep: torch.Tensor):
        """RoPE for [cls, kept tokens]: ids_keep (N, L_keep) -> rotation by (N, 1, 1 + L_keep, head_dim) tables."""
        n = ids_keep.shape[0]
        head_dim = self.rope_cos.shape[1]
        cls_cos = torch.ones(n, 1, head_dim, device=ids_keep.device, dtype=self.rope_cos.dtype)
        cos = torch.cat([cls_cos, self.rope_cos[ids_keep]], dim=1).unsqueeze(1)
        sin = torch.cat([torch.zeros_like(cls_cos), self.rope_sin[ids_keep]], dim=1).unsqueeze(1)
        return partial(apply_rope, cos=cos, sin=sin)

    def forward_encoder(self, x: torch.Tensor, mask_ratio: float, noise: torch.Tensor = None):
        """(N, C, H, W) -> latent (N, 1 + L_keep, D) incl. cls token, mask (N, L), ids_restore (N, L)."""
        x = self.patch_embed(x) + self.pos_embed[:, 1:, :]  # (N, L, D)
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
        cls_token = self.cls_token + self.pos_embed[:, :1, :]
        x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        # ids_restore is the inverse permutation of the shuffle, so sorting it gives the shuffle back.
        rope = self._masked_rope(torch.argsort(ids_restore, dim=1)[:, : x.shape[1] - 1]) if self.use_rope else None
        for block in self.blocks:
            x = block(x, rope=rope)
        return self.norm(x), mask, ids_restore


# --------------------------------------------------------------------------------------
# Presets (original MAE and USP names). Every size kwarg can be overridden via **kwargs.
# --------------------------------------------------------------------------------------

_LN = partial(nn.LayerNorm, eps=1e-6)
_DECODER = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)
_LATENT = dict(img_size=28, in_chans=4)  # SD-VAE latents of 224 px images


def _build(defaults: dict, kwargs: dict) -> MaskedAutoencoderViT:
    return MaskedAutoencoderViT(**{"mlp_ratio": 4, "norm_layer": _LN, **_DECODER, **defaults, **kwargs})


def mae_vit_base_patch16_dec512d8b(**kwargs):
    """Pixel MAE ViT-B/16: 768 wide, 12 deep, 12 heads."""
    return _build(dict(patch_size=16, **size_kwargs("B")), kwargs)


def mae_vit_large_patch16_dec512d8b(**kwargs):
    """Pixel MAE ViT-L/16: 1024 wide, 24 deep, 16 heads."""
    return _build(dict(patch_size=16, **size_kwargs("L")), kwargs)


def mae_vit_huge_patch14_dec512d8b(**kwargs):
    """Pixel MAE ViT-H/14: 1280 wide, 32 deep, 16 heads."""
    return _build(dict(patch_size=14, **size_kwargs("H")), kwargs)


def mae_vit_xlarge_patch16(**kwargs):
    """Pixel MAE sized like DiT-XL (1152/28/16), 16x16 patches (USP's models_mae)."""
    return _build(dict(patch_size=16, **size_kwargs("XL")), kwargs)


# The names the MAE repo exposes (recommended decoder = 512-d, 8 blocks).
mae_vit_base_patch16 = mae_vit_base_patch16_dec512d8b
mae_vit_large_patch16 = mae_vit_large_patch16_dec512d8b
mae_vit_huge_patch14 = mae_vit_huge_patch14_dec512d8b


def vit_base_patch_vae(**kwargs):
    """Latent MAE, ViT-B width (768/12/12), 2x2 latent patches."""
    return _build(dict(_LATENT, patch_size=2, **size_kwargs("B")), kwargs)


def vit_base_patch_vae_2(**kwargs):
    """Latent MAE, ViT-B width, 4x4 latent patches."""
    return _build(dict(_LATENT, patch_size=4, **size_kwargs("B")), kwargs)


def vit_large_patch_vae(**kwargs):
    """Latent MAE, ViT-L width (1024/24/16), 2x2 latent patches."""
    return _build(dict(_LATENT, patch_size=2, **size_kwargs("L")), kwargs)


def vit_large_patch_vae_2(**kwargs):
    """Latent MAE, ViT-L width, 4x4 latent patches."""
    return _build(dict(_LATENT, patch_size=4, **size_kwargs("L")), kwargs)


def vit_xlarge_patch_vae(**kwargs):
    """Latent MAE sized like DiT-XL (1152/28/16) so every encoder block transfers into DiT-XL/SiT-XL."""
    return _build(dict(_LATENT, patch_size=2, **size_kwargs("XL")), kwargs)


def vit_huge_patch_vae(**kwargs):
    """Latent MAE, ViT-H width (1280/32/16), 2x2 latent patches."""
    return _build(dict(_LATENT, patch_size=2, **size_kwargs("H")), kwargs)


def _lightningdit_preset(size: str):
    def build(**kwargs):
        defaults = dict(img_size=16, patch_size=1, in_chans=32, mlp_ratio=4, **size_kwargs(size), **_DECODER)
        return MaskedAutoencoderLightningDiT(**{**defaults, **kwargs})

    build.__doc__ = f"Latent MAE with LightningDiT-{size} encoder blocks; every encoder tensor transfers into LightningDiT-{size}/1."
    return build


lightningdit_base_patch_vae = _lightningdit_preset("B")
lightningdit_large_patch_vae = _lightningdit_preset("L")
lightningdit_xlarge_patch_vae = _lightningdit_preset("XL")

PIXEL_MODELS = {
    "mae_vit_base_patch16": mae_vit_base_patch16,
    "mae_vit_large_patch16": mae_vit_large_patch16,
    "mae_vit_huge_patch14": mae_vit_huge_patch14,
    "mae_vit_xlarge_patch16": mae_vit_xlarge_patch16,
}
# name -> (constructor, latent patch multiplier: 1 = one pixel-16 patch, 2 = the `_2` presets)
LATENT_MODELS = {
    "vit_base_patch_vae": (vit_base_patch_vae, 1),
    # USP's name for the same ViT-B latent MAE with 2x2 patches (its constructor fixes patch_size=2).
    "vit_base_patch2_vae": (vit_base_patch_vae, 1),
    "vit_base_patch_vae_2": (vit_base_patch_vae_2, 2),
    "vit_large_patch_vae": (vit_large_patch_vae, 1),
    "vit_large_patch_vae_2": (vit_large_patch_vae_2, 2),
    "vit_xlarge_patch_vae": (vit_xlarge_patch_vae, 1),
    "vit_huge_patch_vae": (vit_huge_patch_vae, 1),
    "lightningdit_base_patch_vae": (lightningdit_base_patch_vae, 1),
    "lightningdit_large_patch_vae": (lightningdit_large_patch_vae, 1),
    "lightningdit_xlarge_patch_vae": (lightningdit_xlarge_patch_vae, 1),
}
MAE_MODEL_NAMES = sorted([*PIXEL_MODELS, *LATENT_MODELS])


def is_pixel_model(name: str) -> bool:
    """True for the RGB presets (mae_vit_*), False for the latent ones; unknown name -> ValueError."""
    _check_name(name)
    return name in PIXEL_MODELS


def _check_name(name: str):
    if name not in PIXEL_MODELS and name not in LATENT_MODELS:
        raise UserError(f"unknown MAE model {name!r}; choose one of: {', '.join(MAE_MODEL_NAMES)}.")


def create_mae(name: str, input_size: int, vae_version: str = None, **kwargs) -> MaskedAutoencoderViT:
    """Builds a preset for `input_size`-pixel images.

    Pixel presets: img_size = input_size, in_chans = 3 (`vae_version` is not used).
    Latent presets: with the VAE's spec (default "d8"), img_size = input_size // factor,
    in_chans = spec.channels, patch_size = 16 // factor (x2 for `_2`), i.e. always the latent
    equivalent of a 16 (or 32) pixel patch. Any of these can be overridden through kwargs.
    """
    _check_name(name)
    if name in PIXEL_MODELS:
        return PIXEL_MODELS[name](**{"img_size": input_size, "in_chans": 3, **kwargs})
    constructor, patch_multiplier = LATENT_MODELS[name]
    spec = get_latent_spec(vae_version or "d8")
    derived = dict(
        img_size=spec.latent_size(input_size),
        in_chans=spec.channels,
        patch_size=max(1, 16 // spec.factor) * patch_multiplier,
    )
    return constructor(**{**derived, **kwargs})
