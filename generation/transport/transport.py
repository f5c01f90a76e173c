"""SiT's objective (Transport) and its samplers (Sampler).

x0 is Gaussian noise, x1 the data, x_t = alpha_t x1 + sigma_t x0 with t = 1 at the data. The model
predicts, at (x_t, t), either the velocity d x_t / dt, the noise x0, or the score of p_t.
"""
import enum

import torch

from generation.diffusion.utils import mean_flat

from .integrators import ode, sde
from .likelihood import ode_likelihood
from .path import DIFFUSION_FORMS, GVPCPlan, ICPlan, VPCPlan
from .utils import expand_t_like_x

LAST_STEPS = (None, "Mean", "Tweedie", "Euler")


class ModelType(enum.Enum):
    """What the network outputs."""

    NOISE = enum.auto()  # x0
    SCORE = enum.auto()  # grad log p_t(x_t)
    VELOCITY = enum.auto()  # d x_t / dt


class PathType(enum.Enum):
    LINEAR = enum.auto()
    GVP = enum.auto()
    VP = enum.auto()


class WeightType(enum.Enum):
    """Loss weighting of noise/score predictions (velocity predictions are never weighted, as SiT)."""

    NONE = enum.auto()
    VELOCITY = enum.auto()  # (g / sigma)^2: the velocity-space error
    LIKELIHOOD = enum.auto()  # g / sigma^2: the likelihood (score-matching) weighting


class Transport:
    """The training objective over one path.

    train_eps / sample_eps keep t away from the ends where a noise/score parameterisation (or the
    VP path) is singular; see check_interval.
    """

    def __init__(self, *, model_type, path_type, loss_type, train_eps, sample_eps):
        plans = {PathType.LINEAR: ICPlan, PathType.GVP: GVPCPlan, PathType.VP: VPCPlan}
        self.model_type = model_type
        self.path_type = path_type
        self.loss_type = loss_type
        self.train_eps = train_eps
        self.sample_eps = sample_eps
        self.path_sampler = plans[path_type]()

    def check_interval(self, train_eps, sample_eps, *, diffusion_form="SBDM", sde=False, eval=False,
                       last_step_size=0.0):
        """The time interval (t0, t1) used for training (eval=False) or sampling (eval=True).

        VP: t1 = 1 - eps (its sigma_t vanishes at t = 1). Linear/GVP: the velocity ODE is regular on
        [0, 1]; noise/score models, and SDE sampling, stop eps short of both ends (t0 = 0 for a
        velocity SDE unless the diffusion is SBDM, whose g blows up at t = 0). An SDE with a
        final denoising step stops last_step_size short of t = 1 instead.
        """
        t0, t1 = 0.0, 1.0
        eps = sample_eps if eval else train_eps
        stop_short = 1 - eps if (not sde or last_step_size == 0) else 1 - last_step_size
        if self.path_type == PathType.VP:
            t1 = stop_short
        elif self.model_type != ModelType.VELOCITY or sde:
            t0 = eps if (diffusion_form == "SBDM" and sde) or self.model_type != ModelType.VELOCITY else 0.0
            t1 = stop_short
        return t0, t1

    def sample(self, x1):
        """(t (N,), x0 like x1, x1) with t uniform on the training interval and x0 ~ N(0, I)."""
        t0, t1 = self.check_interval(self.train_eps, self.sample_eps)
        t = torch.rand((x1.shape[0],), device=x1.device, dtype=x1.dtype) * (t1 - t0) + t0
        return t, torch.randn_like(x1), x1

    def training_losses(self, model, x1, model_kwargs=None, t=None, x0=None):
        """Per-sample loss (N,) and the raw prediction for data x1 (N, C, ...).

        t (N,) and x0 (like x1) may be given so the caller controls the randomness (e.g. per-sample
        generators); otherwise t is uniform on the training interval and x0 ~ N(0, I).
        Returns {"loss": (N,), "pred": (N, C, ...)} and, for a velocity model, "target": the path's velocity.
        """
        if t is None or x0 is None:
            sampled_t, sampled_x0, _ = self.sample(x1)
            t = sampled_t if t is None else t
            x0 = sampled_x0 if x0 is None else x0
        if t.shape != (x1.shape[0],) or x0.shape != x1.shape:
            raise ValueError(
                f"t must have shape ({x1.shape[0]},) and x0 the data's shape {tuple(x1.shape)}, got "
                f"{tuple(t.shape)} and {tuple(x0.shape)}."
            )
        t, xt, ut = self.path_sampler.plan(t, x0, x1)
        model_output = model(xt, t, **(model_kwargs or {}))
        if model_output.shape != xt.shape:
            raise ValueError(
                f"the model output {tuple(model_output.shape)} must match its input {tuple(xt.shape)}; SiT models "
                "drop the learned-sigma channels in forward, so check the model class."
            )
        # Under autocast the network may return bf16; the objective is computed in the data's dtype.
        model_output = model_output.to(xt.dtype)
        if self.model_type == ModelType.VELOCITY:
            return {"loss": mean_flat((model_output - ut) ** 2), "pred": model_output, "target": ut}

        _, drift_var = self.path_sampler.compute_drift(xt, t)
        sigma_t, _ = self.path_sampler.compute_sigma_t(expand_t_like_x(t, xt))
        if self.loss_type == WeightType.VELOCITY:
            weight = (drift_var / sigma_t) ** 2
        elif self.loss_type == WeightType.LIKELIHOOD:
            weight = drift_var / sigma_t**2
        else:
            weight = 1.0
        if self.model_type == ModelType.NOISE:
            loss = mean_flat(weight * (model_output - x0) ** 2)
        else:  # the true score of x_t given x0 is -x0 / sigma_t
            loss = mean_flat(weight * (model_output * sigma_t + x0) ** 2)
        return {"loss": loss, "pred": model_output}

    def get_drift(self):
        """The probability-flow velocity fn(x, t, model, **model_kwargs) for this model type."""
        path = self.path_sampler

        def velocity_ode(x, t, model, **model_kwargs):
            return model(x, t, **model_kwargs)

        def score_ode(x, t, model, **model_kwargs):
            return path.get_velocity_from_score(model(x, t, **model_kwargs), x, t)

        def noise_ode(x, t, model, **model_kwargs):
            sigma_t, _ = path.compute_sigma_t(expand_t_like_x(t, x))
            return path.get_velocity_from_score(model(x, t, **model_kwargs) / -sigma_t, x, t)

        drift = {ModelType.VELOCITY: velocity_ode, ModelType.SCORE: score_ode, ModelType.NOISE: noise_ode}[
            self.model_type
        ]

        def checked_drift(x, t, model, **model_kwargs):
            output = drift(x, t, model, **model_kwargs)
            if output.shape != x.shape:
                raise ValueError(f"the model output {tuple(output.shape)} must match its input {tuple(x.shape)}.")
            return output.to(x.dtype)

        return checked_drift

    def get_score(self):
        """The score fn(x, t, model, **model_kwargs) for this model type."""
        path = self.path_sampler
        if self.model_type == ModelType.NOISE:
            return lambda x, t, model, **kw: model(x, t, **kw) / -path.compute_sigma_t(expand_t_like_x(t, x))[0]
        if self.model_type == ModelType.SCORE:
            return lambda x, t, model, **kw: model(x, t, **kw)
        return lambda x, t, model, **kw: path.get_score_from_velocity(model(x, t, **kw), x, t)


