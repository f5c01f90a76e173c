"""Training samples for DiT/SiT with every random quantity keyed by (seed, epoch, index).

A sample is a dict: the input (`x`: an image in [-1, 1] for the online VAE path, or scaled latents from
the latent cache), the label `y`, and the objective's randomness (`u`, `noise`, `drop`, plus
`posterior_noise` when the VAE runs online). Everything comes from generators seeded by the sample's
key, so a global batch is the same whatever the world size, the number of workers or the step a run
was resumed from; the loop itself draws no random numbers.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch.utils.data import Dataset

from util.rng import sample_generator

# The flip (and, for the cache, posterior noise) already uses sample_generator(seed, ...); the objective's
# noise uses a second stream so the two are independent. sample_seed hashes the seed, so any offset works.
NOISE_STREAM_OFFSET = 0x5EED_D1F


class GenerationTrainSet(Dataset):
    """Wraps a keyed dataset `base[(epoch, index)] -> (x, label, index)` and adds the objective's noise.

    latent_shape: (C, h, w) of the latents the network sees.
    class_dropout_prob: probability that the label is replaced by the null class (CFG training).
    online_vae: also draw `posterior_noise` (C, h, w) for sampling the VAE posterior in the loop.
    features: a REPA feature cache (`util.feature_cache.FeatureCache`) paired with a latent-cache `base`: each
    sample also gets the target features of the same image in the same orientation as its latent.
    Returns {"x", "y" (int64), "u" (float32 scalar), "noise" (C, h, w), "drop" (int64 0/1)
    [, "posterior_noise" (C, h, w)] [, "repa_features" (T, D) float32]}.
    """

    def __init__(self, base: Dataset, latent_shape: Sequence[int], seed: int, class_dropout_prob: float,
                 online_vae: bool, features=None):
        self.base = base
        self.latent_shape = tuple(latent_shape)
        self.noise_seed = int(seed) + NOISE_STREAM_OFFSET
        self.class_dropout_prob = float(class_dropout_prob)
        self.online_vae = online_vae
        self.features = features

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        epoch, index = key
        x, label, _ = self.base[key]
        generator = sample_generator(self.noise_seed, epoch, index)
        sample = {
            "x": x,
            "y": torch.as_tensor(label, dtype=torch.long),
            "u": torch.rand((), generator=generator),
            "drop": (torch.rand((), generator=generator) < self.class_dropout_prob).long(),
            "noise": torch.randn(self.latent_shape, generator=generator),
        }
        if self.online_vae:
            sample["posterior_noise"] = torch.randn(self.latent_shape, generator=generator)
        if self.features is not None:
            # The latent cache's own choice of orientation for this draw, so latent and features agree.
            image_index = int(self.base.image_index[index])
            sample["repa_features"] = self.features.features(image_index, self.base.flip_of(epoch, index))
        return sample
