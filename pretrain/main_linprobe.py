"""Linear probing of a USP-pretrained ViT on VAE latents (MAE's main_linprobe).

    torchrun --nproc_per_node=8 -m pretrain.main_linprobe --model vit_base_patch16_vae --vae_version d8 \
        --cls_token --finetune usp_pretrain.pth --data_path /imagenet --batch_size 512 --epochs 90 \
        --blr 0.1 --weight_decay 0.0 --dist_eval

The encoder is frozen; only head = Sequential(BatchNorm1d(D, affine=False, eps=1e-6), Linear(D, K))
on the cls token (or the pooled tokens with --global_pool) trains, with LARS, no weight decay, and
RandomResizedCrop + flip as the only augmentation. With --use_cached the training latents come
from a latent cache (pretrain.cache_latents: center crop + random flip, posterior mean); validation
still encodes the val images online.
"""
import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn as nn
from torchvision import transforms
from timm.optim import Lars

from models.vae import PER_CHANNEL_CODECS, load_latent_norm, vae_identity
from models.vit import is_pixel_model
from pretrain.engine_finetune import evaluate_only, run_main, train
from pretrain.latent_classifier import LatentClassifier, build_models, t_noise_alpha_bar
from pretrain.main_finetune import (add_common_args, build_eval_loader, build_train_loader, check_class_count,
                                    image_mean_std, start)
from pretrain.main_pretrain import check_cache_flags
from util.cli import finish_parser, non_negative_int, positive_int
from util.data import SeededDataset, build_image_folder
from util.errors import UserError
from util.latent_cache import LatentCacheDataset
from util.lr_sched import effective_lr
from util.tf_crop import RandomResizedCrop

HEAD_INIT_STD = 0.01  # MAE's linear probe head init


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("USP linear probing for image classification", add_help=True)
    add_common_args(parser, batch_size=512, epochs=90, blr=0.1, weight_decay=0.0, min_lr=0.0,
                    warmup_epochs=10, global_pool=False)
    parser.add_argument("--use_cached", action="store_true", help="train from a latent cache (pretrain.cache_latents)")
    parser.add_argument("--cached_path", default="", type=str, help="latent cache directory of the train split")
    parser.add_argument("--skip_depth", default=0, type=non_negative_int,
                        help="probe the output of block depth - skip_depth: the ViT or DiT backbone is built "
                             "without its last skip_depth blocks (USP)")
    parser.add_argument("--eval_resize", default=None, type=positive_int,
                        help="resize the short side of validation images to N before the center crop (MAE/USP's "
                             "probe: 256 at every size; default: MAE's fine-tuning rule, the same at 224 and 256 px)")
    return finish_parser(parser)


def build_train_dataset(args, pixel: bool):
    """MAE's probe augmentation (RandomResizedCrop, bicubic + flip) on images, or the latent cache."""
    if args.use_cached:
        check_cache_flags(args, pixel)
        expect = {"image_size": args.input_size, "vae_version": args.vae_version,
                  "vae_identity": vae_identity(args.vae_version, args.vae_path)}
        normalize = (load_latent_norm(args.vae_version, args.vae_path, args.latent_stats).normalize
                     if args.vae_version in PER_CHANNEL_CODECS else None)  # VA-VAE: per-channel statistics
        dataset = LatentCacheDataset(args.cached_path, expect=expect, use_mean=True, seed=args.seed,
                                     normalize=normalize)
        if len(dataset.manifest["classes"]) != args.nb_classes:
            raise UserError(f"--nb_classes {args.nb_classes} does not match the {len(dataset.manifest['classes'])} "
                             f"classes of the latent cache {args.cached_path}; pass --nb_classes "
                             f"{len(dataset.manifest['classes'])}.")
        return dataset
    mean, std = image_mean_std(pixel)
    transform = transforms.Compose([  # MAE/USP's probe: TF-style RandomResizedCrop (bicubic) + flip
        RandomResizedCrop(args.input_size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(), transforms.ToTensor(), transforms.Normalize(mean, std)])
    base = build_image_folder(args.data_path, "train", strict=args.strict_data)
    check_class_count(base, args.nb_classes, Path(args.data_path) / "train")
    return SeededDataset(base, transform, seed=args.seed)


def attach_probe_head(vit: nn.Module) -> nn.Module:
    """Freezes the encoder and puts BatchNorm (no affine) in front of the linear head (MAE).

    The BatchNorm standardises the frozen features, which is what makes one lr work for every
    encoder; its running statistics are part of the probe (saved with the head).
    """
    vit.requires_grad_(False)
    vit.head = nn.Sequential(nn.BatchNorm1d(vit.head.in_features, affine=False, eps=1e-6), vit.head)
    vit.head.requires_grad_(True)
    return vit


def build_lars(head: nn.Module, args, base_lr: float) -> torch.optim.Optimizer:
    """timm's LARS set up as MAE's: momentum 0.9, trust 0.001, and for 1-D parameters (the bias)
    neither weight decay nor the trust-ratio adaptation.

    timm only adapts a group when its weight decay is non-zero or `always_adapt` is set, so the
    matrices get `always_adapt=True` and the vectors weight_decay 0 without it. One numeric
    difference remains: timm divides by ||g|| + wd * ||w|| + 1e-8 where MAE uses ||g + wd * w||;
    with the probe's weight_decay = 0 (MAE's default) both are trust * ||w|| / ||g|| up to the eps.
    """
    matrices = [p for p in head.parameters() if p.ndim > 1]
    vectors = [p for p in head.parameters() if p.ndim <= 1]
    groups = [{"params": matrices, "weight_decay": args.weight_decay, "always_adapt": True},
              {"params": vectors, "weight_decay": 0.0, "always_adapt": False}]
    return Lars(groups, lr=base_lr, momentum=0.9, trust_coeff=0.001)


def main(args) -> dict:
    dist_env = start(args)
    pixel = is_pixel_model(args.model)

    eval_loader = build_eval_loader(args, dist_env, pixel)
    train_dataset = None if args.eval else build_train_dataset(args, pixel)

    vit, codec = build_models(args, dist_env, pixel, HEAD_INIT_STD, adapt_vit=attach_probe_head)
    eval_model = LatentClassifier(vit, codec, args.vae_precision, t_noise_alpha_bar(args, pixel))
    if args.eval:
        return evaluate_only(args, eval_model, eval_loader, dist_env)
    # Cached latents skip the encoder during training; validation still starts from images.
    classifier = LatentClassifier(vit, None, t_noise_alpha_bar=eval_model.t_noise_alpha_bar) if args.use_cached \
        else eval_model

    train_data = build_train_loader(args, train_dataset, dist_env)
    base_lr = effective_lr(args.blr, args.lr, args.batch_size, args.accum_iter, dist_env.world_size)
    optimizer = build_lars(vit.head, args, base_lr)
    return train(args, dist_env, classifier, train_data, eval_model, eval_loader, optimizer, base_lr,
                 nn.CrossEntropyLoss(), module="pretrain.main_linprobe")


if __name__ == "__main__":
    sys.exit(run_main(main, get_args_parser().parse_args(), "pretrain.main_linprobe"))
