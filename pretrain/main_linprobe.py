"""Linear probing of a USP-pretrained ViT on VAE latents (MAE's main_linprobe).

    torchrun --nproc_per_node=8 -m pretrain.main_linprobe --model vit_base_patch16_vae --vae_version d8 \
        --cls_token --finetune usp_pretrain.pth --data_path /imagenet --batch_size 512 --epochs 90 \
        --blr 0.1 --weight_decay 0.0 --dist_eval

The encoder is frozen; only head = Sequential(BatchNorm1d(D, affine=False, eps=1e-6), Linear(D, K))
on the cls token (or the pooled tokens with --global_pool) trains, with LARS, no weight decay, and
RandomResizedCrop + flip as the only augmentation. With --use_cached the training latents come
from a latent cache (util.latent_cache: center crop + random flip, posterior mean); validation
still encodes the val images online.
"""
import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn as nn
from timm.data import create_transform
from timm.optim import Lars

from models.vit import is_pixel_model
from pretrain.engine_finetune import (LatentClassifier, TrainSetup, UsageError, add_common_args,
                                      build_eval_loader, build_vit, check_class_count, evaluate, fit,
                                      image_mean_std, resume_from, run_main, validate_args)
from pretrain.engine_pretrain import LoopPosition
from util.data import SeededDataset, build_image_folder, build_loader
from util.distributed import cleanup, init_distributed, rank_seed, seed_everything, setup_for_distributed_printing
from util.logging import RunLogger
from util.lr_sched import effective_lr
from util.precision import enable_tf32, make_grad_scaler
from util.preemption import PreemptionHandler
from util.sampler import ResumableDistributedSampler

HEAD_INIT_STD = 0.01  # MAE's linear probe head init


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("USP linear probing for image classification", add_help=True)
    add_common_args(parser, batch_size=512, epochs=90, blr=0.1, weight_decay=0.0, min_lr=0.0,
                    warmup_epochs=10, global_pool=False)
    parser.add_argument("--use_cached", action="store_true", help="train from a latent cache (util.latent_cache)")
    parser.add_argument("--cached_path", default="", type=str, help="latent cache directory of the train split")
    return parser


def build_train_dataset(args, pixel: bool):
    """MAE's probe augmentation (RandomResizedCrop, bicubic + flip) on images, or the latent cache."""
    if args.use_cached:
        from models.vae import vae_identity
        from util.latent_cache import LatentCacheDataset

        if pixel:
            raise UsageError(f"--use_cached holds VAE latents but --model {args.model} reads pixels; "
                             "use a *_vae preset or drop --use_cached.")
        if not args.cached_path:
            raise UsageError("--use_cached needs --cached_path pointing at a latent cache of the train split "
                             "(made with `python -m util.latent_cache`).")
        expect = {"image_size": args.input_size, "vae_version": args.vae_version,
                  "vae_identity": vae_identity(args.vae_version, args.vae_path)}
        dataset = LatentCacheDataset(args.cached_path, expect=expect, use_mean=True, seed=args.seed)
        if len(dataset.manifest["classes"]) != args.nb_classes:
            raise UsageError(f"--nb_classes {args.nb_classes} does not match the {len(dataset.manifest['classes'])} "
                             f"classes of the latent cache {args.cached_path}; pass --nb_classes "
                             f"{len(dataset.manifest['classes'])}.")
        return dataset
    mean, std = image_mean_std(pixel)
    transform = create_transform(input_size=args.input_size, is_training=True, color_jitter=None,
                                 auto_augment=None, interpolation="bicubic", re_prob=0.0, mean=mean, std=std)
    base = build_image_folder(args.data_path, "train")
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
    validate_args(args)
    dist_env = init_distributed(args.device)
    setup_for_distributed_printing(dist_env.is_main)
    device = dist_env.device
    if device.type == "cuda":
        enable_tf32()
        torch.backends.cudnn.benchmark = True
    pixel = is_pixel_model(args.model)

    eval_loader = build_eval_loader(args, dist_env, pixel)
    train_dataset = None if args.eval else build_train_dataset(args, pixel)

    seed_everything(args.seed)  # the same initial weights on every rank, whatever the world size
    vit = attach_probe_head(build_vit(args, HEAD_INIT_STD)).to(device)  # before the VAE: fails fast
    seed_everything(rank_seed(args.seed, dist_env.rank))
    codec = None
    if not pixel:
        from models.vae import LatentCodec

        codec = LatentCodec.load(args.vae_version, args.vae_path, device=device)
    eval_model = LatentClassifier(vit, codec, args.vae_precision)
    # Cached latents skip the encoder during training; validation still starts from images.
    classifier = LatentClassifier(vit, None) if args.use_cached else eval_model

    if args.eval:
        resume_from(args, eval_model)
        metrics = evaluate(eval_model, eval_loader, device, args.precision, args.dist_eval and dist_env.world_size > 1)
        print(f"Accuracy of the network on the {metrics['images']} test images: {metrics['acc1']:.2f}% "
              f"(top-5 {metrics['acc5']:.2f}%)")
        cleanup()
        return metrics

    sampler = ResumableDistributedSampler(len(train_dataset), dist_env.world_size, dist_env.rank,
                                          shuffle=True, seed=args.seed, drop_last=True)
    steps_per_epoch = sampler.num_samples // (args.batch_size * args.accum_iter)
    if steps_per_epoch == 0:
        raise UsageError(f"{sampler.num_samples} training images per rank do not fill one optimizer step of "
                         f"--batch_size {args.batch_size} x --accum_iter {args.accum_iter}; lower them.")
    train_loader = build_loader(train_dataset, sampler, args.batch_size, args.num_workers,
                                pin_memory=args.pin_mem and device.type == "cuda",
                                persistent_workers=True, drop_last=True)

    base_lr = effective_lr(args.blr, args.lr, args.batch_size, args.accum_iter, dist_env.world_size)
    optimizer = build_lars(vit.head, args, base_lr)
    scaler = make_grad_scaler(device, args.precision)
    model = classifier
    if dist_env.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            classifier, device_ids=[device.index] if device.type == "cuda" else None)

    position, best_acc1 = LoopPosition(epoch=args.start_epoch), 0.0
    if args.resume:
        position, best_acc1 = resume_from(args, classifier, optimizer, scaler)
    print(f"base lr: {base_lr:.3e}  effective batch: {args.batch_size * args.accum_iter * dist_env.world_size}  "
          f"steps/epoch: {steps_per_epoch}")

    logger = RunLogger(args.output_dir, dist_env.is_main, log_dir=args.log_dir)
    run = TrainSetup(args=args, device=device, dist=dist_env, logger=logger, preemption=PreemptionHandler(),
                     base_lr=base_lr, steps_per_epoch=steps_per_epoch, criterion=nn.CrossEntropyLoss())
    try:
        metrics = fit(classifier, model, sampler, train_loader, eval_model, eval_loader, optimizer, scaler,
                      position, best_acc1, run)
    finally:
        logger.close()
        run.preemption.restore()
    cleanup()
    return metrics


if __name__ == "__main__":
    sys.exit(run_main(main, get_args_parser().parse_args()))
