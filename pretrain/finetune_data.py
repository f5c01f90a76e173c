"""Fine-tuning and linear-probe data: the resumable training loader, the exact evaluation shards, timm's
posterize patch and the normalisation statistics."""
from dataclasses import dataclass
from pathlib import Path

import torch

from pretrain.robustness import GaussianNoise
from util.data import build_image_folder, build_loader, eval_transform
from util.sampler import ResumableDistributedSampler
from util.errors import UserError


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
        raise UserError(f"--nb_classes {nb_classes} does not match the {len(dataset.classes)} class folders in "
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
        raise UserError(f"{sampler.num_samples} training images per rank do not fill one optimizer step of "
                         f"--batch_size {args.batch_size} x --accum_iter {args.accum_iter}; lower them.")
    loader = build_loader(train_dataset, sampler, args.batch_size, args.num_workers,
                          pin_memory=args.pin_mem and dist_env.device.type == "cuda",
                          persistent_workers=True, drop_last=True)
    return TrainData(sampler=sampler, loader=loader, steps_per_epoch=steps_per_epoch)
