"""SiT's objective: interpolant paths (Linear / GVP / VP), prediction targets and ODE / SDE samplers.

t = 1 is data, x0 is noise. Training: `create_transport(...).training_losses(model, x1)`;
sampling: `Sampler(transport).sample_ode()(z, model_fn, **model_kwargs)[-1]`.
"""
import warnings

from .transport import ModelType, PathType, Sampler, Transport, WeightType

PATH_TYPES = {"Linear": PathType.LINEAR, "GVP": PathType.GVP, "VP": PathType.VP}
PREDICTIONS = {"velocity": ModelType.VELOCITY, "noise": ModelType.NOISE, "score": ModelType.SCORE}
LOSS_WEIGHTS = {None: WeightType.NONE, "none": WeightType.NONE, "velocity": WeightType.VELOCITY,
                "likelihood": WeightType.LIKELIHOOD}


def create_transport(path_type="Linear", prediction="velocity", loss_weight=None, train_eps=None, sample_eps=None):
    """A Transport as SiT builds it.

    Default epsilons (SiT's create_transport): VP trains with 1e-5 and samples with 1e-3; Linear/GVP
    with a noise or score prediction use 1e-3 for both; a velocity prediction on Linear/GVP is
    regular everywhere and uses 0/0. An explicit train_eps / sample_eps always wins; SiT ignores
    them for velocity on Linear/GVP (leave them unset for SiT's behaviour; see GENERATION.md,
    "Differences from the official code").
    """
    for name, value, choices in (("path_type", path_type, PATH_TYPES), ("prediction", prediction, PREDICTIONS),
                                 ("loss_weight", loss_weight, LOSS_WEIGHTS)):
        if value not in choices:
            names = ", ".join(str(choice) for choice in choices if choice is not None)
            raise ValueError(f"unknown {name} {value!r}; use one of {names}.")
    model_type = PREDICTIONS[prediction]
    weight_type = LOSS_WEIGHTS[loss_weight]
    if model_type == ModelType.VELOCITY and weight_type != WeightType.NONE:
        warnings.warn(
            f"loss_weight={loss_weight!r} has no effect with prediction='velocity' (as in SiT); "
            "it weights only noise and score predictions.",
            stacklevel=2,
        )
    path = PATH_TYPES[path_type]
    if path == PathType.VP:
        default_train_eps, default_sample_eps = 1e-5, 1e-3
    elif model_type != ModelType.VELOCITY:
        default_train_eps, default_sample_eps = 1e-3, 1e-3
    else:
        default_train_eps, default_sample_eps = 0.0, 0.0
    return Transport(
        model_type=model_type,
        path_type=path,
        loss_type=weight_type,
        train_eps=default_train_eps if train_eps is None else train_eps,
        sample_eps=default_sample_eps if sample_eps is None else sample_eps,
    )
