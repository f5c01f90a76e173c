"""Classification fine-tuning (SFT) of a USP-pretrained ViT on VAE latents (MAE's main_finetune).

    torchrun --nproc_per_node=8 -m pretrain.main_finetune --model vit_base_patch16_vae --vae_version d8 \
        --finetune usp_pretrain.pth --data_path /imagenet --batch_size 128 --epochs 100 --blr 5e-4 \
        --layer_decay 0.65 --weight_decay 0.05 --drop_path 0.1 --reprob 0.25 --mixup 0.8 --cutmix 1.0 --dist_eval

Pipeline per batch: timm's train transform on pixels (RandomResizedCrop, RandAugment, colour
jitter, random erasing) -> frozen VAE encoder (posterior mean x scale; trainable with --train_vae)
-> [--add_t_noise] -> Mixup/CutMix on the latents (USP; --image_mix mixes the pixels before the VAE) -> ViT
-> soft-target / label-smoothing cross-entropy. Layer-wise lr decay (MAE's param_groups_lrd, util/lr_decay.py),
AdamW, per-iteration warmup + cosine, optional grad clipping and EMA. Pixel presets (vit_base_patch16, ...)
skip the VAE and use ImageNet normalisation.

The flags, checks, start and loaders shared with the linear probe live here (main_linprobe imports them); the
loop both use is engine_finetune.py.
"""
import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, create_transform
from timm.data.auto_augment import (AugmentOp, augment_and_mix_transform, auto_augment_transform, posterize,
                                   rand_augment_transform)
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import param_groups_weight_decay
from timm.utils import ModelEmaV3

from models.dit_classifier import DIT_CLASSIFIERS
from models.latent_spec import get_latent_spec
from models.vit import VIT_MODEL_NAMES, create_vit, is_pixel_model
from pretrain.engine_finetune import EvalShardSampler, TrainData, evaluate_only, run_main, train
from pretrain.latent_classifier import LatentClassifier, build_models, t_noise_alpha_bar
from pretrain.robustness import GaussianNoise
from util.cli import (check_model_builds, decay, default_num_workers, finish_parser, fraction_below_one,
                      non_negative_float, non_negative_int, number, parse_json_object, positive_float, positive_int,
                      probability)
from util.data import SeededDataset, build_image_folder, build_loader, eval_transform
from util.distributed import DEFAULT_TIMEOUT_MINUTES, init_distributed, setup_for_distributed_printing
from util.disk import ensure_writable_dir
from util.errors import UserError
from util.lr_decay import param_groups_lrd
from util.lr_sched import effective_lr
from util.precision import PRECISIONS, configure_backend
from util.run_dir import claim_output_dir
from util.run_log import require_wandb
from util.sampler import ResumableDistributedSampler

HEAD_INIT_STD = 2e-5  # MAE: a near-zero head so early fine-tuning does not wreck the pretrained features


# ----------------------------------------------------------------------------------------------
# Flags, checks and start, shared with main_linprobe
# ----------------------------------------------------------------------------------------------

def auto_augment_policy(text: str) -> str:
    """--aa's type: the policy built once with timm's parser (as create_transform picks it), so a typo is
    refused when parsing, not as an AssertionError when the data loader is built."""
    if text == "none":
        return text
    build = (rand_augment_transform if text.startswith("rand") else
             augment_and_mix_transform if text.startswith("augmix") else auto_augment_transform)
    try:
        build(text, {"translate_const": 100, "img_mean": (124, 116, 104)})
    except (AssertionError, ValueError, KeyError, IndexError) as error:
        raise argparse.ArgumentTypeError(f"{text!r} is not a timm augmentation policy ({error}); pass e.g. "
                                         "'rand-m9-mstd0.5-inc1', 'augmix-m5-w4-d2', 'original' or 'none'") from None
    return text


