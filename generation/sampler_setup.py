"""What the two samplers (sample_ddp.py: FID folders; sample.py: one PNG grid) share, declared once.

The sampler flags of DiT's and SiT's sample scripts (SiT's mode word, ODE / SDE flags, DiT's
--sampler, guidance variants), their checks, reading a checkpoint (official raw state dicts or this
project's training checkpoints, `ema` first) and building the `ImageGenerator`.
"""
import argparse
import sys
import warnings
from pathlib import Path

import torch

from generation.objectives import objective_family
from generation.sampling import Guidance, ImageGenerator, diffusion_sampler, transport_sampler
from generation.train_utils import build_model, build_vae, check_model_args, check_vae_args, none_or_str
from generation.transport import create_transport
from generation.transport.integrators import ODE_METHODS, SDE_METHODS
from generation.transport.path import DIFFUSION_FORMS
from models.latent_spec import get_latent_spec
from models.repa import convert_time_convention, layout_from_state_dict, without_projectors
from util.checkpoint import load_checkpoint
from util.cli import non_negative_float, positive_float, probability
from util.errors import UserError

MODES = ("ODE", "SDE")
DEFAULT_MODE = "SDE"  # USP samples SiT with the SDE (sample_sit.sh, train.py's evaluation); SiT itself has no default
LIGHTNING_DEFAULT_MODE = "ODE"  # LightningDiT samples with its Euler ODE


def add_sampler_flags(parser: argparse.ArgumentParser) -> None:
    """DiT's --sampler, SiT's mode and ODE / SDE flags, and the guidance variants (the transport flags come
    with `add_model_flags`)."""
    # DiT samplers.
    parser.add_argument("--sampler", type=str, choices=["ddpm", "ddim"], default=None,
                        help="DiT only: DDPM respaced to --num-sampling-steps (default) or DDIM (eta 0)")
    # SiT: the mode and the ODE / SDE flags of SiT's sample_ddp.py.
    parser.add_argument("--mode", type=str, choices=MODES, default=None,
                        help="SiT only (also accepted as the first argument): SDE (default, as USP's recipe and "
                             "training-time evaluation) or ODE")
    parser.add_argument("--sampling-method", type=str, default=None,
                        help=f"ODE: {', '.join(ODE_METHODS)} (default dopri5); SDE: {', '.join(SDE_METHODS)} "
                             "(default Euler)")
    parser.add_argument("--atol", type=positive_float, default=1e-6, help="ODE absolute tolerance")
    parser.add_argument("--rtol", type=positive_float, default=1e-3, help="ODE relative tolerance")
    parser.add_argument("--reverse", action="store_true", help="ODE: integrate from data to noise (SiT's flag)")
    parser.add_argument("--diffusion-form", type=str, default="sigma", choices=list(DIFFUSION_FORMS),
                        help="SDE diffusion coefficient form")
    parser.add_argument("--diffusion-norm", type=non_negative_float, default=1.0,
                        help="SDE diffusion coefficient scale")
    parser.add_argument("--last-step", type=none_or_str, default="Mean", choices=[None, "Mean", "Tweedie", "Euler"],
                        help="SDE final step")
    parser.add_argument("--last-step-size", type=non_negative_float, default=0.04, help="SDE final step size")
    # Classifier-free guidance variants.
    parser.add_argument("--cfg-channels", type=str, choices=["legacy3", "all"], default="legacy3",
                        help="guide the first 3 latent channels (official DiT/SiT, reproduces their numbers) or all")
    parser.add_argument("--guidance-interval", type=probability, nargs=2, default=None, metavar=("LO", "HI"),
                        help="guide only where LO <= t <= HI, in the model's t units (DiT 0..999, SiT 0..1, 1 = data)")
    parser.add_argument("--repa-checkpoint", action="store_true",
                        help="--ckpt is REPA's own SiT (t = 1 is noise): convert it to SiT's time convention")


