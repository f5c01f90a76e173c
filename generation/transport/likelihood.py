"""Log-likelihood of data under the probability-flow ODE (SiT's `sample_ode_likelihood`, `--likelihood`).

For dx/dt = v(x, t) carrying the prior p_{t0} (noise) to p_{t1} (data), the instantaneous change of
variables gives log p_{t1}(x) = log p_{t0}(z) - int_{t0}^{t1} div v(x_t, t) dt, with z the point the
ODE maps x back to. The divergence uses Hutchinson's estimator with one Rademacher probe per
function evaluation, as SiT does (exact for a diagonal Jacobian, unbiased otherwise).
"""
import math

import torch
from torchdiffeq import odeint


def standard_normal_logp(z):
    """log N(z; 0, I) per sample: z (N, ...) -> (N,)."""
    dims = z[0].numel()
    return -0.5 * dims * math.log(2 * math.pi) - z.flatten(1).pow(2).sum(dim=1) / 2


def bits_per_dim(logp, sample_shape):
    """-log p / (D ln 2) for log-densities logp (N,) of samples with per-sample shape sample_shape.

    On latents this is a continuous density (it can be negative), not the discretised pixel NLL.
    """
    return -logp / (math.prod(sample_shape) * math.log(2))


def ode_likelihood(drift, *, t0, t1, sampling_method, num_steps, atol, rtol):
    """fn(x (N, ...), model, generator=None, **model_kwargs) -> (logp (N,), z (N, ...)).

    Integrates data x at t1 backwards to z at t0 (SiT runs the same integral forwards in 1 - t, which
    starts at t = 1 even where the path stops at t1 < 1, e.g. VP). num_steps: output times of the
    solver (fixed-step methods take num_steps - 1 steps).
    """

    def likelihood(x, model, generator=None, **model_kwargs):
        def dynamics(t, state):
            x_t, _ = state
            probe = torch.randint(0, 2, x_t.shape, generator=generator, device=x_t.device).to(x_t.dtype) * 2 - 1
            with torch.enable_grad():
                x_t = x_t.detach().requires_grad_(True)
                velocity = drift(x_t, t.expand(x_t.shape[0]).to(x_t.dtype), model, **model_kwargs)
                jvp = torch.autograd.grad((velocity * probe).sum(), x_t)[0]
            divergence = (jvp * probe).flatten(1).sum(dim=1)
            return velocity.detach(), divergence.detach()

        dtype = torch.promote_types(x.dtype, torch.float32)
        times = torch.linspace(t1, t0, num_steps, device=x.device, dtype=dtype)
        start = (x, torch.zeros(x.shape[0], device=x.device, dtype=x.dtype))
        trajectory, integral = odeint(dynamics, start, times, method=sampling_method, atol=atol, rtol=rtol)
        z = trajectory[-1]
        # integral[-1] = int_{t1}^{t0} div v dt = -int_{t0}^{t1} div v dt.
        return standard_normal_logp(z) + integral[-1], z

    return likelihood
