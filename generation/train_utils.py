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
from models.latent_spec import LATENT_SPECS, get_latent_spec
from models.lightningdit import LightningDiT_models
from models.sit import SiT_models
from models.vae import LDM_CODECS, PER_CHANNEL_CODECS, LatentCodec, load_latent_norm
from util.cli import parse_json_object
from util.errors import UserError

ALL_MODELS = {**DiT_models, **SiT_models, **LightningDiT_models}
# LightningDiT's architecture switches (its config's `model:` keys), off by default as in its constructor.
LIGHTNINGDIT_FLAGS = ("use_qknorm", "use_swiglu", "use_rope", "use_rmsnorm", "wo_shift")
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
    "--vae-version": dict(type=str, default="d8", choices=sorted(LATENT_SPECS)),
    "--vae-path": dict(type=str, default=None,
                       help="d8: diffusers AutoencoderKL folder or hub id; d16: the kl16.ckpt file; vavae_f16d32: "
                            "the VA-VAE .pt file or its folder (with latents_stats.pt)"),
    "--latent-stats": dict(type=str, default=None,
                           help="vavae_f16d32: per-channel latent statistics (LightningDiT's latents_stats.pt); "
                                "default: the file beside the VA-VAE weights"),
    # LightningDiT's block switches (only for LightningDiT-* models).
    "--use-qknorm": dict(action="store_true", help="LightningDiT: QK-norm in attention"),
    "--use-swiglu": dict(action="store_true", help="LightningDiT: SwiGLU FFN (released models: on)"),
    "--use-rope": dict(action="store_true", help="LightningDiT: 2-D RoPE (released models: on)"),
    "--use-rmsnorm": dict(action="store_true", help="LightningDiT: RMSNorm (released models: on)"),
    "--wo-shift": dict(action="store_true", help="LightningDiT: adaLN without shift"),
    "--timestep-shift": dict(type=float, default=0.0,
                             help="ODE sampling grid shift s t / (1 + (s - 1) t) (LightningDiT: 0.3; 0 = even grid)"),
    "--device": dict(type=str, default="cuda", choices=["cuda", "cpu"]),
    "--model-kwargs": dict(type=str, default="{}",
                           help='JSON overrides of the model constructor, e.g. \'{"hidden_size": 64, "depth": 2}\''),
}
TRANSPORT_FLAGS = ("--path-type", "--prediction", "--loss-weight", "--sample-eps", "--train-eps")
LIGHTNINGDIT_MODEL_FLAGS = tuple("--" + name.replace("_", "-") for name in LIGHTNINGDIT_FLAGS)


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
    chosen = [name for name in LIGHTNINGDIT_FLAGS if getattr(args, name, False)]
    if chosen and not args.model.startswith("LightningDiT-"):
        raise UserError(f"--{chosen[0].replace('_', '-')} is a LightningDiT switch but --model is {args.model}; "
                        f"drop it or pick a LightningDiT-* model.")
    return model_kwargs


def check_vae_args(args) -> None:
    if args.vae_version in LDM_CODECS and args.vae_path is None:
        raise UserError(f"--vae-version {args.vae_version} needs --vae-path pointing at "
                        f"{LDM_CODECS[args.vae_version]['release']}.")
    if getattr(args, "latent_stats", None) is not None and args.vae_version != "vavae_f16d32":
        raise UserError(f"--latent-stats is VA-VAE's per-channel normalisation but --vae-version is "
                        f"{args.vae_version}; drop it.")


def build_model(args, model_kwargs: dict, latent_size: int, channels: int):
    """The --model preset for (channels, latent_size, latent_size) latents, with --model-kwargs applied."""
    kwargs = dict(input_size=latent_size, num_classes=args.num_classes, in_channels=channels)
    if args.model.startswith("LightningDiT-"):
        kwargs.update({name: bool(getattr(args, name, False)) for name in LIGHTNINGDIT_FLAGS})
    kwargs.update(model_kwargs)
    try:
        return ALL_MODELS[args.model](**kwargs)
    except TypeError as error:
        raise UserError(f"--model-kwargs does not fit {args.model} ({error}); use the DiT constructor's names.")


def vae_source(args):
    """--vae-path, else (d8) the hub id that --vae names, as DiT's f"stabilityai/sd-vae-ft-{args.vae}"."""
    return args.vae_path if args.vae_path is not None or args.vae_version in LDM_CODECS else VAE_HUB_IDS[args.vae]


def build_latent_norm(args):
    """VA-VAE's per-channel normalisation (a `ChannelNorm`) for --vae-version vavae_f16d32, else None (the
    one-scale codecs' latent cache applies its recorded scale)."""
    if args.vae_version not in PER_CHANNEL_CODECS:
        return None
    return load_latent_norm(args.vae_version, args.vae_path, getattr(args, "latent_stats", None))


def build_vae(args, device):
    return LatentCodec.load(args.vae_version, vae_source(args), device=device,
                            latent_stats=getattr(args, "latent_stats", None))