def parse_with_mode(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parses the command line; SiT's leading `ODE`/`SDE` word is accepted as well as --mode."""
    argv = list(sys.argv[1:] if argv is None else argv)
    positional_mode = argv.pop(0) if argv and argv[0] in MODES else None
    args = parser.parse_args(argv)
    if positional_mode is not None and args.mode not in (None, positional_mode):
        raise UserError(f"the command names mode {positional_mode} and --mode {args.mode}; give only one.")
    args.mode = args.mode or positional_mode
    return args


def sit_mode(args) -> str:
    """The transport sampler's mode: the one asked for, else SDE for SiT (USP) and ODE for LightningDiT."""
    if args.mode:
        return args.mode
    return LIGHTNING_DEFAULT_MODE if objective_family(args.model) == "lightning" else DEFAULT_MODE


def check_sampler_args(args) -> dict:
    """The checks both samplers make before loading anything; returns the parsed --model-kwargs."""
    model_kwargs = check_model_args(args)
    family = objective_family(args.model)
    if family == "diffusion" and args.mode is not None:
        raise UserError(f"mode {args.mode} is a SiT sampler but --model is {args.model}; drop it (DiT uses --sampler).")
    if family != "diffusion" and args.sampler is not None:
        raise UserError(f"--sampler is a DiT flag but --model is {args.model}; use ODE or SDE mode for SiT.")
    if args.timestep_shift != 0 and (family == "diffusion" or sit_mode(args) != "ODE"):
        raise UserError("--timestep-shift warps the ODE sampler's time grid; use it with ODE mode of a SiT or "
                        "LightningDiT model.")
    if family != "diffusion":
        methods = ODE_METHODS if sit_mode(args) == "ODE" else SDE_METHODS
        if args.sampling_method is not None and args.sampling_method not in methods:
            raise UserError(f"--sampling-method {args.sampling_method} is not an {sit_mode(args)} method; "
                            f"use one of {', '.join(methods)}.")
    if args.cfg_scale < 1.0:
        raise UserError(f"--cfg-scale must be >= 1.0 (1.0 disables guidance), got {args.cfg_scale}.")
    if args.guidance_interval is not None and args.guidance_interval[0] > args.guidance_interval[1]:
        raise UserError(f"--guidance-interval {args.guidance_interval[0]} {args.guidance_interval[1]} is empty; "
                        "give LO <= HI.")
    if not Path(args.ckpt).is_file():
        raise UserError(f"--ckpt {args.ckpt} does not exist; pass a DiT/SiT checkpoint file.")
    check_vae_args(args)
    return model_kwargs


def select_weights(checkpoint, path, warn=warnings.warn) -> dict:
    """The state dict to sample with: `ema` of a training checkpoint, else its `model` (with a warning),
    else the file itself when it is a raw state dict (official DiT/SiT releases)."""
    if not isinstance(checkpoint, dict):
        raise UserError(f"--ckpt {path} holds a {type(checkpoint).__name__}, not a state dict or training checkpoint.")
    if isinstance(checkpoint.get("ema"), dict):
        return checkpoint["ema"]
    if isinstance(checkpoint.get("model"), dict):
        warn(f"--ckpt {path} has no 'ema' weights, so the raw 'model' weights are used; they typically score "
             "about 2 FID worse than the EMA weights.")
        return checkpoint["model"]
    if checkpoint and all(isinstance(value, torch.Tensor) for value in checkpoint.values()):
        return checkpoint
    raise UserError(f"--ckpt {path} has neither 'ema' nor 'model' weights and is not a raw state dict "
                    f"(keys: {', '.join(sorted(map(str, checkpoint))[:6])}); pass a DiT/SiT checkpoint.")


def load_weights_strict(model: torch.nn.Module, state_dict: dict, path, checkpoint_args=None) -> None:
    """`load_state_dict(strict=True)`, with a mismatch explained in one sentence instead of a key dump."""
    expected = model.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    reshaped = [key for key in expected if key in state_dict and state_dict[key].shape != expected[key].shape]
    if missing or unexpected or reshaped:
        parts = [f"{len(missing)} missing (e.g. {missing[0]})" if missing else "",
                 f"{len(unexpected)} unexpected (e.g. {unexpected[0]})" if unexpected else "",
                 f"{len(reshaped)} of another shape (e.g. {reshaped[0]}: {tuple(state_dict[reshaped[0]].shape)} vs "
                 f"{tuple(expected[reshaped[0]].shape)})" if reshaped else ""]
        if isinstance(checkpoint_args, argparse.Namespace):  # the official DiT/SiT train.py pickle their args
            checkpoint_args = vars(checkpoint_args)
        recorded = [f"--{key.replace('_', '-')} {checkpoint_args[key]}" for key in
                     ("model", "image_size", "num_classes", "model_kwargs")
                     if isinstance(checkpoint_args, dict) and checkpoint_args.get(key) is not None]
        trained = f" (its args say {' '.join(recorded)})" if recorded else ""
        raise UserError(f"--ckpt {path} does not fit the model built from --model/--image-size/--num-classes/"
                        f"--model-kwargs: {'; '.join(part for part in parts if part)}; pass the settings it was "
                        f"trained with{trained}.")
    model.load_state_dict(state_dict, strict=True)


def build_sample_fn(args, model):
    """The latent sampler the flags ask for: DiT DDPM/DDIM, or SiT ODE/SDE over the flags' transport."""
    if objective_family(args.model) == "diffusion":
        method = args.sampler or "ddpm"
        return diffusion_sampler(args.num_sampling_steps, method, learn_sigma=model.learn_sigma), method == "ddpm"
    transport = create_transport(args.path_type, args.prediction, args.loss_weight, args.train_eps, args.sample_eps)
    mode = sit_mode(args)
    sample_fn = transport_sampler(transport, mode, args.num_sampling_steps, args.sampling_method, atol=args.atol,
                                  rtol=args.rtol, reverse=args.reverse, diffusion_form=args.diffusion_form,
                                  diffusion_norm=args.diffusion_norm, last_step=args.last_step,
                                  last_step_size=args.last_step_size, timestep_shift=args.timestep_shift)
    return sample_fn, mode == "SDE"


def repa_weights(args, state_dict: dict, model_kwargs: dict) -> tuple[dict, dict]:
    """REPA-trained weights for sampling: the training-only projectors dropped, QK-norm read from the weights,
    and with --repa-checkpoint (REPA's own SiT files) its time convention folded into SiT's and no sigma
    channels (`models.repa.convert_time_convention`). Returns (state dict, constructor kwargs)."""
    state_dict = without_projectors(state_dict)
    if layout_from_state_dict(state_dict)["qk_norm"]:
        model_kwargs = {"qk_norm": True, **model_kwargs}
    if args.repa_checkpoint:
        if objective_family(args.model) != "transport":
            raise UserError(f"--repa-checkpoint converts REPA's SiT weights; --model {args.model} is not a SiT.")
        state_dict = convert_time_convention(state_dict)
        model_kwargs = {"learn_sigma": False, **model_kwargs}
    return state_dict, model_kwargs


def load_model(args, model_kwargs: dict, device, warn=warnings.warn) -> torch.nn.Module:
    """The --model preset with --ckpt's weights (strict; REPA projectors dropped), in eval mode on `device`."""
    spec = get_latent_spec(args.vae_version)
    # Memory-mapped: only the EMA tensors that select_weights keeps are ever read from disk; a training
    # checkpoint's model and AdamW state (2/3 of DiT-XL's ~11 GB) stay unread, and the ranks of a node share
    # the page cache.
    checkpoint = load_checkpoint(args.ckpt, mmap=True)
    state_dict, model_kwargs = repa_weights(args, select_weights(checkpoint, args.ckpt, warn), model_kwargs)
    model = build_model(args, model_kwargs, spec.latent_size(args.image_size), spec.channels)
    load_weights_strict(model, state_dict, args.ckpt, checkpoint.get("args"))
    del checkpoint, state_dict
    return model.to(device).eval()


def build_generator(args, model, device) -> ImageGenerator:
    """model + the flags' sampler, guidance and VAE -> an `ImageGenerator`."""
    spec = get_latent_spec(args.vae_version)
    latent_size = spec.latent_size(args.image_size)
    sample_fn, stochastic = build_sample_fn(args, model)
    guidance = Guidance(scale=args.cfg_scale, channels=3 if args.cfg_channels == "legacy3" else None,
                        interval=tuple(args.guidance_interval) if args.guidance_interval else None)
    return ImageGenerator(model, build_vae(args, device), sample_fn, num_classes=args.num_classes,
                          latent_shape=(spec.channels, latent_size, latent_size), device=device,
                          guidance=guidance, precision=args.precision, stochastic=stochastic)
