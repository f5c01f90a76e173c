"""USP pretraining: masked latent modeling on frozen-VAE latents (MAE's main_pretrain, USP's flags).

    torchrun --nproc_per_node=8 -m pretrain.main_pretrain --model vit_base_patch_vae --vae_version d8 \
        --vae_path /path/to/sd-vae-ft-ema --batch_size 64 --norm_pix_loss --mask_ratio 0.75 \
        --epochs 800 --warmup_epochs 40 --blr 1.5e-4 --weight_decay 0.05 --data_path /imagenet ...

Data flow per sample: image -> RandomResizedCrop(0.2-1, bicubic) + flip -> [-1, 1] -> frozen VAE ->
posterior mean x scale -> (optional --add_noise) -> MAE with 75% of the latent patches masked.
Pixel presets (mae_vit_*) skip the VAE and see ImageNet-normalised images, as in MAE.

Tiny models for tests and experiments: `--model_kwargs '{"embed_dim": 32, "depth": 2, "num_heads": 2,
"decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 2}'` overrides any constructor
argument of the preset (JSON object), and is stored in the checkpoint's args so tools can rebuild it.
"""
import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from timm.optim import param_groups_weight_decay

from models.latent_spec import get_latent_spec
from models.mae import create_mae, is_pixel_model
from models.vae import PER_CHANNEL_CODECS, LatentCodec, load_latent_norm, vae_identity
from pretrain.engine_pretrain import MaskedModelingDataset, train_one_epoch
from util.checkpoint import (CheckpointManager, require_fitting_weights, require_same_args,
                              require_training_state, resolve_resume)
from util.cli import (advising_resume, check_model_builds, continue_command, default_num_workers, finish_parser,
                      non_negative_float, non_negative_int, parse_json_object, positive_float, positive_int)
from util.data import SeededDataset, build_image_folder, build_loader, pretrain_transform
from util.disk import ensure_writable_dir
from util.distributed import (DEFAULT_TIMEOUT_MINUTES, barrier, cleanup, get_world_size, init_distributed, rank_seed,
                              seed_everything, setup_for_distributed_printing)
from util.errors import UserError, run_cli
from util.latent_cache import LatentCacheDataset
from util.loop import LoopPosition
from util.lr_sched import effective_lr
from util.npz_latents import NpzLatentFolder, is_npz_latent_folder
from util.precision import PRECISIONS, configure_backend, make_grad_scaler
from util.preemption import PreemptionHandler
from util.run_dir import claim_output_dir, release_output_dir
from util.run_log import RunLogger, require_wandb
from util.sampler import ResumableDistributedSampler
from util.train_state import load_parts, resume_position, saved_global_batch, training_state

CHECKPOINT_PATTERN = r"^checkpoint-(\d+)\.pth$"
MODULE = "pretrain.main_pretrain"  # how advice to the user names this command

