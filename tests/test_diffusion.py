"""DiT's Gaussian diffusion against closed forms on tiny inputs (float64 where exactness is checked)."""
import math

import numpy as np
import pytest
import torch

from generation.diffusion import create_diffusion, space_timesteps
from generation.diffusion.losses import discretized_gaussian_log_likelihood

BASE_BETAS = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
BASE_ALPHAS_CUMPROD = np.cumprod(1.0 - BASE_BETAS)


def closed_form_posterior(t):
    """Mean coefficients and variance of q(x_{t-1} | x_t, x_0) by Gaussian conditioning (Bayes).

    q(x_{t-1} | x_0) = N(sqrt(abar_prev) x_0, 1 - abar_prev), q(x_t | x_{t-1}) = N(sqrt(alpha) x_{t-1}, beta):
    precision = 1 / (1 - abar_prev) + alpha / beta.
    """
    beta = BASE_BETAS[t]
    alpha = 1.0 - beta
    abar_prev = BASE_ALPHAS_CUMPROD[t - 1] if t > 0 else 1.0
    variance = 1.0 / (1.0 / (1.0 - abar_prev) + alpha / beta)
    coef_x0 = variance * math.sqrt(abar_prev) / (1.0 - abar_prev)
    coef_xt = variance * math.sqrt(alpha) / beta
    return coef_x0, coef_xt, variance


def learned_sigma_output(eps, v):
    """A learned-sigma model output (N, 2C, ...) from eps (N, C, ...) and a constant v."""
    return torch.cat([eps, torch.full_like(eps, v)], dim=1)


def test_linear_schedule_is_dits():
    diffusion = create_diffusion("")
    assert diffusion.num_timesteps == 1000
    np.testing.assert_allclose(diffusion.betas, BASE_BETAS, rtol=0, atol=1e-15)
    half = create_diffusion("", diffusion_steps=500)
    assert half.betas[0] == pytest.approx(2e-4) and half.betas[-1] == pytest.approx(0.04)


def test_q_sample_matches_forward_marginal():
    diffusion = create_diffusion("")
    x_start = torch.tensor([0.7, -0.3], dtype=torch.float64).view(2, 1, 1, 1).expand(2, 1, 100, 100).contiguous()
    t = torch.tensor([10, 700])
    noise = torch.randn_like(x_start)
    x_t = diffusion.q_sample(x_start, t, noise)
    abar = torch.tensor(BASE_ALPHAS_CUMPROD[[10, 700]]).view(2, 1, 1, 1)
    exact = abar.sqrt() * x_start + (1 - abar).sqrt() * noise
    assert (x_t - exact).abs().max() < 1e-12
    # Moments of the 10^4 draws per sample: mean sqrt(abar) x_0, variance 1 - abar.
    torch.manual_seed(0)
    x_t = diffusion.q_sample(x_start, t)
    empirical_mean = x_t.mean(dim=(1, 2, 3))
    empirical_var = x_t.var(dim=(1, 2, 3))
    assert torch.allclose(empirical_mean, (abar.sqrt() * x_start[:, :, :1, :1]).flatten(), atol=0.03)
    assert torch.allclose(empirical_var, (1 - abar).flatten(), rtol=0.05)


def test_posterior_matches_bayes():
    diffusion = create_diffusion("")
    t_values = [1, 2, 50, 500, 999]
    t = torch.tensor(t_values)
    x_start = torch.randn(len(t_values), 2, 3, 3, dtype=torch.float64)
    x_t = torch.randn_like(x_start)
    mean, variance, log_variance = diffusion.q_posterior_mean_variance(x_start, x_t, t)
    for i, step in enumerate(t_values):
        coef_x0, coef_xt, expected_var = closed_form_posterior(step)
        assert torch.allclose(mean[i], coef_x0 * x_start[i] + coef_xt * x_t[i], rtol=1e-10, atol=1e-12)
        assert torch.allclose(variance[i], torch.full_like(variance[i], expected_var), rtol=1e-10)
        assert torch.allclose(log_variance[i], torch.full_like(variance[i], math.log(expected_var)), rtol=1e-10)