class Sampler:
    """ODE and SDE samplers for a Transport; each returns fn(x0, model, **model_kwargs) -> trajectory."""

    def __init__(self, transport):
        self.transport = transport
        self.drift = transport.get_drift()
        self.score = transport.get_score()

    def _sde_drift_and_diffusion(self, diffusion_form, diffusion_norm):
        path = self.transport.path_sampler

        def diffusion(x, t):
            return path.compute_diffusion(x, t, form=diffusion_form, norm=diffusion_norm)

        def sde_drift(x, t, model, **model_kwargs):
            # Reverse-time SDE with the same marginals as the ODE: v + w * score.
            return self.drift(x, t, model, **model_kwargs) + diffusion(x, t) * self.score(x, t, model, **model_kwargs)

        return sde_drift, diffusion

    def _last_step(self, sde_drift, last_step, last_step_size):
        """The final jump from t1 = 1 - last_step_size to t = 1 (None: keep the last SDE state)."""
        path = self.transport.path_sampler
        if last_step is None:
            return lambda x, t, model, **kw: x
        if last_step == "Mean":
            return lambda x, t, model, **kw: x + sde_drift(x, t, model, **kw) * last_step_size
        if last_step == "Euler":
            return lambda x, t, model, **kw: x + self.drift(x, t, model, **kw) * last_step_size

        def tweedie(x, t, model, **kw):
            # E[x1 | x_t] = (x_t + sigma_t^2 * score) / alpha_t.
            alpha_t = path.compute_alpha_t(expand_t_like_x(t, x))[0]
            sigma_t = path.compute_sigma_t(expand_t_like_x(t, x))[0]
            return (x + sigma_t**2 * self.score(x, t, model, **kw)) / alpha_t

        return tweedie

    def sample_sde(self, sampling_method="Euler", diffusion_form="sigma", diffusion_norm=1.0, last_step="Mean",
                   last_step_size=0.04, num_steps=250):
        """An SDE sampler fn(x0, model, generator=None, **model_kwargs) -> list of num_steps states.

        num_steps - 1 stochastic steps from t0 to t1, then the last step to t = 1; the list's last
        entry is the sample. generator: None, a torch.Generator, or one per sample.
        """
        if last_step not in LAST_STEPS:
            raise ValueError(f"unknown last step {last_step!r}; use one of Mean, Tweedie, Euler or None.")
        if diffusion_form not in DIFFUSION_FORMS:
            raise ValueError(f"unknown diffusion form {diffusion_form!r}; use one of {', '.join(DIFFUSION_FORMS)}.")
        if last_step is None:
            last_step_size = 0.0
        elif not 0.0 < last_step_size < 1.0:
            raise ValueError(f"last_step_size must be in (0, 1), got {last_step_size}.")
        sde_drift, diffusion = self._sde_drift_and_diffusion(diffusion_form, diffusion_norm)
        t0, t1 = self.transport.check_interval(
            self.transport.train_eps, self.transport.sample_eps, diffusion_form=diffusion_form, sde=True,
            eval=True, last_step_size=last_step_size,
        )
        if diffusion_form == "SBDM" and t0 == 0.0 and self.transport.path_type != PathType.VP:
            raise ValueError(
                "diffusion_form='SBDM' is infinite at t=0 on the Linear and GVP paths; pass sample_eps > 0 "
                "(e.g. 1e-3) to create_transport or use diffusion_form='sigma'."
            )
        if sampling_method == "Heun" and t1 >= 1.0:
            raise ValueError(
                "the Heun SDE sampler would evaluate the model at t=1, where the score is undefined; use a last "
                "step (Mean, Tweedie or Euler) or pass sample_eps > 0 to create_transport."
            )
        integrator = sde(sde_drift, diffusion, t0=t0, t1=t1, num_steps=num_steps, sampler_type=sampling_method)
        last_step_fn = self._last_step(sde_drift, last_step, last_step_size)

        def _sample(init, model, generator=None, **model_kwargs):
            states = integrator.sample(init, model, generator=generator, **model_kwargs)
            t_end = torch.full((init.shape[0],), t1, device=init.device, dtype=init.dtype)
            with torch.no_grad():
                states.append(last_step_fn(states[-1], t_end, model, **model_kwargs))
            return states

        return _sample

    def sample_ode(self, sampling_method="dopri5", num_steps=50, atol=1e-6, rtol=1e-3, reverse=False,
                   timestep_shift=0.0, step_to_end=None):
        """An ODE sampler fn(x, model, **model_kwargs) -> trajectory (num_steps, N, ...).

        Forward: noise at t0 to data at t1 (trajectory[-1] is the sample). reverse=True integrates
        the same probability-flow ODE backwards, data at t1 to noise at t0 (for encoding /
        likelihoods). step_to_end: make an adaptive solver's last step land on the end time; None
        means SiT's behaviour (step past and interpolate back) except on the VP path, where SiT's
        solver fails because the path is undefined beyond t1. timestep_shift: LightningDiT's grid
        warp (0 = SiT's even grid).
        """
        if step_to_end is None:
            step_to_end = self.transport.path_type == PathType.VP
        t0, t1 = self.transport.check_interval(
            self.transport.train_eps, self.transport.sample_eps, sde=False, eval=True, last_step_size=0.0
        )
        if reverse:
            t0, t1 = t1, t0
        integrator = ode(self.drift, t0=t0, t1=t1, sampler_type=sampling_method, num_steps=num_steps, atol=atol,
                         rtol=rtol, timestep_shift=timestep_shift, step_to_end=step_to_end)
        return integrator.sample

    def sample_ode_likelihood(self, sampling_method="dopri5", num_steps=50, atol=1e-6, rtol=1e-3):
        """fn(x, model, generator=None, **model_kwargs) -> (log p(x) (N,), noise z (N, ...)), see likelihood.py."""
        t0, t1 = self.transport.check_interval(
            self.transport.train_eps, self.transport.sample_eps, sde=False, eval=True, last_step_size=0.0
        )
        return ode_likelihood(self.drift, t0=t0, t1=t1, sampling_method=sampling_method, num_steps=num_steps,
                              atol=atol, rtol=rtol)