# MAE/USP decay every parameter with 2+ dimensions (timm's param_groups_weight_decay with an empty
# list): cls_token and mask_token are decayed, biases and norm weights are not. --no_decay_tokens
# also exempts the learned tokens and position embeddings (frozen in MAE; listed so a variant that
# learns them is handled the same way).
TOKENS_AND_POSITIONS = ("cls_token", "mask_token", "pos_embed", "decoder_pos_embed")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("USP / MAE pretraining", add_help=True)
    parser.add_argument("--batch_size", default=64, type=positive_int,
                        help="batch size per GPU (effective batch = batch_size * accum_iter * world size)")
    parser.add_argument("--epochs", default=400, type=positive_int)
    parser.add_argument("--accum_iter", default=1, type=positive_int,
                        help="accumulate gradients over this many iterations (for a larger effective batch)")
    parser.add_argument("--max_steps", default=None, type=non_negative_int,
                        help="stop after this many optimizer steps (checkpointing at the end); the lr schedule "
                             "still follows --epochs")

    # Model
    parser.add_argument("--model", default="mae_vit_large_patch16", type=str,
                        help="MAE preset name (USP's default; the paper's runs use vit_{base,large,xlarge}_patch_vae)")
    parser.add_argument("--model_kwargs", default="{}", type=str,
                        help='JSON object of constructor overrides, e.g. \'{"embed_dim": 32, "depth": 2}\'')
    parser.add_argument("--input_size", default=256, type=positive_int,
                        help="image size in pixels (USP's default; its pretraining recipe passes 224)")
    parser.add_argument("--mask_ratio", default=0.75, type=float, help="fraction of patches removed")
    parser.add_argument("--norm_pix_loss", action="store_true",
                        help="use per-patch normalised targets as the reconstruction target")
    parser.add_argument("--norm_image", action="store_true",
                        help="with --norm_pix_loss: normalise the target per image instead of per patch (USP)")
    parser.add_argument("--add_noise", action="store_true",
                        help="feed sqrt(t) z + sqrt(1 - t) eps with t ~ U[0.5, 1) and reconstruct the clean z")
    parser.add_argument("--vae_version", default="d8", choices=["d8", "d16", "vavae_f16d32"],
                        help="d8: SD-VAE (4 ch, /8); d16: KL-16 (16 ch, /16); vavae_f16d32: VA-VAE (32 ch, /16)")
    parser.add_argument("--vae_path", default=None, type=str,
                        help="d8: diffusers AutoencoderKL folder or hub id; d16: the kl16.ckpt file; vavae_f16d32: "
                             "the VA-VAE .pt file or its folder")
    parser.add_argument("--latent_stats", default=None, type=str,
                        help="vavae_f16d32: per-channel latent statistics (latents_stats.pt; default: beside the "
                             "VA-VAE weights)")
    parser.add_argument("--precision", default="bf16", choices=sorted(PRECISIONS),
                        help="autocast dtype: bf16, fp16 (with a dynamic grad scaler) or fp32 (no autocast)")
    parser.add_argument("--deterministic", action="store_true",
                        help="deterministic CUDA kernels (bit-exact GPU resume, slower); CPU runs are deterministic "
                             "without it")
    parser.add_argument("--dist_timeout_minutes", type=positive_float, default=DEFAULT_TIMEOUT_MINUTES,
                        help="minutes a collective may wait before the process group aborts (NCCL/gloo)")
    parser.add_argument("--vae_precision", default="fp32", choices=["bf16", "fp16", "fp32"],
                        help="autocast dtype of the frozen VAE encoder (fp32 keeps latents identical to "
                             "the latent cache's)")

    # Optimizer
    parser.add_argument("--weight_decay", type=non_negative_float, default=0.05)
    parser.add_argument("--no_decay_tokens", action="store_true",
                        help="no weight decay on cls_token / mask_token (MAE and USP decay them)")
    parser.add_argument("--lr", type=positive_float, default=None, metavar="LR", help="absolute learning rate")
    parser.add_argument("--blr", type=positive_float, default=1e-3, metavar="LR",
                        help="base learning rate: absolute_lr = base_lr * total_batch_size / 256")
    parser.add_argument("--min_lr", type=non_negative_float, default=0.0, metavar="LR",
                        help="lower lr bound of the cosine")
    parser.add_argument("--warmup_epochs", type=non_negative_int, default=40, metavar="N", help="epochs to warm up lr")

    # Data
    parser.add_argument("--data_path", default="/datasets01/imagenet_full_size/061417/", type=str,
                        help="ImageFolder root holding train/")
    parser.add_argument("--use_cached", action="store_true", help="read latents from a latent cache")
    parser.add_argument("--cached_path", default="", type=str,
                        help="latent cache: a pretrain.cache_latents directory or a MAR-style <class>/<image>.npz folder")
    parser.add_argument("--cached_posterior_sample", action="store_true",
                        help="with --use_cached, draw a posterior sample each step as USP's cached path does "
                             "(default: the posterior mean, as USP's online path)")
    parser.add_argument("--strict_data", action="store_true", help="stop on an unreadable image instead of skipping it")
    parser.add_argument("--num_workers", default=default_num_workers(), type=non_negative_int,
                        help="data-loading processes per GPU (the recipe's 10, or fewer on a smaller machine)")
    parser.add_argument("--pin_mem", action="store_true",
                        help="pin CPU memory in the DataLoader for more efficient transfer to the GPU")
    parser.add_argument("--no_pin_mem", action="store_false", dest="pin_mem")
    parser.set_defaults(pin_mem=True)

    # Run
    parser.add_argument("--output_dir", default="./output_dir", help="where checkpoints and log.txt go")
    parser.add_argument("--log_dir", default="./output_dir", help="TensorBoard directory")
    parser.add_argument("--device", default="cuda", help="cuda or cpu")
    parser.add_argument("--seed", default=0, type=non_negative_int)
    parser.add_argument("--resume", default="", help="checkpoint file or run directory to continue")
    parser.add_argument("--start_epoch", default=0, type=non_negative_int, metavar="N",
                        help="first epoch (without --resume)")
    parser.add_argument("--wandb", action="store_true", help="also log to Weights & Biases (needs `pip install wandb`)")
    parser.add_argument("--save_every", default=40, type=positive_int,
                        help="save after epochs 0, N, 2N, ... and the last (USP/MAE: 40)")
    parser.add_argument("--keep_last", default=None, type=non_negative_int,
                        help="keep only the newest K checkpoints (default: keep all, as MAE)")
    parser.add_argument("--log_every", default=20, type=positive_int, help="optimizer steps between metric reads")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in an --output_dir that holds another run's checkpoints (they are moved "
                             "into overwritten-<time>/, not deleted)")
    # torch.distributed.launch passes --local_rank; torchrun's LOCAL_RANK environment variable is what we use.
    parser.add_argument("--local_rank", "--local-rank", default=-1, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--allow_changed_args", action="store_true",
                        help="--resume with a changed run-defining flag (RESUME_MUST_MATCH), logging what changed")
    return finish_parser(parser)