def vb_setup(t_values, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x_start = torch.rand(len(t_values), 3, 4, 4, generator=generator, dtype=torch.float64) * 2 - 1
    noise = torch.randn(x_start.shape, generator=generator, dtype=torch.float64)
    return x_start, noise, torch.tensor(t_values)


def test_vb_is_zero_when_model_predicts_the_posterior():
    diffusion = create_diffusion("")
    x_start, noise, t = vb_setup([1, 10, 300, 999])
    # eps = the true noise gives x_0 exactly; v = -1 selects the posterior variance beta-tilde.
    model = lambda x, steps: learned_sigma_output(noise, -1.0)  # noqa: E731
    losses = diffusion.training_losses(model, x_start, t, noise=noise)
    assert losses["vb"].abs().max() < 1e-9
    assert losses["mse"].abs().max() < 1e-20


def test_vb_matches_analytic_kl_in_bits():
    """A mean offset from a shifted eps, and the wrong variance (v = +1 gives beta): closed-form KL / ln 2."""
    diffusion = create_diffusion("")
    t_values = [1, 10, 300, 999]
    x_start, noise, t = vb_setup(t_values, seed=1)
    delta = 0.3
    model = lambda x, steps: learned_sigma_output(noise + delta, 1.0)  # noqa: E731
    losses = diffusion.training_losses(model, x_start, t, noise=noise)
    for i, step in enumerate(t_values):
        coef_x0, _, posterior_var = closed_form_posterior(step)
        abar = BASE_ALPHAS_CUMPROD[step]
        # x_0 predicted from eps + delta is off by -sqrt(1/abar - 1) delta; the mean by coef_x0 times that.
        mean_offset = coef_x0 * math.sqrt(1.0 / abar - 1.0) * delta
        model_var = BASE_BETAS[step]
        kl_nats = 0.5 * (math.log(model_var / posterior_var) + posterior_var / model_var - 1 + mean_offset**2 / model_var)
        assert losses["vb"][i].item() == pytest.approx(kl_nats / math.log(2.0), rel=1e-9)
        assert losses["mse"][i].item() == pytest.approx(delta**2, rel=1e-12)
        assert losses["loss"][i].item() == pytest.approx(losses["mse"][i].item() + losses["vb"][i].item(), rel=1e-12)


def test_vb_at_t0_is_the_discretized_decoder_nll():
    diffusion = create_diffusion("")
    bins = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    x_start = bins[torch.randint(0, 256, (2, 3, 4, 4), generator=torch.Generator().manual_seed(0))]
    noise = torch.randn_like(x_start)
    t = torch.zeros(2, dtype=torch.long)
    model = lambda x, steps: learned_sigma_output(noise, 0.0)  # noqa: E731
    vb = diffusion.training_losses(model, x_start, t, noise=noise)["vb"]
    # At t = 0 the posterior mean is x_0 itself; v = 0 gives log-variance halfway between the bounds.
    log_variance = 0.5 * (math.log(BASE_BETAS[0]) + math.log(closed_form_posterior(1)[2]))
    log_probs = discretized_gaussian_log_likelihood(
        x_start, means=x_start, log_scales=torch.full_like(x_start, 0.5 * log_variance)
    )
    expected = -log_probs.mean(dim=(1, 2, 3)) / math.log(2.0)
    assert torch.allclose(vb, expected, rtol=1e-9)


@pytest.mark.parametrize("mean,log_scale", [(0.0, math.log(0.1)), (0.37, math.log(0.02)), (-0.9, 0.0)])
def test_discretized_gaussian_sums_to_one_over_bins(mean, log_scale):
    bins = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    log_probs = discretized_gaussian_log_likelihood(
        bins, means=torch.full_like(bins, mean), log_scales=torch.full_like(bins, log_scale)
    )
    assert log_probs.exp().sum().item() == pytest.approx(1.0, abs=1e-9)


def test_vb_term_does_not_train_the_mean():
    diffusion = create_diffusion("")

    class TwoHeads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.eps_bias = torch.nn.Parameter(torch.zeros(1, 2, 1, 1))
            self.v_bias = torch.nn.Parameter(torch.zeros(1, 2, 1, 1))

        def forward(self, x, steps):
            return torch.cat([x * 0 + self.eps_bias, x * 0 + self.v_bias], dim=1)

    model = TwoHeads()
    losses = diffusion.training_losses(model, torch.randn(3, 2, 4, 4), torch.tensor([5, 100, 800]))
    losses["vb"].sum().backward()
    assert model.eps_bias.grad.abs().max() == 0
    assert model.v_bias.grad.abs().max() > 0


def test_respacing_keeps_alphas_cumprod():
    base = create_diffusion("")
    spaced = create_diffusion("250")
    assert spaced.num_timesteps == 250 and len(spaced.timestep_map) == 250
    assert spaced.timestep_map[0] == 0 and spaced.timestep_map[-1] == 999
    np.testing.assert_allclose(spaced.alphas_cumprod, base.alphas_cumprod[spaced.timestep_map], rtol=1e-12)
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    with pytest.raises(ValueError, match="not understood"):
        create_diffusion("fast")
    with pytest.raises(ValueError, match="fewer sampling steps"):
        create_diffusion("2000")


def test_respaced_model_receives_original_timesteps():
    spaced = create_diffusion("ddim50")
    seen = []

    def model(x, steps):
        seen.append(steps.clone())
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])

    spaced.training_losses(model, torch.randn(2, 1, 2, 2), torch.tensor([0, 49]))
    assert seen[0].tolist() == [0, 980]


