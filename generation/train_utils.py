"""What generation's entry points share, declared once: flags, argument checks and builders.

SiT keeps these in `train_utils.py`; so does this package. `generation/train.py` and
`generation/sample_ddp.py` (and the demo, the benchmark) import from here and never from each other.

    parser = argparse.ArgumentParser(...)
    add_flags(parser, "--model", "--image-size", ...)   # each flag defined once, in SHARED_FLAGS
    model_kwargs = check_model_args(args)                # preset name, --model-kwargs, size vs VAE factor
    model = build_model(args, model_kwargs, latent_size, channels)
    codec = build_vae(args, device)
"""
import argparse

from generation.objectives import objective_family
from models.dit import DiT_models
from models.latent_spec import get_latent_spec
from models.sit import SiT_models
from models.vae import LatentCodec
from util.cli import parse_json_object
from util.errors import UserError

ALL_MODELS = {**DiT_models, **SiT_models}
VAE_HUB_IDS = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}
CHECKPOINT_PATTERN = r"^(\d+)\.pt$"


def none_or_str(value):
    """SiT's argparse type: the string "None" means None (for --loss-weight, --last-step)."""
    return None if value == "None" else value


# Every flag that more than one generation entry point accepts, with one help text and one default.
SHARED_FLAGS = {
    "--model": dict(type=str, default="DiT-XL/2", help=f"one of {', '.join(ALL_MODELS)}"),
    "--image-size": dict(type=int, default=256, help="any multiple of the VAE factor (8 or 16)"),
    "--num-classes": dict(type=int, default=1000),
    "--global-seed": dict(type=int, default=0),
    "--vae": dict(type=str, choices=["ema", "mse"], default="ema",
                  help="d8 hub weights stabilityai/sd-vae-ft-{ema,mse} (used when --vae-path is not given)"),
    "--num-sampling-steps": dict(type=int, default=250),
    # SiT's transport flags (ignored for DiT).
    "--path-type": dict(type=str, default="Linear", choices=["Linear", "GVP", "VP"]),
    "--prediction": dict(type=str, default="velocity", choices=["velocity", "score", "noise"]),
    "--loss-weight": dict(type=none_or_str, default=None, choices=[None, "velocity", "likelihood"]),
    "--sample-eps": dict(type=float, default=None),
    "--train-eps": dict(type=float, default=None),
    # This re-implementation's additions.
    "--vae-version": dict(type=str, default="d8", choices=["d8", "d16"]),
    "--vae-path": dict(type=str, default=None,
                       help="d8: diffusers AutoencoderKL folder or hub id; d16: the kl16.ckpt file"),
    "--device": dict(type=str, default="cuda", choices=["cuda", "cpu"]),
    "--model-kwargs": dict(type=str, default="{}",
                           help='JSON overrides of the model constructor, e.g. \'{"hidden_size": 64, "depth": 2}\''),
}
TRANSPORT_FLAGS = ("--path-type", "--prediction", "--loss-weight", "--sample-eps", "--train-eps")


def add_flags(parser: argparse.ArgumentParser, *names: str) -> None:
    """Adds the named SHARED_FLAGS to `parser`, in the order given (the order of `vars(args)`)."""
    for name in names:
        parser.add_argument(name, **SHARED_FLAGS[name])


def check_model_args(args) -> dict:
    """The checks every generation command makes before loading anything; returns the parsed --model-kwargs."""
    if args.model not in ALL_MODELS:
        objective_family(args.model)  # a name that is neither DiT nor SiT gets that sentence
        raise UserError(f"--model {args.model!r} is not a known preset; choose one of {', '.join(ALL_MODELS)}.")
    try:
        model_kwargs = parse_json_object(args.model_kwargs, "--model-kwargs")
    except ValueError as error:
        raise UserError(str(error)) from None
    get_latent_spec(args.vae_version).latent_size(args.image_size)  # image size vs VAE factor
    return model_kwargs


def check_vae_args(args) -> None:
    if args.vae_version == "d16" and args.vae_path is None:
        raise UserError("--vae-version d16 needs --vae-path pointing at the KL-16 autoencoder file kl16.ckpt.")


def build_model(args, model_kwargs: dict, latent_size: int, channels: int):
    """The --model preset for (channels, latent_size, latent_size) latents, with --model-kwargs applied."""
    kwargs = dict(input_size=latent_size, num_classes=args.num_classes, in_channels=channels)
    kwargs.update(model_kwargs)
    try:
        return ALL_MODELS[args.model](**kwargs)
    except TypeError as error:
        raise UserError(f"--model-kwargs does not fit {args.model} ({error}); use the DiT constructor's names.")


def vae_source(args):
    """--vae-path, else (d8) the hub id that --vae names, as DiT's f"stabilityai/sd-vae-ft-{args.vae}"."""
    return args.vae_path if args.vae_path is not None or args.vae_version == "d16" else VAE_HUB_IDS[args.vae]


def build_vae(args, device):
    return LatentCodec.load(args.vae_version, vae_source(args), device=device)
