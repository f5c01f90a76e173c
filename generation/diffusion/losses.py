"""Closed-form Gaussian quantities used by the variational bound (improved-diffusion's losses)."""
import math

import torch


def normal_kl(mean1, logvar1, mean2, logvar2):
    """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats; inputs broadcast."""
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + torch.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x):
    """The tanh approximation of the standard normal CDF that DiT/ADM use (kept for parity of the bpd)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x, *, means, log_scales):
    """Log-likelihood (nats, elementwise) of data on the 256 bins of [-1, 1] under N(means, exp(log_scales)^2).

    x: (N, ...) values in [-1, 1] that lie on the bin centres -1 + 2k/255; the first and last bins
    extend to -inf / +inf so the probabilities over the 256 bins sum to one.
    """
    if not (x.shape == means.shape == log_scales.shape):
        raise ValueError(
            f"x {tuple(x.shape)}, means {tuple(means.shape)} and log_scales {tuple(log_scales.shape)} "
            "must have the same shape; broadcast them before calling."
        )
    centered_x = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(
        x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta)
    )
