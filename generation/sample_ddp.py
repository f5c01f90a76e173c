"""Samples a DiT or SiT checkpoint on all ranks into PNGs and an ADM-layout npz for FID evaluation.

    # DiT (DDPM respaced to 250 steps, as the USP tables):
    torchrun --nproc_per_node=8 -m generation.sample_ddp --model DiT-XL/2 --ckpt DiT-XL-2-256x256.pt \
        --num-fid-samples 50000 --per-proc-batch-size 32 --cfg-scale 1.0 --sample-dir samples/dit-xl
    # SiT (mode first, as SiT's sample_ddp.py; `--mode SDE` works too):
    torchrun --nproc_per_node=8 -m generation.sample_ddp SDE --model SiT-XL/2 --ckpt SiT-XL-2-256x256.pt ...

Writes `<sample-dir>/<index:06d>.png` (the label in a PNG text chunk) and then `<sample-dir>.npz` with
arr_0 (N, H, W, 3) uint8 and arr_1 (N,) labels, exactly --num-fid-samples images in index order.
Image i depends only on (--global-seed, i) (and, bit for bit, on --per-proc-batch-size), never on the
number of processes; see `generation/sampling.py`. Rerunning an interrupted command resumes: complete
batches are skipped, and the npz equals that of an uninterrupted run.

Checkpoints: official DiT/SiT raw state dicts, or this project's training checkpoints, whose `ema`
weights are used (the `model` weights only when there is no `ema`, with a warning).
Differences from the official scripts: --sample-dir is the PNG folder itself (DiT names a subfolder after
the settings; here `sampling_config.json` in the folder records them and a resume with other settings is
refused), no checkpoint is downloaded (--ckpt is required), and labels are drawn per image.
"""
import argparse
import sys
import warnings
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from generation.eval_hooks import total_throughput
from generation.objectives import objective_family
from generation.sampling import (Guidance, ImageGenerator, check_sample_folder,
                                 create_npz_from_sample_folder, diffusion_sampler, sample_to_folder,
                                 transport_sampler)
from generation.train_utils import (TRANSPORT_FLAGS, add_flags, build_model, build_vae, check_model_args,
                                    check_vae_args, none_or_str)
from generation.transport import create_transport
from generation.transport.integrators import ODE_METHODS, SDE_METHODS
from generation.transport.path import DIFFUSION_FORMS
from models.latent_spec import get_latent_spec
from util.checkpoint import load_checkpoint
from util.cli import show_defaults
from util.disk import ensure_writable_dir
from util.errors import UserError, run_cli
from util.distributed import barrier, cleanup, init_distributed
from util.precision import add_precision_arg, enable_tf32

