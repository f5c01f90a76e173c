"""The classification loop shared by fine-tuning and linear probing (MAE's engine_finetune + setup).

main_finetune.py and main_linprobe.py differ in which parameters train, the optimizer, the
criterion and the augmentation; everything else - process-group start, seeded model building,
the image -> (VAE) -> ViT model wrapper, data loading with per-sample randomness, one epoch of
training, exact top-k evaluation across ranks, checkpoints (last + best), resume, and the two
endings (`evaluate_only` for --eval, `train`) - lives here once.
"""
import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from models.dit_classifier import DIT_CLASSIFIERS, load_dit_backbone
from models.latent_spec import get_latent_spec
from models.vit import VIT_MODEL_NAMES, create_vit, is_pixel_model
from pretrain.robustness import GaussianNoise, ddpm_alpha_bar, diffuse_latents
from util.checkpoint import args_to_dict, load_checkpoint, require_training_state, save_checkpoint
from util.cli import check_model_builds, default_num_workers, parse_json_object
from util.data import build_image_folder, build_loader, eval_transform
from util.distributed import (add_dist_timeout_arg, cleanup, get_world_size, init_distributed, is_dist, rank_seed,
                              seed_everything, setup_for_distributed_printing)
from util.run_log import RunLogger, require_wandb
from util.loop import LossWindow, LoopPosition, backward_micro_batch, optimizer_step
from util.lr_sched import adjust_learning_rate
from util.precision import add_determinism_arg, add_precision_arg, autocast, configure_cuda, make_grad_scaler
from util.preemption import PreemptionHandler
from util.rng import gather_rng_states, restore_rank_rng
from util.run_dir import claim_output_dir, release_output_dir
from util.sampler import ResumableDistributedSampler
from util.errors import CommandLineExit, UserError, run_cli


