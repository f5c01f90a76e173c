"""Training samples for DiT/SiT: a keyed dataset plus the per-sample noise the objective needs.

Every random quantity here comes from a generator keyed by (seed, epoch, index), so a global batch is the same
whatever the world size, the number of workers or the step a run was resumed from; the timestep is drawn by
the objective (generation/objectives.py), keyed by the step and the sample's `index`.
"""
import torch
from torch.utils.data import Dataset

from generation.repa import open_feature_cache
from generation.train_utils import build_latent_norm, vae_source
from models.vae import vae_identity
from util.data import SeededDataset, build_image_folder, generation_transform
from util.errors import UserError
from util.latent_cache import LatentCacheDataset
from util.rng import sample_generator


# sample_generator hashes the seed, so this offset gives a stream independent of the flips (drawn with `seed`).
NOISE_STREAM_OFFSET = 0x5EED_D1F


class GenerationTrainSet(Dataset):
    """Wraps a keyed dataset `base[(epoch, index)] -> (x, label, index)` and adds the per-sample noise.

    The noise comes from a generator keyed by (seed, epoch, index), so a global batch is the same whatever
    the world size, the number of workers or the step a run was resumed from (the timestep is drawn by the
    objective, keyed by the step and `index`). features: a REPA `FeatureCache` paired with a latent-cache base.
    Returns {"x", "y" (int64), "index" (int64), "noise" (C, h, w), "drop" (int64 0/1: the null label for CFG)
    [, "posterior_noise" (C, h, w) with the online VAE] [, "repa_features" (T, D) float32]}.
    """

    def __init__(self, base: Dataset, latent_shape, seed: int, class_dropout_prob: float, online_vae: bool,
                 features=None):
        self.base, self.latent_shape, self.features = base, tuple(latent_shape), features
        self.noise_seed = int(seed) + NOISE_STREAM_OFFSET
        self.class_dropout_prob, self.online_vae = float(class_dropout_prob), online_vae

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        epoch, index = key
        x, label, _ = self.base[key]
        generator = sample_generator(self.noise_seed, epoch, index)
        sample = {"x": x, "y": torch.as_tensor(label, dtype=torch.long), "index": torch.as_tensor(index),
                  "drop": (torch.rand((), generator=generator) < self.class_dropout_prob).long(),
                  "noise": torch.randn(self.latent_shape, generator=generator)}
        if self.online_vae:
            sample["posterior_noise"] = torch.randn(self.latent_shape, generator=generator)
        if self.features is not None:
            # The latent cache's own choice of orientation for this draw, so latent and features agree.
            image_index = int(self.base.image_index[index])
            sample["repa_features"] = self.features.features(image_index, self.base.flip_of(epoch, index))
        return sample


def build_dataset(args, latent_shape, class_dropout_prob: float) -> GenerationTrainSet:
    """Cached latents or images (ADM center crop [+ flip]) with their noise [and REPA's cached features]."""
    if args.cached_path is not None:
        # The cache must hold ADM-center-cropped latents of this VAE at this size, else training silently
        # learns another distribution than the one the EMA previews decode.
        expect = dict(image_size=args.image_size, vae_version=args.vae_version, crop="center",
                      vae_identity=vae_identity(args.vae_version, vae_source(args)))
        latent_norm = build_latent_norm(args)
        base = LatentCacheDataset(args.cached_path, expect=expect, use_mean=False, seed=args.global_seed,
                                  normalize=latent_norm.normalize if latent_norm is not None else None,
                                  fixed_posterior=args.fixed_posterior_sample, random_flip=args.random_flip)
        classes, source = base.manifest["classes"], args.cached_path
    else:
        folder = build_image_folder(args.data_path, strict=args.strict_data)
        base = SeededDataset(folder, generation_transform(args.image_size, args.random_flip), seed=args.global_seed)
        classes, source = folder.classes, args.data_path
    if len(classes) != args.num_classes:
        raise UserError(f"{source} has {len(classes)} classes but --num-classes is {args.num_classes}; "
                        f"pass --num-classes {len(classes)}.")
    return GenerationTrainSet(base, latent_shape, seed=args.global_seed, class_dropout_prob=class_dropout_prob,
                              online_vae=args.cached_path is None, features=open_feature_cache(args, base))
