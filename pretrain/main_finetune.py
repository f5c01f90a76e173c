"""Classification fine-tuning (SFT) of a USP-pretrained ViT on VAE latents (MAE's main_finetune).

    torchrun --nproc_per_node=8 -m pretrain.main_finetune --model vit_base_patch16_vae --vae_version d8 \
        --finetune usp_pretrain.pth --data_path /imagenet --batch_size 128 --epochs 100 --blr 5e-4 \
        --layer_decay 0.65 --weight_decay 0.05 --drop_path 0.1 --reprob 0.25 --mixup 0.8 --cutmix 1.0 --dist_eval

Pipeline per batch: timm's train transform on pixels (RandomResizedCrop, RandAugment, colour
jitter, random erasing) -> frozen VAE encoder (posterior mean x scale; trainable with --train_vae)
-> [--add_t_noise] -> Mixup/CutMix on the latents (USP; --image_mix mixes the pixels before the VAE) -> ViT -> soft-target / label-smoothing cross-entropy. Layer-wise lr decay
(MAE's param_groups_lrd, util/lr_decay.py), AdamW, per-iteration warmup + cosine, optional grad clipping
and EMA. Pixel presets (vit_base_patch16, ...) skip the VAE and use ImageNet normalisation.
"""
import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from timm.data import Mixup, create_transform
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import param_groups_weight_decay
from timm.utils import ModelEmaV3

from models.dit_classifier import DIT_CLASSIFIERS
from models.vit import is_pixel_model
from pretrain.finetune_data import (build_eval_loader, build_train_loader, check_class_count, guard_posterize,
                                    image_mean_std)
from pretrain.finetune_loop import evaluate_only, run_main, train
from pretrain.finetune_setup import add_common_args, start
from pretrain.latent_classifier import LatentClassifier, build_models, t_noise_alpha_bar
from util.cli import finish_parser
from util.data import SeededDataset, build_image_folder
from util.lr_decay import param_groups_lrd
from util.lr_sched import effective_lr
from util.errors import UserError

HEAD_INIT_STD = 2e-5  # MAE: a near-zero head so early fine-tuning does not wreck the pretrained features


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("USP fine-tuning for image classification", add_help=True)
    add_common_args(parser, batch_size=64, epochs=50, blr=1e-3, weight_decay=0.05, min_lr=1e-6,
                    warmup_epochs=5, global_pool=True)
    parser.add_argument("--drop_path", type=float, default=0.1, metavar="PCT", help="drop path rate")
    parser.add_argument("--clip_grad", type=float, default=None, metavar="NORM", help="clip gradient norm")
    parser.add_argument("--layer_decay", type=float, default=0.75, help="layer-wise lr decay (ELECTRA/BEiT)")
    parser.add_argument("--train_vae", action="store_true",
                        help="also fine-tune the VAE encoder (its parameters join the optimizer)")
    parser.add_argument("--train_vae_flat", action="store_true",
                        help="with --train_vae, USP's optimizer: one lr (no layer decay) and weight decay on every "
                             "ViT and VAE parameter")
    parser.add_argument("--image_mix", action="store_true",
                        help="Mixup/CutMix the images before the VAE (default: the latents, as USP)")
    parser.add_argument("--no_aug", action="store_true",
                        help="no training augmentation: resize + center crop + flip-free (timm's no_aug)")
    # Augmentation (timm's implementations).
    parser.add_argument("--color_jitter", type=float, default=None, metavar="PCT",
                        help="colour jitter factor (enabled only when not using auto augment)")
    parser.add_argument("--aa", type=str, default="rand-m9-mstd0.5-inc1", metavar="NAME",
                        help='auto augment policy, e.g. "rand-m9-mstd0.5-inc1"; "none" disables it')
    parser.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    parser.add_argument("--reprob", type=float, default=0.25, metavar="PCT", help="random erase prob")
    parser.add_argument("--remode", type=str, default="pixel", help="random erase mode")
    parser.add_argument("--recount", type=int, default=1, help="random erase count")
    parser.add_argument("--resplit", action="store_true", default=False,
                        help="do not random erase the first (clean) augmentation split")
    parser.add_argument("--mixup", type=float, default=0, help="mixup alpha, mixup enabled if > 0")
    parser.add_argument("--cutmix", type=float, default=0, help="cutmix alpha, cutmix enabled if > 0")
    parser.add_argument("--cutmix_minmax", type=float, nargs="+", default=None,
                        help="cutmix min/max ratio, overrides alpha and enables cutmix if set")
    parser.add_argument("--mixup_prob", type=float, default=1.0, help="probability of mixup or cutmix per batch")
    parser.add_argument("--mixup_switch_prob", type=float, default=0.5,
                        help="probability of switching to cutmix when both mixup and cutmix are enabled")
    parser.add_argument("--mixup_mode", type=str, default="batch", choices=["batch", "pair", "elem"],
                        help="how to apply mixup/cutmix params: per batch, pair or element")
    parser.add_argument("--model_ema", action="store_true", help="keep (and evaluate) an EMA of the weights")
    parser.add_argument("--model_ema_decay", type=float, default=0.9999)
    return finish_parser(parser)


def build_train_dataset(args, pixel: bool) -> SeededDataset:
    """Train ImageFolder with timm's augmentation; per-sample randomness keyed by (seed, epoch, index)."""
    mean, std = image_mean_std(pixel)
    transform = create_transform(
        input_size=args.input_size, is_training=True, color_jitter=args.color_jitter,
        auto_augment=None if args.aa in (None, "none") else args.aa, interpolation="bicubic",
        re_prob=args.reprob, re_mode=args.remode, re_count=args.recount, mean=mean, std=std, no_aug=args.no_aug,
    )
    base = build_image_folder(args.data_path, "train", strict=args.strict_data)
    check_class_count(base, args.nb_classes, Path(args.data_path) / "train")
    return SeededDataset(base, guard_posterize(transform), seed=args.seed)


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
    sys.exit(run_main(main, get_args_parser().parse_args()))