def add_common_args(parser: argparse.ArgumentParser, *, batch_size: int, epochs: int, blr: float,
                    weight_decay: float, min_lr: float, warmup_epochs: int, global_pool: bool) -> None:
    """Flags that fine-tuning and linear probing share, with MAE's names; defaults differ per recipe."""
    parser.add_argument("--batch_size", default=batch_size, type=positive_int,
                        help="batch size per GPU (effective batch = batch_size * accum_iter * world size)")
    parser.add_argument("--epochs", default=epochs, type=positive_int)
    parser.add_argument("--accum_iter", default=1, type=positive_int,
                        help="accumulate gradients over this many micro-batches per optimizer step")
    parser.add_argument("--model", default="vit_base_patch16_vae", type=str, metavar="MODEL",
                        help=f"classifier preset, one of: {', '.join(VIT_MODEL_NAMES)}")
    parser.add_argument("--model_kwargs", default="{}", type=str,
                        help='JSON dict of preset overrides, e.g. \'{"embed_dim": 64, "depth": 2, "num_heads": 2}\'')
    parser.add_argument("--input_size", default=224, type=positive_int, help="image side in pixels")
    parser.add_argument("--vae_version", default=None, choices=["d8", "d16", "vavae_f16d32"],
                        help="latent space of *_vae presets (default d8); not allowed for pixel presets")
    parser.add_argument("--vae_path", default=None, type=str,
                        help="d8: diffusers AutoencoderKL folder or hub id; d16: kl16.ckpt; vavae_f16d32: the VA-VAE "
                             ".pt (or its folder)")
    parser.add_argument("--latent_stats", default=None, type=str,
                        help="vavae_f16d32: latents_stats.pt (default: beside the VA-VAE weights)")
    parser.add_argument("--vae_precision", default="fp32", choices=["bf16", "fp16", "fp32"],
                        help="autocast dtype of the VAE encoder (fp32 matches pretraining and the latent cache)")
    parser.add_argument("--weight_decay", type=non_negative_float, default=weight_decay)
    parser.add_argument("--lr", type=positive_float, default=None, metavar="LR", help="absolute learning rate")
    parser.add_argument("--blr", type=positive_float, default=blr, metavar="LR",
                        help="base learning rate: absolute_lr = base_lr * total_batch_size / 256")
    parser.add_argument("--min_lr", type=non_negative_float, default=min_lr, metavar="LR",
                        help="lower lr bound for cosine")
    parser.add_argument("--warmup_epochs", type=non_negative_int, default=warmup_epochs, metavar="N")
    parser.add_argument("--finetune", default="", help="USP/MAE pretraining checkpoint to initialise from")
    parser.add_argument("--global_pool", action="store_true", dest="global_pool",
                        help="classify the mean of the patch tokens (fc_norm)")
    parser.add_argument("--cls_token", action="store_false", dest="global_pool",
                        help="classify the cls token instead of the pooled patch tokens")
    parser.set_defaults(global_pool=global_pool)
    parser.add_argument("--data_path", default="/datasets01/imagenet_full_size/061417/", type=str,
                        help="ImageFolder root with train/ and val/")
    parser.add_argument("--nb_classes", default=1000, type=positive_int, help="number of classification classes")
    parser.add_argument("--output_dir", default="./output_dir", help="where checkpoints and log.txt go")
    parser.add_argument("--log_dir", default=None, help="TensorBoard folder (default: output_dir)")
    parser.add_argument("--device", default="cuda", help="cuda or cpu")
    parser.add_argument("--seed", default=0, type=non_negative_int)
    parser.add_argument("--resume", default="", help="checkpoint file or run directory to resume from")
    parser.add_argument("--start_epoch", default=0, type=non_negative_int, metavar="N",
                        help="start epoch (without --resume)")
    parser.add_argument("--eval", action="store_true", help="only evaluate the --resume checkpoint")
    parser.add_argument("--dist_eval", action="store_true",
                        help="split evaluation over all ranks (every image counted exactly once)")
    parser.add_argument("--save_every", default=20, type=positive_int,
                        help="also keep checkpoint-{epoch}.pth after epochs 0, N, 2N, ... and the last (MAE/USP: 20)")
    parser.add_argument("--eval_freq", default=1, type=positive_int,
                        help="evaluate every N epochs (and always after the last one or an early stop)")
    parser.add_argument("--num_workers", default=default_num_workers(), type=non_negative_int,
                        help="data-loading processes per GPU (MAE's 10, or fewer on a smaller machine)")
    parser.add_argument("--strict_data", action="store_true", help="stop on an unreadable image instead of skipping it")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in an --output_dir that holds another run's checkpoints (they are moved "
                             "into overwritten-<time>/, not deleted)")
    parser.add_argument("--pin_mem", action="store_true", default=True, help="pin CPU memory for transfers")
    parser.add_argument("--no_pin_mem", action="store_false", dest="pin_mem")
    parser.add_argument("--max_steps", default=None, type=non_negative_int,
                        help="stop after this many optimizer steps (counted over the whole run), saving a checkpoint")
    parser.add_argument("--log_every", default=20, type=positive_int, help="optimizer steps between metric logs")
    parser.add_argument("--wandb", action="store_true", help="also log to Weights & Biases (needs `pip install wandb`)")
    # USP's robustness probes (pretrain/robustness.py).
    parser.add_argument("--add_noise", action="store_true",
                        help="evaluate on images with ImageNet-C Gaussian noise of --noise_level (USP)")
    parser.add_argument("--noise_level", type=int, default=1, choices=[1, 2, 3, 4, 5], help="ImageNet-C severity")
    parser.add_argument("--add_t_noise", action="store_true",
                        help="diffuse the latents to DDPM step --t before the classifier, in training and evaluation")
    parser.add_argument("--t", type=number(int, low=1, high=1000, what="a DDPM step"), default=100,
                        help="DDPM step (1..1000) of --add_t_noise")
    parser.add_argument("--precision", default="bf16", choices=sorted(PRECISIONS),
                        help="autocast dtype: bf16, fp16 (with a dynamic grad scaler) or fp32 (no autocast)")
    parser.add_argument("--deterministic", action="store_true",
                        help="deterministic CUDA kernels (bit-exact GPU resume, slower); CPU runs are deterministic "
                             "without it")
    parser.add_argument("--dist_timeout_minutes", type=positive_float, default=DEFAULT_TIMEOUT_MINUTES,
                        help="minutes a collective may wait before the process group aborts (NCCL/gloo)")
    # Distributed flags of MAE's scripts; torchrun's environment is what is actually used.
    parser.add_argument("--world_size", default=1, type=positive_int, help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", "--local-rank", default=-1, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--dist_on_itp", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dist_url", default="env://", help=argparse.SUPPRESS)
    parser.add_argument("--allow_changed_args", action="store_true",
                        help="--resume with a changed run-defining flag (engine_finetune.RESUME_MUST_MATCH), logging "
                             "what changed")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("USP fine-tuning for image classification", add_help=True)
    add_common_args(parser, batch_size=64, epochs=50, blr=1e-3, weight_decay=0.05, min_lr=1e-6,
                    warmup_epochs=5, global_pool=True)
    parser.add_argument("--drop_path", type=fraction_below_one, default=0.1, metavar="PCT", help="drop path rate")
    parser.add_argument("--clip_grad", type=positive_float, default=None, metavar="NORM", help="clip gradient norm")
    parser.add_argument("--layer_decay", type=number(float, low=0, high=1, low_open=True, what="a layer decay"),
                        default=0.75, help="layer-wise lr decay (ELECTRA/BEiT)")
    parser.add_argument("--train_vae", action="store_true",
                        help="also fine-tune the VAE encoder (its parameters join the optimizer)")
    parser.add_argument("--train_vae_flat", action="store_true",
                        help="with --train_vae, USP's --train_vae exactly: one lr (no layer decay) and weight decay on "
                             "every ViT and VAE parameter, DDP over the ViT only (each rank's VAE follows its own "
                             "gradients), the whole VAE saved as `vae`")
    parser.add_argument("--image_mix", action="store_true",
                        help="Mixup/CutMix the images before the VAE (default: the latents, as USP)")
    parser.add_argument("--no_aug", action="store_true",
                        help="no training augmentation: resize + center crop + flip-free (timm's no_aug)")
    # Augmentation (timm's implementations).
    parser.add_argument("--color_jitter", type=non_negative_float, default=None, metavar="PCT",
                        help="colour jitter factor (enabled only when not using auto augment)")
    parser.add_argument("--aa", type=auto_augment_policy, default="rand-m9-mstd0.5-inc1", metavar="NAME",
                        help='auto augment policy, e.g. "rand-m9-mstd0.5-inc1"; "none" disables it')
    parser.add_argument("--smoothing", type=probability, default=0.1, help="label smoothing")
    parser.add_argument("--reprob", type=probability, default=0.25, metavar="PCT", help="random erase prob")
    parser.add_argument("--remode", type=str, default="pixel", help="random erase mode")
    parser.add_argument("--recount", type=positive_int, default=1, help="random erase count")
    parser.add_argument("--resplit", action="store_true", default=False,
                        help="do not random erase the first (clean) augmentation split")
    parser.add_argument("--mixup", type=non_negative_float, default=0, help="mixup alpha, mixup enabled if > 0")
    parser.add_argument("--cutmix", type=non_negative_float, default=0, help="cutmix alpha, cutmix enabled if > 0")
    parser.add_argument("--cutmix_minmax", type=probability, nargs="+", default=None,
                        help="cutmix min/max ratio, overrides alpha and enables cutmix if set")
    parser.add_argument("--mixup_prob", type=probability, default=1.0, help="probability of mixup or cutmix per batch")
    parser.add_argument("--mixup_switch_prob", type=probability, default=0.5,
                        help="probability of switching to cutmix when both mixup and cutmix are enabled")
    parser.add_argument("--mixup_mode", type=str, default="batch", choices=["batch", "pair", "elem"],
                        help="how to apply mixup/cutmix params: per batch, pair or element")
    parser.add_argument("--model_ema", action="store_true", help="keep (and evaluate) an EMA of the weights")
    parser.add_argument("--model_ema_decay", type=decay, default=0.9999)
    return finish_parser(parser)


def check_args(args) -> None:
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


def start(args):
    """Checks the flags, joins the process group (torchrun or a single process), prints on rank 0 only
    and turns on the CUDA speed flags. Returns the DistEnv."""
    check_args(args)
    dist_env = init_distributed(args.device, args.dist_timeout_minutes)
    setup_for_distributed_printing(dist_env.is_main)
    if args.log_dir and not args.eval:  # TensorBoard's folder, checked like --output_dir (and before its lock)
        ensure_writable_dir(args.log_dir, flag="--log_dir")
    if args.output_dir and not args.eval:  # unwritable, in use, or another run's: stop before any data or weights
        claim_output_dir(args.output_dir, resume=args.resume, overwrite=args.overwrite, is_main=dist_env.is_main)
    configure_backend(dist_env.device, args.precision, args.deterministic)  # prints on the main process only
    return dist_env



# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------

def image_mean_std(pixel: bool):
    """Normalisation statistics: ImageNet's for pixel models (MAE), 0.5/0.5 -> [-1, 1] for VAE input."""
    return (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD) if pixel else ((0.5,) * 3, (0.5,) * 3)


def check_class_count(dataset, nb_classes: int, root) -> None:
    if len(dataset.classes) != nb_classes:
        raise UserError(f"--nb_classes {nb_classes} does not match the {len(dataset.classes)} class folders in "
                         f"{root}; pass --nb_classes {len(dataset.classes)}.")


def build_eval_loader(args, dist_env, pixel: bool):
    """Validation loader: resize to input_size / 0.875 (or the probe's --eval_resize) + center crop; sharded
    with --dist_eval."""
    corruption = GaussianNoise(args.noise_level) if getattr(args, "add_noise", False) else None
    dataset = build_image_folder(args.data_path, "val",
                                 transform=eval_transform(args.input_size, pixel=pixel, corruption=corruption,
                                                          resize=getattr(args, "eval_resize", None)))
    check_class_count(dataset, args.nb_classes, Path(args.data_path) / "val")
    if args.dist_eval and dist_env.world_size > 1:
        sampler = EvalShardSampler(len(dataset), dist_env.world_size, dist_env.rank)
    else:
        sampler = EvalShardSampler(len(dataset))  # every rank evaluates everything (MAE's default)
    return build_loader(dataset, sampler, batch_size=args.batch_size, num_workers=args.num_workers,
                        pin_memory=args.pin_mem and dist_env.device.type == "cuda", drop_last=False)


def build_train_loader(args, train_dataset, dist_env) -> TrainData:
    """Shuffled, rank-split, drop-last loader; one sentence when an epoch cannot fill one optimizer step."""
    sampler = ResumableDistributedSampler(len(train_dataset), dist_env.world_size, dist_env.rank,
                                          shuffle=True, seed=args.seed, drop_last=True)
    steps_per_epoch = sampler.num_samples // (args.batch_size * args.accum_iter)
    if steps_per_epoch == 0:
        raise UserError(f"{sampler.num_samples} training images per rank do not fill one optimizer step of "
                         f"--batch_size {args.batch_size} x --accum_iter {args.accum_iter}; lower them.")
    loader = build_loader(train_dataset, sampler, args.batch_size, args.num_workers,
                          pin_memory=args.pin_mem and dist_env.device.type == "cuda",
                          persistent_workers=True, drop_last=True)
    return TrainData(sampler=sampler, loader=loader, steps_per_epoch=steps_per_epoch)


def posterize_keep_zero_bits(img, bits_to_keep, **kwargs):
    """timm's posterize, extended to bits_to_keep = 0 (a black image, what Pillow < 11 returned).

    timm's RandAugment with magnitude noise ("mstd0.5") reaches level 10, where PosterizeIncreasing
    keeps 0 bits; Pillow >= 11 rejects that with a ValueError that would kill the data loader.
    """
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return posterize(img, bits_to_keep, **kwargs)


def adapt_augment_ops(transform, fill):
    """Points every Posterize op of timm's RandAugment/AutoAugment inside `transform` at
    `posterize_keep_zero_bits` and makes every op fill uncovered pixels with `fill` (RGB 0..255); only this
    transform's op objects change, not timm's tables."""
    stack = [transform]
    while stack:
        node = stack.pop()
        if isinstance(node, (list, tuple)):  # AutoAugment's policy is a list of sub-policy lists
            stack.extend(node)
            continue
        if isinstance(node, AugmentOp):
            node.kwargs["fillcolor"] = fill
            if node.aug_fn is posterize:
                node.aug_fn = posterize_keep_zero_bits
        stack.extend(child for child in (getattr(node, "transforms", None), getattr(node, "ops", None),
                                         getattr(node, "policy", None)) if isinstance(child, (list, tuple)))
    return transform


def build_train_dataset(args, pixel: bool) -> SeededDataset:
    """Train ImageFolder with timm's augmentation; per-sample randomness keyed by (seed, epoch, index).

    Rotate/shear/translate fill with the ImageNet mean (124, 116, 104) also for VAE input normalised with
    0.5, as USP's util/datasets.py does (timm would derive the fill from the normalisation mean: 128)."""
    mean, std = image_mean_std(pixel)
    transform = create_transform(
        input_size=args.input_size, is_training=True, color_jitter=args.color_jitter,
        auto_augment=None if args.aa in (None, "none") else args.aa, interpolation="bicubic",
        re_prob=args.reprob, re_mode=args.remode, re_count=args.recount, mean=mean, std=std, no_aug=args.no_aug,
    )
    base = build_image_folder(args.data_path, "train", strict=args.strict_data)
    check_class_count(base, args.nb_classes, Path(args.data_path) / "train")
    fill = tuple(min(255, round(255 * m)) for m in IMAGENET_DEFAULT_MEAN)
    return SeededDataset(base, adapt_augment_ops(transform, fill), seed=args.seed)


def build_mixup(args):
    """timm Mixup/CutMix (with label smoothing folded into the soft targets), or None when off."""
    active = args.mixup > 0 or args.cutmix > 0.0 or args.cutmix_minmax is not None
    if not active:
        return None
    if args.batch_size % 2:
        raise UserError(f"mixup/cutmix pairs images inside a batch, so --batch_size must be even (got "
                         f"{args.batch_size}); use {args.batch_size + 1}.")
    return Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                 prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                 label_smoothing=args.smoothing, num_classes=args.nb_classes)



