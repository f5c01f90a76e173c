"""Image data shared by pretraining, generation and classification: folders, crops, seeded transforms.

Datasets here are indexed by `(epoch, index)` keys from `ResumableDistributedSampler`; the
transform of sample `index` in `epoch` runs under a torch generator seeded from
`sample_generator(seed, epoch, index)`, so a batch's content depends only on which samples are
in it, not on the rank, the worker process or the resume point.
"""
import atexit
import multiprocessing
import os
import random
import signal
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import datasets, transforms
from torchvision.transforms import InterpolationMode

from util.rng import sample_seed
from util.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

SKIP_UNREADABLE, SKIP_TOO_LARGE = 1, 2  # reasons recorded in SafeImageFolder.bad
SPLIT_NAMES = {"train", "val", "validation", "test"}


def center_crop_arr(pil_image: Image.Image, image_size: int) -> Image.Image:
    """ADM's center crop: halve with a box filter while the short side is >= 2x the target,
    resize the short side to `image_size` with bicubic, then crop the centre square.

    Returns a PIL image of size (image_size, image_size). Used by DiT/SiT training and the cache.
    """
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(side // 2 for side in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(side * scale) for side in pil_image.size), resample=Image.BICUBIC)
    array = np.asarray(pil_image)
    top = (array.shape[0] - image_size) // 2
    left = (array.shape[1] - image_size) // 2
    return Image.fromarray(array[top: top + image_size, left: left + image_size])


class CenterCropArr:
    """Picklable transform wrapper around `center_crop_arr` (lambdas break spawn-started workers)."""

    def __init__(self, image_size: int):
        self.image_size = image_size

    def __call__(self, pil_image: Image.Image) -> Image.Image:
        return center_crop_arr(pil_image, self.image_size)


def _to_unit_range() -> transforms.Normalize:
    return transforms.Normalize(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])


def _normalize(pixel: bool) -> transforms.Normalize:
    """[-1, 1] for images fed to a VAE; ImageNet statistics for pixel-space models (as MAE)."""
    return transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD) if pixel else _to_unit_range()


