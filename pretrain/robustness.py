"""USP's robustness probes of an understanding model (main_finetune / main_linprobe flags).

- `--add_noise --noise_level S`: ImageNet-C's Gaussian noise at severity S (1-5) on the evaluation
  images, after the centre crop: x in [0, 1] plus N(0, c^2) with c = .08, .12, .18, .26, .38, clipped to
  [0, 1] and truncated back to uint8 (USP's `GaussianNoise`, from Hendrycks & Dietterich).
- `--add_t_noise --t T`: the latents are diffused to DDPM step T of the linear 1e-4..0.02 schedule,
  z_T = sqrt(abar_T) z + sqrt(1 - abar_T) eps with abar_T = prod_{s<=T} (1 - beta_s), in training and
  evaluation (USP's engine_finetune).
"""
import numpy as np
import torch
from PIL import Image

GAUSSIAN_NOISE_STD = (0.08, 0.12, 0.18, 0.26, 0.38)  # ImageNet-C severities 1..5


class GaussianNoise:
    """PIL RGB image -> PIL RGB image with ImageNet-C Gaussian noise of `severity` (1-5).

    The noise comes from NumPy's global generator (as USP), which SeededDataset reseeds per sample.
    """

    def __init__(self, severity: int = 1):
        if severity not in range(1, 6):
            raise ValueError(f"--noise_level must be 1..5 (ImageNet-C severities), got {severity}.")
        self.std = GAUSSIAN_NOISE_STD[severity - 1]

    def __call__(self, image: Image.Image) -> Image.Image:
        if not isinstance(image, Image.Image):
            raise TypeError("GaussianNoise expects a PIL image (place it before ToTensor).")
        pixels = np.asarray(image, dtype=np.uint8) / 255.0
        noisy = np.clip(pixels + np.random.normal(size=pixels.shape, scale=self.std), 0, 1) * 255
        return Image.fromarray(noisy.astype(np.uint8))


def ddpm_alpha_bar(t: int, num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> float:
    """abar_t of the linear DDPM schedule, t in 1..num_steps (USP indexes alpha_cumprod[t - 1])."""
    if not 1 <= t <= num_steps:
        raise ValueError(f"--t must be in 1..{num_steps}, got {t}.")
    betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float32)
    return torch.cumprod(1 - betas, dim=0)[t - 1].item()


def diffuse_latents(latents: torch.Tensor, alpha_bar: float, generator=None) -> torch.Tensor:
    """latents (N, C, h, w) -> sqrt(abar) latents + sqrt(1 - abar) eps, eps ~ N(0, I)."""
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    return alpha_bar ** 0.5 * latents + (1 - alpha_bar) ** 0.5 * noise
