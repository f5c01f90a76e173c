"""Noise schedules beta_1..beta_T of the discrete-time Gaussian diffusion (DiT / improved-diffusion).

All schedules are float64 numpy arrays: the cumulative products lose precision in float32 over 1000
steps, and DiT's numbers are computed in float64 before indexing.
"""
import math

import numpy as np

NOISE_SCHEDULES = ("linear", "squaredcos_cap_v2")


def get_named_beta_schedule(schedule_name, num_diffusion_timesteps):
    """Betas (T,) for a named schedule.

    "linear": DDPM's 1e-4 -> 0.02 over 1000 steps, rescaled by 1000 / T so that other step counts
    keep the same total amount of noise (this is DiT's default).
    "squaredcos_cap_v2": improved-diffusion's cosine alpha_bar, betas capped at 0.999.
    """
    if schedule_name == "linear":
        scale = 1000 / num_diffusion_timesteps
        return np.linspace(scale * 0.0001, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)
    if schedule_name == "squaredcos_cap_v2":
        return betas_for_alpha_bar(
            num_diffusion_timesteps, lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        )
    raise ValueError(
        f"unknown noise schedule {schedule_name!r}; use one of {', '.join(NOISE_SCHEDULES)}."
    )


def betas_for_alpha_bar(num_diffusion_timesteps, alpha_bar, max_beta=0.999):
    """Betas (T,) that reproduce a continuous alpha_bar(t), t in [0, 1], on T steps.

    beta_i = 1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), capped at max_beta because the cosine
    alpha_bar reaches 0 at t = 1 and beta = 1 would make the last step singular.
    """
    betas = []
    for i in range(num_diffusion_timesteps):
        t_start, t_end = i / num_diffusion_timesteps, (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar(t_end) / alpha_bar(t_start), max_beta))
    return np.array(betas, dtype=np.float64)
