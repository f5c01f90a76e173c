"""SiT's transport objective and samplers against closed forms on Gaussian data.

With data x1 ~ N(m, s^2) per element and noise x0 ~ N(0, 1), x_t = a_t x1 + s_t x0 is Gaussian with
variance r_t^2 = a_t^2 s^2 + s_t^2, so the exact velocity, noise and score models are affine in x_t
and the probability-flow map between two times is x_u = a_u m + r_u / r_t (x_t - a_t m).
"""
import math

import pytest
import torch

from generation.transport import Sampler, create_transport

DATA_MEAN, DATA_STD = 0.7, 0.4
PATHS = ("Linear", "GVP", "VP")


def vp_alpha(t):
    """VP's alpha_t with SiT's beta from 0.1 to 20, written from the SDE: exp(-1/2 int_t^1 beta)."""
    s = 1 - t
    return torch.exp(-0.5 * (0.1 * s + 0.5 * (20.0 - 0.1) * s**2))


CLOSED_FORMS = {  # path -> (alpha_t, sigma_t); derivatives come from autograd
    "Linear": (lambda t: t, lambda t: 1 - t),
    "GVP": (lambda t: torch.sin(math.pi * t / 2), lambda t: torch.cos(math.pi * t / 2)),
    "VP": (vp_alpha, lambda t: torch.sqrt(1 - vp_alpha(t) ** 2)),
}


def coefficients(path, t):
    """(alpha, d alpha, sigma, d sigma) at t (N,) float64, from the closed forms above."""
    alpha_fn, sigma_fn = CLOSED_FORMS[path]
    with torch.enable_grad():  # the SDE sampler calls the model under no_grad
        t = t.detach().clone().requires_grad_(True)
        alpha, sigma = alpha_fn(t), sigma_fn(t)
        d_alpha = torch.autograd.grad(alpha.sum(), t)[0]
        d_sigma = torch.autograd.grad(sigma.sum(), t)[0]
    return alpha.detach(), d_alpha, sigma.detach(), d_sigma


def gaussian_oracle(path, prediction):
    """The exact model for Gaussian data on `path`: fn(x (N, ...), t (N,)) -> velocity / noise / score."""

    def model(x, t):
        alpha, d_alpha, sigma, d_sigma = (c.view(-1, *([1] * (x.ndim - 1))).to(x.dtype) for c in coefficients(path, t.double()))
        r_sq = alpha**2 * DATA_STD**2 + sigma**2
        centred = x - alpha * DATA_MEAN
        expected_x1 = DATA_MEAN + alpha * DATA_STD**2 / r_sq * centred
        expected_x0 = sigma / r_sq * centred
        if prediction == "noise":
            return expected_x0
        if prediction == "score":
            return -centred / r_sq
        return d_alpha * expected_x1 + d_sigma * expected_x0

    return model


def flow_map(path, x_start, t_start, t_end):
    """The exact probability-flow ODE solution from t_start to t_end (floats) for Gaussian data."""
    alpha_0, _, sigma_0, _ = coefficients(path, torch.tensor([t_start], dtype=torch.float64))
    alpha_1, _, sigma_1, _ = coefficients(path, torch.tensor([t_end], dtype=torch.float64))
    r_0 = torch.sqrt(alpha_0**2 * DATA_STD**2 + sigma_0**2)
    r_1 = torch.sqrt(alpha_1**2 * DATA_STD**2 + sigma_1**2)
    return alpha_1 * DATA_MEAN + r_1 / r_0 * (x_start - alpha_0 * DATA_MEAN)


@pytest.mark.parametrize("path", PATHS)
def test_path_coefficients_match_closed_forms(path):
    plan = create_transport(path).path_sampler
    t = torch.linspace(0.05, 0.95, 7, dtype=torch.float64)
    alpha, d_alpha, sigma, d_sigma = coefficients(path, t)
    got_alpha, got_d_alpha = plan.compute_alpha_t(t)
    got_sigma, got_d_sigma = plan.compute_sigma_t(t)
    for got, expected in ((got_alpha, alpha), (got_d_alpha, d_alpha), (got_sigma, sigma), (got_d_sigma, d_sigma)):
        assert torch.allclose(got, expected, rtol=1e-10, atol=1e-12)
    assert torch.allclose(plan.compute_d_alpha_alpha_ratio_t(t), d_alpha / alpha, rtol=1e-10)
    if path != "Linear":  # variance preserving
        assert torch.allclose(alpha**2 + sigma**2, torch.ones_like(t), atol=1e-12)


