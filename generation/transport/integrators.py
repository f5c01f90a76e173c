"""Numerical integrators for the probability-flow ODE (torchdiffeq) and the reverse-time SDE."""
import torch
from torchdiffeq import odeint

from .lightning_recipe import shift_timesteps
from generation.diffusion.utils import randn_like

ADAPTIVE_ODE_METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
# SiT passes any torchdiffeq method through: the Adams-Bashforth(-Moulton) multistep solvers and
# SciPy's solve_ivp (scipy_solver, LSODA) are there as well.
ODE_METHODS = ADAPTIVE_ODE_METHODS + ("euler", "midpoint", "heun", "heun2", "heun3", "rk4", "explicit_adams",
                                      "implicit_adams", "fixed_adams", "scipy_solver")
SDE_METHODS = ("Euler", "Heun")


def _time_grid(start, end, num_steps, like):
    """num_steps times from start to end (either direction), in at least float32 on like's device."""
    dtype = torch.promote_types(like.dtype, torch.float32)
    return torch.linspace(start, end, num_steps, device=like.device, dtype=dtype)


class ode:
    """dx/dt = drift(x, t, model, **model_kwargs), integrated from t0 to t1 (t0 > t1 runs backwards).

    Adaptive methods (dopri5, ...) step as atol/rtol require and report the state at num_steps
    evenly spaced times; fixed-step methods (euler, heun, rk4, ...) take exactly num_steps - 1 steps.
    timestep_shift s > 0 (LightningDiT) warps the grid to s t / (1 + (s - 1) t); 0 keeps it even (SiT).
    """

    def __init__(self, drift, *, t0, t1, sampler_type, num_steps, atol, rtol, timestep_shift=0.0,
                 step_to_end=False):
        if sampler_type not in ODE_METHODS:
            raise ValueError(f"unknown ODE sampling method {sampler_type!r}; use one of {', '.join(ODE_METHODS)}.")
        if num_steps < 2:
            raise ValueError(f"the ODE sampler needs num_steps >= 2 (start and end times), got {num_steps}.")
        self.drift = drift
        self.t0, self.t1 = t0, t1
        self.sampler_type = "heun2" if sampler_type == "heun" else sampler_type
        self.num_steps = num_steps
        self.atol, self.rtol = atol, rtol
        self.timestep_shift = timestep_shift
        self.step_to_end = step_to_end

    def sample(self, x, model, **model_kwargs):
        """x (N, ...) at t0 -> trajectory (num_steps, N, ...); the last entry is the state at t1."""
        times = shift_timesteps(_time_grid(self.t0, self.t1, self.num_steps, x), self.timestep_shift)

        def velocity(t, state):
            # torchdiffeq passes a scalar time; the model wants one time per sample.
            return self.drift(state, t.expand(state.shape[0]).to(state.dtype), model, **model_kwargs)

        # SiT lets an adaptive solver step past the last time and interpolate back (step_to_end=False).
        # That evaluates the model beyond t1, where the VP path is undefined (torchdiffeq then stops with
        # "underflow in dt"); step_to_end=True makes the last step land on t1 instead.
        adaptive_end = self.step_to_end and self.sampler_type in ADAPTIVE_ODE_METHODS
        options = {"step_t": times[-1:]} if adaptive_end else None
        return odeint(velocity, x, times, method=self.sampler_type, atol=self.atol, rtol=self.rtol, options=options)


class sde:
    """dx = drift(x, t) dt + sqrt(2 diffusion(x, t)) dW, stepped on num_steps even times from t0 < t1."""

    def __init__(self, drift, diffusion, *, t0, t1, num_steps, sampler_type):
        if sampler_type not in SDE_METHODS:
            raise ValueError(f"unknown SDE sampling method {sampler_type!r}; use one of {', '.join(SDE_METHODS)}.")
        if num_steps < 2:
            raise ValueError(f"the SDE sampler needs num_steps >= 2, got {num_steps}.")
        if not t0 < t1:
            raise ValueError(f"the SDE interval must run forward in time, got t0={t0} and t1={t1}.")
        self.drift = drift
        self.diffusion = diffusion
        self.t0, self.t1 = t0, t1
        self.num_steps = num_steps
        self.step = self._euler_maruyama_step if sampler_type == "Euler" else self._heun_step

    def _euler_maruyama_step(self, x, t, dt, model, generator, **model_kwargs):
        dw = randn_like(x, generator) * dt.sqrt()
        drift = self.drift(x, t, model, **model_kwargs)
        return x + drift * dt + torch.sqrt(2 * self.diffusion(x, t)) * dw

    def _heun_step(self, x, t, dt, model, generator, **model_kwargs):
        # Noise first, then a Heun (trapezoidal) step of the drift from the perturbed point.
        dw = randn_like(x, generator) * dt.sqrt()
        x_hat = x + torch.sqrt(2 * self.diffusion(x, t)) * dw
        k1 = self.drift(x_hat, t, model, **model_kwargs)
        x_pred = x_hat + dt * k1
        k2 = self.drift(x_pred, t + dt, model, **model_kwargs)
        return x_hat + 0.5 * dt * (k1 + k2)

    def sample(self, init, model, generator=None, **model_kwargs):
        """init (N, ...) at t0 -> list of num_steps - 1 states (N, ...), the last one at t1."""
        times = _time_grid(self.t0, self.t1, self.num_steps, init)
        dt = times[1] - times[0]
        x, samples = init, []
        for t in times[:-1]:
            with torch.no_grad():
                x = self.step(x, t.expand(x.shape[0]).to(x.dtype), dt.to(x.dtype), model, generator, **model_kwargs)
            samples.append(x)
        return samples
