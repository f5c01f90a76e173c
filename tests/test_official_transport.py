"""Transport defaults against SiT's code (willisma/SiT transport/__init__.py, integrators.py), restated."""
import math

import pytest
import torch
from torchdiffeq import odeint

from generation.transport import Sampler, create_transport


def sit_default_epsilons(path_type, prediction):
    """SiT's create_transport with train_eps = sample_eps = None (the command-line default)."""
    if path_type == "VP":
        return 1e-5, 1e-3
    if prediction != "velocity":
        return 1e-3, 1e-3
    return 0, 0


@pytest.mark.parametrize("path_type", ["Linear", "GVP", "VP"])
@pytest.mark.parametrize("prediction", ["velocity", "noise", "score"])
def test_default_epsilons_are_sits(path_type, prediction):
    transport = create_transport(path_type, prediction)
    assert (transport.train_eps, transport.sample_eps) == sit_default_epsilons(path_type, prediction)


def test_linear_dopri5_matches_a_plain_odeint_call_like_sits():
    """SiT's ode.sample: odeint(fn, x, linspace(t0, t1, num_steps), method, atol, rtol), no step options."""
    def model(x, t):  # a smooth, time-dependent velocity field the solver has to adapt to
        return torch.sin(3 * t).view(-1, 1, 1, 1) * x + torch.cos(x)

    x = torch.randn(4, 2, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ours = Sampler(create_transport("Linear")).sample_ode(num_steps=7)(x, model)
    times = torch.linspace(0.0, 1.0, 7, dtype=torch.float64)
    official = odeint(lambda t, state: model(state, torch.ones(state.shape[0], dtype=state.dtype) * t), x, times,
                      method="dopri5", atol=1e-6, rtol=1e-3)
    assert torch.equal(ours, official)


def test_vp_dopri5_lands_on_the_end_time():
    """SiT's dopri5 on VP steps past t1 = 1 - 1e-3 into t > 1, where sigma_t is NaN; ours stops there."""
    transport = create_transport("VP")
    seen = []

    def model(x, t):
        seen.append(t.max().item())
        return -x

    Sampler(transport).sample_ode(num_steps=5)(torch.randn(2, 1, 2, 2, dtype=torch.float64), model)
    assert max(seen) <= 1 - 1e-3 + 1e-12


@pytest.mark.parametrize("method, steps, allowed", [("implicit_adams", 200, 1e-3), ("explicit_adams", 200, 1e-2),
                                                    ("fixed_adams", 200, 1e-3), ("scipy_solver", 5, 1e-4)])
def test_adams_and_scipy_solvers_follow_the_exact_flow(method, steps, allowed):
    from test_transport import flow_map, gaussian_oracle

    noise = torch.randn(64, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sample_fn = Sampler(create_transport("Linear")).sample_ode(sampling_method=method, num_steps=steps,
                                                               atol=1e-8, rtol=1e-8)
    samples = sample_fn(noise, gaussian_oracle("Linear", "velocity"))[-1]
    assert (samples - flow_map("Linear", noise, 0.0, 1.0)).abs().max() < allowed


@pytest.mark.parametrize("path, prediction", [("Linear", "velocity"), ("GVP", "velocity"), ("Linear", "noise")])
def test_ode_likelihood_matches_the_gaussian_density(path, prediction):
    """Data N(m, s^2) per element: log p_{t1}(x) is the Gaussian log-density of the path's marginal at t1."""
    from test_transport import DATA_MEAN, DATA_STD, coefficients, gaussian_oracle
    from generation.transport.likelihood import bits_per_dim

    transport = create_transport(path, prediction)
    t0, t1 = transport.check_interval(transport.train_eps, transport.sample_eps, eval=True)
    data = DATA_MEAN + DATA_STD * torch.randn(16, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    likelihood = Sampler(transport).sample_ode_likelihood(atol=1e-9, rtol=1e-9)
    logp, z = likelihood(data, gaussian_oracle(path, prediction), generator=torch.Generator().manual_seed(3))

    def marginal_std(t):
        alpha, _, sigma, _ = coefficients(path, torch.tensor([t], dtype=torch.float64))
        return alpha, torch.sqrt(alpha**2 * DATA_STD**2 + sigma**2)

    alpha_1, std_1 = marginal_std(t1)
    alpha_0, std_0 = marginal_std(t0)
    expected = torch.distributions.Normal(alpha_1 * DATA_MEAN, std_1).log_prob(data).flatten(1).sum(1)
    # The prior is N(0, I), the marginal at t0 only when t0 = 0; correct for it as the hand-worked check.
    expected_z = alpha_0 * DATA_MEAN + std_0 / std_1 * (data - alpha_1 * DATA_MEAN)
    assert torch.allclose(z, expected_z, atol=1e-6)
    prior_gap = (torch.distributions.Normal(0.0, 1.0).log_prob(z)
                 - torch.distributions.Normal(alpha_0 * DATA_MEAN, std_0).log_prob(z)).flatten(1).sum(1)
    assert torch.allclose(logp, expected + prior_gap, atol=1e-5)
    bpd = bits_per_dim(logp, data.shape[1:])
    assert torch.allclose(bpd, -logp / (4 * math.log(2)))