UsageError = UserError  # a command-line problem of the understanding entry points; one type for every user error (util/errors.py)


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
        raise UsageError(str(error)) from None
    if pixel and args.vae_version is not None:
        raise UsageError(f"--model {args.model} is a pixel-space preset and has no VAE variant, so --vae_version "
                         f"{args.vae_version} cannot be used with it; drop --vae_version or pick a *_vae preset "
                         f"({', '.join(n for n in VIT_MODEL_NAMES if n.endswith('_vae'))}).")
    if not pixel:
        args.vae_version = args.vae_version or "d8"
        try:
            get_latent_spec(args.vae_version).latent_size(args.input_size)
        except ValueError as error:
            raise UsageError(str(error)) from None
    if getattr(args, "train_vae", False) and pixel:
        raise UsageError(f"--train_vae needs a *_vae preset, but --model {args.model} reads pixels; drop --train_vae.")
    try:
        args.model_kwargs_dict = parse_json_object(args.model_kwargs, "--model_kwargs", '{"embed_dim": 64, "depth": 2}')
    except ValueError as error:
        raise UsageError(str(error)) from None
    if args.wandb:
        require_wandb()
    if args.eval and not args.resume:
        raise UsageError("--eval evaluates a trained checkpoint; pass it with --resume PATH.")
    if args.model not in DIT_CLASSIFIERS:  # DiT backbones are checked as they are built (build_dit_probe)
        check_model_builds(lambda: create_vit(args.model, args.input_size, vae_version=args.vae_version,
                                              num_classes=args.nb_classes, global_pool=args.global_pool,
                                              **args.model_kwargs_dict),
                           "--model_kwargs", args.model, args.model_kwargs_dict)
    for flag in ("batch_size", "epochs", "accum_iter", "log_every", "eval_freq"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be at least 1, got {getattr(args, flag)}.")


def start(args):
    """Checks the flags, joins the process group (torchrun or a single process), prints on rank 0 only
    and turns on the CUDA speed flags. Returns the DistEnv."""
    validate_args(args)
    dist_env = init_distributed(args.device, args.dist_timeout_minutes)
    setup_for_distributed_printing(dist_env.is_main)
    if args.output_dir and not args.eval:  # unwritable, in use, or another run's: stop before any data or weights
        claim_output_dir(args.output_dir, resume=args.resume, overwrite=args.overwrite, is_main=dist_env.is_main)
    if dist_env.device.type == "cuda":
        configure_cuda(deterministic=args.deterministic)
    return dist_env


# ----------------------------------------------------------------------------------------------
# Model: images -> (frozen or trainable VAE encoder) -> ViT
# ----------------------------------------------------------------------------------------------

class LatentClassifier(nn.Module):
    """images (N, 3, H, W) -> logits (N, num_classes).

    With a codec the images ([-1, 1]) first go through the VAE encoder: latents = posterior mean
    * scale, (N, C, H/f, W/f), as in USP. Without one the input goes straight to the ViT (pixel
    presets, or latents read from the cache). The codec's weights only receive gradients after
    `codec.train_encoder()` (--train_vae); otherwise the encoder runs without autograd.
    `vae_precision` is the encoder's own autocast dtype (fp32 by default, so the latents equal
    the ones pretraining and the latent cache saw), independent of the ViT's --precision.
    """

    def __init__(self, vit: nn.Module, codec=None, vae_precision: str = "fp32", t_noise_alpha_bar=None,
                 latent_mixup=None):
        super().__init__()
        self.vit = vit
        self.codec = codec
        self.vae_precision = vae_precision
        self.t_noise_alpha_bar = t_noise_alpha_bar  # --add_t_noise: latents diffused to abar_t (USP)
        self.latent_mixup = latent_mixup  # Mixup/CutMix on the latents (USP's default, i.e. without --image_mix)

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor = None):
        """inputs (N, 3, H, W) -> logits (N, K); with `targets` (training with latent mixing) ->
        (logits, mixed soft targets (N, K)): USP encodes, adds t-noise, then mixes the latents."""
        if self.codec is not None:
            if self.vae_precision == "fp32":
                vae_autocast = torch.autocast(inputs.device.type, enabled=False)  # overrides an outer autocast
            else:
                vae_autocast = autocast(inputs.device, self.vae_precision)
            with vae_autocast:
                inputs = self.codec.encode(inputs.float() if self.vae_precision == "fp32" else inputs,
                                           sample=False).float()  # (N, C, h, w) scaled posterior mean
        if self.t_noise_alpha_bar is not None:
            inputs = diffuse_latents(inputs, self.t_noise_alpha_bar)
        if targets is None:
            return self.vit(inputs)
        inputs, targets = self.latent_mixup(inputs, targets)
        return self.vit(inputs), targets


def t_noise_alpha_bar(args, pixel: bool):
    """abar_t for --add_t_noise (USP: linear DDPM schedule, step --t), or None when off."""
    if not getattr(args, "add_t_noise", False):
        return None
    if pixel:
        raise UsageError(f"--add_t_noise diffuses VAE latents but --model {args.model} reads pixels; use a *_vae preset.")
    return ddpm_alpha_bar(args.t)


def build_vit(args, head_init_std: float) -> nn.Module:
    """The ViT preset for the flags, initialised from --finetune (USP/MAE weights) when given.

    The classifier head starts as trunc_normal(std=head_init_std) with zero bias (MAE: 2e-5 for
    fine-tuning, 0.01 for the linear probe), whether or not pretrained weights are loaded.
    """
    from models.transfer import TransferError, transfer_pretrained  # lazily: it pulls in DiT/SiT too

    if args.model in DIT_CLASSIFIERS:
        return build_dit_probe(args, head_init_std)
    if getattr(args, "skip_depth", 0):
        raise UsageError(f"--skip_depth probes an intermediate block of a DiT backbone (dit_*); --model {args.model} "
                         "is a ViT.")
    vit = create_vit(args.model, args.input_size, vae_version=args.vae_version, num_classes=args.nb_classes,
                     drop_path_rate=getattr(args, "drop_path", 0.0), global_pool=args.global_pool,
                     **args.model_kwargs_dict)
    nn.init.trunc_normal_(vit.head.weight, std=head_init_std)
    nn.init.zeros_(vit.head.bias)
    if args.finetune and not args.eval:
        try:
            report = transfer_pretrained(vit, args.finetune, head_init_std=head_init_std)
        except TransferError as error:
            raise UsageError(f"--finetune {args.finetune} cannot initialise --model {args.model}: {error}") from None
        print(f"Initialised from {args.finetune}:\n{report}")
    return vit


