"""Exponential moving average of weights (DiT keeps one with decay 0.9999)."""
import torch


@torch.no_grad()
def update_ema(ema_model: torch.nn.Module, model: torch.nn.Module, decay: float = 0.9999) -> None:
    """ema = decay * ema + (1 - decay) * model, for every parameter, with one fused foreach kernel.

    `model` may be DDP-wrapped; parameters are matched by name so a wrapper never misaligns them.
    """
    model = getattr(model, "module", model)
    model_params = dict(model.named_parameters())
    ema_params, source_params = [], []
    for name, ema_param in ema_model.named_parameters():
        ema_params.append(ema_param)
        source_params.append(model_params[name].detach())
    torch._foreach_lerp_(ema_params, source_params, 1.0 - decay)


def requires_grad(model: torch.nn.Module, flag: bool = True) -> None:
    for param in model.parameters():
        param.requires_grad_(flag)