# Flags a --resume must keep: they fix the network, the objective and the order and content of the batches
# (the global batch is compared too; the per-GPU batch may change with the number of GPUs).
RESUME_MUST_MATCH = ("model", "model_kwargs", "input_size", "mask_ratio", "norm_pix_loss", "norm_image", "add_noise",
                     "vae_version", "latent_stats", "seed", "use_cached", "cached_posterior_sample")


def build_model(args) -> torch.nn.Module:
    """The MAE preset for --model at --input_size (latent presets sized from --vae_version).

    Raises a one-sentence ValueError for an unknown name, an image size not divisible by the VAE
    factor, or a latent grid not divisible by the patch size.
    """
    return create_mae(args.model, args.input_size, vae_version=args.vae_version,
                      norm_pix_loss=args.norm_pix_loss, norm_image=args.norm_image,
                      **parse_json_object(args.model_kwargs, "--model_kwargs", '{"embed_dim": 32, "depth": 2}'))


def check_args(args) -> None:
    """Every check of the command line that needs no data, weights or GPU: it runs first."""
    if args.epochs < 1 or args.epochs <= args.start_epoch and not args.resume:
        raise UserError(f"--epochs {args.epochs} leaves nothing to train (it counts all epochs of the run, from "
                        f"--start_epoch {args.start_epoch}); pass a larger --epochs.")
    if not 0 < args.mask_ratio < 1:  # NaN too
        raise UserError(f"--mask_ratio {args.mask_ratio:g} must be between 0 and 1 (exclusive): it is the fraction "
                        "of patches hidden from the encoder (USP and MAE use 0.75).")
    is_pixel_model(args.model)  # unknown name -> one sentence listing the presets
    overrides = parse_json_object(args.model_kwargs, "--model_kwargs", '{"embed_dim": 32, "depth": 2}')
    check_model_builds(lambda: build_model(args), "--model_kwargs", args.model, overrides)


