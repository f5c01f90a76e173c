"""Interpolation paths x_t = alpha_t * x1 + sigma_t * x0 between noise x0 (t = 0) and data x1 (t = 1).

SiT's conventions: t = 1 is data. Each plan gives alpha_t, sigma_t and their time derivatives, the
velocity target d/dt x_t, and the conversions between velocity, score and noise that the samplers
need. `compute_drift` returns the coefficients (-f, g) of the reverse-time ODE written as
velocity = f(x, t) + g(t) * score, with f linear in x.
"""
import math

import torch

from .utils import expand_t_like_x

DIFFUSION_FORMS = ("constant", "SBDM", "sigma", "linear", "decreasing", "increasing-decreasing")


class ICPlan:
    """The Linear path (stochastic interpolant / rectified flow): alpha_t = t, sigma_t = 1 - t."""

    def compute_alpha_t(self, t):
        """(alpha_t, d alpha_t / dt)."""
        return t, torch.ones_like(t)

    def compute_sigma_t(self, t):
        """(sigma_t, d sigma_t / dt)."""
        return 1 - t, -torch.ones_like(t)

    def compute_d_alpha_alpha_ratio_t(self, t):
        """d log(alpha_t) / dt, computed stably per path."""
        return 1 / t

    def compute_drift(self, x, t):
        """(-f, g) with velocity = f + g * score: f = (alpha'/alpha) x, g = (alpha'/alpha) sigma^2 - sigma sigma'.

        x (N, ...), t (N,); the returned g is broadcastable to x.
        """
        t = expand_t_like_x(t, x)
        alpha_ratio = self.compute_d_alpha_alpha_ratio_t(t)
        sigma_t, d_sigma_t = self.compute_sigma_t(t)
        drift = alpha_ratio * x
        diffusion = alpha_ratio * sigma_t**2 - sigma_t * d_sigma_t
        return -drift, diffusion

    def compute_diffusion(self, x, t, form="constant", norm=1.0):
        """The SDE sampler's diffusion coefficient w(t), broadcastable to x (N, ...).

        The reverse SDE is dx = [v + w s] dt + sqrt(2 w) dW; every form keeps the same marginals.
        """
        t = expand_t_like_x(t, x)
        if form == "constant":
            return torch.full_like(t, norm)
        if form == "SBDM":  # the score-based diffusion model's own g
            return norm * self.compute_drift(x, t)[1]
        if form == "sigma":
            return norm * self.compute_sigma_t(t)[0]
        if form == "linear":
            return norm * (1 - t)
        if form == "decreasing":
            return 0.25 * (norm * torch.cos(math.pi * t) + 1) ** 2
        if form == "increasing-decreasing":
            return norm * torch.sin(math.pi * t) ** 2
        raise ValueError(f"unknown diffusion form {form!r}; use one of {', '.join(DIFFUSION_FORMS)}.")

    def get_score_from_velocity(self, velocity, x, t):
        """score = (alpha/alpha' v - x) / (sigma^2 - alpha/alpha' sigma' sigma); all (N, ...)."""
        t = expand_t_like_x(t, x)
        alpha_t, d_alpha_t = self.compute_alpha_t(t)
        sigma_t, d_sigma_t = self.compute_sigma_t(t)
        reverse_alpha_ratio = alpha_t / d_alpha_t
        variance = sigma_t**2 - reverse_alpha_ratio * d_sigma_t * sigma_t
        return (reverse_alpha_ratio * velocity - x) / variance

    def get_noise_from_velocity(self, velocity, x, t):
        """The x0 consistent with (x_t, v): (alpha/alpha' v - x) / (alpha/alpha' sigma' - sigma)."""
        t = expand_t_like_x(t, x)
        alpha_t, d_alpha_t = self.compute_alpha_t(t)
        sigma_t, d_sigma_t = self.compute_sigma_t(t)
        reverse_alpha_ratio = alpha_t / d_alpha_t
        return (reverse_alpha_ratio * velocity - x) / (reverse_alpha_ratio * d_sigma_t - sigma_t)

    def get_velocity_from_score(self, score, x, t):
        """velocity = f + g * score (see compute_drift)."""
        minus_f, g = self.compute_drift(x, t)
        return g * score - minus_f

    def compute_mu_t(self, t, x0, x1):
        """x_t = alpha_t x1 + sigma_t x0 for t (N,), x0 and x1 (N, ...)."""
        t = expand_t_like_x(t, x1)
        return self.compute_alpha_t(t)[0] * x1 + self.compute_sigma_t(t)[0] * x0

    def compute_xt(self, t, x0, x1):
        return self.compute_mu_t(t, x0, x1)

    def compute_ut(self, t, x0, x1, xt):
        """The conditional velocity target alpha'_t x1 + sigma'_t x0 (xt unused, kept for SiT's signature)."""
        t = expand_t_like_x(t, x1)
        return self.compute_alpha_t(t)[1] * x1 + self.compute_sigma_t(t)[1] * x0

    def plan(self, t, x0, x1):
        """(t, x_t, u_t) for a training batch."""
        xt = self.compute_xt(t, x0, x1)
        return t, xt, self.compute_ut(t, x0, x1, xt)


class VPCPlan(ICPlan):
    """The VP path of score-based diffusion with a linear beta(s) from sigma_min to sigma_max, s = 1 - t."""

    def __init__(self, sigma_min=0.1, sigma_max=20.0):
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def _log_mean_coeff(self, t):
        return -0.25 * (1 - t) ** 2 * (self.sigma_max - self.sigma_min) - 0.5 * (1 - t) * self.sigma_min

    def _d_log_mean_coeff(self, t):
        return 0.5 * (1 - t) * (self.sigma_max - self.sigma_min) + 0.5 * self.sigma_min

    def compute_alpha_t(self, t):
        alpha_t = torch.exp(self._log_mean_coeff(t))
        return alpha_t, alpha_t * self._d_log_mean_coeff(t)

    def compute_sigma_t(self, t):
        alpha_sq = torch.exp(2 * self._log_mean_coeff(t))
        sigma_t = torch.sqrt(1 - alpha_sq)
        return sigma_t, -alpha_sq * self._d_log_mean_coeff(t) / sigma_t

    def compute_d_alpha_alpha_ratio_t(self, t):
        return self._d_log_mean_coeff(t)

    def compute_drift(self, x, t):
        """VP's own SDE: -f = -beta_t / 2 x, g = beta_t / 2 with beta_t = sigma_min + (1 - t)(sigma_max - sigma_min)."""
        t = expand_t_like_x(t, x)
        beta_t = self.sigma_min + (1 - t) * (self.sigma_max - self.sigma_min)
        return -0.5 * beta_t * x, beta_t / 2


class GVPCPlan(ICPlan):
    """The generalised VP path: alpha_t = sin(pi t / 2), sigma_t = cos(pi t / 2) (alpha^2 + sigma^2 = 1)."""

    def compute_alpha_t(self, t):
        return torch.sin(t * math.pi / 2), math.pi / 2 * torch.cos(t * math.pi / 2)

    def compute_sigma_t(self, t):
        return torch.cos(t * math.pi / 2), -math.pi / 2 * torch.sin(t * math.pi / 2)

    def compute_d_alpha_alpha_ratio_t(self, t):
        return math.pi / (2 * torch.tan(t * math.pi / 2))