MODES = ("ODE", "SDE")
# Arguments that do not change any image: a resume may alter them.
NOT_IN_CONFIG = ("num_fid_samples", "sample_dir", "npz_workers", "progress")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("DiT / SiT DDP sampling into an ADM npz",
                                     usage="%(prog)s [ODE|SDE] --model NAME --ckpt PATH [options]")
    # DiT / SiT sample_ddp.py flags.
    add_flags(parser, "--model")
    parser.add_argument("--ckpt", type=str, required=True, help="official raw state dict or a training checkpoint")
    add_flags(parser, "--vae")
    parser.add_argument("--sample-dir", type=str, default="samples", help="PNG folder; the npz goes next to it")
    parser.add_argument("--per-proc-batch-size", type=int, default=32)
    parser.add_argument("--num-fid-samples", type=int, default=50_000)
    add_flags(parser, "--image-size", "--num-classes")
    parser.add_argument("--cfg-scale", type=float, default=1.5, help="1.0 = no guidance (the USP tables)")
    add_flags(parser, "--num-sampling-steps", "--global-seed")
    parser.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                        help="TF32 matmuls on Ampere+ (DiT's default; --no-tf32 for strict fp32)")
    # DiT samplers.
    parser.add_argument("--sampler", type=str, choices=["ddpm", "ddim"], default=None,
                        help="DiT only: DDPM respaced to --num-sampling-steps (default) or DDIM (eta 0)")
    # SiT: the mode and the transport / ODE / SDE flags of SiT's sample_ddp.py.
    parser.add_argument("--mode", type=str, choices=MODES, default=None,
                        help="SiT only (also accepted as the first argument): ODE (default) or SDE")
    add_flags(parser, *TRANSPORT_FLAGS)
    parser.add_argument("--sampling-method", type=str, default=None,
                        help=f"ODE: {', '.join(ODE_METHODS)} (default dopri5); SDE: {', '.join(SDE_METHODS)} "
                             "(default Euler)")
    parser.add_argument("--atol", type=float, default=1e-6, help="ODE absolute tolerance")
    parser.add_argument("--rtol", type=float, default=1e-3, help="ODE relative tolerance")
    parser.add_argument("--reverse", action="store_true", help="ODE: integrate from data to noise (SiT's flag)")
    parser.add_argument("--diffusion-form", type=str, default="sigma", choices=list(DIFFUSION_FORMS),
                        help="SDE diffusion coefficient form")
    parser.add_argument("--diffusion-norm", type=float, default=1.0, help="SDE diffusion coefficient scale")
    parser.add_argument("--last-step", type=none_or_str, default="Mean", choices=[None, "Mean", "Tweedie", "Euler"],
                        help="SDE final step")
    parser.add_argument("--last-step-size", type=float, default=0.04, help="SDE final step size")
    # Classifier-free guidance variants.
    parser.add_argument("--cfg-channels", type=str, choices=["legacy3", "all"], default="legacy3",
                        help="guide the first 3 latent channels (official DiT/SiT, reproduces their numbers) or all")
    parser.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                        help="guide only where LO <= t <= HI, in the model's t units (DiT 0..999, SiT 0..1, 1 = data)")
    # This re-implementation's additions.
    add_flags(parser, "--vae-version", "--vae-path", "--device")
    add_precision_arg(parser, "--precision", default="fp32")
    add_flags(parser, "--model-kwargs")
    parser.add_argument("--npz-workers", type=int, default=8, help="threads reading PNGs into the npz")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm bar on rank 0")
    return show_defaults(parser)


def parse_args(argv=None) -> argparse.Namespace:
    """Parses the command line; SiT's leading `ODE`/`SDE` word is accepted as well as --mode."""
    argv = list(sys.argv[1:] if argv is None else argv)
    positional_mode = argv.pop(0) if argv and argv[0] in MODES else None
    args = get_args_parser().parse_args(argv)
    if positional_mode is not None and args.mode not in (None, positional_mode):
        raise UserError(f"the command names mode {positional_mode} and --mode {args.mode}; give only one.")
    args.mode = args.mode or positional_mode
    return args


# ----------------------------------------------------------------------------------------------
# Checks that need no weights
# ----------------------------------------------------------------------------------------------

def check_args(args) -> dict:
    """Validates the command line before anything is loaded; returns the parsed --model-kwargs."""
    model_kwargs = check_model_args(args)
    family = objective_family(args.model)
    if family == "diffusion" and args.mode is not None:
        raise UserError(f"mode {args.mode} is a SiT sampler but --model is {args.model}; drop it (DiT uses --sampler).")
    if family == "transport" and args.sampler is not None:
        raise UserError(f"--sampler is a DiT flag but --model is {args.model}; use ODE or SDE mode for SiT.")
    if family == "transport":
        methods = ODE_METHODS if (args.mode or "ODE") == "ODE" else SDE_METHODS
        if args.sampling_method is not None and args.sampling_method not in methods:
            raise UserError(f"--sampling-method {args.sampling_method} is not an {args.mode or 'ODE'} method; "
                            f"use one of {', '.join(methods)}.")
    for flag in ("num_fid_samples", "per_proc_batch_size", "num_sampling_steps", "num_classes"):
        if getattr(args, flag) <= 0:
            raise UserError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}.")
    if args.cfg_scale < 1.0:
        raise UserError(f"--cfg-scale must be >= 1.0 (1.0 disables guidance), got {args.cfg_scale}.")
    if args.guidance_interval is not None and args.guidance_interval[0] > args.guidance_interval[1]:
        raise UserError(f"--guidance-interval {args.guidance_interval[0]} {args.guidance_interval[1]} is empty; "
                        "give LO <= HI.")
    if not Path(args.ckpt).is_file():
        raise UserError(f"--ckpt {args.ckpt} does not exist; pass a DiT/SiT checkpoint file.")
    check_vae_args(args)
    return model_kwargs


# ----------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------
# Building the generator
# ----------------------------------------------------------------------------------------------