def check_cache_flags(args, pixel: bool) -> None:
    """--use_cached needs a latent model and --cached_path (here and in main_linprobe)."""
    if pixel:
        raise UserError(f"--use_cached holds VAE latents but --model {args.model} reads pixels; "
                        "use a latent preset (vit_*_patch_vae*, *_vae) or drop --use_cached.")
    if not args.cached_path:
        raise UserError("--use_cached needs --cached_path pointing at a latent cache directory "
                        "(made with `python -m pretrain.cache_latents`).")


def build_dataset(args, model, pixel: bool):
    """The keyed pretraining dataset: a latent cache (--use_cached) or an ImageFolder of train/."""
    if args.use_cached:
        check_cache_flags(args, pixel)
        expect = {"vae_version": args.vae_version, "image_size": args.input_size}
        if args.vae_path:
            expect["vae_identity"] = vae_identity(args.vae_version, args.vae_path)
        # USP's online path encodes the posterior mean; its cached path draws a sample every step
        # (--cached_posterior_sample). The cache picks the flip per (epoch, index).
        use_mean = not args.cached_posterior_sample
        if is_npz_latent_folder(args.cached_path):
            if args.vae_version in PER_CHANNEL_CODECS:
                raise UserError(f"--cached_path {args.cached_path} is a per-image .npz folder, which holds one-scale "
                                f"latents; {args.vae_version} needs a latent cache from `python -m pretrain.cache_latents`.")
            spec = get_latent_spec(args.vae_version)
            base = NpzLatentFolder(args.cached_path, scale=spec.scale, use_mean=use_mean, seed=args.seed,
                                   expect_shape=(spec.channels, spec.latent_size(args.input_size),
                                                 spec.latent_size(args.input_size)))
        else:
            base = LatentCacheDataset(args.cached_path, expect=expect, use_mean=use_mean, seed=args.seed,
                                      normalize=cache_normalizer(args))
    else:
        folder = build_image_folder(args.data_path, split="train", strict=args.strict_data)
        base = SeededDataset(folder, pretrain_transform(args.input_size, pixel=pixel), seed=args.seed)
    input_shape = (model.in_chans, model.img_size, model.img_size)
    return MaskedModelingDataset(base, model.patch_embed.num_patches, input_shape, args.add_noise, args.seed)


def cache_normalizer(args):
    """VA-VAE's per-channel normalisation of cached latents (None: the cache's one scale factor)."""
    if args.vae_version not in PER_CHANNEL_CODECS:
        return None
    return load_latent_norm(args.vae_version, args.vae_path, args.latent_stats).normalize


def build_codec(args, device, pixel: bool):
    """The frozen VAE for online encoding, or None (pixel model or latent cache)."""
    if pixel or args.use_cached:
        return None
    if args.vae_path is None:
        raise UserError("latent pretraining needs the VAE weights: pass --vae_path (d8: a diffusers "
                         "AutoencoderKL folder such as a download of stabilityai/sd-vae-ft-ema; d16: kl16.ckpt), "
                         "or --use_cached with a latent cache.")
    return LatentCodec.load(args.vae_version, args.vae_path, device=device, latent_stats=args.latent_stats)


def build_optimizer(model, args, lr: float, device) -> torch.optim.Optimizer:
    """AdamW(0.9, 0.95); no weight decay on biases and norms (and tokens with --no_decay_tokens)."""
    exempt = TOKENS_AND_POSITIONS if getattr(args, "no_decay_tokens", False) else ()
    groups = param_groups_weight_decay(model, args.weight_decay, no_weight_decay_list=exempt)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=device.type == "cuda")