def pretrain_transform(input_size: int, pixel: bool = False) -> transforms.Compose:
    """MAE/USP pretraining augmentation: RandomResizedCrop(0.2-1, bicubic) + horizontal flip."""
    return transforms.Compose([
        transforms.RandomResizedCrop(input_size, scale=(0.2, 1.0), interpolation=InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        _normalize(pixel),
    ])


def generation_transform(image_size: int, random_flip: bool = True) -> transforms.Compose:
    """DiT/SiT training: ADM center crop + horizontal flip (REPA: none, `random_flip=False`), to [-1, 1]."""
    flip = [transforms.RandomHorizontalFlip()] if random_flip else []
    return transforms.Compose([CenterCropArr(image_size), *flip, transforms.ToTensor(), _to_unit_range()])


def eval_crop(input_size: int, resize: int = None) -> transforms.Compose:
    """MAE/USP evaluation: resize the short side to input_size / crop_pct (bicubic), take the centre.

    crop_pct is 224 / 256 up to 224 px and 1.0 above (MAE's `build_transform`): 256 px evaluates on the
    whole resized image, not a 256 / 0.875 = 292 px resize. `resize` fixes the short side instead (MAE/USP's
    linear probe: 256 at every size).
    """
    crop_pct = 224 / 256 if input_size <= 224 else 1.0
    return transforms.Compose([
        transforms.Resize(resize or int(input_size / crop_pct), interpolation=InterpolationMode.BICUBIC),
        transforms.CenterCrop(input_size),
    ])


def eval_transform(input_size: int, pixel: bool = False, corruption=None, resize: int = None) -> transforms.Compose:
    """Evaluation transform: `eval_crop` (with `resize`), then `corruption` (a PIL -> PIL callable, e.g. USP's
    ImageNet-C noise) if given, then normalisation."""
    steps = [eval_crop(input_size, resize)] + ([corruption] if corruption is not None else [])
    return transforms.Compose([*steps, transforms.ToTensor(), _normalize(pixel)])


class SafeImageFolder(datasets.ImageFolder):
    """ImageFolder that survives unreadable/corrupt files instead of killing a multi-day run.

    With `transform=None` items are `(PIL RGB image, label)`. A file that fails to decode is
    recorded in a shared-memory vector (visible to the main process even when workers loaded it,
    because DataLoader workers inherit shared tensors) with its reason (`SKIP_UNREADABLE`, or
    `SKIP_TOO_LARGE` for an image over PIL's decompression-bomb limit) and replaced by the next
    readable image, so batch shapes stay fixed; `skip_report()` is the line trainers print and log
    at the end of each epoch. `strict=True` raises `UserError` instead.
    """

    def __init__(self, root, transform=None, strict: bool = False):
        super().__init__(str(root), transform=transform)
        self.strict = strict
        self.bad = torch.zeros(len(self.samples), dtype=torch.uint8).share_memory_()

    @property
    def num_skipped(self) -> int:
        """Distinct unreadable files met so far (by any worker)."""
        return int((self.bad > 0).sum())

    def skipped_files(self) -> list[str]:
        return [self.samples[i][0] for i in torch.nonzero(self.bad).flatten().tolist()]

    def skip_report(self, shown: int = 3) -> dict | None:
        """None if every image read so far decoded; else {"skipped_images", "too_large_images", "message"}.

        message: one line naming the count and the first `shown` paths, for the console and log.txt.
        Under torch.distributed the ranks' records are merged (a collective: call it on every rank).
        """
        bad = _merged_over_ranks(self.bad)
        count = int((bad > 0).sum())
        if not count:
            return None
        too_large = int((bad == SKIP_TOO_LARGE).sum())
        files = [self.samples[i][0] for i in torch.nonzero(bad).flatten().tolist()]
        more = f" and {count - shown} more" if count > shown else ""
        large = (f"; {too_large} of them exceed PIL's decompression-bomb limit of {Image.MAX_IMAGE_PIXELS} "
                 "pixels (raise PIL.Image.MAX_IMAGE_PIXELS if they are genuine)") if too_large else ""
        message = (f"{count} unreadable image{'s' if count > 1 else ''} skipped so far, each replaced by the next "
                   f"readable one: {', '.join(files[:shown])}{more}{large}; --strict_data stops at the first one.")
        return {"skipped_images": count, "too_large_images": too_large, "message": message}

    def try_load(self, index: int):
        """(RGB image or None if unreadable, label) for `index`; raises UserError in strict mode."""
        path, label = self.samples[index]
        try:
            with Image.open(path) as image:
                return image.convert("RGB"), label
        except Image.DecompressionBombError as error:
            reason, why = SKIP_TOO_LARGE, f"it exceeds PIL's decompression-bomb limit: {error}"
        except (OSError, ValueError, SyntaxError) as error:
            reason, why = SKIP_UNREADABLE, str(error)
        if self.strict:
            raise UserError(f"image {path} cannot be read ({why}); remove or replace it, "
                                      "or drop --strict_data to skip unreadable images.")
        self.bad[index] = reason
        return None, label

    def load(self, index: int):
        """(image, label) for `index`, substituting the next readable image if it is corrupt."""
        for offset in range(len(self.samples)):
            image, label = self.try_load((index + offset) % len(self.samples))
            if image is not None:
                return image, label
        raise UserError(f"no image under {self.root} can be read ({len(self.samples)} files tried, "
                                  f"first: {self.samples[0][0]}); check the files or the data path.")

    def __getitem__(self, index: int):
        image, label = self.load(index)
        if self.transform is not None:
            image = self.transform(image)
        return image, label


def _merged_over_ranks(flags: torch.Tensor) -> torch.Tensor:
    """Element-wise max of `flags` over all ranks (each rank only sees the files its own shard read)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flags
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    merged = flags.to(device=device, dtype=torch.int32)
    dist.all_reduce(merged, op=dist.ReduceOp.MAX)
    return merged.cpu().to(torch.uint8)


def build_image_folder(path, split: str | None = None, transform=None, strict: bool = False) -> SafeImageFolder:
    """`SafeImageFolder` over `path` (or `path/split`), failing with one sentence if it is missing or empty.

    Call it before building any model so a typo in --data_path costs seconds, not a model load.
    """
    root = Path(path) / split if split else Path(path)
    if not root.is_dir():
        raise UserError(f"data folder {root} does not exist; pass a folder laid out as <class>/<image> "
                        + (f"with a '{split}' subfolder " if split else "") + "to the data path flag.")
    class_dirs = [entry for entry in os.scandir(root) if entry.is_dir()]
    if not class_dirs:
        raise UserError(f"data folder {root} has no class subfolders; expected ImageFolder layout "
                        "<root>/<class_name>/<image>.jpg.")
    names = {entry.name for entry in class_dirs}
    if names <= SPLIT_NAMES and "train" in names:
        # The split folders would become the classes (e.g. "--num-classes 2" for train/ and val/).
        raise UserError(f"data folder {root} holds the splits {', '.join(name + '/' for name in sorted(names))} rather than class "
                        f"folders; point the data path at {root / 'train'} instead.")
    try:
        return SafeImageFolder(root, transform=transform, strict=strict)
    except FileNotFoundError as error:
        raise UserError(f"data folder {root} contains no images with a supported extension "
                        f"({', '.join(datasets.folder.IMG_EXTENSIONS)}).") from error


class SeededDataset(torch.utils.data.Dataset):
    """Applies `transform` to `base.load(index)` under the sample's own generator.

    `__getitem__((epoch, index))` -> (tensor, label, index). torchvision's v1 transforms draw from
    torch's default CPU generator and timm's (RandomResizedCropAndInterpolation, RandAugment,
    RandomErasing) from Python's `random` and NumPy, so all three are reseeded from (seed, epoch,
    index) for the transform and put back afterwards: the augmentation is a function of the sample,
    and the process's own streams (dropout, Mixup) are untouched, which keeps exact resume simple.
    """

    def __init__(self, base: SafeImageFolder, transform, seed: int = 0):
        self.base = base
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        image, label = self.base.load(index)
        seed = sample_seed(self.seed, epoch, index)
        python_state, numpy_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % 2**32)
            try:
                tensor = self.transform(image)
            finally:
                random.setstate(python_state)
                np.random.set_state(numpy_state)
        return tensor, label, index


def build_loader(dataset, sampler, batch_size: int, num_workers: int = 0, pin_memory: bool = False,
                 persistent_workers: bool = False, drop_last: bool = True) -> torch.utils.data.DataLoader:
    """DataLoader that never touches the global RNG.

    A DataLoader draws its workers' base seed from the global generator each time an iterator
    is created; a resumed run creates that iterator at a different point than the original run,
    so we give it a private generator instead (sample randomness comes from the keys anyway).
    """
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
        pin_memory=pin_memory, drop_last=drop_last,
        persistent_workers=persistent_workers and num_workers > 0,
        generator=torch.Generator().manual_seed(0),
        worker_init_fn=ignore_stop_signals,
    )


def ignore_stop_signals(worker_id: int) -> None:
    """SLURM sends SIGTERM to every process of a job step, loader workers included: a worker killed by it would
    stop the training process mid-step. The training process alone decides when to stop (util/preemption.py)
    and ends its workers itself."""
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)


@atexit.register  # registered after multiprocessing's own exit hook, so it runs before it
def _kill_loader_workers_at_exit() -> None:
    """multiprocessing ends daemonic children at exit with SIGTERM, which loader workers ignore: a loader still
    open at exit (an error raised mid-epoch keeps its iterator alive) would hang the process in multiprocessing's
    join. The workers hold no state, so they are killed instead, as multiprocessing means to."""
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()