# ----------------------------------------------------------------------------------------------
# Optimisation and the run
# ----------------------------------------------------------------------------------------------

def build_optimizer(vit, codec, args, base_lr: float) -> torch.optim.Optimizer:
    """AdamW over layer-decayed ViT groups (+ the VAE encoder at full lr with --train_vae).

    MAE/USP's param_groups_lrd (util/lr_decay.py): stem = layer 0, blocks.i = i + 1, final norm /
    fc_norm / head = depth + 1 with lr_scale 1. No weight decay on 1-D parameters, pos_embed and cls_token.
    --train_vae_flat: USP's --train_vae groups instead, [VAE, ViT] at lr_scale 1 with weight decay on all.
    """
    if codec is not None and args.train_vae and args.train_vae_flat:
        return torch.optim.AdamW([
            {"lr_scale": 1.0, "weight_decay": args.weight_decay, "params": list(codec.autoencoder.parameters())},
            {"lr_scale": 1.0, "weight_decay": args.weight_decay, "params": list(vit.parameters())}], lr=base_lr)
    groups = param_groups_lrd(vit, weight_decay=args.weight_decay, no_weight_decay_list=list(vit.no_weight_decay()),
                              layer_decay=args.layer_decay)
    if codec is not None and args.train_vae:
        groups += param_groups_weight_decay(codec.autoencoder, weight_decay=args.weight_decay)
    return torch.optim.AdamW(groups, lr=base_lr)


