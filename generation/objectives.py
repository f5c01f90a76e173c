"""The generative objectives behind one interface, and the one place that draws their training timesteps.

DiT trains with Gaussian diffusion (1000-step linear schedule, learned sigma, MSE + VB hybrid loss);
SiT trains with stochastic interpolants (`generation/transport`); LightningDiT with SiT's Linear/velocity
transport plus its logit-normal times and cosine loss. The model name's prefix picks one
(`build_objective`). `Objective.training_loss` draws each sample's unit time u from a `TimestepSampler`
with a generator keyed by (seed, step, sample index), so a batch's loss depends neither on the world size
nor on where a run was resumed; the Gaussian noise and the label dropout arrive with the batch, drawn by
the data pipeline (generation/train_data.py). A new timestep sampler is a subclass of
`TimestepSampler` here and an entry in SCHEDULE_SAMPLERS (the trainer's --schedule-sampler).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn

from generation.diffusion import create_diffusion
from generation.sampling import diffusion_sampler, transport_sampler
from generation.transport import create_transport
from generation.transport.lightning_recipe import LIGHTNINGDIT_SAMPLING, logit_normal_from_uniform, velocity_cosine_loss
from util.errors import UserError
from util.rng import sample_generator

ModelFn = Callable[..., torch.Tensor]
# sample_generator hashes the seed, so an offset gives a stream independent of the data pipeline's flips and noise.
TIMESTEP_STREAM_OFFSET = 0x7135_7E9


class TimestepSampler:
    """Draws the unit time u in [0, 1) of each training sample; the default is uniform, as DiT and SiT.

    `sample(generators)` gets one CPU generator per sample, keyed by (seed, step, sample index), and returns
    (u (N,), weights (N,)) drawn only from them; the training loss is mean(weights * per-sample loss), so an
    importance sampler returns weights 1 / (K p(u)) to keep the loss unbiased. The objective maps u to its
    own time range (DiT: t = floor(u * 1000)). `update(u, losses)` sees each batch's u (N,) and unweighted
    losses (N,, detached) on this rank. A loss-aware sampler (ADM's `LossSecondMomentResampler`) keeps its
    loss history there, all-gathered over ranks as ADM's `update_with_local_losses` so that every rank holds
    the same state whatever the world size, and returns it from `state_dict()` (tensors and plain values):
    the trainer saves it in each checkpoint and restores it on --resume.
    """

    def sample(self, generators: list[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
        u = torch.stack([torch.rand((), generator=generator) for generator in generators])
        return u, torch.ones_like(u)

    def update(self, u: torch.Tensor, losses: torch.Tensor) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


# --schedule-sampler's choices (ADM's flag name); a new sampler is one class and one entry here.
SCHEDULE_SAMPLERS = {"uniform": TimestepSampler}


@dataclass
class NoiseBundle:
    """Per-sample randomness for one batch (all on the training device).

    u:     (N,) in [0, 1): the timestep before it is mapped to the objective's range.
    noise: (N, C, h, w) standard Gaussian: diffusion's epsilon / the transport's x0.
    drop:  (N,) int64, 1 where the class label is replaced by the null class (classifier-free guidance).
    """

    u: torch.Tensor
    noise: torch.Tensor
    drop: torch.Tensor


class Objective:
    """What a generative family trains and samples with.

    `loss(model_fn, latents, labels, bundle) -> (N,)` per-sample losses; `model_fn(x, t, y=..., force_drop_ids=...)`
    is the (DDP/compiled/autocast-wrapped) network. `sample(model, z, y, cfg_scale, num_steps) -> (N, C, h, w)`
    latents from noise `z` (N, C, h, w) and labels `y` (N,), using classifier-free guidance when cfg_scale > 1.
    """

    name: str

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.timestep_sampler = TimestepSampler()

    def training_loss(self, model_fn: ModelFn, latents: torch.Tensor, labels: torch.Tensor, noise: torch.Tensor,
                      drop: torch.Tensor, *, seed: int, step: int, sample_ids: torch.Tensor) -> torch.Tensor:
        """(N,) weighted per-sample losses of training step `step`; sample_ids (N,) are the dataset indices."""
        generators = [sample_generator(seed + TIMESTEP_STREAM_OFFSET, step, int(index)) for index in sample_ids]
        u, weights = self.timestep_sampler.sample(generators)
        losses = self.loss(model_fn, latents, labels, NoiseBundle(u.to(latents.device), noise, drop))
        self.timestep_sampler.update(u, losses.detach())
        return losses * weights.to(losses.device)

    def loss(self, model_fn: ModelFn, latents: torch.Tensor, labels: torch.Tensor, bundle: NoiseBundle) -> torch.Tensor:
        raise NotImplementedError

    def _sample_from(self, model_fn: ModelFn, z: torch.Tensor, model_kwargs: dict, num_steps: int) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def sample(self, model: nn.Module, z: torch.Tensor, y: torch.Tensor, cfg_scale: float, num_steps: int,
               wrap: Callable[[ModelFn], ModelFn] = lambda fn: fn) -> torch.Tensor:
        """Generates latents; `wrap` lets the caller add autocast around the network calls."""
        if cfg_scale > 1.0:
            # As in the official sample.py: the second half of the batch carries the null class and
            # forward_with_cfg mixes the two halves; only the conditional half is returned.
            z = torch.cat([z, z], dim=0)
            y = torch.cat([y, torch.full_like(y, self.num_classes)], dim=0)
            samples = self._sample_from(wrap(model.forward_with_cfg), z, dict(y=y, cfg_scale=cfg_scale), num_steps)
            return samples.chunk(2, dim=0)[0]
        return self._sample_from(wrap(model.forward), z, dict(y=y), num_steps)


class DiffusionObjective(Objective):
    """DiT: `create_diffusion(timestep_respacing="")`, t uniform over the 1000 training steps."""

    name = "diffusion"

    def __init__(self, num_classes: int):
        super().__init__(num_classes)
        self.diffusion = create_diffusion(timestep_respacing="")

    def loss(self, model_fn, latents, labels, bundle):
        steps = self.diffusion.num_timesteps
        # floor(u * T) is uniform on {0, ..., T-1}, the same law as torch.randint(0, T) in DiT's train.py.
        t = (bundle.u * steps).long().clamp_(max=steps - 1)
        terms = self.diffusion.training_losses(
            model_fn, latents, t, model_kwargs=dict(y=labels, force_drop_ids=bundle.drop), noise=bundle.noise)
        return terms["loss"]

    def _sample_from(self, model_fn, z, model_kwargs, num_steps):
        # Respaced sampling (DiT's sample.py): DDPM ancestral sampling over `num_steps` of the 1000 steps.
        return diffusion_sampler(num_steps, method="ddpm")(model_fn, z, model_kwargs, None)


class TransportObjective(Objective):
    """SiT: stochastic interpolant with SiT's conventions (t = 1 is data, x0 Gaussian noise)."""

    name = "transport"

    def __init__(self, num_classes: int, path_type: str = "Linear", prediction: str = "velocity",
                 loss_weight: Optional[str] = None, train_eps: Optional[float] = None,
                 sample_eps: Optional[float] = None):
        super().__init__(num_classes)
        self.transport = create_transport(path_type, prediction, loss_weight, train_eps, sample_eps)

    def loss(self, model_fn, latents, labels, bundle):
        # The same interval SiT's Transport.sample draws t from, avoiding the singular ends of VP/score paths.
        t0, t1 = self.transport.check_interval(self.transport.train_eps, self.transport.sample_eps)
        t = bundle.u * (t1 - t0) + t0
        terms = self.transport.training_losses(
            model_fn, latents, model_kwargs=dict(y=labels, force_drop_ids=bundle.drop), t=t, x0=bundle.noise)
        return terms["loss"]

    def _sample_from(self, model_fn, z, model_kwargs, num_steps):
        # Fixed-step Euler ODE keeps training-time previews bounded in cost (dopri5 is adaptive).
        sample_fn = transport_sampler(self.transport, mode="ODE", num_steps=num_steps, sampling_method="euler")
        return sample_fn(model_fn, z, model_kwargs, None)


class LightningObjective(TransportObjective):
    """LightningDiT: SiT's Linear / velocity transport with its transport flags use_lognorm and use_cosine_loss.

    With use_lognorm the per-sample uniform u becomes t = sigmoid(Phi^-1(u)), the logit-normal law the official
    `Transport.sample` draws with scipy (here from the sample's own generator, so batches stay independent of
    the world size and resume point); with use_cosine_loss the per-sample loss is MSE + (1 - cos) of the
    velocity, whose batch mean is the official mean(MSE) + mean(cosine). Previews sample with the Euler ODE
    on the shifted grid (timestep_shift).
    """

    name = "lightning"

    def __init__(self, num_classes: int, use_lognorm: bool = True, use_cosine_loss: bool = True,
                 timestep_shift: float = LIGHTNINGDIT_SAMPLING["timestep_shift"], path_type: str = "Linear",
                 prediction: str = "velocity", train_eps: Optional[float] = None, sample_eps: Optional[float] = None):
        super().__init__(num_classes, path_type, prediction, None, train_eps, sample_eps)
        if use_cosine_loss and prediction != "velocity":
            raise UserError("the cosine loss compares velocities; use --prediction velocity with it (LightningDiT's "
                             "setting).")
        self.use_lognorm = use_lognorm
        self.use_cosine_loss = use_cosine_loss
        self.timestep_shift = timestep_shift

    def loss(self, model_fn, latents, labels, bundle):
        t0, t1 = self.transport.check_interval(self.transport.train_eps, self.transport.sample_eps)
        u = logit_normal_from_uniform(bundle.u) if self.use_lognorm else bundle.u
        terms = self.transport.training_losses(
            model_fn, latents, model_kwargs=dict(y=labels, force_drop_ids=bundle.drop), t=u * (t1 - t0) + t0,
            x0=bundle.noise)
        if not self.use_cosine_loss:
            return terms["loss"]
        return terms["loss"] + velocity_cosine_loss(terms["pred"], terms["target"])

    def _sample_from(self, model_fn, z, model_kwargs, num_steps):
        sample_fn = transport_sampler(self.transport, mode="ODE", num_steps=num_steps, sampling_method="euler",
                                      timestep_shift=self.timestep_shift)
        return sample_fn(model_fn, z, model_kwargs, None)


def objective_family(model_name: str) -> str:
    """'DiT-XL/2' -> 'diffusion', 'SiT-B/2-VAE-simple' -> 'transport', 'LightningDiT-XL/1' -> 'lightning' (a
    transport objective with LightningDiT's options); anything else is a user error."""
    if model_name.startswith("DiT-"):
        return "diffusion"
    if model_name.startswith("SiT-"):
        return "transport"
    if model_name.startswith("LightningDiT-"):
        return "lightning"
    raise UserError(f"--model {model_name!r} names neither a DiT, a SiT nor a LightningDiT; use a name starting with "
                    f"'DiT-', 'SiT-' or 'LightningDiT-'.")


def build_objective(model_name: str, num_classes: int, path_type: str = "Linear", prediction: str = "velocity",
                    loss_weight: Optional[str] = None, train_eps: Optional[float] = None,
                    sample_eps: Optional[float] = None, use_lognorm: bool = False, use_cosine_loss: bool = False,
                    timestep_shift: float = 0.0, schedule_sampler: str = "uniform") -> Objective:
    """The model name's prefix picks the objective; the transport flags matter for SiT and LightningDiT,
    use_lognorm / use_cosine_loss / timestep_shift for LightningDiT only (off by default, as its code);
    schedule_sampler names the training `TimestepSampler` in SCHEDULE_SAMPLERS."""
    family = objective_family(model_name)
    if family != "lightning" and (use_lognorm or use_cosine_loss):
        raise UserError(f"--use-lognorm / --use-cosine-loss are LightningDiT's transport options but --model is "
                        f"{model_name}; drop them or pick a LightningDiT-* model.")
    if family == "lightning" and loss_weight is not None:
        raise UserError("--loss-weight does not apply to LightningDiT (velocity prediction); drop it.")
    if family == "diffusion":
        objective = DiffusionObjective(num_classes)
    elif family == "lightning":
        objective = LightningObjective(num_classes, use_lognorm, use_cosine_loss, timestep_shift, path_type,
                                       prediction, train_eps, sample_eps)
    else:
        objective = TransportObjective(num_classes, path_type, prediction, loss_weight, train_eps, sample_eps)
    objective.timestep_sampler = SCHEDULE_SAMPLERS[schedule_sampler]()
    return objective
