"""Building blocks of LightningDiT (Yao et al., "Reconstruction vs. Generation", hustvl/LightningDiT).

Shared by `models.lightningdit` (the diffusion transformer), `models.mae.MaskedAutoencoderLightningDiT` (USP's
masked latent model whose encoder blocks are these), so an encoder block and a LightningDiT block
hold the same tensors under the same names:

    norm1.weight, norm2.weight               RMSNorm (use_rmsnorm) - or parameter-free LayerNorms
    attn.qkv.{weight,bias}, attn.proj.*      attention; attn.{q,k}_norm.* with use_qknorm
    mlp.w12.*, mlp.w3.*                      SwiGLU FFN (use_swiglu) - or mlp.fc1/fc2 (tanh-GELU MLP)

Facts taken from the official code (not its source): RMSNorm eps 1e-6 computed in float32 then cast
back and scaled by `weight`; the SwiGLU hidden width is `int(2/3 * mlp_ratio * D)` with no rounding to
a multiple of 8 (their SwiGLUFFN, not the fused xformers variant); QK-norm is a LayerNorm(head_dim)
(eps 1e-5, affine) or, with use_rmsnorm, an RMSNorm(head_dim); RoPE is EVA-02's
`VisionRotaryEmbeddingFast` with dim = head_dim / 2 per axis: the first half of each head's channels
rotates with the row index, the second half with the column index, channel pairs interleaved.
"""
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp

Rope = Callable[[torch.Tensor], torch.Tensor]


class RMSNorm(nn.Module):
    """x (..., D) -> x / sqrt(mean(x^2) + eps) * weight, the statistics in float32 (LLaMA's RMSNorm)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class SwiGLUFFN(nn.Module):
    """x (..., D) -> w3(silu(a) * b) with [a | b] = w12(x), hidden width `hidden_features`."""

    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.w12 = nn.Linear(in_features, 2 * hidden_features, bias=True)
        self.w3 = nn.Linear(hidden_features, in_features, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


def swiglu_hidden_features(hidden_size: int, mlp_ratio: float) -> int:
    """LightningDiT's SwiGLU width: two thirds of the GELU MLP's, truncated (XL: 3072, L: 2730, B: 2048)."""
    return int(2 / 3 * int(hidden_size * mlp_ratio))


# ----------------------------------------------------------------------------------------------
# 2-D rotary position embedding
# ----------------------------------------------------------------------------------------------

def rope_tables(head_dim: int, grid_size: int, theta: float = 10000.0):
    """(cos, sin), each (grid_size**2, head_dim), for tokens in row-major order on a square grid.

    Each axis gets head_dim / 2 channels with frequencies theta^(-2k / (head_dim / 2)), k < head_dim / 4,
    each frequency repeated for the two channels of a rotated pair.
    """
    if head_dim % 4 != 0:
        raise ValueError(f"2-D RoPE needs a head dimension divisible by 4, got {head_dim}; change the width or "
                         f"the number of heads.")
    axis_dim = head_dim // 2
    freqs = 1.0 / (theta ** (torch.arange(0, axis_dim, 2)[: axis_dim // 2].float() / axis_dim))
    # arange(L) / L * L, as the official table builds positions (exact for powers of two).
    positions = torch.arange(grid_size) / grid_size * grid_size
    angles = torch.einsum("i,f->if", positions, freqs).repeat_interleave(2, dim=-1)  # (L, axis_dim)
    rows = angles[:, None, :].expand(grid_size, grid_size, axis_dim)
    cols = angles[None, :, :].expand(grid_size, grid_size, axis_dim)
    table = torch.cat([rows, cols], dim=-1).reshape(grid_size * grid_size, head_dim)
    return table.cos(), table.sin()


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(..., 2k) with interleaved pairs (a, b) -> (-b, a)."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (N, heads, T, head_dim) rotated by cos/sin broadcastable to it ((T, hd) or (N, 1, T, hd))."""
    return x * cos + rotate_pairs(x) * sin


class VisionRotaryEmbeddingFast(nn.Module):
    """The 2-D RoPE of a square grid of `pt_seq_len` x `pt_seq_len` tokens, for heads of 2 * `dim` channels.

    Buffers `freqs_cos` / `freqs_sin` (T, 2 * dim) are persistent, as in the official module, so they are
    part of a released LightningDiT state dict. forward(q or k (N, heads, T, 2 * dim)) -> same shape.
    """

    def __init__(self, dim: int, pt_seq_len: int = 16):
        super().__init__()
        cos, sin = rope_tables(2 * dim, pt_seq_len)
        self.grid_size = pt_seq_len
        self.register_buffer("freqs_cos", cos)
        self.register_buffer("freqs_sin", sin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] != self.freqs_cos.shape[0]:
            raise ValueError(f"RoPE was built for a {self.grid_size}x{self.grid_size} token grid "
                             f"({self.freqs_cos.shape[0]} tokens) but got {x.shape[-2]} tokens; build the model "
                             f"for this latent size.")
        return apply_rope(x, self.freqs_cos, self.freqs_sin)


# ----------------------------------------------------------------------------------------------
# Attention and the unconditioned block
# ----------------------------------------------------------------------------------------------

class Attention(nn.Module):
    """Multi-head self-attention with optional QK-norm and RoPE: x (N, T, D) -> (N, T, D)."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_norm: bool = False,
                 use_rmsnorm: bool = False):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads; change one of them.")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        norm_layer = RMSNorm if use_rmsnorm else nn.LayerNorm
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: Optional[Rope] = None) -> torch.Tensor:
        n, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(n, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (N, heads, T, head_dim)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rope(q), rope(k)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(n, tokens, dim))


def _tanh_gelu():
    return nn.GELU(approximate="tanh")


class LightningEncoderBlock(nn.Module):
    """Pre-norm transformer block with LightningDiT's layers and no conditioning: x (N, T, D) -> (N, T, D).

    `LightningDiTBlock` is this block plus adaLN modulation, so every tensor of an encoder built from
    these blocks has a same-named, same-shaped counterpart in LightningDiT.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, use_qknorm: bool = False,
                 use_swiglu: bool = False, use_rmsnorm: bool = False, drop_path: float = 0.0):
        super().__init__()
        # Stochastic depth for fine-tuning a classifier on these blocks (no parameters; LightningDiT uses none).
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        if use_rmsnorm:
            self.norm1, self.norm2 = RMSNorm(hidden_size), RMSNorm(hidden_size)
        else:
            self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
            self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True, qk_norm=use_qknorm,
                              use_rmsnorm=use_rmsnorm)
        if use_swiglu:
            self.mlp = SwiGLUFFN(hidden_size, swiglu_hidden_features(hidden_size, mlp_ratio))
        else:
            self.mlp = Mlp(in_features=hidden_size, hidden_features=int(hidden_size * mlp_ratio),
                           act_layer=_tanh_gelu, drop=0)

    def forward(self, x: torch.Tensor, rope: Optional[Rope] = None) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), rope=rope))
        return x + self.drop_path(self.mlp(self.norm2(x)))
