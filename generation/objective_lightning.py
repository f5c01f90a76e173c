"""LightningDiT's objective: SiT's Linear / velocity transport with logit-normal times and the cosine loss.

Same interface as `generation.objectives.Objective` (the trainer's loop does not change): the per-sample
uniform `bundle.u` becomes t = sigmoid(Phi^-1(u)) with use_lognorm (the logit-normal law the official
`Transport.sample` draws with scipy, here from the sample's own generator so batches do not depend on the
world size or resume point), and the per-sample loss is MSE + (1 - cos) of the velocity, whose batch mean
is the official `loss_dict["loss"].mean() + loss_dict["cos_loss"].mean()`.
Previews sample with LightningDiT's ODE settings: Euler with the timestep shift.
"""
from __future__ import annotations

from typing import Optional

from generation.objectives import TransportObjective
from generation.sampling import transport_sampler
from generation.transport.lightning_recipe import (LIGHTNINGDIT_SAMPLING, logit_normal_from_uniform,
                                                   velocity_cosine_loss)


class LightningObjective(TransportObjective):
    """use_lognorm / use_cosine_loss as LightningDiT's transport flags; timestep_shift for sampling."""

    name = "lightning"

    def __init__(self, num_classes: int, use_lognorm: bool = True, use_cosine_loss: bool = True,
                 timestep_shift: float = LIGHTNINGDIT_SAMPLING["timestep_shift"], path_type: str = "Linear",
                 prediction: str = "velocity", train_eps: Optional[float] = None, sample_eps: Optional[float] = None):
        super().__init__(num_classes, path_type, prediction, None, train_eps, sample_eps)
        if use_cosine_loss and prediction != "velocity":
            raise ValueError("the cosine loss compares velocities; use --prediction velocity with it (LightningDiT's "
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
