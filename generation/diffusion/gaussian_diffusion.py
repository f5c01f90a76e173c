"""Discrete-time Gaussian diffusion as trained and sampled by DiT (improved-diffusion's formulation).

Conventions (as DiT):
- t indexes this diffusion's own steps 0..T-1; t = 0 is the least noisy step. A respaced diffusion
  (respace.py) maps t to the original 1000-step index before calling the model.
- Tables are float64 numpy arrays; values are indexed per sample and cast to float32 (float64
  inputs keep float64), so losses never depend on the model's autocast dtype.
- A learned-sigma model outputs 2*C channels: C for the mean parameterisation (epsilon or x_0)
  and C for v in [-1, 1], which interpolates the log-variance between the posterior variance
  beta-tilde (v = -1) and beta (v = +1).
"""
import enum
import math

import numpy as np
import torch
from tqdm.auto import tqdm

from .losses import discretized_gaussian_log_likelihood, normal_kl
from .utils import mean_flat, randn_like


class ModelMeanType(enum.Enum):
    """What the first C output channels predict."""

    START_X = enum.auto()  # x_0
    EPSILON = enum.auto()  # the noise that produced x_t


class ModelVarType(enum.Enum):
    """How the reverse-process variance is chosen."""

    FIXED_SMALL = enum.auto()  # beta-tilde, the true posterior variance
    FIXED_LARGE = enum.auto()  # beta (with beta-tilde_1 at t = 0 for a finite log)
    LEARNED_RANGE = enum.auto()  # the model's v interpolates log beta-tilde .. log beta


class LossType(enum.Enum):
    MSE = enum.auto()  # MSE on the mean (+ the VB term when the variance is learned)
    RESCALED_MSE = enum.auto()  # as MSE, the VB term scaled by T / 1000
    KL = enum.auto()  # the variational bound alone
    RESCALED_KL = enum.auto()  # the variational bound times T (the full-chain bound)

    def is_vb(self):
        return self in (LossType.KL, LossType.RESCALED_KL)


