"""Latent cache: encode a dataset through the frozen VAE once, train from the stored moments.

Layout of `<cache_dir>`:
  manifest.json             settings (VAE identity/version/scale, image size, crop, classes, file
                            list hash, shard size) + `complete`, `count`, `skipped` once finished
  shard-00000.safetensors   for images [k*S, (k+1)*S) of the ImageFolder, in its sorted order:
                            mean, logvar (n, 2, C, h, w) UNscaled, [:, 0] = image, [:, 1] = its
                            horizontal flip, float32 or (--moments_dtype fp16) float16; label (n,)
                            int64; valid (n,) uint8 (0 = unreadable)

fp16 moments halve the cache (ImageNet-1k at 256 px with flips: 1.28M x 2 x 2 x 4x32x32 values, about
84 GB in fp32, 42 GB in fp16). Training reads them back as float32; the rounding (relative 2^-11 at
most, on values far inside fp16's range since logvar is clamped to [-30, 20]) is measured in
README.md's latent-cache section.

Extraction is one DDP pass (shard k belongs to rank k % world_size). Each shard is written
atomically when complete and skipped if already present, so an interrupted extraction resumes
where it stopped; a shard's bytes depend only on its images and the batch size, not on the rank,
world size or resume point. Training reads with `LatentCacheDataset`, which picks the flip and
draws the posterior noise from `sample_generator(seed, epoch, index)`.

CLI (under torchrun or alone):
  python -m util.latent_cache --data_path DIR --cached_path OUT --vae_version d8 --vae_path VAE --input_size 256
  [--latent_stats]   also write OUT/latents_stats.pt (per-channel statistics for VA-VAE, see util/latent_stats.py)
"""
import argparse
import hashlib
import json
import math
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import safetensors.torch
import torch
from safetensors import safe_open
from torchvision import transforms

from util.checkpoint import atomic_open
from util.cli import finish_parser
from util.disk import ensure_writable_dir
from util.data import CenterCropArr, build_image_folder, eval_crop
from util.distributed import add_dist_timeout_arg, barrier, cleanup, init_distributed
from util.errors import UserError, run_cli
from util.latent_stats import LATENT_STATS_FILENAME, OFFICIAL_MAX_SAMPLES, compute_latent_stats, save_latent_stats
from util.precision import configure_cuda
from util.run_log import progress
from util.rng import sample_generator

CACHE_FORMAT = 1
FIXED_POSTERIOR_STREAM = 0xF1C5ED  # seed offset of the epoch-independent posterior noise (fixed_posterior)
MANIFEST = "manifest.json"
MOMENTS_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
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


REBUILD = ("delete the cache folder and rebuild it with `python -m util.latent_cache --data_path ... "
           "--cached_path ...`.")


def read_manifest(cache_dir, what: str = "latent cache", command: str = "util.latent_cache") -> dict:
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
                           command: str = "util.latent_cache") -> dict:
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
    """index -> (image (3, H, W) in [-1, 1] or zeros if unreadable, label, valid)."""

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


