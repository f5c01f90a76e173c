"""Latent cache: the frozen VAE's posterior moments of every image, stored once, read back by training.

Layout of `<cache_dir>` (written by `python -m pretrain.cache_latents`):
  manifest.json             settings (VAE identity/version/scale, image size, crop, classes, file
                            list hash, shard size) + `complete`, `count`, `skipped` and `shards_crc32`
                            (each shard file's CRC-32, checked when a process first reads the shard)
                            once finished
  shard-00000.safetensors   for images [k*S, (k+1)*S) of the ImageFolder, in its sorted order:
                            mean, logvar (n, 2, C, h, w) UNscaled, [:, 0] = image, [:, 1] = its
                            horizontal flip, float32 or (--moments_dtype fp16) float16; label (n,)
                            int64; valid (n,) uint8 (0 = unreadable)

fp16 moments halve the cache (ImageNet-1k at 256 px with flips: 1.28M x 2 x 2 x 4x32x32 values, about
84 GB in fp32, 42 GB in fp16). Training reads them back as float32; the rounding is at most 2^-11
relative, on values far inside fp16's range since logvar is clamped to [-30, 20].

Training reads with `LatentCacheDataset`, which picks the flip and draws the posterior noise from
`sample_generator(seed, epoch, index)`. The crop, manifest and shard helpers here are shared with the
REPA feature cache (util/feature_cache.py), which has the same layout.
"""
import hashlib
import json
import math
import zlib
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from torchvision import transforms

from util.checkpoint import atomic_open
from util.data import CenterCropArr, eval_crop
from util.errors import UserError
from util.rng import sample_generator

FIXED_POSTERIOR_STREAM = 0xF1C5ED  # seed offset of the epoch-independent posterior noise (fixed_posterior)
MANIFEST = "manifest.json"
CHECKSUMS = "shards_crc32"  # manifest key: CRC-32 of every shard file, in shard order
# How an image becomes a square of `image_size` pixels before encoding.
CROPS = {"center": CenterCropArr, "eval": eval_crop}  # ADM center crop (DiT, MAR) | MAE's resize + center


def shard_path(cache_dir, shard: int) -> Path:
    return Path(cache_dir) / f"shard-{shard:05d}.safetensors"


def cache_transform(image_size: int, crop: str = "center") -> transforms.Compose:
    """Deterministic crop of the cache (no flip: both orientations are stored), to [-1, 1]."""
    if crop not in CROPS:
        raise UserError(f"unknown crop {crop!r} for the latent cache; choose one of {sorted(CROPS)}.")
    return transforms.Compose([
        CROPS[crop](image_size), transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3),
    ])


def files_digest(dataset) -> str:
    """Hash of the (relative path, label) list: a cache never silently mixes two datasets."""
    digest = hashlib.sha256()
    for path, label in dataset.samples:
        digest.update(f"{Path(path).relative_to(dataset.root)}\t{label}\n".encode())
    return digest.hexdigest()[:16]


REBUILD = ("delete the cache folder and rebuild it with `python -m pretrain.cache_latents --data_path ... "
           "--cached_path ...`.")


def read_manifest(cache_dir, what: str = "latent cache", command: str = "pretrain.cache_latents") -> dict:
    """The manifest of a cache folder (this latent cache, or another cache of the same layout, e.g. REPA's
    feature cache); a missing one is a one-sentence error naming the command that makes it, a garbled one
    says to rebuild."""
    path = Path(cache_dir) / MANIFEST
    if not path.is_file():
        raise UserError(f"no {what} at {cache_dir} ({MANIFEST} is missing); create it with "
                        f"`python -m {command} --data_path ... --cached_path ...`.")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"the {what} manifest {path} is corrupt ({error}); delete the cache folder and "
                        f"rebuild it with `python -m {command} --data_path ... --cached_path ...`.") from None


