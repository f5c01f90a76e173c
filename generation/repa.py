"""REPA's training signal (sihyun-yu/REPA loss.py `SILoss`, train.py): the alignment loss.

For every target encoder, every image and every token: -cos(projector output, encoder patch token),
averaged over tokens, images and encoders, and added to the diffusion/flow loss times `proj_coeff` (0.5).
The targets come from `models.repa` (frozen encoders, computed without gradients under the run's
autocast) or from the feature cache (`util.feature_cache`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_PROJ_COEFF = 0.5


def projection_loss(targets: list[torch.Tensor], projections: list[torch.Tensor]) -> torch.Tensor:
    """Per-sample REPA loss (N,): -cos(projection, target) averaged over tokens and encoders.

    targets[i], projections[i]: (N, T, z_dim_i). REPA's batch value is the mean of this over the batch.
    """
    if len(targets) != len(projections):
        raise ValueError(f"{len(projections)} projectors but {len(targets)} target encoders; build the model with "
                         "one z_dim per encoder.")
    per_encoder = []
    for target, projection in zip(targets, projections):
        if target.shape != projection.shape:
            raise ValueError(f"target tokens {tuple(target.shape)} do not match the projected tokens "
                             f"{tuple(projection.shape)}; the encoder grid must equal the DiT/SiT token grid.")
        cosine = (F.normalize(target.float(), dim=-1) * F.normalize(projection.float(), dim=-1)).sum(dim=-1)
        per_encoder.append(-cosine.mean(dim=1))  # (N,)
    return torch.stack(per_encoder).mean(dim=0)