def build_criterion(args, mixup_fn) -> torch.nn.Module:
    if mixup_fn is not None:
        return SoftTargetCrossEntropy()  # smoothing is already in Mixup's soft targets
    if args.smoothing > 0.0:
        return LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return torch.nn.CrossEntropyLoss()


def main(args) -> dict:
    if args.model in DIT_CLASSIFIERS:
        raise UserError(f"--model {args.model} is a DiT backbone for linear probing (USP probes, not fine-tunes, "
                         "them); use pretrain.main_linprobe.")
    dist_env = start(args)
    pixel = is_pixel_model(args.model)

    # Data first: a wrong path or class count fails in seconds, before any weights are read.
    eval_loader = build_eval_loader(args, dist_env, pixel)
    train_dataset = None if args.eval else build_train_dataset(args, pixel)
    mixup_fn = build_mixup(args)

    vit, codec = build_models(args, dist_env, pixel, HEAD_INIT_STD)
    if codec is not None and args.train_vae:
        codec.train_encoder(True)
    latent_mixup = mixup_fn if not args.image_mix else None
    classifier = LatentClassifier(vit, codec, args.vae_precision, t_noise_alpha_bar(args, pixel), latent_mixup)
    if args.eval:
        return evaluate_only(args, classifier, eval_loader, dist_env)

    train_data = build_train_loader(args, train_dataset, dist_env)
    base_lr = effective_lr(args.blr, args.lr, args.batch_size, args.accum_iter, dist_env.world_size)
    optimizer = build_optimizer(vit, codec, args, base_lr)
    model_ema = ModelEmaV3(vit, decay=args.model_ema_decay) if args.model_ema else None
    return train(args, dist_env, classifier, train_data, classifier, eval_loader, optimizer, base_lr,
                 build_criterion(args, mixup_fn), mixup_fn=mixup_fn, model_ema=model_ema, clip_grad=args.clip_grad)



if __name__ == "__main__":
    sys.exit(run_main(main, get_args_parser().parse_args(), "pretrain.main_finetune"))