@pytest.mark.parametrize("path", PATHS)
def test_velocity_score_noise_conversions(path):
    plan = create_transport(path).path_sampler
    t = torch.linspace(0.1, 0.9, 6, dtype=torch.float64)
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    velocity = gaussian_oracle(path, "velocity")(x, t)
    score = gaussian_oracle(path, "score")(x, t)
    noise = gaussian_oracle(path, "noise")(x, t)
    assert torch.allclose(plan.get_score_from_velocity(velocity, x, t), score, rtol=1e-9, atol=1e-10)
    assert torch.allclose(plan.get_velocity_from_score(score, x, t), velocity, rtol=1e-9, atol=1e-10)
    assert torch.allclose(plan.get_noise_from_velocity(velocity, x, t), noise, rtol=1e-9, atol=1e-10)


def test_linear_path_velocity_target_is_x1_minus_x0():
    transport = create_transport("Linear", "velocity")
    x1, x0 = torch.randn(4, 3, 2, 2, dtype=torch.float64), torch.randn(4, 3, 2, 2, dtype=torch.float64)
    t = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    _, xt, ut = transport.path_sampler.plan(t, x0, x1)
    tt = t.view(-1, 1, 1, 1)
    assert torch.allclose(xt, tt * x1 + (1 - tt) * x0, atol=1e-15)
    assert torch.allclose(ut, x1 - x0, atol=1e-15)
    exact = transport.training_losses(lambda x, s: x1 - x0, x1, t=t, x0=x0)
    assert exact["loss"].abs().max() < 1e-28
    zero = transport.training_losses(lambda x, s: torch.zeros_like(x), x1, t=t, x0=x0)
    assert torch.allclose(zero["loss"], ((x1 - x0) ** 2).mean(dim=(1, 2, 3)), rtol=1e-12)


@pytest.mark.parametrize("prediction", ["noise", "score"])
@pytest.mark.parametrize("loss_weight", [None, "velocity", "likelihood"])
@pytest.mark.parametrize("path", ["Linear", "VP"])
def test_loss_weights(path, prediction, loss_weight):
    """A prediction with unit error in the x0 scale gives loss = weight: 1, (g / sigma)^2 or g / sigma^2."""
    transport = create_transport(path, prediction, loss_weight)
    t = torch.tensor([0.1, 0.4, 0.8], dtype=torch.float64)
    x1, x0 = torch.randn(3, 2, 2, 2, dtype=torch.float64), torch.randn(3, 2, 2, 2, dtype=torch.float64)
    _, _, sigma, _ = coefficients(path, t)
    sig = sigma.view(-1, 1, 1, 1)
    if prediction == "noise":
        model = lambda x, s: x0 + 1  # noqa: E731
    else:  # score error (1 / sigma): (output * sigma + x0)^2 = 1
        model = lambda x, s: (1 - x0) / sig  # noqa: E731
    # g of the reverse ODE: (1 - t) / t on the Linear path, beta_t / 2 on VP.
    g = (1 - t) / t if path == "Linear" else (0.1 + (1 - t) * 19.9) / 2
    expected = {None: torch.ones_like(t), "velocity": (g / sigma) ** 2, "likelihood": g / sigma**2}[loss_weight]
    loss = transport.training_losses(model, x1, t=t, x0=x0)["loss"]
    assert torch.allclose(loss, expected, rtol=1e-9)


def test_velocity_prediction_ignores_loss_weight_with_a_warning():
    with pytest.warns(UserWarning, match="no effect"):
        transport = create_transport("Linear", "velocity", "likelihood")
    x1 = torch.randn(2, 1, 2, 2)
    x0 = torch.randn(2, 1, 2, 2)
    loss = transport.training_losses(lambda x, t: torch.zeros_like(x), x1, t=torch.tensor([0.3, 0.6]), x0=x0)["loss"]
    assert torch.allclose(loss, ((x1 - x0) ** 2).mean(dim=(1, 2, 3)))


