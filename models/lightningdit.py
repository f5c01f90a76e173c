"""LightningDiT (hustvl/LightningDiT): DiT with SwiGLU, RMSNorm, 2-D RoPE, optional QK-norm and wo_shift.

Constructor keywords and parameter names are the official ones, so the released checkpoints
(lightningdit-xl-imagenet256-64ep.pt / -800ep.pt) load with `strict=True`:

    x_embedder.proj.*, pos_embed (fixed sin-cos), t_embedder.mlp.{0,2}.*, y_embedder.embedding_table.weight
    feat_rope.freqs_{cos,sin}                    (T, head_dim) RoPE tables, persistent buffers (use_rope)
    blocks.i.{norm1,norm2}.weight                RMSNorm (use_rmsnorm; parameter-free LayerNorm otherwise)
    blocks.i.attn.{qkv,proj}.*, blocks.i.attn.{q_norm,k_norm}.* (use_qknorm)
    blocks.i.mlp.{w12,w3}.* (use_swiglu) | blocks.i.mlp.{fc1,fc2}.*
    blocks.i.adaLN_modulation.1.*                6D outputs, or 4D with wo_shift (scale/gate only)
    final_layer.{norm_final,linear,adaLN_modulation.1}.*

Official defaults kept: every feature flag off, in_channels 32, learn_sigma False (with learn_sigma the
output is chunked back to in_channels, as theirs), guidance on the first 3 channels. The 64/800-epoch
recipes turn on use_swiglu, use_rope and use_rmsnorm (use_qknorm and wo_shift stay off).

The class reuses DiT's weight initialisation, unpatchify and classifier-free guidance: apart from the
blocks and RoPE the two networks are the same (the official file is derived from DiT's).
"""
from typing import Optional

import torch
import torch.nn as nn
from timm.layers import PatchEmbed
from torch.utils.checkpoint import checkpoint

from models.dit import DiT, check_sizes
from models.layers import LabelEmbedder, TimestepEmbedder
from models.lightningdit_layers import LightningEncoderBlock, RMSNorm, VisionRotaryEmbeddingFast
from models.sizes import TRANSFORMER_SIZES


def modulate(x: torch.Tensor, shift: Optional[torch.Tensor], scale: torch.Tensor) -> torch.Tensor:
    """x (N, T, D) * (1 + scale) + shift, with shift None under wo_shift."""
    x = x * (1 + scale.unsqueeze(1))
    return x if shift is None else x + shift.unsqueeze(1)