@torch.no_grad()
def extract_latent_cache(image_root, cache_dir, codec, image_size: int, crop: str = "center", batch_size: int = 64,
                         dist=None, num_workers: int = 0, shard_size: int = 1024, vae_identity: str = "",
                         vae_version: str | None = None, strict: bool = False, show_progress: bool = True,
                         moments_dtype: str = "fp32") -> dict:
    """Encodes every image of `image_root` (an ImageFolder) and its flip into `cache_dir`; returns the manifest.

    codec: a `models.vae.LatentCodec` (uses `encode_moments` and `spec`) already on `dist.device`.
    dist:  the `DistEnv` of this process (None = single process). All ranks must call this.
    vae_identity / vae_version: recorded in the manifest and checked when training reads the cache.
    Unreadable images are stored as invalid (skipped by training, counted in the manifest);
    `strict=True` raises instead. `moments_dtype` "fp16" stores mean/logvar in half precision.
    """
    if moments_dtype not in MOMENTS_DTYPES:
        raise UserError(f"unknown moments dtype {moments_dtype!r}; choose one of {sorted(MOMENTS_DTYPES)}.")
    store_dtype = MOMENTS_DTYPES[moments_dtype]
    rank, world_size = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    is_main = rank == 0
    spec = codec.spec
    latent_size = spec.latent_size(image_size)
    transform = cache_transform(image_size, crop)
    folder = build_image_folder(image_root, strict=strict)
    cache_dir = Path(cache_dir)
    settings = {
        "format": CACHE_FORMAT, "vae_identity": vae_identity, "vae_version": vae_version, "scale": spec.scale,
        "channels": spec.channels, "factor": spec.factor, "image_size": image_size, "latent_size": latent_size,
        "crop": crop, "batch_size": batch_size, "shard_size": shard_size, "num_images": len(folder),
        "classes": list(folder.classes), "files_sha256": files_digest(folder), "moments_dtype": moments_dtype,
    }
    if (cache_dir / MANIFEST).is_file():
        differences = manifest_differences({"moments_dtype": "fp32", **read_manifest(cache_dir)}, settings)
        if differences:
            raise UserError(f"{cache_dir} already holds a latent cache made with other settings "
                                   f"({', '.join(differences)}); choose another --cached_path or delete it.")
    elif is_main:
        write_manifest(cache_dir, {**settings, "complete": False})
    barrier()

    num_shards = math.ceil(len(folder) / shard_size)
    pending = [k for k in range(rank, num_shards, world_size) if not shard_path(cache_dir, k).is_file()]
    # Batches never straddle shards, so each shard's batches (hence bytes) are fixed by the data alone.
    batches = [list(range(start, min(start + batch_size, (k + 1) * shard_size, len(folder))))
               for k in pending for start in range(k * shard_size, min((k + 1) * shard_size, len(folder)), batch_size)]
    loader = torch.utils.data.DataLoader(CroppedImages(folder, transform, image_size), batch_sampler=batches,
                                         num_workers=num_workers, pin_memory=codec.device.type == "cuda")
    parts = {}
    for batch_indices, (images, labels, valid) in zip(batches, progress(loader, is_main and show_progress,
                                                                         desc="latent cache")):
        mean, logvar = codec.encode_moments(images)
        flip_mean, flip_logvar = codec.encode_moments(images.flip(-1))
        shard = batch_indices[0] // shard_size
        parts.setdefault(shard, []).append({
            "mean": torch.stack([mean, flip_mean], dim=1).to(store_dtype).cpu(),
            "logvar": torch.stack([logvar, flip_logvar], dim=1).to(store_dtype).cpu(),
            "label": labels.to(torch.int64), "valid": valid.to(torch.uint8),
        })
        if batch_indices[-1] == min((shard + 1) * shard_size, len(folder)) - 1:
            shard_parts = parts.pop(shard)
            tensors = {name: torch.cat([part[name] for part in shard_parts]).contiguous()
                       for name in ("mean", "logvar", "label", "valid")}
            with atomic_open(shard_path(cache_dir, shard)) as handle:
                handle.write(safetensors.torch.save(tensors))
    barrier()

    manifest = {**settings, "complete": True}
    if is_main:
        valid = np.concatenate([_read_whole(shard_path(cache_dir, k), "valid") for k in range(num_shards)])
        skipped = [folder.samples[i][0] for i in np.flatnonzero(valid == 0)]
        manifest.update(count=int(valid.sum()), skipped=len(skipped), skipped_files=skipped[:100])
        write_manifest(cache_dir, manifest)
        print(f"latent cache {cache_dir}: {manifest['count']} images encoded, {len(skipped)} unreadable skipped")
    barrier()
    return manifest


def _open_shard(path: Path):
    """safe_open of a shard; a missing, truncated or garbled one is a UserError naming the file."""
    try:
        return safe_open(str(path), framework="np")
    except FileNotFoundError:
        raise UserError(f"latent cache shard {path} is missing; {REBUILD}") from None
    except Exception as error:  # safetensors' own SafetensorError: truncated file, bad header
        raise UserError(f"latent cache shard {path} is truncated or corrupt ({error}); {REBUILD}") from None