def setup(args) -> SimpleNamespace:
    """Everything before the loop, in the order that fails fastest on bad input."""
    dist_env = init_distributed(args.device, args.dist_timeout_minutes)
    setup_for_distributed_printing(dist_env.is_main)
    device = dist_env.device
    configure_backend(device, args.precision, args.deterministic)  # prints on the main process only
    if args.wandb:
        require_wandb()
    check_args(args)
    # Before any data or weights: a folder that is unwritable, in use, or holds another run stops here.
    if args.log_dir:
        ensure_writable_dir(args.log_dir, flag="--log_dir")
    lock = claim_output_dir(args.output_dir, resume=args.resume, overwrite=args.overwrite, is_main=dist_env.is_main,
                            flag="--output_dir", log=print)

    pixel = is_pixel_model(args.model)
    seed_everything(args.seed)  # same initial weights on every rank and for every world size
    model = build_model(args)
    dataset = build_dataset(args, model, pixel)
    codec = build_codec(args, device, pixel)
    seed_everything(rank_seed(args.seed, dist_env.rank))

    sampler = ResumableDistributedSampler(len(dataset), dist_env.world_size, dist_env.rank, shuffle=True,
                                          seed=args.seed, drop_last=True)
    steps_per_epoch = sampler.num_samples // args.batch_size // args.accum_iter
    if steps_per_epoch == 0:
        raise UserError(f"the dataset has {len(dataset)} samples, fewer than one optimizer step needs "
                         f"({args.batch_size} x {args.accum_iter} x {dist_env.world_size} processes); "
                         "lower --batch_size or --accum_iter.")
    loader = build_loader(dataset, sampler, args.batch_size, num_workers=args.num_workers,
                          pin_memory=args.pin_mem and device.type == "cuda", persistent_workers=True,
                          drop_last=True)

    model.to(device)
    model_without_ddp = model
    if dist_env.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    global_batch = args.batch_size * args.accum_iter * dist_env.world_size
    base_lr = effective_lr(args.blr, args.lr, args.batch_size, args.accum_iter, dist_env.world_size)
    optimizer = build_optimizer(model_without_ddp, args, base_lr, device)
    scaler = make_grad_scaler(device, args.precision)
    position, resumed = restore_run(args, model_without_ddp, optimizer, scaler, steps_per_epoch * args.accum_iter)
    wandb_run = {"project": "usp-pretrain", "name": Path(args.output_dir).name, "config": vars(args)}
    # A resumed run redoes the steps after its checkpoint: their old log lines go (log.txt never repeats a step).
    logger = RunLogger(args.output_dir, dist_env.is_main, log_dir=args.log_dir,
                       wandb_run=wandb_run if args.wandb else None,
                       resume_step=position.global_step if position.global_step > 0 else None)
    if resumed:
        logger.info(resumed)
    logger.info(f"model {args.model}: {sum(p.numel() for p in model_without_ddp.parameters()) / 1e6:.2f}M params, "
                f"{'pixels' if pixel else 'latents'} {tuple(dataset.model_input_shape)}, "
                f"{model_without_ddp.patch_embed.num_patches} patches")
    logger.info(f"lr {base_lr:.3e} (blr {args.blr:.3e} x {global_batch} / 256), {steps_per_epoch} steps/epoch, "
                f"{dist_env.world_size} processes on {device}")
    return SimpleNamespace(
        args=args, dist=dist_env, device=device, model=model, model_without_ddp=model_without_ddp,
        codec=codec, sampler=sampler, loader=loader, optimizer=optimizer, scaler=scaler, logger=logger,
        position=position, base_lr=base_lr, steps_per_epoch=steps_per_epoch,
        preemption=PreemptionHandler(), output_lock=lock,
        images=getattr(dataset.base, "base", None),  # the SafeImageFolder whose skipped files are reported
        checkpoints=CheckpointManager(args.output_dir, lambda epoch: f"checkpoint-{epoch}.pth",
                                      keep_last=args.keep_last, is_main=dist_env.is_main),
    )


