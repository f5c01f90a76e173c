"""MAR / USP-style latent caches: one `.npz` per image, `<root>/<class>/<image>.npz`.

MAR's `main_cache.py` (and USP's `--use_cached`, which reads it through `CachedFolder`) stores for each
image `moments` and `moments_flip`, each (2C, h, w) float: the VAE posterior's mean and log-variance
concatenated on the channel axis, UNscaled, for the image and its horizontal flip. Classes are the
sorted sub-folder names, as ImageFolder orders them. Users with such a cache can train from it without
re-encoding; the manifest-based shard cache (util/latent_cache.py) remains the format we write.
"""
from pathlib import Path

import numpy as np
import torch
from torchvision.datasets.folder import make_dataset

from util.errors import UserError
from util.rng import sample_generator


def is_npz_latent_folder(path) -> bool:
    """True for a folder without our manifest.json whose class sub-folders hold .npz files."""
    root = Path(path)
    if not root.is_dir() or (root / "manifest.json").exists():
        return False
    return any(child.is_dir() and any(child.glob("*.npz")) for child in root.iterdir())


class NpzLatentFolder(torch.utils.data.Dataset):
    """Scaled latents from a per-image .npz folder; the interface of `LatentCacheDataset`.

    `__getitem__((epoch, index))` -> (latents (C, h, w), label, index): the flip (50%) and the posterior
    noise come from `sample_generator(seed, epoch, index)`; `use_mean=True` returns the scaled mean.
    scale: the VAE's latent scale (the files do not record it). expect_shape: (C, h, w) the run needs.
    """

    def __init__(self, root, scale: float, expect_shape=None, use_mean: bool = False, seed: int = 0,
                 random_flip: bool = True):
        self.root = Path(root)
        if not is_npz_latent_folder(self.root):
            raise UserError(f"{root} is not a latent cache: expected manifest.json (pretrain.cache_latents) or "
                            "<class>/<image>.npz files with 'moments' and 'moments_flip' (MAR's main_cache.py).")
        classes = sorted(entry.name for entry in self.root.iterdir() if entry.is_dir())
        class_to_idx = {name: i for i, name in enumerate(classes)}
        self.samples = make_dataset(str(self.root), class_to_idx, extensions=(".npz",), allow_empty=True)
        self.labels = np.array([label for _, label in self.samples], dtype=np.int64)
        self.manifest = {"classes": classes, "scale": scale, "num_images": len(self.samples), "format": "npz"}
        self.scale = float(scale)
        self.use_mean, self.seed, self.random_flip = use_mean, seed, random_flip
        channels = self.moments(0, 0)[0].shape
        if expect_shape is not None and tuple(channels) != tuple(expect_shape):
            raise UserError(f"the latents in {root} have shape {tuple(channels)} but this run needs "
                            f"{tuple(expect_shape)}; match --input_size / --vae_version to the cache.")

    def __len__(self) -> int:
        return len(self.samples)

    def moments(self, index: int, flip: int):
        """UNscaled (mean, logvar), each (C, h, w); logvar clamped to [-30, 20] as LDM's posterior."""
        path = self.samples[index][0]
        try:
            with np.load(path) as data:
                moments = torch.from_numpy(np.asarray(data["moments_flip" if flip else "moments"], dtype=np.float32))
        except (OSError, KeyError, ValueError) as error:
            raise UserError(f"{path} is not a MAR latent file with 'moments' and 'moments_flip' ({error}).") from None
        mean, logvar = moments.chunk(2, dim=0)
        return mean, logvar.clamp(-30.0, 20.0)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        generator = sample_generator(self.seed, epoch, index)
        flip = int(torch.randint(0, 2, (1,), generator=generator)) if self.random_flip else 0
        mean, logvar = self.moments(index, flip)
        if self.use_mean:
            latents = mean
        else:
            latents = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=generator)
        return latents * self.scale, int(self.labels[index]), index