def read_complete_manifest(cache_dir, expect: dict | None = None, what: str = "latent cache",
                           command: str = "pretrain.cache_latents") -> dict:
    """The manifest of a finished cache whose settings include `expect`; otherwise one sentence saying why not."""
    manifest = read_manifest(cache_dir, what, command)
    if not manifest.get("complete"):
        raise UserError(f"the {what} at {cache_dir} is incomplete (its extraction was interrupted); "
                        f"rerun the same `python -m {command}` command to finish it.")
    differences = manifest_differences(manifest, expect or {})
    if differences:
        raise UserError(f"the {what} at {cache_dir} was made with {', '.join(differences)}; "
                        "extract a cache for these settings or change the run's flags.")
    return manifest


def write_manifest(cache_dir, manifest: dict) -> None:
    with atomic_open(Path(cache_dir) / MANIFEST) as handle:
        handle.write(json.dumps(manifest, indent=1).encode())


def manifest_differences(found: dict, wanted: dict) -> list[str]:
    return [f"{key}={found.get(key)!r} (needed {value!r})" for key, value in wanted.items() if found.get(key) != value]


class CroppedImages(torch.utils.data.Dataset):
    """What the cache builders encode: index -> (image (3, H, W) in [-1, 1] or zeros if unreadable, label, valid)."""

    def __init__(self, folder, transform, image_size: int):
        self.folder = folder
        self.transform = transform
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int):
        image, label = self.folder.try_load(index)
        if image is None:
            return torch.zeros(3, self.image_size, self.image_size), label, False
        return self.transform(image), label, True


def shard_crc32(path: Path, what: str = "latent cache") -> int:
    """CRC-32 of a shard file (16 ms for a 64 MiB ImageNet shard in memory, plus reading it); an unreadable file is
    one sentence."""
    checksum = 0
    try:
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 24):
                checksum = zlib.crc32(chunk, checksum)
    except OSError as error:
        raise UserError(f"{what} shard {path} cannot be read ({error.strerror or error}); fix its permissions or "
                        "storage, or delete it and rerun the cache command to rewrite it.") from None
    return checksum


def verify_shard(cache_dir, manifest: dict, shard: int, what: str = "latent cache",
                 command: str = "pretrain.cache_latents") -> None:
    """One sentence naming the shard whose bytes changed after extraction (overwritten, damaged storage), instead
    of training on garbage or NaN. Caches written before checksums were recorded are not checked."""
    expected = manifest.get(CHECKSUMS)
    path = shard_path(cache_dir, shard)
    # A missing file is left to the reader, whose sentence says to rebuild.
    if expected is not None and path.is_file() and shard_crc32(path, what) != expected[shard]:
        raise UserError(f"{what} shard {path} is corrupt (its checksum differs from the one recorded when it was "
                        f"written); delete that file and rerun the same `python -m {command}` command to rewrite it.")


def _open_shard(path: Path):
    """safe_open of a shard; a missing, truncated, garbled or unreadable one is a UserError naming the file."""
    try:
        return safe_open(str(path), framework="np")
    except FileNotFoundError:
        raise UserError(f"latent cache shard {path} is missing; {REBUILD}") from None
    except PermissionError as error:
        raise UserError(f"latent cache shard {path} cannot be read ({error.strerror}); fix its permissions.") from None
    except Exception as error:  # safetensors' own SafetensorError: truncated file, bad header
        raise UserError(f"latent cache shard {path} is truncated or corrupt ({error}); {REBUILD}") from None


def read_shard_tensor(path: Path, name: str) -> np.ndarray:
    """Tensor `name` of a safetensors shard as a numpy array."""
    with _open_shard(path) as shard:
        return shard.get_tensor(name)