def _read_whole(path: Path, name: str) -> np.ndarray:
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
        valid = np.concatenate([_read_whole(path, "valid") for path in paths])
        self.image_index = np.flatnonzero(valid)  # dataset position -> image index in the folder
        self.labels = np.concatenate([_read_whole(path, "label") for path in paths])[self.image_index]
        self._views = {}  # per process: shards are opened (memory-mapped) lazily in each DataLoader worker

    def __getstate__(self):  # open shard handles stay in their process; a worker reopens its own
        return {**self.__dict__, "_views": {}}

    def __len__(self) -> int:
        return len(self.image_index)

    def _view(self, shard: int):
        if shard not in self._views:
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


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Extract a latent cache (posterior moments of each image and its flip)")
    parser.add_argument("--data_path", required=True, help="ImageFolder root (<class>/<image>)")
    parser.add_argument("--cached_path", required=True, help="output folder for shards + manifest.json")
    parser.add_argument("--vae_version", default="d8", choices=["d8", "d16", "vavae_f16d32"])
    parser.add_argument("--vae_path", default=None,
                        help="d8: diffusers folder or hub id; d16: kl16.ckpt; vavae_f16d32: the VA-VAE .pt (or folder)")
    parser.add_argument("--input_size", type=int, default=256, help="image size (divisible by the VAE factor)")
    parser.add_argument("--crop", default="center", choices=sorted(CROPS))
    parser.add_argument("--batch_size", type=int, default=64, help="images per encoder call per rank")
    parser.add_argument("--shard_size", type=int, default=1024, help="images per shard file")
    parser.add_argument("--num_workers", type=int, default=4)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--strict_data", action="store_true", help="fail on unreadable images instead of skipping")
    parser.add_argument("--latent_stats", action="store_true",
                        help=f"then compute per-channel statistics into <cached_path>/{LATENT_STATS_FILENAME} "
                             f"(LightningDiT's latent_norm, for VA-VAE users without the released file)")
    parser.add_argument("--stats_max_samples", type=int, default=OFFICIAL_MAX_SAMPLES,
                        help="images the statistics use (a seeded random choice, as LightningDiT); 0 = all")
    add_dist_timeout_arg(parser, "--dist_timeout_minutes")
    parser.add_argument("--moments_dtype", default="fp32", choices=sorted(MOMENTS_DTYPES),
                        help="storage of mean/logvar: fp32 (exact) or fp16 (half the disk; see README for the "
                             "measured difference)")
    return finish_parser(parser)


def main(args) -> dict:
    from models.latent_spec import get_latent_spec
    from models.vae import LatentCodec, vae_identity

    # Cheap checks first: a bad size or folder costs seconds, not a VAE load.
    get_latent_spec(args.vae_version).latent_size(args.input_size)
    build_image_folder(args.data_path)
    ensure_writable_dir(args.cached_path, flag="--cached_path")
    env = init_distributed(args.device, args.dist_timeout_minutes)
    if env.device.type == "cuda":
        configure_cuda()  # TF32 as the trainers' online encoding; fixed-shape convs: cuDNN autotuning
    try:
        # The cache stores raw posterior moments, so VA-VAE's statistics are not needed to extract it.
        codec = LatentCodec.load(args.vae_version, args.vae_path, device=env.device, require_stats=False)
        manifest = extract_latent_cache(
            args.data_path, args.cached_path, codec, args.input_size, crop=args.crop, batch_size=args.batch_size,
            dist=env, num_workers=args.num_workers, shard_size=args.shard_size,
            vae_identity=vae_identity(args.vae_version, args.vae_path), vae_version=args.vae_version,
            strict=args.strict_data, moments_dtype=args.moments_dtype,
        )
        if args.latent_stats:
            mean, std = compute_latent_stats(LatentCacheDataset(args.cached_path), args.stats_max_samples or None,
                                             rank=env.rank, world_size=env.world_size, device=env.device)
            if env.is_main:
                path = save_latent_stats(Path(args.cached_path) / LATENT_STATS_FILENAME, mean, std)
                print(f"latent statistics -> {path} (mean {mean.flatten()[:3].tolist()}..., "
                      f"std {std.flatten()[:3].tolist()}...)")
        return manifest
    finally:
        cleanup()


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args(), prog="util.latent_cache", cleanup=cleanup)