class GaussianDiffusion:
    """Forward process q, reverse process p, the training losses and the samplers.

    betas: (T,) noise schedule (float64, each in (0, 1]).
    """

    def __init__(self, *, betas, model_mean_type, model_var_type, loss_type):
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or len(betas) == 0 or not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must be a non-empty 1-D array with every value in (0, 1].")
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type
        self.betas = betas
        self.num_timesteps = len(betas)

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)

        # q(x_{t-1} | x_t, x_0) = N(coef1 * x_0 + coef2 * x_t, beta-tilde_t).
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # beta-tilde_0 = 0 has no log; use beta-tilde_1 there (a single-step chain falls back to beta).
        if self.num_timesteps > 1:
            self.posterior_log_variance_clipped = np.log(
                np.append(self.posterior_variance[1], self.posterior_variance[1:])
            )
        else:
            self.posterior_log_variance_clipped = np.log(betas)
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        )
        # FIXED_LARGE uses beta, except at t = 0 where beta-tilde_1 keeps the decoder well defined.
        fixed_large_variance = np.append(self.posterior_variance[1:2], betas[1:])
        self.fixed_large_variance = fixed_large_variance if self.num_timesteps > 1 else betas
        self.fixed_large_log_variance = np.log(self.fixed_large_variance)
        self._device_tables = {}

    # ---------------------------------------------------------------- table lookup
    def _table(self, name, device):
        """The float64 table `name` as a tensor on `device` (copied once per device, not per step)."""
        tables = self._device_tables.setdefault(device, {})
        if name not in tables:
            tables[name] = torch.from_numpy(getattr(self, name)).to(device)
        return tables[name]

    def _extract(self, name, t, like):
        """Table values at timesteps t (N,), viewed as (N, 1, ...) and expanded to like's shape."""
        values = self._table(name, t.device)[t]
        values = values.to(torch.float64 if like.dtype == torch.float64 else torch.float32)
        return values.view(-1, *([1] * (like.ndim - 1))).expand(like.shape)

    def _check_timesteps(self, t, x):
        if t.ndim != 1 or t.shape[0] != x.shape[0]:
            raise ValueError(f"timesteps must have shape ({x.shape[0]},) to match the batch, got {tuple(t.shape)}.")
        if t.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"timesteps must be integer step indices, got dtype {t.dtype}.")

    def _model_timesteps(self, t):
        """The timesteps the network sees; a respaced diffusion maps them to the original chain."""
        return t

    def _call_model(self, model, x, t, model_kwargs):
        output = model(x, self._model_timesteps(t), **(model_kwargs or {}))
        # Under autocast the network may return bf16/fp16; the objective is computed in x's dtype.
        return output.to(x.dtype)

    # ---------------------------------------------------------------- forward process
    def q_sample(self, x_start, t, noise=None):
        """Draw x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I); x_start (N, ...), t (N,)."""
        if noise is None:
            noise = torch.randn_like(x_start)
        return (
            self._extract("sqrt_alphas_cumprod", t, x_start) * x_start
            + self._extract("sqrt_one_minus_alphas_cumprod", t, x_start) * noise
        )

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0), each shaped like x_t."""
        mean = (
            self._extract("posterior_mean_coef1", t, x_t) * x_start
            + self._extract("posterior_mean_coef2", t, x_t) * x_t
        )
        variance = self._extract("posterior_variance", t, x_t)
        log_variance = self._extract("posterior_log_variance_clipped", t, x_t)
        return mean, variance, log_variance

    def _predict_xstart_from_eps(self, x_t, t, eps):
        return (
            self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t
            - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t) * eps
        )

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return (
            self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t - pred_xstart
        ) / self._extract("sqrt_recipm1_alphas_cumprod", t, x_t)

    # ---------------------------------------------------------------- reverse process
    def _split_learned_sigma(self, model_output, x):
        channels = x.shape[1]
        if model_output.shape[1] != 2 * channels or model_output.shape[2:] != x.shape[2:]:
            raise ValueError(
                f"a learned-sigma diffusion needs a model output of shape {(x.shape[0], 2 * channels, *x.shape[2:])} "
                f"(mean and variance channels), got {tuple(model_output.shape)}; build the model with learn_sigma=True."
            )
        return torch.split(model_output, channels, dim=1)

    def _output_distribution(self, model_output, x, t, clip_denoised):
        """p(x_{t-1} | x_t) from a raw network output (N, C or 2C, ...) at x_t = x.

        Returns a dict of mean, variance, log_variance and pred_xstart, each shaped like x.
        """
        if self.model_var_type == ModelVarType.LEARNED_RANGE:
            model_output, var_values = self._split_learned_sigma(model_output, x)
            min_log = self._extract("posterior_log_variance_clipped", t, x)
            max_log = torch.log(self._extract("betas", t, x))
            frac = (var_values + 1) / 2  # v in [-1, 1] -> [0, 1]
            log_variance = frac * max_log + (1 - frac) * min_log
            variance = torch.exp(log_variance)
        else:
            if model_output.shape != x.shape:
                raise ValueError(
                    f"a fixed-variance diffusion needs a model output shaped like x {tuple(x.shape)}, got "
                    f"{tuple(model_output.shape)}; build the model with learn_sigma=False or use learn_sigma=True here."
                )
            if self.model_var_type == ModelVarType.FIXED_SMALL:
                variance_name, log_variance_name = "posterior_variance", "posterior_log_variance_clipped"
            else:
                variance_name, log_variance_name = "fixed_large_variance", "fixed_large_log_variance"
            variance = self._extract(variance_name, t, x)
            log_variance = self._extract(log_variance_name, t, x)

        if self.model_mean_type == ModelMeanType.START_X:
            pred_xstart = model_output
        else:
            pred_xstart = self._predict_xstart_from_eps(x, t, model_output)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_xstart": pred_xstart}

    def p_mean_variance(self, model, x, t, clip_denoised=False, model_kwargs=None):
        """Run the model at (x_t, t) and return p(x_{t-1} | x_t): dict of mean, variance,
        log_variance, pred_xstart, each (N, C, ...)."""
        self._check_timesteps(t, x)
        return self._output_distribution(self._call_model(model, x, t, model_kwargs), x, t, clip_denoised)

    # ---------------------------------------------------------------- losses
    def _vb_terms_bpd(self, model_output, x_start, x_t, t, clip_denoised=False):
        """One term of the variational bound, in bits per dimension, per sample (N,).

        t > 0: KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)); t = 0: the decoder NLL
        -log p(x_0 | x_1) under the discretised Gaussian on 256 bins.
        """
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self._output_distribution(model_output, x_t, t, clip_denoised)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        decoder_nll = mean_flat(decoder_nll) / math.log(2.0)
        return {"output": torch.where(t == 0, decoder_nll, kl), "pred_xstart": out["pred_xstart"]}

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        """Per-sample losses (N,) for data x_start (N, C, ...) at this diffusion's steps t (N,).

        Returns {"loss", "mse"} and, when the variance is learned, "vb": DiT's hybrid objective
        loss = mse + vb, where the VB term sees the mean prediction detached so that it trains
        only the variance channels (improved-diffusion's L_hybrid, lambda = 1 for T = 1000).
        With a KL loss type only "loss" is returned.
        """
        self._check_timesteps(t, x_start)
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        model_output = self._call_model(model, x_t, t, model_kwargs)

        if self.loss_type.is_vb():
            loss = self._vb_terms_bpd(model_output, x_start, x_t, t)["output"]
            if self.loss_type == LossType.RESCALED_KL:
                loss = loss * self.num_timesteps
            return {"loss": loss}

        terms = {}
        if self.model_var_type == ModelVarType.LEARNED_RANGE:
            mean_output, var_values = self._split_learned_sigma(model_output, x_t)
            frozen_output = torch.cat([mean_output.detach(), var_values], dim=1)
            terms["vb"] = self._vb_terms_bpd(frozen_output, x_start, x_t, t)["output"]
            if self.loss_type == LossType.RESCALED_MSE:
                # The MSE is a mean over dims while the bound sums T terms; T / 1000 keeps
                # improved-diffusion's balance for other step counts.
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)
            model_output = mean_output
        target = noise if self.model_mean_type == ModelMeanType.EPSILON else x_start
        if model_output.shape != target.shape:
            raise ValueError(
                f"the model output {tuple(model_output.shape)} must match the input {tuple(target.shape)}; "
                "check learn_sigma on the model and the diffusion."
            )
        terms["mse"] = mean_flat((target - model_output) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms

    # ---------------------------------------------------------------- samplers
    def p_sample(self, model, x, t, clip_denoised=False, model_kwargs=None, generator=None):
        """One ancestral step x_t -> x_{t-1} ~ p(x_{t-1} | x_t) (no noise at t = 0).

        Returns {"sample", "pred_xstart"}, each shaped like x.
        """
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        nonzero_mask = (t != 0).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        sample = out["mean"] + nonzero_mask * torch.exp(0.5 * out["log_variance"]) * randn_like(x, generator)
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample(self, model, x, t, clip_denoised=False, model_kwargs=None, eta=0.0, generator=None):
        """One DDIM step x_t -> x_{t-1}; eta = 0 is deterministic, eta = 1 matches DDPM's variance.

        Returns {"sample", "pred_xstart"}, each shaped like x.
        """
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        # Re-derive eps from the (possibly clipped) x_0 so the step is consistent with it.
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = self._extract("alphas_cumprod", t, x)
        alpha_bar_prev = self._extract("alphas_cumprod_prev", t, x)
        sigma = (
            eta
            * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
            * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        )
        mean_pred = out["pred_xstart"] * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        nonzero_mask = (t != 0).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        sample = mean_pred + nonzero_mask * sigma * randn_like(x, generator)
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def _sample_loop_progressive(self, step, model, shape, noise, device, progress, generator):
        """Run `step` from t = T-1 down to 0, yielding each step's output dict."""
        device = _resolve_device(model, noise, device)
        if noise is not None:
            if tuple(noise.shape) != tuple(shape):
                raise ValueError(f"noise has shape {tuple(noise.shape)} but shape {tuple(shape)} was requested.")
            image = noise.to(device)
        else:
            image = randn_like(torch.empty(shape, device=device), generator)
        indices = list(range(self.num_timesteps))[::-1]
        for i in tqdm(indices, disable=not progress, desc="sampling"):
            t = torch.full((shape[0],), i, device=device, dtype=torch.long)
            with torch.no_grad():
                out = step(image, t)
            yield out
            image = out["sample"]

    def p_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=False, model_kwargs=None,
                                  device=None, progress=False, generator=None):
        """DDPM ancestral sampling, yielding {"sample", "pred_xstart"} after every step."""

        def step(x, t):
            return self.p_sample(model, x, t, clip_denoised, model_kwargs, generator)

        yield from self._sample_loop_progressive(step, model, shape, noise, device, progress, generator)

    def p_sample_loop(self, model, shape, noise=None, clip_denoised=False, model_kwargs=None,
                      device=None, progress=False, generator=None):
        """DDPM ancestral sampling from x_T = noise (or fresh N(0, I)); returns x_0 of `shape`.

        generator: None, a torch.Generator, or one generator per sample (see utils.randn_like).
        """
        final = None
        for final in self.p_sample_loop_progressive(
            model, shape, noise, clip_denoised, model_kwargs, device, progress, generator
        ):
            pass
        return final["sample"]

    def ddim_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=False, model_kwargs=None,
                                     device=None, progress=False, eta=0.0, generator=None):
        """DDIM sampling, yielding {"sample", "pred_xstart"} after every step."""

        def step(x, t):
            return self.ddim_sample(model, x, t, clip_denoised, model_kwargs, eta, generator)

        yield from self._sample_loop_progressive(step, model, shape, noise, device, progress, generator)

    def ddim_sample_loop(self, model, shape, noise=None, clip_denoised=False, model_kwargs=None,
                         device=None, progress=False, eta=0.0, generator=None):
        """DDIM sampling over this diffusion's steps (respace with "ddimN" for N steps); returns x_0."""
        final = None
        for final in self.ddim_sample_loop_progressive(
            model, shape, noise, clip_denoised, model_kwargs, device, progress, eta, generator
        ):
            pass
        return final["sample"]


def _resolve_device(model, noise, device):
    """The sampling device: explicit, else the noise's, else the model's parameters', else CPU."""
    if device is not None:
        return torch.device(device)
    if noise is not None:
        return noise.device
    parameters = getattr(model, "parameters", None)
    if parameters is not None:
        first = next(iter(parameters()), None)
        if first is not None:
            return first.device
    return torch.device("cpu")