def restore_run(args, model, optimizer, scaler, batches_per_epoch: int) -> tuple:
    """Loads --resume into model/optimizer/scaler and returns (where the run continues, a message or None).

    The position is the checkpoint's `loop` record (util/train_state.py); MAE/USP checkpoints only have
    `epoch`, which means "finished", so they continue at the next epoch.
    """
    if not args.resume:
        return LoopPosition(epoch=args.start_epoch), None
    path, checkpoint = resolve_resume(args.resume, CHECKPOINT_PATTERN)
    require_training_state(checkpoint, path, hint="resume from a checkpoint-N.pth written by this script (a bare "
                                                   "state dict holds no run to continue).")
    require_fitting_weights(model, checkpoint["model"], path,
                            f"--model {args.model} with --model_kwargs {args.model_kwargs}")
    global_batch = args.batch_size * args.accum_iter * get_world_size()
    require_same_args(checkpoint, args, RESUME_MUST_MATCH, path, allow=args.allow_changed_args, dashes=False,
                      also=[("the global batch", saved_global_batch(checkpoint), global_batch)])
    load_parts(checkpoint, {"model": model, "optimizer": optimizer, "scaler": scaler})
    position = resume_position(checkpoint, path, batch_size=args.batch_size, accum=args.accum_iter,
                               batches_per_epoch=batches_per_epoch)
    if position is None:  # released weights carry only `model`: continue from --start_epoch, fresh optimizer
        position = LoopPosition(epoch=args.start_epoch)
    return position, (f"resumed {path} at epoch {position.epoch}, batch {position.batch}, "
                      f"step {position.global_step}")


def train(run) -> None:
    """The epoch loop: train, log MAE's per-epoch line, checkpoint every --save_every epochs and at the end."""
    args, position = run.args, run.position
    if args.max_steps is not None and position.global_step >= args.max_steps:
        run.logger.info(f"nothing to do: the run already took {position.global_step} >= --max_steps steps")
        return
    while position.epoch < args.epochs:
        run.sampler.set_epoch(position.epoch, start_batch=position.batch, batch_size=args.batch_size)
        result = train_one_epoch(run.model, run.codec, run.loader, run.optimizer, run.scaler, position, run)
        finished = result.epoch_finished
        if finished and run.images is not None:  # every rank: the report merges their records
            run.logger.report_skips(run.images.skip_report(), position.global_step)
        if finished and result.stats["loss"] is not None:
            run.logger.log(position.global_step, {"train_lr": result.stats["lr"], "train_loss": result.stats["loss"],
                                                  "epoch": position.epoch}, prefix="epoch")
        # MAE/USP: `epoch % 40 == 0 or epoch + 1 == epochs`.
        scheduled = finished and (position.epoch + 1 == args.epochs or position.epoch % args.save_every == 0)
        if scheduled or result.stop_reason is not None:
            save_state(run, run.model_without_ddp, run.optimizer, run.scaler, position)
        if result.stop_reason is not None:
            advice = continue_command(args.output_dir, MODULE) if result.stop_reason == "preempted" else ""
            run.logger.info(f"stopping at step {position.global_step}: {result.stop_reason}"
                            + (f"; {advice}" if advice else ""))
            return
        position.epoch += 1
        position.batch = 0


def save_state(run, model, optimizer, scaler, position: LoopPosition):
    """Writes checkpoint-{epoch}.pth (rank 0) with MAE's keys plus the resume record (util/train_state.py).

    A finished epoch is recorded as the start of the next one; otherwise (max_steps, preemption) the run
    continues inside this epoch after the batches already consumed.
    """
    state = training_state({"model": model, "optimizer": optimizer, "scaler": scaler}, run.args, position,
                           epoch=position.epoch, batch_size=run.args.batch_size,
                           batches_per_epoch=run.steps_per_epoch * run.args.accum_iter)
    path = run.checkpoints.save(state, position.epoch)
    if path is not None:
        run.logger.info(f"saved {path}")
    barrier()


def main(args) -> None:
    def release_and_cleanup():  # bad input after the folder claim: a later run in this process may use it
        release_output_dir(args.output_dir)
        cleanup()

    run = run_cli(setup, args, prog="main_pretrain", cleanup=release_and_cleanup)  # bad input: one sentence, exit 2
    try:
        # A diverged loss: one sentence, exit 1; a full disk: one sentence with the command that continues the run.
        run_cli(advising_resume(train, args.output_dir, MODULE), run, prog="main_pretrain")
    finally:
        run.preemption.restore()
        run.logger.close()
        release_output_dir(args.output_dir)
        cleanup()


if __name__ == "__main__":
    main(get_args_parser().parse_args())