def test_epsilons_and_intervals_follow_sit():
    assert (create_transport("VP").train_eps, create_transport("VP").sample_eps) == (1e-5, 1e-3)
    assert (create_transport("Linear").train_eps, create_transport("Linear").sample_eps) == (0.0, 0.0)
    assert (create_transport("GVP", "score").train_eps, create_transport("GVP", "score").sample_eps) == (1e-3, 1e-3)
    assert create_transport("Linear", sample_eps=0.01).sample_eps == 0.01
    noise = create_transport("Linear", "noise")
    assert noise.check_interval(noise.train_eps, noise.sample_eps) == (1e-3, 1 - 1e-3)
    assert noise.check_interval(noise.train_eps, noise.sample_eps, eval=True) == (1e-3, 1 - 1e-3)
    assert noise.check_interval(0, 1e-3, sde=True, eval=True, diffusion_form="SBDM", last_step_size=0.04) == (1e-3, 0.96)
    velocity = create_transport("Linear")
    assert velocity.check_interval(0, 0) == (0.0, 1.0)
    assert velocity.check_interval(0, 0, sde=True, eval=True, diffusion_form="sigma", last_step_size=0.04) == (0.0, 0.96)
    vp = create_transport("VP")
    assert vp.check_interval(vp.train_eps, vp.sample_eps) == (0.0, 1 - 1e-5)
    seen = []
    noise.training_losses(lambda x, t: seen.append(t) or torch.zeros_like(x), torch.randn(256, 1, 1, 1))
    assert seen[0].min() >= 1e-3 and seen[0].max() <= 1 - 1e-3


def test_bad_names_are_refused_in_one_sentence():
    with pytest.raises(ValueError, match="unknown path_type 'linear'; use one of Linear, GVP, VP"):
        create_transport("linear")
    with pytest.raises(ValueError, match="unknown prediction"):
        create_transport("Linear", "x0")
    sampler = Sampler(create_transport())
    with pytest.raises(ValueError, match="unknown ODE sampling method"):
        sampler.sample_ode("dopri")
    with pytest.raises(ValueError, match="unknown last step"):
        sampler.sample_sde(last_step="Tweedy")
    with pytest.raises(ValueError, match="unknown diffusion form"):
        sampler.sample_sde(diffusion_form="Sigma")


TIGHT = {"atol": 1e-8, "rtol": 1e-8}
ODE_CASES = [  # (path, prediction, method, num_steps, solver tolerances, allowed max abs error)
    ("Linear", "velocity", "dopri5", 50, {}, 0.05),  # SiT's default atol 1e-6, rtol 1e-3
    ("Linear", "velocity", "dopri5", 50, TIGHT, 1e-6),
    ("Linear", "velocity", "euler", 100, {}, 0.05),
    ("Linear", "velocity", "heun", 30, {}, 5e-3),
    ("Linear", "noise", "dopri5", 20, TIGHT, 1e-6),
    ("GVP", "velocity", "dopri5", 20, TIGHT, 1e-6),
    ("GVP", "score", "rk4", 50, {}, 1e-4),
    ("VP", "velocity", "dopri5", 20, TIGHT, 1e-6),
    ("VP", "noise", "dopri5", 20, TIGHT, 1e-6),
    ("VP", "score", "dopri5", 20, TIGHT, 1e-6),
]


