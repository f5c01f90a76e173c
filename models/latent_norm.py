"""Per-channel latent normalisation (VA-VAE / LightningDiT's `latent_norm` + `latent_multiplier`).

SD-VAE and KL-16 latents are brought to unit variance by one scale factor. VA-VAE's 32 channels are
not alike, so LightningDiT standardises each channel with statistics measured on the training set
(`latents_stats.pt`: {"mean": (1, C, 1, 1), "std": (1, C, 1, 1)}) and then multiplies by
`latent_multiplier` (1.0 in the released configs):

    normalised = (z - mean) / std * multiplier          (datasets/img_latent_dataset.py)
    z          = normalised * std / multiplier + mean     (inference.py, before decoding)

The file is written by `util.latent_stats` (computed from a latent cache), read by `ChannelNorm.load`.
`ChannelNorm.scalar(scale)` expresses the one-factor codecs in the same terms (mean 0, std 1,
multiplier = scale), giving exactly z * scale and x / scale.
"""
from pathlib import Path
from typing import Union

import torch
import torch.nn as nn

from util.errors import UserError



class ChannelNorm(nn.Module):
    """z (N, C, h, w) <-> normalised latents; buffers mean/std (1, C, 1, 1) travel with the codec."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, multiplier: float = 1.0, latent_norm: bool = True):
        super().__init__()
        mean, std = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)
        channels = mean.numel()
        if std.numel() != channels or not torch.all(std > 0):
            raise UserError(f"latent statistics need a positive std per channel matching the {channels} means "
                                   f"(got {std.numel()} stds, min {float(std.min()):.3g}); recompute latents_stats.pt.")
        self.register_buffer("mean", mean.reshape(1, channels, 1, 1))
        self.register_buffer("std", std.reshape(1, channels, 1, 1))
        self.multiplier = float(multiplier)
        self.latent_norm = latent_norm

    @classmethod
    def scalar(cls, scale: float, channels: int) -> "ChannelNorm":
        """The one-factor normalisation z * scale of SD-VAE / KL-16 (no per-channel statistics)."""
        return cls(torch.zeros(channels), torch.ones(channels), multiplier=scale, latent_norm=False)

    @classmethod
    def load(cls, path: Union[str, Path], multiplier: float = 1.0, latent_norm: bool = True) -> "ChannelNorm":
        """Reads LightningDiT's latents_stats.pt ({"mean", "std"}, any shape holding C values each)."""
        path = Path(path).expanduser()
        if not path.is_file():
            raise UserError(f"latent statistics file {str(path)!r} was not found; download latents_stats.pt "
                                   f"(released with the VA-VAE weights) or compute it with "
                                   f"`python -m util.latent_stats` on your training set.")
        stats = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(stats, dict) or not {"mean", "std"} <= set(stats):
            raise UserError(f"{str(path)!r} is not a latent statistics file: it needs 'mean' and 'std' "
                                   f"tensors (LightningDiT's latents_stats.pt layout).")
        return cls(stats["mean"], stats["std"], multiplier=multiplier, latent_norm=latent_norm)

    @property
    def channels(self) -> int:
        return self.mean.shape[1]

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents (N, C, h, w) -> model-space latents."""
        if self.latent_norm:
            return (z - self.mean.to(z.dtype)) / self.std.to(z.dtype) * self.multiplier
        return z * self.multiplier

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Model-space latents (N, C, h, w) -> raw latents for the decoder."""
        if self.latent_norm:  # the official order: (x * std) / multiplier + mean
            return x * self.std.to(x.dtype) / self.multiplier + self.mean.to(x.dtype)
        return x / self.multiplier

    def extra_repr(self) -> str:
        return f"channels={self.channels}, latent_norm={self.latent_norm}, multiplier={self.multiplier:g}"
