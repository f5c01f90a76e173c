"""LightningDiT's training and sampling recipe on the Linear / velocity transport, as pure functions.

Facts from hustvl/LightningDiT (transport/transport.py, train.py, configs/*_64ep_cfg.yaml):
- `use_lognorm`: t = sigmoid(u), u ~ N(0, 1) (a logit-normal, which the code calls lognorm), scaled to the
  training interval [t0, t1] (= [0, 1] for a velocity model on the Linear path);
- `use_cosine_loss`: per sample, 1 - cos(v_pred, v_target) taken over the channel axis at every
  position, averaged over positions; the training loss is mean(MSE) + mean(cosine);
- `timestep_shift` s (ODE sampling only): the grid t_n = n / (K - 1) becomes s t / (1 + (s - 1) t);
  s = 0.3 spends more of the 250 Euler steps near the noise end (t = 0);
- classifier-free guidance with `cfg_interval_start` 0.10: rows with t < 0.10 use the conditional
  velocity (see `LightningDiT.forward_with_cfg`), on the first 3 channels as DiT's legacy default.
"""
from typing import Optional

import torch
import torch.nn.functional as F

from generation.diffusion.utils import mean_flat

# The 64-epoch (FID 2.11) and 800-epoch (FID 1.35) settings of the released configs.
LIGHTNINGDIT_SAMPLING = dict(mode="ODE", sampling_method="euler", num_steps=250, timestep_shift=0.3,
                             cfg_interval_start=0.10, guidance_channels=3)
CFG_SCALE_64EP, CFG_SCALE_800EP = 10.0, 6.7


def logit_normal_timesteps(n: int, mu: float = 0.0, sigma: float = 1.0, t0: float = 0.0, t1: float = 1.0,
                           generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
    """(n,) float32 training times sigmoid(mu + sigma * N(0, 1)) * (t1 - t0) + t0."""
    u = torch.randn(n, generator=generator, device=generator.device if generator is not None else (device or "cpu"))
    t = torch.sigmoid(mu + sigma * u) * (t1 - t0) + t0
    return t if device is None else t.to(device)


def logit_normal_from_uniform(u: torch.Tensor, mu: float = 0.0, sigma: float = 1.0) -> torch.Tensor:
    """u (N,) uniform in [0, 1) -> sigmoid(mu + sigma * Phi^-1(u)): the same logit-normal law as
    `logit_normal_timesteps`, from a uniform the data pipeline drew per sample (u = 0 gives t = 0)."""
    return torch.sigmoid(mu + sigma * torch.special.ndtri(u.double())).to(u.dtype)


def velocity_cosine_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """pred, target (N, C, H, W) -> (N,): mean over positions of 1 - cos(pred, target) along channels."""
    return mean_flat(1 - F.cosine_similarity(pred, target, dim=1))


def lightningdit_loss(mse: torch.Tensor, pred: torch.Tensor, target: torch.Tensor,
                      use_cosine_loss: bool = True) -> torch.Tensor:
    """The scalar LightningDiT trains on: mean(mse) (+ mean(cosine) with use_cosine_loss); mse is (N,)."""
    loss = mse.mean()
    return loss + velocity_cosine_loss(pred, target).mean() if use_cosine_loss else loss


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """t in [0, 1] -> shift * t / (1 + (shift - 1) * t); shift <= 0 leaves t unchanged (the official switch)."""
    if shift <= 0:
        return t
    return shift * t / (1 + (shift - 1) * t)