class LatentCacheDataset(torch.utils.data.Dataset):
    """Scaled latents from a cache: `__getitem__((epoch, index))` -> (latents (C, h, w), label, index).

    The flip (50%) and the posterior noise come from `sample_generator(seed, epoch, index)`;
    `use_mean=True` returns the scaled posterior mean instead of a sample (USP pretraining).
    `normalize` maps raw latents to what the network sees; default: times the manifest's scale (SD-VAE,
    KL-16); VA-VAE passes its per-channel `ChannelNorm.normalize` (models/latent_norm.py).
    `fixed_posterior=True` draws each image's (and each flip's) posterior noise once, the same in every epoch,
    as LightningDiT's extracted latents are one stored sample per image (default: a fresh sample per epoch).
    `expect` holds manifest values this run needs (e.g. {"image_size": 256, "vae_version": "d8",
    "vae_identity": ...}); any difference is refused with one sentence naming it.
    """

    def __init__(self, cache_dir, expect: dict | None = None, use_mean: bool = False, seed: int = 0,
                 random_flip: bool = True, normalize=None, fixed_posterior: bool = False):
        self.cache_dir = Path(cache_dir)
        manifest = read_complete_manifest(self.cache_dir, expect)
        self.manifest = manifest
        self.scale = float(manifest["scale"])
        self.normalize = normalize
        self.fixed_posterior = fixed_posterior
        self.shard_size = int(manifest["shard_size"])
        self.use_mean = use_mean
        self.seed = seed
        self.random_flip = random_flip
        num_shards = math.ceil(manifest["num_images"] / self.shard_size)
        paths = [shard_path(self.cache_dir, k) for k in range(num_shards)]
        valid = np.concatenate([read_shard_tensor(path, "valid") for path in paths])
        self.image_index = np.flatnonzero(valid)  # dataset position -> image index in the folder
        self.labels = np.concatenate([read_shard_tensor(path, "label") for path in paths])[self.image_index]
        self._views = {}  # per process: shards are opened (memory-mapped) lazily in each DataLoader worker

    def __getstate__(self):  # open shard handles stay in their process; a worker reopens its own
        return {**self.__dict__, "_views": {}}

    def __len__(self) -> int:
        return len(self.image_index)

    def _view(self, shard: int):
        if shard not in self._views:
            verify_shard(self.cache_dir, self.manifest, shard)
            self._views[shard] = _open_shard(shard_path(self.cache_dir, shard))
        return self._views[shard]

    def moments(self, index: int, flip: int) -> tuple[torch.Tensor, torch.Tensor]:
        """UNscaled float32 (mean, logvar), each (C, h, w), of dataset item `index` (flip 0 or 1)."""
        shard, row = divmod(int(self.image_index[index]), self.shard_size)
        view = self._view(shard)
        return (torch.from_numpy(np.asarray(view.get_slice("mean")[row, flip], dtype=np.float32)),
                torch.from_numpy(np.asarray(view.get_slice("logvar")[row, flip], dtype=np.float32)))

    def _draw_flip(self, generator: torch.Generator) -> int:
        return int(torch.randint(0, 2, (1,), generator=generator)) if self.random_flip else 0

    def flip_of(self, epoch: int, index: int) -> int:
        """The orientation (0 = image, 1 = its flip) that `__getitem__((epoch, index))` reads: the first draw of
        the sample's generator. A REPA feature cache uses it to pair features with the latent."""
        return self._draw_flip(sample_generator(self.seed, epoch, index))

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        generator = sample_generator(self.seed, epoch, index)
        flip = self._draw_flip(generator)
        mean, logvar = self.moments(index, flip)
        if self.use_mean:
            latents = mean
        else:
            # A fixed sample keys its noise by (image, flip) only; FIXED_POSTERIOR_STREAM keeps it apart from the flips.
            noise_generator = (sample_generator(self.seed + FIXED_POSTERIOR_STREAM, flip, index)
                               if self.fixed_posterior else generator)
            latents = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=noise_generator)
        latents = self.normalize(latents[None])[0] if self.normalize is not None else latents * self.scale
        return latents, int(self.labels[index]), index
