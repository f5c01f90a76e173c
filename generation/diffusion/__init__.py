"""DiT's objective: a 1000-step Gaussian diffusion with learned sigma, plus DDPM/DDIM samplers.

`create_diffusion` mirrors DiT's factory: training uses `create_diffusion(timestep_respacing="")`
(all 1000 steps), sampling e.g. `create_diffusion("250")` or `create_diffusion("ddim50")`.
"""
from .gaussian_diffusion import LossType, ModelMeanType, ModelVarType
from .respace import SpacedDiffusion, space_timesteps
from .schedules import get_named_beta_schedule


def create_diffusion(
    timestep_respacing,
    noise_schedule="linear",
    use_kl=False,
    sigma_small=False,
    predict_xstart=False,
    learn_sigma=True,
    rescale_learned_sigmas=False,
    diffusion_steps=1000,
):
    """A SpacedDiffusion as DiT builds it.

    timestep_respacing: None or "" for all `diffusion_steps`, else as `space_timesteps` ("250",
    "ddim50", "10,20,30"). Loss: the VB alone when use_kl (x T), else MSE (+ VB when learn_sigma,
    scaled by T / 1000 when rescale_learned_sigmas).
    """
    if int(diffusion_steps) < 1:
        raise ValueError(f"diffusion_steps must be at least 1, got {diffusion_steps}.")
    betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
    if use_kl:
        loss_type = LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = LossType.RESCALED_MSE
    else:
        loss_type = LossType.MSE
    if timestep_respacing is None or timestep_respacing == "":
        timestep_respacing = [diffusion_steps]
    if learn_sigma:
        model_var_type = ModelVarType.LEARNED_RANGE
    else:
        model_var_type = ModelVarType.FIXED_SMALL if sigma_small else ModelVarType.FIXED_LARGE
    return SpacedDiffusion(
        use_timesteps=space_timesteps(diffusion_steps, timestep_respacing),
        betas=betas,
        model_mean_type=ModelMeanType.START_X if predict_xstart else ModelMeanType.EPSILON,
        model_var_type=model_var_type,
        loss_type=loss_type,
    )