def build_dit_probe(args, head_init_std: float) -> nn.Module:
    """A DiT backbone classifier (USP's models_dit) from a DiT/SiT checkpoint's 'model' weights (--finetune)."""
    spec = get_latent_spec(args.vae_version)
    try:
        model = DIT_CLASSIFIERS[args.model](img_size=spec.latent_size(args.input_size), in_chans=spec.channels,
                                            patch_size=max(1, 16 // spec.factor), num_classes=args.nb_classes,
                                            skip_depth=getattr(args, "skip_depth", 0), **args.model_kwargs_dict)
    except (TypeError, ValueError) as error:
        raise UsageError(f"--model {args.model} cannot be built from these flags: {error}") from None
    nn.init.trunc_normal_(model.head.weight, std=head_init_std)
    nn.init.zeros_(model.head.bias)
    if args.finetune and not args.eval:
        try:
            fresh = load_dit_backbone(model, load_checkpoint(args.finetune))
        except ValueError as error:
            raise UsageError(f"--finetune {args.finetune} cannot initialise --model {args.model}: {error}") from None
        print(f"Initialised the DiT trunk from {args.finetune}; left at initialisation: {', '.join(fresh)}")
    return model


def build_models(args, dist_env, pixel: bool, head_init_std: float, adapt_vit=None) -> tuple:
    """(vit on the device, LatentCodec or None for pixel presets), seeded so runs are reproducible.

    The ViT is built under the global seed, so every rank starts from the same weights whatever the
    world size; afterwards each rank gets its own seed (dropout, drop path, mixup differ per rank).
    `adapt_vit(vit) -> vit` changes the network before it moves (the linear probe's head). The ViT
    comes before the VAE so a wrong --finetune checkpoint fails before the VAE weights are read.
    """
    seed_everything(args.seed)
    vit = build_vit(args, head_init_std)
    if adapt_vit is not None:
        vit = adapt_vit(vit)
    vit = vit.to(dist_env.device)
    seed_everything(rank_seed(args.seed, dist_env.rank))
    codec = None
    if not pixel:
        from models.vae import LatentCodec

        codec = LatentCodec.load(args.vae_version, args.vae_path, device=dist_env.device,
                                 latent_stats=args.latent_stats)
    return vit, codec


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------

def posterize_keep_zero_bits(img, bits_to_keep, **kwargs):
    """timm's posterize, extended to bits_to_keep = 0 (a black image, what Pillow < 11 returned).

    timm's RandAugment with magnitude noise ("mstd0.5") reaches level 10, where PosterizeIncreasing
    keeps 0 bits; Pillow >= 11 rejects that with a ValueError that would kill the data loader.
    """
    from PIL import Image
    from timm.data.auto_augment import posterize

    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return posterize(img, bits_to_keep, **kwargs)


def guard_posterize(transform):
    """Points every Posterize op of timm's RandAugment/AutoAugment inside `transform` at
    `posterize_keep_zero_bits` (only this transform's op objects change, not timm's tables)."""
    from timm.data.auto_augment import AugmentOp, posterize

    stack = [transform]
    while stack:
        node = stack.pop()
        if isinstance(node, (list, tuple)):  # AutoAugment's policy is a list of sub-policy lists
            stack.extend(node)
            continue
        if isinstance(node, AugmentOp) and node.aug_fn is posterize:
            node.aug_fn = posterize_keep_zero_bits
        stack.extend(child for child in (getattr(node, "transforms", None), getattr(node, "ops", None),
                                         getattr(node, "policy", None)) if isinstance(child, (list, tuple)))
    return transform


def image_mean_std(pixel: bool):
    """Normalisation statistics: ImageNet's for pixel models (MAE), 0.5/0.5 -> [-1, 1] for VAE input."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    return (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD) if pixel else ((0.5,) * 3, (0.5,) * 3)


def check_class_count(dataset, nb_classes: int, root) -> None:
    if len(dataset.classes) != nb_classes:
        raise UsageError(f"--nb_classes {nb_classes} does not match the {len(dataset.classes)} class folders in "
                         f"{root}; pass --nb_classes {len(dataset.classes)}.")


class EvalShardSampler(torch.utils.data.Sampler):
    """Rank r takes indices r, r + W, r + 2W, ... of the dataset, without padding.

    torch's DistributedSampler pads the last round with repeated images so every rank gets the
    same count; summing correct predictions over ranks would then count those images twice.
    Here every image is evaluated exactly once; ranks may differ by one image, which is fine
    because evaluation has no per-step collectives.
    """

    def __init__(self, dataset_len: int, num_replicas: int = 1, rank: int = 0):
        self.indices = list(range(rank, dataset_len, num_replicas))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def build_eval_loader(args, dist_env, pixel: bool):
    """Validation loader: resize to input_size / 0.875 + center crop; sharded with --dist_eval."""
    corruption = GaussianNoise(args.noise_level) if getattr(args, "add_noise", False) else None
    dataset = build_image_folder(args.data_path, "val",
                                 transform=eval_transform(args.input_size, pixel=pixel, corruption=corruption))
    check_class_count(dataset, args.nb_classes, Path(args.data_path) / "val")
    if args.dist_eval and dist_env.world_size > 1:
        sampler = EvalShardSampler(len(dataset), dist_env.world_size, dist_env.rank)
    else:
        sampler = EvalShardSampler(len(dataset))  # every rank evaluates everything (MAE's default)
    return build_loader(dataset, sampler, batch_size=args.batch_size, num_workers=args.num_workers,
                        pin_memory=args.pin_mem and dist_env.device.type == "cuda", drop_last=False)


@dataclass
class TrainData:
    """The training sampler (resumable, keyed by (epoch, index)), its loader, and optimizer steps per epoch."""

    sampler: ResumableDistributedSampler
    loader: torch.utils.data.DataLoader
    steps_per_epoch: int


def build_train_loader(args, train_dataset, dist_env) -> TrainData:
    """Shuffled, rank-split, drop-last loader; one sentence when an epoch cannot fill one optimizer step."""
    sampler = ResumableDistributedSampler(len(train_dataset), dist_env.world_size, dist_env.rank,
                                          shuffle=True, seed=args.seed, drop_last=True)
    steps_per_epoch = sampler.num_samples // (args.batch_size * args.accum_iter)
    if steps_per_epoch == 0:
        raise UsageError(f"{sampler.num_samples} training images per rank do not fill one optimizer step of "
                         f"--batch_size {args.batch_size} x --accum_iter {args.accum_iter}; lower them.")
    loader = build_loader(train_dataset, sampler, args.batch_size, args.num_workers,
                          pin_memory=args.pin_mem and dist_env.device.type == "cuda",
                          persistent_workers=True, drop_last=True)
    return TrainData(sampler=sampler, loader=loader, steps_per_epoch=steps_per_epoch)


# ----------------------------------------------------------------------------------------------
# Metrics and evaluation
# ----------------------------------------------------------------------------------------------

def topk_correct(logits: torch.Tensor, target: torch.Tensor, topk=(1, 5)) -> torch.Tensor:
    """Number of samples whose label is among the k highest logits, for each k.

    logits (N, K), target (N,) int64 -> (len(topk),) int64 counts. k larger than K is clipped to K
    (top-5 on a 4-class problem is then 100%).
    """
    maxk = min(max(topk), logits.shape[1])
    predictions = logits.topk(maxk, dim=1).indices  # (N, maxk), best first
    hits = predictions.eq(target.view(-1, 1))  # (N, maxk)
    return torch.stack([hits[:, :min(k, maxk)].any(dim=1).sum() for k in topk])


@torch.no_grad()
def evaluate(model: nn.Module, data_loader, device: torch.device, precision: str, reduce: bool) -> dict:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy over the loader's images.

    `reduce`: the loader holds this rank's shard (EvalShardSampler), so correct counts, loss sums
    and image counts are summed over ranks - exact, since no image appears twice.
    """
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # correct@1, correct@5, loss sum, count
    for images, target, *_ in data_loader:
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        with autocast(device, precision):
            logits = model(images)
        logits = logits.float()
        loss_sum = nn.functional.cross_entropy(logits, target, reduction="sum")
        totals[:2] += topk_correct(logits, target, (1, 5)).double()
        totals[2] += loss_sum.double()
        totals[3] += target.numel()
    if reduce and is_dist():
        dist.all_reduce(totals, op=dist.ReduceOp.SUM)
    correct1, correct5, loss_sum, count = totals.tolist()
    count = max(count, 1.0)
    return {"acc1": 100.0 * correct1 / count, "acc5": 100.0 * correct5 / count, "loss": loss_sum / count,
            "images": int(totals[3].item())}


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

@dataclass
class TrainSetup:
    """What main_finetune / main_linprobe hand to the loop."""

    args: argparse.Namespace
    device: torch.device
    dist: object  # util.distributed.DistEnv
    logger: object  # util.run_log.RunLogger
    preemption: object  # util.preemption.PreemptionHandler
    base_lr: float
    steps_per_epoch: int  # optimizer steps in a full epoch
    criterion: nn.Module
    mixup_fn: object = None  # timm.data.Mixup or None
    model_ema: object = None  # timm.utils.ModelEmaV3 or None
    clip_grad: float | None = None


def train_one_epoch(model, data_loader, optimizer, scaler, position: LoopPosition, run: TrainSetup) -> tuple:
    """Trains from `position` to the end of `position.epoch`, or until --max_steps / preemption.

    Per micro-batch: lr schedule (per optimizer step), Mixup/CutMix on the pixels, forward under
    autocast, backward (no DDP all-reduce until the last micro-batch of an accumulation group).
    Per optimizer step: unscale + clip, step, EMA. Losses stay on the device and are read only
    every --log_every steps. Returns (stats {"lr", "loss"}, stop_reason: None at the end of the
    epoch, else "max_steps" or "preempted").
    """
    args, device = run.args, run.device
    model.train(True)
    accum = args.accum_iter
    batches_per_epoch = run.steps_per_epoch * accum
    losses = LossWindow(device)
    window_steps = 0
    window_start = time.perf_counter()
    stop_reason = None
    lr = optimizer.param_groups[0]["lr"]

    for samples, targets, _ in data_loader:
        if position.batch >= batches_per_epoch:
            break
        if position.batch % accum == 0:
            lr = adjust_learning_rate(optimizer, position.epoch + position.batch / batches_per_epoch,
                                      run.base_lr, args.min_lr, args.warmup_epochs, args.epochs)
        samples = samples.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        mix_latents = run.mixup_fn is not None and not getattr(args, "image_mix", False)
        if run.mixup_fn is not None and not mix_latents:
            samples, targets = run.mixup_fn(samples, targets)  # --image_mix: pixel-space mixing, soft targets

        def compute_loss():
            with autocast(device, args.precision):
                # USP's default mixes the latents inside the classifier, after the VAE encoder.
                logits, soft_targets = model(samples, targets) if mix_latents else (model(samples), targets)
            return run.criterion(logits.float(), soft_targets)

        boundary = (position.batch + 1) % accum == 0
        losses.add(backward_micro_batch(model, scaler, compute_loss, accum, boundary))
        position.batch += 1
        if not boundary:
            continue

        optimizer_step(optimizer, scaler, position, run.clip_grad)
        window_steps += 1
        if run.model_ema is not None:
            run.model_ema.update(unwrap(model).vit, step=position.global_step)

        if run.preemption.should_stop(position.global_step):
            stop_reason = "preempted"
        elif args.max_steps is not None and position.global_step >= args.max_steps:
            stop_reason = "max_steps"
        # Also read the loss before any stop: a checkpoint is only written after a finite check.
        if position.global_step % args.log_every == 0 or stop_reason or position.batch >= batches_per_epoch:
            loss_value = losses.read_window(position.global_step)
            elapsed = time.perf_counter() - window_start
            images = window_steps * accum * args.batch_size * run.dist.world_size
            run.logger.log(position.global_step, {
                "loss": loss_value, "lr": lr, "epoch": position.epoch + position.batch / batches_per_epoch,
                "images_per_s": images / max(elapsed, 1e-9),
            })
            window_steps = 0
            window_start = time.perf_counter()
        if stop_reason is not None:
            break

    epoch_mean = losses.read_epoch(position.global_step)
    return {"lr": lr, "loss": math.nan if epoch_mean is None else epoch_mean}, stop_reason


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel (or the model itself)."""
    return getattr(model, "module", model)


# ----------------------------------------------------------------------------------------------
# Checkpoints and resume
# ----------------------------------------------------------------------------------------------

LAST_NAME = "checkpoint-last.pth"  # full training state, overwritten (atomically) every epoch
BEST_NAME = "checkpoint-best.pth"  # weights of the best top-1 epoch so far


def training_state(classifier: LatentClassifier, optimizer, scaler, position: LoopPosition, args,
                   best_acc1: float, model_ema=None, train_vae: bool = False) -> dict:
    """Everything needed to continue the run exactly (a collective: gathers every rank's RNG).

    Keys follow MAE (`model` = the ViT's state dict, loadable with strict=True into the preset,
    `optimizer`, `epoch`, `scaler`, `args`) plus the resume position and RNG states.
    """
    state = {
        "model": classifier.vit.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": position.epoch,
        "epoch_batch": position.batch,
        "global_step": position.global_step,
        "best_acc1": best_acc1,
        "args": args_to_dict(args),
        "rng": gather_rng_states(),
        "world_size": get_world_size(),
    }
    if model_ema is not None:
        state["model_ema"] = model_ema.module.state_dict()
    if train_vae:
        state["vae_encoder"] = {k: v for k, v in classifier.codec.autoencoder.state_dict().items()
                                if k.startswith(("encoder.", "quant_conv."))}
    return state


def resume_from(args, classifier: LatentClassifier, optimizer=None, scaler=None, model_ema=None) -> tuple:
    """Loads --resume (file or run dir) into the model (and optimizer, scaler, EMA, RNG when given).

    Returns (LoopPosition to continue from, best_acc1). A checkpoint whose epoch was finished
    continues at the next epoch's first batch. Official MAE/USP fine-tuned checkpoints (no
    resume position) count as finished epochs.
    """
    path = Path(args.resume)
    if path.is_dir():
        path = path / LAST_NAME
    state = require_training_state(load_checkpoint(path), path,
                                   hint="to start from these weights use --finetune instead of --resume.")
    try:
        classifier.vit.load_state_dict(state["model"], strict=True)
    except (KeyError, RuntimeError) as error:
        raise UsageError(f"--resume {path} does not hold weights of --model {args.model} with these flags "
                         f"({str(error).splitlines()[0][:160]}); pass the matching checkpoint or model flags.") from None
    if "vae_encoder" in state:
        classifier.codec.autoencoder.load_state_dict(state["vae_encoder"], strict=False)
    print(f"Resumed weights from {path}")
    position = LoopPosition(epoch=args.start_epoch)
    best_acc1 = float(state.get("best_acc1", 0.0))
    if optimizer is None or "optimizer" not in state or "epoch" not in state:
        return position, best_acc1
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    if model_ema is not None and "model_ema" in state:
        model_ema.module.load_state_dict(state["model_ema"])
    position = LoopPosition(epoch=int(state["epoch"]), batch=int(state.get("epoch_batch", -1)),
                            global_step=int(state.get("global_step", 0)))
    if "rng" in state:
        restore_rank_rng(state["rng"])
    return position, best_acc1


def fit(classifier: LatentClassifier, model, train_sampler, train_loader, eval_model, eval_loader,
        optimizer, scaler, position: LoopPosition, best_acc1: float, run: TrainSetup) -> dict:
    """Epoch loop: train, evaluate, save last (+ best); stops early on --max_steps or preemption.

    `model` is what trains (DDP-wrapped `classifier` or the classifier itself); `eval_model`
    evaluates (the classifier, or one that sees images when training reads cached latents).
    Returns the last evaluation's metrics.
    """
    args, logger = run.args, run.logger
    output_dir = Path(args.output_dir)
    batches_per_epoch = run.steps_per_epoch * args.accum_iter
    if position.batch >= batches_per_epoch or position.batch < 0:
        position.epoch, position.batch = position.epoch + 1, 0
    metrics = {}
    reduce = args.dist_eval and run.dist.world_size > 1
    start_time = time.time()
    while position.epoch < args.epochs:
        if args.max_steps is not None and position.global_step >= args.max_steps:
            break
        train_sampler.set_epoch(position.epoch, start_batch=position.batch, batch_size=args.batch_size)
        stats, stop_reason = train_one_epoch(model, train_loader, optimizer, scaler, position, run)
        images = getattr(train_loader.dataset, "base", None)  # the SafeImageFolder (None for a latent cache)
        if hasattr(images, "skip_report"):  # every rank: the report merges their records
            logger.report_skips(images.skip_report(), position.global_step)
        if stop_reason == "preempted":
            save(output_dir / LAST_NAME, classifier, optimizer, scaler, position, args, best_acc1, run)
            logger.info(f"Stopped on {run.preemption.signal_name or 'a preemption signal'} at step "
                        f"{position.global_step}; resume with --resume {output_dir}.")
            return metrics
        last_epoch = position.epoch + 1 >= args.epochs or stop_reason == "max_steps"
        is_best = False
        if last_epoch or (position.epoch + 1) % args.eval_freq == 0:
            metrics = evaluate_all(eval_model, eval_loader, run, reduce)
            is_best = metrics["acc1"] > best_acc1
            best_acc1 = max(best_acc1, metrics["acc1"])
            logger.log(position.global_step, {"epoch": position.epoch, "train_loss": stats["loss"],
                                              **{k: v for k, v in metrics.items() if k != "images"},
                                              "best_acc1": best_acc1}, prefix="eval")
            logger.info(f"Accuracy of the network on the {metrics['images']} test images: {metrics['acc1']:.1f}% "
                        f"(top-5 {metrics['acc5']:.1f}%, best top-1 {best_acc1:.2f}%)")
        if args.output_dir:
            save(output_dir / LAST_NAME, classifier, optimizer, scaler, position, args, best_acc1, run)
            if is_best and run.dist.is_main:
                save_checkpoint({"model": classifier.vit.state_dict(), "epoch": position.epoch,
                                 "acc1": metrics["acc1"], "args": args_to_dict(args)}, output_dir / BEST_NAME)
        if stop_reason == "max_steps":
            break
        position.epoch, position.batch = position.epoch + 1, 0
    logger.info(f"Training time {time.time() - start_time:.1f}s; best top-1 {best_acc1:.2f}%")
    metrics["best_acc1"] = best_acc1
    return metrics


def evaluate_all(eval_model, eval_loader, run: TrainSetup, reduce: bool) -> dict:
    """`evaluate` for the model and, with --model_ema, for its EMA weights (as ema_acc1, ...)."""
    metrics = evaluate(eval_model, eval_loader, run.device, run.args.precision, reduce)
    if run.model_ema is not None:
        ema_model = LatentClassifier(run.model_ema.module, eval_model.codec, eval_model.vae_precision,
                                     eval_model.t_noise_alpha_bar)
        ema_metrics = evaluate(ema_model, eval_loader, run.device, run.args.precision, reduce)
        metrics.update({f"ema_{k}": v for k, v in ema_metrics.items() if k != "images"})
    return metrics


def save(path: Path, classifier, optimizer, scaler, position, args, best_acc1, run: TrainSetup) -> None:
    """Saves the full training state atomically on rank 0 (every rank joins the RNG gather)."""
    state = training_state(classifier, optimizer, scaler, position, args, best_acc1, run.model_ema,
                           getattr(args, "train_vae", False))
    if run.dist.is_main:
        save_checkpoint(state, path)


# ----------------------------------------------------------------------------------------------
# The two ways an entry point ends: evaluate a checkpoint, or train
# ----------------------------------------------------------------------------------------------

def evaluate_only(args, eval_model: LatentClassifier, eval_loader, dist_env) -> dict:
    """--eval: loads the --resume weights, prints MAE's accuracy line and leaves the process group."""
    resume_from(args, eval_model)
    metrics = evaluate(eval_model, eval_loader, dist_env.device, args.precision,
                       args.dist_eval and dist_env.world_size > 1)
    print(f"Accuracy of the network on the {metrics['images']} test images: {metrics['acc1']:.2f}% "
          f"(top-5 {metrics['acc5']:.2f}%)")
    cleanup()
    return metrics


def train(args, dist_env, classifier: LatentClassifier, train_data: TrainData, eval_model: LatentClassifier,
          eval_loader, optimizer, base_lr: float, criterion: nn.Module, *, mixup_fn=None, model_ema=None,
          clip_grad: float | None = None) -> dict:
    """Grad scaler, DDP, --resume, logging and preemption around `fit`; leaves the process group at the end.

    `classifier` is what trains (its codec may be None when training reads cached latents);
    `eval_model` is what evaluates (see `fit`). Returns the last evaluation's metrics.
    """
    device = dist_env.device
    scaler = make_grad_scaler(device, args.precision)
    model = classifier
    if dist_env.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            classifier, device_ids=[device.index] if device.type == "cuda" else None)

    position, best_acc1 = LoopPosition(epoch=args.start_epoch), 0.0
    if args.resume:
        position, best_acc1 = resume_from(args, classifier, optimizer, scaler, model_ema)
    effective_batch = args.batch_size * args.accum_iter * dist_env.world_size
    # MAE's two lines: the base lr (--blr, per 256 images) and the absolute lr it gives for this batch.
    print(f"base lr: {base_lr * 256 / effective_batch:.3e}  actual lr: {base_lr:.3e}  effective batch: "
          f"{effective_batch}  steps/epoch: {train_data.steps_per_epoch}")

    wandb_run = {"project": "usp-understanding", "name": Path(args.output_dir).name, "config": vars(args)}
    # A resumed run redoes the steps after its checkpoint: their old log lines go (log.txt never repeats a step).
    logger = RunLogger(args.output_dir, dist_env.is_main, log_dir=args.log_dir,
                       wandb_run=wandb_run if args.wandb else None,
                       resume_step=position.global_step if position.global_step > 0 else None)
    run = TrainSetup(args=args, device=device, dist=dist_env, logger=logger, preemption=PreemptionHandler(),
                     base_lr=base_lr, steps_per_epoch=train_data.steps_per_epoch, criterion=criterion,
                     mixup_fn=mixup_fn, model_ema=model_ema, clip_grad=clip_grad)
    try:
        metrics = fit(classifier, model, train_data.sampler, train_data.loader, eval_model, eval_loader, optimizer,
                      scaler, position, best_acc1, run)
    finally:
        logger.close()
        run.preemption.restore()
        release_output_dir(args.output_dir)
    cleanup()
    return metrics


def run_main(main_fn, args) -> int:
    """Runs `main_fn(args)` under `util.errors.run_cli` and returns the exit code (0; 2 after a user error,
    1 after a diverged loss, each reported as one line on stderr) for `sys.exit`."""
    try:
        run_cli(main_fn, args, prog="")
    except CommandLineExit as stopped:
        if args.output_dir:  # a later run in this process (tests, the demo) may use the folder again
            release_output_dir(args.output_dir)
        return stopped.code
    return 0
