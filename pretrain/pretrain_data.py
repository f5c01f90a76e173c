"""Pretraining data: keyed masked-modeling samples from images or a latent cache, and the frozen VAE.

`build_dataset` returns a `MaskedModelingDataset` over an ImageFolder (crop/flip per (epoch, index)), a latent cache
(util/latent_cache.py) or a MAR-style .npz folder; `build_codec` loads the VAE that encodes images online.
"""
import torch

from models.latent_spec import get_latent_spec
from models.vae import PER_CHANNEL_CODECS, LatentCodec, load_latent_norm, vae_identity
from util.data import build_image_folder, pretrain_transform, SeededDataset
from util.errors import UserError
from util.latent_cache import LatentCacheDataset
from util.npz_latents import NpzLatentFolder, is_npz_latent_folder
from util.rng import sample_generator, sample_seed


class MaskedModelingDataset(torch.utils.data.Dataset):
    """Adds the per-sample randomness of a masked-modeling step to a keyed dataset.

    `base[(epoch, index)]` -> (input (C, H, W), label, index): images (SeededDataset) or
    scaled latents (LatentCacheDataset). This returns a dict with
      images     (C, H, W)  the base item,
      mask_noise (L,)       uniform values, the smallest (1 - mask_ratio) * L patches stay visible,
      t          ()         --add_noise level in [0.5, 1),
      eps        (C, h, w)  --add_noise Gaussian noise, shaped like the model input,
    all drawn in the loader's CPU workers from a generator keyed by (epoch, index) on a stream of
    its own, so they depend neither on the rank nor on where the run was resumed.
    """

    def __init__(self, base, num_patches: int, model_input_shape: tuple, add_noise: bool, seed: int):
        self.base = base
        self.num_patches = num_patches
        self.model_input_shape = tuple(model_input_shape)
        self.add_noise = add_noise
        # A hashed stream seed: the crop/flip stream uses `seed` itself, so the two never coincide.
        self.stream_seed = sample_seed(seed, -1, 0x4D41534B)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key) -> dict:
        epoch, index = key
        images, _, _ = self.base[key]
        generator = sample_generator(self.stream_seed, epoch, index)
        item = {"images": images, "mask_noise": torch.rand(self.num_patches, generator=generator)}
        if self.add_noise:
            item["t"] = 0.5 + 0.5 * torch.rand((), generator=generator)
            item["eps"] = torch.randn(self.model_input_shape, generator=generator)
        return item


def check_cache_flags(args, pixel: bool) -> None:
    """--use_cached needs a latent model and --cached_path (pretraining and the linear probe)."""
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