def build_sample_fn(args, model):
    """The latent sampler the flags ask for: DiT DDPM/DDIM, or SiT ODE/SDE over the flags' transport."""
    if objective_family(args.model) == "diffusion":
        method = args.sampler or "ddpm"
        return diffusion_sampler(args.num_sampling_steps, method, learn_sigma=model.learn_sigma), method == "ddpm"
    transport = create_transport(args.path_type, args.prediction, args.loss_weight, args.train_eps, args.sample_eps)
    mode = args.mode or "ODE"
    sample_fn = transport_sampler(transport, mode, args.num_sampling_steps, args.sampling_method, atol=args.atol,
                                  rtol=args.rtol, reverse=args.reverse, diffusion_form=args.diffusion_form,
                                  diffusion_norm=args.diffusion_norm, last_step=args.last_step,
                                  last_step_size=args.last_step_size)
    return sample_fn, mode == "SDE"


def sampling_config(args, dist_env) -> dict:
    """What fixes the images of a sample folder (recorded in it, so a resume cannot mix settings)."""
    config = {key: value for key, value in vars(args).items() if key not in NOT_IN_CONFIG}
    config["ckpt"] = str(Path(args.ckpt).resolve())
    config["device"] = dist_env.device.type  # CPU and GPU kernels differ in the last bits
    return config


def setup(args, dist_env, log=print) -> ImageGenerator:
    model_kwargs = check_args(args)
    ensure_writable_dir(args.sample_dir, flag="--sample-dir")  # before the model and the VAE, not after
    spec = get_latent_spec(args.vae_version)
    latent_size = spec.latent_size(args.image_size)
    model = build_model(args, model_kwargs, latent_size, spec.channels)
    checkpoint = load_checkpoint(args.ckpt)
    warn = warnings.warn if dist_env.is_main else (lambda *a, **k: None)
    state_dict = select_weights(checkpoint, args.ckpt, warn)
    load_weights_strict(model, state_dict, args.ckpt, checkpoint.get("args"))
    del checkpoint, state_dict
    model = model.to(dist_env.device).eval()
    sample_fn, stochastic = build_sample_fn(args, model)
    codec = build_vae(args, dist_env.device)
    guidance = Guidance(scale=args.cfg_scale, channels=3 if args.cfg_channels == "legacy3" else None,
                        interval=tuple(args.guidance_interval) if args.guidance_interval else None)
    check_sample_folder(args.sample_dir, sampling_config(args, dist_env), dist_env.is_main)
    if dist_env.is_main:
        log(f"{args.model}: {sum(p.numel() for p in model.parameters()):,} parameters from {args.ckpt}; "
            f"{args.num_fid_samples} samples into {args.sample_dir} on {dist_env.world_size} process(es)")
    return ImageGenerator(model, codec, sample_fn, num_classes=args.num_classes,
                          latent_shape=(spec.channels, latent_size, latent_size), device=dist_env.device,
                          guidance=guidance, precision=args.precision, stochastic=stochastic)


def main(argv=None) -> None:
    """Exit codes (util.errors): 2 = a user error, reported as one sentence on stderr."""
    run_cli(sample, argv, prog="generation.sample_ddp", cleanup=cleanup)


def sample(argv=None) -> None:
    args = parse_args(argv)
    dist_env = init_distributed(args.device)
    if dist_env.device.type == "cuda" and args.tf32:
        enable_tf32()
    generator = setup(args, dist_env)
    try:
        result = sample_to_folder(generator, args.sample_dir, args.num_fid_samples, args.per_proc_batch_size,
                                  args.global_seed, dist_env.rank, dist_env.world_size,
                                  progress=args.progress and dist_env.is_main)
        total, seconds, rate = total_throughput(result["images"], result["seconds"], dist_env.device)
        barrier()  # every PNG exists before rank 0 packs them
        if dist_env.is_main:
            print(f"sampled {total} images in {seconds:.1f}s ({rate:.2f} images/s over "
                  f"{dist_env.world_size} process(es))")
            out = create_npz_from_sample_folder(args.sample_dir, args.num_fid_samples, args.npz_workers)
            print(f"Saved .npz file to {out} [shape={(args.num_fid_samples, args.image_size, args.image_size, 3)}].")
    finally:
        cleanup()


if __name__ == "__main__":
    main()
