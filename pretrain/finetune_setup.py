"""Fine-tuning and linear probing setup: the shared flags, their validation, and the start of a run.

main_finetune.py and main_linprobe.py add their own flags to `add_common_args`; `start` checks them, joins
the process group and claims the output folder before any data or weights are read.
"""
import argparse

from models.dit_classifier import DIT_CLASSIFIERS
from models.latent_spec import get_latent_spec
from models.vit import VIT_MODEL_NAMES, create_vit, is_pixel_model
from util.cli import check_model_builds, default_num_workers, parse_json_object
from util.distributed import add_dist_timeout_arg, init_distributed, setup_for_distributed_printing
from util.errors import UserError
from util.precision import add_determinism_arg, add_precision_arg, configure_backend
from util.run_dir import claim_output_dir
from util.run_log import require_wandb



# ----------------------------------------------------------------------------------------------
# Arguments shared by both entry points
# ----------------------------------------------------------------------------------------------

def add_common_args(parser: argparse.ArgumentParser, *, batch_size: int, epochs: int, blr: float,
                    weight_decay: float, min_lr: float, warmup_epochs: int, global_pool: bool) -> None:
    """Flags that fine-tuning and linear probing share, with MAE's names; defaults differ per recipe."""
    parser.add_argument("--batch_size", default=batch_size, type=int,
                        help="batch size per GPU (effective batch = batch_size * accum_iter * world size)")
    parser.add_argument("--epochs", default=epochs, type=int)
    parser.add_argument("--accum_iter", default=1, type=int,
                        help="accumulate gradients over this many micro-batches per optimizer step")
    parser.add_argument("--model", default="vit_base_patch16_vae", type=str, metavar="MODEL",
                        help=f"classifier preset, one of: {', '.join(VIT_MODEL_NAMES)}")
    parser.add_argument("--model_kwargs", default="{}", type=str,
                        help='JSON dict of preset overrides, e.g. \'{"embed_dim": 64, "depth": 2, "num_heads": 2}\'')
    parser.add_argument("--input_size", default=224, type=int, help="image side in pixels")
    parser.add_argument("--vae_version", default=None, choices=["d8", "d16", "vavae_f16d32"],
                        help="latent space of *_vae presets (default d8); not allowed for pixel presets")
    parser.add_argument("--vae_path", default=None, type=str,
                        help="d8: diffusers AutoencoderKL folder or hub id; d16: kl16.ckpt; vavae_f16d32: the VA-VAE "
                             ".pt (or its folder)")
    parser.add_argument("--latent_stats", default=None, type=str,
                        help="vavae_f16d32: latents_stats.pt (default: beside the VA-VAE weights)")
    parser.add_argument("--vae_precision", default="fp32", choices=["bf16", "fp16", "fp32"],
                        help="autocast dtype of the VAE encoder (fp32 matches pretraining and the latent cache)")
    parser.add_argument("--weight_decay", type=float, default=weight_decay)
    parser.add_argument("--lr", type=float, default=None, metavar="LR", help="absolute learning rate")
    parser.add_argument("--blr", type=float, default=blr, metavar="LR",
                        help="base learning rate: absolute_lr = base_lr * total_batch_size / 256")
    parser.add_argument("--min_lr", type=float, default=min_lr, metavar="LR", help="lower lr bound for cosine")
    parser.add_argument("--warmup_epochs", type=int, default=warmup_epochs, metavar="N")
    parser.add_argument("--finetune", default="", help="USP/MAE pretraining checkpoint to initialise from")
    parser.add_argument("--global_pool", action="store_true", dest="global_pool",
                        help="classify the mean of the patch tokens (fc_norm)")
    parser.add_argument("--cls_token", action="store_false", dest="global_pool",
                        help="classify the cls token instead of the pooled patch tokens")
    parser.set_defaults(global_pool=global_pool)
    parser.add_argument("--data_path", default="/datasets01/imagenet_full_size/061417/", type=str,
                        help="ImageFolder root with train/ and val/")
    parser.add_argument("--nb_classes", default=1000, type=int, help="number of classification classes")
    parser.add_argument("--output_dir", default="./output_dir", help="where checkpoints and log.txt go")
    parser.add_argument("--log_dir", default=None, help="TensorBoard folder (default: output_dir)")
    parser.add_argument("--device", default="cuda", help="cuda or cpu")
    parser.add_argument("--seed", default=0, type=int)
    parser.add_argument("--resume", default="", help="checkpoint file or run directory to resume from")
    parser.add_argument("--start_epoch", default=0, type=int, metavar="N", help="start epoch (without --resume)")
    parser.add_argument("--eval", action="store_true", help="only evaluate the --resume checkpoint")
    parser.add_argument("--dist_eval", action="store_true",
                        help="split evaluation over all ranks (every image counted exactly once)")
    parser.add_argument("--eval_freq", default=1, type=int,
                        help="evaluate every N epochs (and always after the last one or an early stop)")
    parser.add_argument("--num_workers", default=default_num_workers(), type=int,
                        help="data-loading processes per GPU (MAE's 10, or fewer on a smaller machine)")
    parser.add_argument("--strict_data", action="store_true", help="stop on an unreadable image instead of skipping it")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in an --output_dir that holds another run's checkpoints (they are moved "
                             "into overwritten-<time>/, not deleted)")
    parser.add_argument("--pin_mem", action="store_true", default=True, help="pin CPU memory for transfers")
    parser.add_argument("--no_pin_mem", action="store_false", dest="pin_mem")
    parser.add_argument("--max_steps", default=None, type=int,
                        help="stop after this many optimizer steps (counted over the whole run), saving a checkpoint")
    parser.add_argument("--log_every", default=20, type=int, help="optimizer steps between metric logs")
    parser.add_argument("--wandb", action="store_true", help="also log to Weights & Biases (needs `pip install wandb`)")
    # USP's robustness probes (pretrain/robustness.py).
    parser.add_argument("--add_noise", action="store_true",
                        help="evaluate on images with ImageNet-C Gaussian noise of --noise_level (USP)")
    parser.add_argument("--noise_level", type=int, default=1, choices=[1, 2, 3, 4, 5], help="ImageNet-C severity")
    parser.add_argument("--add_t_noise", action="store_true",
                        help="diffuse the latents to DDPM step --t before the classifier, in training and evaluation")
    parser.add_argument("--t", type=int, default=100, help="DDPM step (1..1000) of --add_t_noise")
    add_precision_arg(parser, "--precision", default="bf16")
    add_determinism_arg(parser)
    add_dist_timeout_arg(parser, "--dist_timeout_minutes")
    # Distributed flags of MAE's scripts; torchrun's environment is what is actually used.
    parser.add_argument("--world_size", default=1, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", "--local-rank", default=-1, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--dist_on_itp", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dist_url", default="env://", help=argparse.SUPPRESS)


def validate_args(args) -> None:
    """Rejects inconsistent flags with one sentence each, before any data or model is touched."""
    try:
        pixel = is_pixel_model(args.model)
    except ValueError as error:
        raise UserError(str(error)) from None
    if pixel and args.vae_version is not None:
        raise UserError(f"--model {args.model} is a pixel-space preset and has no VAE variant, so --vae_version "
                         f"{args.vae_version} cannot be used with it; drop --vae_version or pick a *_vae preset "
                         f"({', '.join(n for n in VIT_MODEL_NAMES if n.endswith('_vae'))}).")
    if not pixel:
        args.vae_version = args.vae_version or "d8"
        try:
            get_latent_spec(args.vae_version).latent_size(args.input_size)
        except ValueError as error:
            raise UserError(str(error)) from None
    if getattr(args, "train_vae", False) and pixel:
        raise UserError(f"--train_vae needs a *_vae preset, but --model {args.model} reads pixels; drop --train_vae.")
    try:
        args.model_kwargs_dict = parse_json_object(args.model_kwargs, "--model_kwargs", '{"embed_dim": 64, "depth": 2}')
    except ValueError as error:
        raise UserError(str(error)) from None
    if args.wandb:
        require_wandb()
    if args.eval and not args.resume:
        raise UserError("--eval evaluates a trained checkpoint; pass it with --resume PATH.")
    if args.model not in DIT_CLASSIFIERS:  # DiT backbones are checked as they are built (build_dit_probe)
        check_model_builds(lambda: create_vit(args.model, args.input_size, vae_version=args.vae_version,
                                              num_classes=args.nb_classes, global_pool=args.global_pool,
                                              **args.model_kwargs_dict),
                           "--model_kwargs", args.model, args.model_kwargs_dict)
    for flag in ("batch_size", "epochs", "accum_iter", "log_every", "eval_freq"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be at least 1, got {getattr(args, flag)}.")


def start(args):
    """Checks the flags, joins the process group (torchrun or a single process), prints on rank 0 only
    and turns on the CUDA speed flags. Returns the DistEnv."""
    validate_args(args)
    dist_env = init_distributed(args.device, args.dist_timeout_minutes)
    setup_for_distributed_printing(dist_env.is_main)
    if args.output_dir and not args.eval:  # unwritable, in use, or another run's: stop before any data or weights
        claim_output_dir(args.output_dir, resume=args.resume, overwrite=args.overwrite, is_main=dist_env.is_main)
    configure_backend(dist_env.device, args.precision, args.deterministic)  # prints on the main process only
    return dist_env
