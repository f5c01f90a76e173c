"""What generation's entry points share (SiT's `train_utils.py`): the model and VAE flags, their checks and
the builders. generation/train.py, sample_ddp.py and sample.py import from here, never from each other.

    add_model_flags(parser)                          # --model, --image-size, --vae*, transport, LightningDiT, ...
    model_kwargs = check_model_args(args)            # preset name, --model-kwargs, size vs VAE factor
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
from util.cli import non_negative_float, parse_json_object, positive_int
from util.errors import UserError

ALL_MODELS = {**DiT_models, **SiT_models, **LightningDiT_models}
# LightningDiT's architecture switches (its config's `model:` keys), off by default as in its constructor.
LIGHTNINGDIT_FLAGS = ("use_qknorm", "use_swiglu", "use_rope", "use_rmsnorm", "wo_shift")
VAE_HUB_IDS = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}


def none_or_str(value):
    """SiT's argparse type: the string "None" means None (for --loss-weight, --last-step)."""
    return None if value == "None" else value


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """The flags every generation entry point reads: the network, its latents, SiT's transport and
    LightningDiT's switches (the official names and defaults)."""
    parser.add_argument("--model", type=str, default="DiT-XL/2", help=f"one of {', '.join(ALL_MODELS)}")
    parser.add_argument("--image-size", type=positive_int, default=256, help="any multiple of the VAE factor (8 or 16)")
    parser.add_argument("--num-classes", type=positive_int, default=1000)
    parser.add_argument("--num-sampling-steps", type=positive_int, default=250)
    parser.add_argument("--vae", type=str, choices=["ema", "mse"], default="ema",
                        help="d8 hub weights stabilityai/sd-vae-ft-{ema,mse} (used when --vae-path is not given)")
    # This re-implementation's additions.
    parser.add_argument("--vae-version", type=str, default="d8", choices=sorted(LATENT_SPECS))
    parser.add_argument("--vae-path", type=str, default=None,
                        help="d8: diffusers AutoencoderKL folder or hub id; d16: the kl16.ckpt file; vavae_f16d32: "
                             "the VA-VAE .pt file or its folder (with latents_stats.pt)")
    parser.add_argument("--latent-stats", type=str, default=None,
                        help="vavae_f16d32: per-channel latent statistics (LightningDiT's latents_stats.pt); "
                             "default: the file beside the VA-VAE weights")
    parser.add_argument("--device", type=str, default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--model-kwargs", type=str, default="{}",
                        help='JSON overrides of the model constructor, e.g. \'{"hidden_size": 64, "depth": 2}\'')
    # SiT's transport flags (ignored for DiT).
    parser.add_argument("--path-type", type=str, default="Linear", choices=["Linear", "GVP", "VP"])
    parser.add_argument("--prediction", type=str, default="velocity", choices=["velocity", "score", "noise"])
    parser.add_argument("--loss-weight", type=none_or_str, default=None, choices=[None, "velocity", "likelihood"])
    parser.add_argument("--sample-eps", type=non_negative_float, default=None)
    parser.add_argument("--train-eps", type=non_negative_float, default=None)
    # LightningDiT's block switches (hustvl/LightningDiT config keys; only for LightningDiT-* models).
    parser.add_argument("--use-qknorm", action="store_true", help="LightningDiT: QK-norm in attention")
    parser.add_argument("--use-swiglu", action="store_true", help="LightningDiT: SwiGLU FFN (released models: on)")
    parser.add_argument("--use-rope", action="store_true", help="LightningDiT: 2-D RoPE (released models: on)")
    parser.add_argument("--use-rmsnorm", action="store_true", help="LightningDiT: RMSNorm (released models: on)")
    parser.add_argument("--wo-shift", action="store_true", help="LightningDiT: adaLN without shift")
    parser.add_argument("--timestep-shift", type=non_negative_float, default=0.0,
                        help="ODE sampling grid shift s t / (1 + (s - 1) t) (LightningDiT: 0.3; 0 = even grid)")


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
    if args.latent_stats is not None and args.vae_version != "vavae_f16d32":
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
    return load_latent_norm(args.vae_version, args.vae_path, args.latent_stats)


def build_vae(args, device) -> LatentCodec:
    """The --vae-version codec (encode to / decode from scaled latents) on `device`."""
    return LatentCodec.load(args.vae_version, vae_source(args), device=device,
                            latent_stats=args.latent_stats)