class LightningDiTBlock(LightningEncoderBlock):
    """adaLN-Zero block: x (N, T, D), c (N, D), rope -> (N, T, D)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, use_qknorm: bool = False,
                 use_swiglu: bool = False, use_rmsnorm: bool = False, wo_shift: bool = False):
        super().__init__(hidden_size, num_heads, mlp_ratio, use_qknorm=use_qknorm, use_swiglu=use_swiglu,
                         use_rmsnorm=use_rmsnorm)
        chunks = 4 if wo_shift else 6
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, chunks * hidden_size, bias=True))
        self.wo_shift = wo_shift

    def forward(self, x: torch.Tensor, c: torch.Tensor, feat_rope=None) -> torch.Tensor:
        if self.wo_shift:
            scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(4, dim=1)
            shift_msa = shift_mlp = None
        else:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope=feat_rope)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """adaLN-modulated norm + linear: (N, T, D), c (N, D) -> (N, T, p*p*out_channels)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, use_rmsnorm: bool = False):
        super().__init__()
        self.norm_final = (RMSNorm(hidden_size) if use_rmsnorm
                           else nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6))
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class LightningDiT(DiT):
    """forward(x (N, C, H, W), t (N,), y (N,)) -> (N, C, H, W) velocity (in_channels outputs).

    Only square latent grids of `input_size` are accepted (the sin-cos and RoPE tables are square, as
    in the official model); another grid is refused with one sentence before any work.
    """

    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 32, hidden_size: int = 1152,
                 depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0, class_dropout_prob: float = 0.1,
                 num_classes: int = 1000, learn_sigma: bool = False, use_qknorm: bool = False,
                 use_swiglu: bool = False, use_rope: bool = False, use_rmsnorm: bool = False,
                 wo_shift: bool = False, use_checkpoint: bool = False):
        # DiT.__init__ would build DiT blocks; this network only shares DiT's methods, so start from nn.Module.
        nn.Module.__init__(self)
        check_sizes(input_size, patch_size, hidden_size, num_heads)
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.input_size = input_size
        self.use_rope, self.use_rmsnorm, self.use_checkpoint = use_rope, use_rmsnorm, use_checkpoint
        self.affine_norm = use_rmsnorm  # what DiT calls the affine block norms, for code that asks

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, hidden_size), requires_grad=False)
        self.feat_rope = (VisionRotaryEmbeddingFast(dim=hidden_size // num_heads // 2,
                                                    pt_seq_len=input_size // patch_size) if use_rope else None)
        self.blocks = nn.ModuleList([
            LightningDiTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio, use_qknorm=use_qknorm,
                              use_swiglu=use_swiglu, use_rmsnorm=use_rmsnorm, wo_shift=wo_shift)
            for _ in range(depth)
        ])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, use_rmsnorm=use_rmsnorm)
        self.initialize_weights()

    def _check_grid(self, x: torch.Tensor):
        expected = (self.in_channels, self.input_size, self.input_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"LightningDiT was built for latents (N, {expected[0]}, {expected[1]}, {expected[2]}) "
                             f"(its position and RoPE tables are square) but got {tuple(x.shape)}; feed square "
                             f"latents of that size or build the model with the matching input_size / in_channels.")

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                force_drop_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (N, C, H, W), t (N,) in [0, 1] (t = 1 at the data), y (N,) -> (N, C, H, W)."""
        self._check_grid(x)
        x = self.x_embedder(x) + self.pos_embed  # (N, T, D)
        c = self.t_embedder(t) + self.y_embedder(y, self.training, force_drop_ids)  # (N, D)
        for block in self.blocks:
            if self.use_checkpoint and torch.is_grad_enabled():
                x = checkpoint(block, x, c, self.feat_rope, use_reentrant=False)
            else:
                x = block(x, c, self.feat_rope)
        x = self.unpatchify(self.final_layer(x, c))  # (N, out_channels, H, W)
        return x.chunk(2, dim=1)[0] if self.learn_sigma else x

    def forward_with_cfg(self, x, t, y, cfg_scale, cfg_interval=None, cfg_interval_start=None,
                         guidance_channels=3, guidance_interval=None):
        """Classifier-free guidance (see DiT.forward_with_cfg), accepting the official keywords too.

        cfg_interval=True with cfg_interval_start s (LightningDiT): rows with t < s get the conditional
        prediction, i.e. guidance only on [s, 1]; the same as guidance_interval=(s, 1).
        """
        if cfg_interval is True and cfg_interval_start is not None:
            guidance_interval = (float(cfg_interval_start), 1.0)
        return super().forward_with_cfg(x, t, y, cfg_scale, guidance_channels=guidance_channels,
                                        guidance_interval=guidance_interval)


# --------------------------------------------------------------------------------------
# Presets: the official names (plus L/1, which the table needs and the official file lacks)
# --------------------------------------------------------------------------------------

# name -> (hidden_size, depth, num_heads) from the shared table: DiT's B/L/XL and LightningDiT's 1p0B/1p6B.
LIGHTNINGDIT_SIZES = {size: tuple(TRANSFORMER_SIZES[size]) for size in ("B", "L", "XL", "1p0B", "1p6B")}


def _preset(size: str, patch_size: int):
    hidden_size, depth, num_heads = LIGHTNINGDIT_SIZES[size]

    def build(**kwargs):
        return LightningDiT(**{"depth": depth, "hidden_size": hidden_size, "patch_size": patch_size,
                               "num_heads": num_heads, **kwargs})

    build.__name__ = f"LightningDiT_{size}_{patch_size}"
    build.__doc__ = f"LightningDiT-{size}/{patch_size}: width {hidden_size}, depth {depth}, {num_heads} heads."
    return build


LightningDiT_models = {f"LightningDiT-{size}/{p}": _preset(size, p) for size in LIGHTNINGDIT_SIZES for p in (1, 2)}
globals().update({builder.__name__: builder for builder in LightningDiT_models.values()})
