"""Per-channel latent statistics (LightningDiT's latents_stats.pt) computed from a latent cache.

For users without the released `latents_stats.pt`, or with another VAE / data set. What the official
code does (datasets/img_latent_dataset.py `compute_latent_stats`): pick min(10000, len) images at
random, take each one's stored latent (a posterior sample of the un-flipped image), and compute the
mean and the (unbiased) std over images and positions for each channel. Here the same estimate is
streamed instead of stacking 10000 latents in memory: each rank accumulates count, sum and sum of
squares per channel in float64 over its share of the chosen images, one all-reduce combines them.
The chosen images (a seeded permutation) and each image's posterior noise (`sample_generator(seed, 0,
index)`) do not depend on the number of ranks, so 1 and 8 processes give the same statistics.

The command is the latent cache's: `python -m pretrain.cache_latents ... --latent_stats` (see there).
"""
from pathlib import Path
from typing import Iterable, Optional

import torch
import torch.distributed as dist

from util.checkpoint import atomic_open
from util.run_log import progress
from util.rng import sample_generator

OFFICIAL_MAX_SAMPLES = 10000
LATENT_STATS_FILENAME = "latents_stats.pt"


def save_latent_stats(path, mean: torch.Tensor, std: torch.Tensor) -> Path:
    """Writes LightningDiT's layout {"mean", "std"}, each (1, C, 1, 1) float32, atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"mean": mean.detach().float().cpu().reshape(1, -1, 1, 1).clone(),
               "std": std.detach().float().cpu().reshape(1, -1, 1, 1).clone()}
    with atomic_open(path) as handle:
        torch.save(tensors, handle)
    return path


class RunningChannelStats:
    """Streaming per-channel mean / std over (N, C, h, w) batches, float64 accumulators."""

    def __init__(self, channels: int):
        self.count = torch.zeros((), dtype=torch.float64)
        self.total = torch.zeros(channels, dtype=torch.float64)
        self.total_sq = torch.zeros(channels, dtype=torch.float64)

    def update(self, latents: torch.Tensor) -> None:
        values = latents.detach().to("cpu", torch.float64).transpose(0, 1).reshape(latents.shape[1], -1)  # (C, M)
        self.count += values.shape[1]
        self.total += values.sum(dim=1)
        self.total_sq += values.square().sum(dim=1)

    def all_reduce(self, device: Optional[torch.device] = None) -> None:
        """Sums the accumulators over every rank (no-op without a process group)."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        packed = torch.cat([self.count.view(1), self.total, self.total_sq]).to(device or "cpu")
        dist.all_reduce(packed)
        packed = packed.cpu()
        channels = self.total.numel()
        self.count, self.total, self.total_sq = packed[0], packed[1:1 + channels], packed[1 + channels:]

    def mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std), each (1, C, 1, 1) float32; std is unbiased (divides by M - 1), as torch.std."""
        if self.count < 2:
            raise ValueError("latent statistics need at least two latent values per channel; use more images.")
        mean = self.total / self.count
        variance = (self.total_sq - self.count * mean.square()) / (self.count - 1)
        std = variance.clamp_min(0).sqrt()
        return mean.float().view(1, -1, 1, 1), std.float().view(1, -1, 1, 1)


def chosen_indices(num_items: int, max_samples: Optional[int], seed: int) -> list[int]:
    """min(max_samples, num_items) distinct item indices, a seeded random choice (all of them with None)."""
    if max_samples is None or max_samples >= num_items:
        return list(range(num_items))
    order = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed))
    return sorted(order[:max_samples].tolist())


def latent_samples(dataset, indices: Iterable[int], seed: int, batch: int = 256):
    """Yields (n, C, h, w) UNnormalised posterior samples of the un-flipped images at `indices`.

    dataset: a `util.latent_cache.LatentCacheDataset` (its `moments(index, flip)` gives mean, logvar).
    """
    chunk = []
    for index in indices:
        mean, logvar = dataset.moments(index, flip=0)
        noise = torch.randn(mean.shape, generator=sample_generator(seed, 0, index))
        chunk.append(mean + torch.exp(0.5 * logvar) * noise)
        if len(chunk) == batch:
            yield torch.stack(chunk)
            chunk = []
    if chunk:
        yield torch.stack(chunk)


def compute_latent_stats(dataset, max_samples: Optional[int] = OFFICIAL_MAX_SAMPLES, seed: int = 0,
                         rank: int = 0, world_size: int = 1, device: Optional[torch.device] = None,
                         show_progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std), each (1, C, 1, 1), of the cache's latents; every rank must call this (one all-reduce)."""
    indices = chosen_indices(len(dataset), max_samples, seed)
    stats = RunningChannelStats(int(dataset.manifest["channels"]))
    mine = indices[rank::world_size]
    for latents in progress(latent_samples(dataset, mine, seed), rank == 0 and show_progress, desc="latent stats"):
        stats.update(latents)
    stats.all_reduce(device)
    return stats.mean_std()
