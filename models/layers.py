"""Building blocks shared by the MAE, ViT, DiT and SiT networks.

Attention, MLP, patch embedding and the pre-norm transformer block are timm's, imported where they are used
(`Attention`/`Block` from `timm.models.vision_transformer`, `Mlp`/`PatchEmbed` from `timm.layers`):
their parameter names (`attn.qkv`, `attn.proj`, `mlp.fc1`, `mlp.fc2`, `patch_embed.proj`) are the
ones the official DiT, SiT and MAE checkpoints use, and timm's attention goes through
`F.scaled_dot_product_attention` (flash / memory-efficient kernels on CUDA).

What is written here is what those repos define themselves: the fixed 2-D sin-cos position
embedding (MAE and DiT share the formula), the adaLN `modulate`, and DiT's timestep and
label embedders.
"""
import math

import numpy as np
import torch
import torch.nn as nn


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation: x (N, T, D), shift/scale (N, D) -> x * (1 + scale) + shift, (N, T, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# --------------------------------------------------------------------------------------
# 2-D sine/cosine position embedding (MAE / DiT formula)
# --------------------------------------------------------------------------------------

def get_1d_sincos_pos_embed_from_grid(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """Positions `pos` (any shape, M values) -> (M, embed_dim): [sin(pos*w_k) for k | cos(pos*w_k) for k].

    w_k = 1 / 10000^(k / (embed_dim/2)), k = 0 .. embed_dim/2 - 1.
    """
    if embed_dim % 2 != 0:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {embed_dim}; use an even width.")
    omega = np.arange(embed_dim // 2, dtype=np.float64)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000 ** omega  # (D/2,)
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)  # (M, D/2) outer product
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # (M, D)


def get_2d_sincos_pos_embed_from_grid(embed_dim: int, grid: np.ndarray) -> np.ndarray:
    """grid (2, 1, H, W) of (w, h) coordinates -> (H*W, embed_dim); first half encodes grid[0], second grid[1]."""
    if embed_dim % 4 != 0:
        raise ValueError(f"2-D sin-cos embedding needs a width divisible by 4, got {embed_dim}; use a multiple of 4.")
    emb_h = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])  # (H*W, D/2)
    emb_w = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])  # (H*W, D/2)
    return np.concatenate([emb_h, emb_w], axis=1)  # (H*W, D)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int, cls_token: bool = False, extra_tokens: int = 0) -> np.ndarray:
    """Fixed 2-D sin-cos table for a square grid, row-major over patches.

    Returns (grid_size*grid_size, embed_dim), or (extra + grid_size*grid_size, embed_dim) with
    `extra` zero rows in front when `cls_token` (MAE: one row) or `extra_tokens > 0` (DiT signature).
    As in MAE/DiT the first half of the channels encodes the column (w) index and the second half
    the row (h) index, because the meshgrid is built as (w, h).
    """
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.meshgrid(grid_w, grid_h)  # w goes first, as in the official code
    grid = np.stack(grid, axis=0).reshape([2, 1, grid_size, grid_size])
    pos_embed = get_2d_sincos_pos_embed_from_grid(embed_dim, grid)
    extra = max(extra_tokens, 1 if cls_token else 0)
    if extra > 0:
        pos_embed = np.concatenate([np.zeros([extra, embed_dim]), pos_embed], axis=0)
    return pos_embed


# --------------------------------------------------------------------------------------
# Conditioning embedders (DiT / SiT)
# --------------------------------------------------------------------------------------

class TimestepEmbedder(nn.Module):
    """Scalar timesteps (N,) -> vectors (N, hidden_size): sinusoidal features then a 2-layer SiLU MLP.

    DiT feeds integer diffusion steps (0..999); SiT feeds continuous t in [0, 1]; the module is the same.
    """

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000) -> torch.Tensor:
        """t (N,) possibly fractional -> (N, dim) = [cos(t*f_k) | sin(t*f_k)], f_k = max_period^(-k/half)."""
        half = dim // 2
        freqs = torch.exp(
            -math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32, device=t.device) / half
        )
        args = t[:, None].float() * freqs[None]  # (N, half)
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)
        # Under autocast the Linear casts its input itself; outside it the MLP's dtype decides.
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels (N,) -> vectors (N, hidden_size), with label dropout for classifier-free guidance.

    With dropout_prob > 0 the table has one extra row (index num_classes) for the "null" class that
    dropped labels and the unconditional half of a CFG batch use.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor = None) -> torch.Tensor:
        """Replaces labels by the null class: at random (train) or exactly where force_drop_ids == 1."""
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor = None) -> torch.Tensor:
        use_dropout = self.dropout_prob > 0
        if (train and use_dropout) or (force_drop_ids is not None):
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)
