"""LightningDiT's recipe pieces against hand computations: logit-normal times, the velocity cosine loss,
the timestep shift, and one Euler ODE run (shift 0.3, cfg interval start 0.10, cfg on the first 3
channels) worked out by hand."""
import math

import torch

from generation.transport import Sampler, create_transport
from generation.transport.lightning_recipe import (LIGHTNINGDIT_SAMPLING, lightningdit_loss, logit_normal_timesteps,
                                                   shift_timesteps, velocity_cosine_loss)
from models.lightningdit import LightningDiT


def test_logit_normal_timesteps_are_sigmoids_of_standard_normals():
    t = logit_normal_timesteps(5, generator=torch.Generator().manual_seed(3))
    u = torch.randn(5, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(t, 1 / (1 + torch.exp(-u)))
    many = logit_normal_timesteps(20000, generator=torch.Generator().manual_seed(0))
    assert 0 < many.min() and many.max() < 1
    assert abs(many.median().item() - 0.5) < 0.02  # logit-normal(0, 1) is symmetric about 1/2
    # P(t < sigmoid(-1)) = P(u < -1) = 0.1587
    assert abs((many < 1 / (1 + math.e)).float().mean().item() - 0.1587) < 0.01


def test_cosine_loss_by_hand():
    # sample 0: position 0 orthogonal (1 - 0 = 1), position 1 parallel (0)          -> 0.5
    # sample 1: position 0 opposite (1 - (-1) = 2), position 1 identical (0)         -> 1.0
    pred = torch.tensor([[[[1.0, 1.0]], [[0.0, 1.0]]], [[[3.0, 1.0]], [[4.0, 0.0]]]])  # (2, C=2, 1, 2)
    target = torch.tensor([[[[0.0, 2.0]], [[1.0, 2.0]]], [[[-3.0, 1.0]], [[-4.0, 0.0]]]])
    torch.testing.assert_close(velocity_cosine_loss(pred, target), torch.tensor([0.5, 1.0]))
    mse = torch.tensor([0.2, 0.4])
    torch.testing.assert_close(lightningdit_loss(mse, pred, target), torch.tensor(0.3 + 0.75))
    torch.testing.assert_close(lightningdit_loss(mse, pred, target, use_cosine_loss=False), torch.tensor(0.3))


def test_timestep_shift_by_hand():
    t = torch.tensor([0.0, 0.5, 1.0])
    torch.testing.assert_close(shift_timesteps(t, 0.3), torch.tensor([0.0, 0.15 / 0.65, 1.0]))
    assert torch.equal(shift_timesteps(t, 0.0), t) and torch.equal(shift_timesteps(t, 1.0), t)


class AffineVelocity(LightningDiT):
    """A stand-in network: velocity x + 1 for a real label, 2x for the null class (index num_classes)."""

    def forward(self, x, t, y, force_drop_ids=None):
        null = (y == self.y_embedder.num_classes).view(-1, 1, 1, 1)
        return torch.where(null, 2 * x, x + 1)


def test_one_euler_run_with_shift_and_cfg_interval_by_hand():
    model = AffineVelocity(input_size=2, patch_size=1, in_channels=4, hidden_size=8, depth=1, num_heads=2,
                           num_classes=5)
    sample = Sampler(create_transport("Linear", "velocity")).sample_ode(
        sampling_method=LIGHTNINGDIT_SAMPLING["sampling_method"], num_steps=3,
        timestep_shift=LIGHTNINGDIT_SAMPLING["timestep_shift"])
    z = torch.full((2, 4, 2, 2), 0.5)  # [conditional half, null half]
    y = torch.tensor([1, 5])
    out = sample(z, model.forward_with_cfg, y=y, cfg_scale=10.0, cfg_interval=True,
                 cfg_interval_start=LIGHTNINGDIT_SAMPLING["cfg_interval_start"])[-1]
    # Grid: [0, 1/2, 1] shifted by 0.3 -> [0, 3/13, 1].
    # Step 1 at t = 0 < 0.10, no guidance: x1 = 1/2 + 3/13 * (1/2 + 1) = 11/13.
    # Step 2 at t = 3/13, guided on channels 0-2: v = 2 x1 + 10 ((x1 + 1) - 2 x1) = 42/13,
    #   x2 = 11/13 + 10/13 * 42/13 = 563/169; channel 3 keeps the conditional v = 24/13: x2 = 383/169.
    expected = torch.tensor([563 / 169] * 3 + [383 / 169]).view(1, 4, 1, 1).expand(1, 4, 2, 2)
    torch.testing.assert_close(out[:1], expected)


def test_logit_normal_from_uniform_is_the_normal_quantile_through_a_sigmoid():
    from generation.transport.lightning_recipe import logit_normal_from_uniform

    u = torch.tensor([0.5, 0.8413447, 0.0227501])  # Phi(0), Phi(1), Phi(-2)
    torch.testing.assert_close(logit_normal_from_uniform(u), torch.sigmoid(torch.tensor([0.0, 1.0, -2.0])),
                               rtol=1e-4, atol=1e-5)
    assert logit_normal_from_uniform(torch.tensor([0.0])).item() == 0.0


def test_lightning_objective_loss_is_mse_plus_cosine():
    from generation.objectives import LightningObjective, NoiseBundle

    objective = LightningObjective(num_classes=5, use_lognorm=True, use_cosine_loss=True)
    latents = torch.randn(2, 4, 2, 2)
    bundle = NoiseBundle(u=torch.tensor([0.5, 0.8413447]), noise=torch.randn(2, 4, 2, 2), drop=torch.zeros(2).long())
    prediction = torch.randn(2, 4, 2, 2)
    seen = {}

    def model_fn(x, t, y, force_drop_ids):
        seen["t"] = t
        return prediction

    loss = objective.loss(model_fn, latents, torch.tensor([1, 2]), bundle)
    t = torch.sigmoid(torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(seen["t"], t, rtol=1e-4, atol=1e-5)
    velocity = latents - bundle.noise  # Linear path: x_t = t x1 + (1 - t) x0, so dx_t/dt = x1 - x0
    mse = ((prediction - velocity) ** 2).mean(dim=[1, 2, 3])
    cosine = (1 - torch.nn.functional.cosine_similarity(prediction, velocity, dim=1)).mean(dim=[1, 2])
    torch.testing.assert_close(loss, mse + cosine)
