"""USP's masked latent modeling with an encoder made of LightningDiT blocks (SwiGLU, RMSNorm, 2-D RoPE).

The MAE of `models.mae` with its timm encoder blocks replaced by `LightningEncoderBlock`s: every encoder
tensor (`patch_embed.proj`, `pos_embed`, `blocks.i.{norm1,attn,norm2,mlp}`) has the name and shape of its
LightningDiT counterpart (`x_embedder.proj`, `pos_embed`, `blocks.i.*`), so `models.transfer` initialises
LightningDiT-{B,L,XL}/1 from it block for block, the adaLN modulation and final layer staying new. The
decoder is MAE's (timm blocks), used for pretraining only.

RoPE on a masked sequence: each kept token is rotated by the angles of its own grid position (the
full-grid table indexed by the kept ids), and the cls token is not rotated (angle 0), so attention
sees the same relative positions as LightningDiT does on the full grid. The RoPE tables are not
saved (they are rebuilt from the grid), matching nothing in the checkpoint by accident.

Presets (`lightningdit_{base,large,xlarge}_patch_vae`) default to VA-VAE latents of 256 px images
(16x16x32, patch 1, i.e. LightningDiT-{B,L,XL}/1's token grid) and to the released LightningDiT block
configuration (use_swiglu, use_rope, use_rmsnorm on; use_qknorm off).
"""
from functools import partial

import torch
import torch.nn as nn

from models.lightningdit import LIGHTNINGDIT_SIZES
from models.lightningdit_layers import LightningEncoderBlock, RMSNorm, apply_rope, rope_tables
from models.mae import _DECODER, MaskedAutoencoderViT


class MaskedAutoencoderLightningDiT(MaskedAutoencoderViT):
    """MaskedAutoencoderViT whose encoder blocks are LightningDiT's; same forward contract.

    forward(latents (N, C, H, W), mask_ratio, target=None, noise=None) -> (loss, pred (N, L, p*p*C), mask (N, L)).
    """

    def __init__(self, img_size: int = 16, patch_size: int = 1, in_chans: int = 32, embed_dim: int = 1152,
                 depth: int = 28, num_heads: int = 16, decoder_embed_dim: int = 512, decoder_depth: int = 8,
                 decoder_num_heads: int = 16, mlp_ratio: float = 4.0, norm_pix_loss: bool = False,
                 norm_image: bool = False, use_qknorm: bool = False, use_swiglu: bool = True, use_rope: bool = True,
                 use_rmsnorm: bool = True):
        # The parent builds the patch embedding, positions, cls token and decoder; depth=0 skips its encoder.
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


def _preset(size: str):
    hidden_size, depth, num_heads = LIGHTNINGDIT_SIZES[size]

    def build(**kwargs):
        defaults = dict(img_size=16, patch_size=1, in_chans=32, embed_dim=hidden_size, depth=depth,
                        num_heads=num_heads, mlp_ratio=4, **_DECODER)
        return MaskedAutoencoderLightningDiT(**{**defaults, **kwargs})

    build.__doc__ = (f"Latent MAE with LightningDiT-{size} encoder blocks ({hidden_size}/{depth}/{num_heads}); every "
                     f"encoder tensor transfers into LightningDiT-{size}/1.")
    return build


lightningdit_base_patch_vae = _preset("B")
lightningdit_large_patch_vae = _preset("L")
lightningdit_xlarge_patch_vae = _preset("XL")

# name -> (constructor, latent patch multiplier), the shape of models.mae.LATENT_MODELS.
LIGHTNINGDIT_MAE_MODELS = {
    "lightningdit_base_patch_vae": (lightningdit_base_patch_vae, 1),
    "lightningdit_large_patch_vae": (lightningdit_large_patch_vae, 1),
    "lightningdit_xlarge_patch_vae": (lightningdit_xlarge_patch_vae, 1),
}