@pytest.mark.parametrize("path,prediction,method,num_steps,solver_tolerances,allowed_error", ODE_CASES)
def test_ode_sampler_follows_the_exact_flow(path, prediction, method, num_steps, solver_tolerances, allowed_error):
    transport = create_transport(path, prediction)
    t0, t1 = transport.check_interval(transport.train_eps, transport.sample_eps, eval=True)
    noise = torch.randn(512, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sample_fn = Sampler(transport).sample_ode(sampling_method=method, num_steps=num_steps, **solver_tolerances)
    trajectory = sample_fn(noise, gaussian_oracle(path, prediction))
    assert trajectory.shape == (num_steps, *noise.shape)
    samples = trajectory[-1]
    error = (samples - flow_map(path, noise, t0, t1)).abs().max().item()
    assert error < allowed_error, f"{path}/{prediction}/{method}: max abs error {error:.2e}"
    if (t0, t1) == (0.0, 1.0):  # the Linear/GVP velocity flow ends exactly at the data distribution
        assert samples.mean().item() == pytest.approx(DATA_MEAN, abs=0.05)
        assert samples.std().item() == pytest.approx(DATA_STD, abs=0.03)


def test_reverse_ode_maps_data_back_to_noise():
    transport = create_transport("Linear")
    data = DATA_MEAN + DATA_STD * torch.randn(64, 1, 2, 2, dtype=torch.float64)
    encode = Sampler(transport).sample_ode(reverse=True, atol=1e-8, rtol=1e-8)
    latents = encode(data, gaussian_oracle("Linear", "velocity"))[-1]
    assert (latents - (data - DATA_MEAN) / DATA_STD).abs().max() < 1e-5


@pytest.mark.parametrize("method", ["Euler", "Heun"])
@pytest.mark.parametrize("diffusion_form", ["constant", "SBDM", "sigma", "linear", "decreasing", "increasing-decreasing"])
@pytest.mark.parametrize("last_step", ["Mean", "Tweedie", "Euler", None])
def test_every_sde_variant_reaches_the_data_moments(method, diffusion_form, last_step):
    """Each integrator x diffusion form x last step, 40 steps from the exact Gaussian oracle, lands on the data's
    mean and std: a wrong drift sign, a missing noise term or a wrong last step moves them by far more."""
    torch.manual_seed(0)
    # sample_eps > 0 keeps SBDM (infinite at t = 0) and Heun without a last step (t = 1) away from the ends.
    transport = create_transport("Linear", "velocity", sample_eps=1e-3)
    sample_fn = Sampler(transport).sample_sde(
        sampling_method=method, diffusion_form=diffusion_form, last_step=last_step, num_steps=40
    )
    trajectory = sample_fn(torch.randn(1000, 1, 2, 2, dtype=torch.float64), gaussian_oracle("Linear", "velocity"))
    assert len(trajectory) == 40
    samples = trajectory[-1]
    assert samples.mean().item() == pytest.approx(DATA_MEAN, abs=0.02)
    # A constant diffusion keeps the full noise level until the end, so 40 steps leave its std 0.02-0.03 off and one
    # 0.04-long Mean step cannot remove the rest (measured 0.09-0.12 off); every other form lands within 0.01.
    std_tolerance = {"Mean": 0.15}.get(last_step, 0.04) if diffusion_form == "constant" else 0.03
    assert samples.std().item() == pytest.approx(DATA_STD, abs=std_tolerance)


@pytest.mark.parametrize(
    "path,prediction,last_step_size",
    # VP's beta falls 9x over its last 0.04, so one Mean step that long over-contracts (std 0.375 vs 0.4).
    [("Linear", "velocity", 0.04), ("VP", "score", 0.01), ("GVP", "noise", 0.04)],
)
def test_sde_sampler_reaches_the_data_moments(path, prediction, last_step_size):
    torch.manual_seed(0)
    transport = create_transport(path, prediction)
    sample_fn = Sampler(transport).sample_sde(num_steps=200, last_step="Mean", last_step_size=last_step_size)
    samples = sample_fn(torch.randn(2000, 1, 2, 2, dtype=torch.float64), gaussian_oracle(path, prediction))[-1]
    assert samples.mean().item() == pytest.approx(DATA_MEAN, abs=0.02)
    assert samples.std().item() == pytest.approx(DATA_STD, abs=0.02)


def test_sde_sampler_refuses_singular_settings():
    sampler = Sampler(create_transport("Linear", "velocity"))
    with pytest.raises(ValueError, match="SBDM' is infinite at t=0"):
        sampler.sample_sde(diffusion_form="SBDM")
    with pytest.raises(ValueError, match="Heun SDE sampler would evaluate the model at t=1"):
        sampler.sample_sde(sampling_method="Heun", last_step=None)
    Sampler(create_transport("VP")).sample_sde(diffusion_form="SBDM")  # VP's g is finite everywhere


def test_sde_per_sample_generators_make_samples_batch_independent():
    sample_fn = Sampler(create_transport()).sample_sde(num_steps=8)
    model = gaussian_oracle("Linear", "velocity")

    def run(seeds):
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        init = torch.stack([torch.randn(1, 2, 2, generator=torch.Generator().manual_seed(100 + s)) for s in seeds])
        return sample_fn(init, model, generator=generators)[-1]

    assert torch.equal(run([3, 4])[1], run([4])[0])