def single_point_model(point):
    """The exact eps-prediction when the data is the single point `point` (C, H, W); learned sigma v = 0."""
    alphas_cumprod = torch.tensor(BASE_ALPHAS_CUMPROD)

    def model(x, steps):
        abar = alphas_cumprod[steps].view(-1, 1, 1, 1).to(x.dtype)
        eps = (x - abar.sqrt() * point) / (1 - abar).sqrt()
        return learned_sigma_output(eps, 0.0)

    return model


@pytest.mark.parametrize("respacing,method", [("ddim50", "ddim"), ("25", "ddim"), ("250", "ddpm"), ("", "ddpm")])
def test_samplers_recover_a_single_data_point(respacing, method):
    diffusion = create_diffusion(respacing)
    point = torch.tensor([[[0.5, -0.25], [0.9, -1.0]]], dtype=torch.float64)  # (1, 2, 2)
    noise = torch.randn(3, 1, 2, 2, dtype=torch.float64)
    loop = diffusion.ddim_sample_loop if method == "ddim" else diffusion.p_sample_loop
    samples = loop(single_point_model(point), noise.shape, noise=noise)
    assert (samples - point).abs().max() < 1e-6


def test_ddpm_samples_gaussian_data_with_its_moments():
    """Data N(m, s^2) per element: the exact model gives back m and s with 250 respaced DDPM steps.

    The exact model predicts E[eps | x_t] and, through v, the exact reverse variance
    beta-tilde + coef1^2 Var[x_0 | x_t], which lies between beta-tilde (v = -1) and beta (v = +1).
    """
    mean, std = 0.4, 0.3
    diffusion = create_diffusion("250")
    spaced_index = torch.zeros(1000, dtype=torch.long)
    spaced_index[diffusion.timestep_map] = torch.arange(250)
    abar_table, betas, posterior_var, coef1, log_var_lo = (
        torch.tensor(table, dtype=torch.float32)
        for table in (diffusion.alphas_cumprod, diffusion.betas, diffusion.posterior_variance,
                      diffusion.posterior_mean_coef1, diffusion.posterior_log_variance_clipped)
    )

    def model(x, steps):
        i = spaced_index[steps]
        abar = abar_table[i].view(-1, 1, 1, 1)
        eps = (1 - abar).sqrt() * (x - abar.sqrt() * mean) / (abar * std**2 + 1 - abar)
        xstart_var = std**2 * (1 - abar) / (abar * std**2 + 1 - abar)
        reverse_var = posterior_var[i] + coef1[i] ** 2 * xstart_var.flatten()
        frac = (reverse_var.log() - log_var_lo[i]) / (betas[i].log() - log_var_lo[i])
        v = (2 * frac.clamp(0, 1) - 1).view(-1, 1, 1, 1).expand_as(x)
        return torch.cat([eps, v], dim=1)

    torch.manual_seed(0)
    samples = diffusion.p_sample_loop(model, (4000, 1, 2, 2))
    assert samples.mean().item() == pytest.approx(mean, abs=0.01)
    assert samples.std().item() == pytest.approx(std, abs=0.01)


def test_per_sample_generators_make_samples_batch_independent():
    diffusion = create_diffusion("10")
    model = single_point_model(torch.zeros(1, 2, 2, dtype=torch.float64))

    def run(seeds):
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        return diffusion.p_sample_loop(
            lambda x, t: model(x, t) * 0.5, (len(seeds), 1, 2, 2), generator=generators, device="cpu"
        )

    pair = run([11, 12])
    alone = run([12])
    assert torch.equal(pair[1], alone[0])


def test_wrong_output_channels_are_refused():
    diffusion = create_diffusion("")
    with pytest.raises(ValueError, match="learn_sigma=True"):
        diffusion.training_losses(lambda x, t: x, torch.randn(2, 4, 2, 2), torch.tensor([1, 2]))
