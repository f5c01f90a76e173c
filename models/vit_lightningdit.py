"""Classifier on LightningDiT blocks, for fine-tuning and linear probing a USP encoder of LightningDiT blocks.

The counterpart of `models.vit` for `models.mae.MaskedAutoencoderLightningDiT`: the same tensor names as the USP encoder
(cls_token, pos_embed (1, 1 + L, D), patch_embed.proj, blocks.i.*, norm) plus MAE's classifier parts
(fc_norm with global_pool, head), so `models.transfer.transfer_pretrained` loads the encoder into it
as it does for the ViT. The blocks see the full token grid with 2-D RoPE (cls token unrotated), as the
encoder did during pretraining on its visible tokens.

forward(latents (N, C, H, W)) -> logits (N, num_classes).
Presets `lightningdit_{base,large,xlarge}_vae` default to VA-VAE latents of 256 px images (16x16x32,
patch 1) and to the released block configuration (SwiGLU, RoPE, RMSNorm).
"""
import torch
import torch.nn as nn
from timm.layers import PatchEmbed

from models.layers import get_2d_sincos_pos_embed
from models.sizes import TRANSFORMER_SIZES
from models.lightningdit_layers import LightningEncoderBlock, RMSNorm, apply_rope, rope_tables


class LightningViT(nn.Module):
    """global_pool=True: head(fc_norm(mean of patch tokens)); False: head(norm(x)[:, 0]) (MAE's switch)."""

    def __init__(self, img_size: int = 16, patch_size: int = 1, in_chans: int = 32, num_classes: int = 1000,
                 embed_dim: int = 1152, depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0,
                 global_pool: bool = False, drop_path_rate: float = 0.0, use_qknorm: bool = False,
                 use_swiglu: bool = True, use_rope: bool = True, use_rmsnorm: bool = True):
        super().__init__()
        if img_size % patch_size != 0:
            raise ValueError(f"input side {img_size} is not divisible by the patch size {patch_size}; choose an "
                             f"input size whose latent side is a multiple of {patch_size}.")
        self.global_pool = global_pool
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # grows with depth (timm's linspace)
        self.blocks = nn.ModuleList([
            LightningEncoderBlock(embed_dim, num_heads, mlp_ratio, use_qknorm=use_qknorm, use_swiglu=use_swiglu,
                                  use_rmsnorm=use_rmsnorm, drop_path=rate)
            for rate in rates
        ])
        norm = (lambda: RMSNorm(embed_dim)) if use_rmsnorm else (lambda: nn.LayerNorm(embed_dim, eps=1e-6))
        if global_pool:
            self.fc_norm = norm()
        else:
            self.norm = norm()
        self.head = nn.Linear(embed_dim, num_classes)
        self.use_rope = use_rope
        if use_rope:
            cos, sin = rope_tables(embed_dim // num_heads, img_size // patch_size)
            # Row 0 is the cls token: angle 0 (cos 1, sin 0), as in the masked encoder.
            self.register_buffer("rope_cos", torch.cat([torch.ones_like(cos[:1]), cos]), persistent=False)
            self.register_buffer("rope_sin", torch.cat([torch.zeros_like(sin[:1]), sin]), persistent=False)
        self._init_weights(int(num_patches ** 0.5))

    def _init_weights(self, grid_size: int):
        pos_embed = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid_size, cls_token=True)
        self.pos_embed.data.copy_(torch.from_numpy(pos_embed).float().unsqueeze(0))
        nn.init.normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def no_weight_decay(self) -> set:
        return {"pos_embed", "cls_token"}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> pooled features (N, D)."""
        x = self.patch_embed(x) + self.pos_embed[:, 1:]
        cls_token = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls_token, x], dim=1)  # (N, 1 + L, D)
        rope = (lambda t: apply_rope(t, self.rope_cos, self.rope_sin)) if self.use_rope else None
        for block in self.blocks:
            x = block(x, rope=rope)
        if self.global_pool:
            return self.fc_norm(x[:, 1:].mean(dim=1))
        return self.norm(x)[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def _preset(size: str):
    hidden_size, depth, num_heads = TRANSFORMER_SIZES[size]

    def build(**kwargs):
        return LightningViT(**{"embed_dim": hidden_size, "depth": depth, "num_heads": num_heads, **kwargs})

    build.__doc__ = f"Classifier on LightningDiT-{size} blocks ({hidden_size}/{depth}/{num_heads}), VA-VAE latents."
    return build


LIGHTNINGDIT_VIT_MODELS = {f"lightningdit_{name}_vae": _preset(size)
                           for name, size in (("base", "B"), ("large", "L"), ("xlarge", "XL"))}
