"""Builds an ADM-style reference batch from an ImageFolder, for datasets other than ImageNet.

    python scripts/make_reference_batch.py --data-path data/train --image-size 256 \
        --inception-weights weights-inception-2015-12-05-6726825d.pth --output ref_256.npz

Every image gets ADM's center crop (`util.data.center_crop_arr`), the crop DiT/SiT train on. The
npz holds what `generation.evaluate` reads from ADM's VIRTUAL_imagenet*_labeled.npz files:
`mu`, `sigma` (pool_3) and `mu_s`, `sigma_s` (spatial) statistics of all images (or of a seeded
random subset of `--max-images`), plus `arr_0`, a seeded random 10k-image subset (all images when
there are fewer) used for Precision/Recall, and their class labels in `arr_1`. With
`--fd-dinov2-weights dinov2_vitl14_pretrain.pth` it also stores `mu_dinov2`, `sigma_dinov2` over the same
images, which `generation.evaluate --fd-dinov2-weights` then uses as FD_DINOv2's reference (as EDM2's
reference files hold training-set statistics).
"""
import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from tqdm import tqdm

from generation.adm_metrics import StatisticsAccumulator
from generation.fd_dinov2 import DinoV2FeatureExtractor
from generation.inception import InceptionFeatureExtractor
from util.cli import finish_parser
from util.data import CenterCropArr, build_image_folder
from util.errors import UserError, run_cli

ADM_ARR_IMAGES = 10000


def collate_uint8(items):
    """[(PIL image (S, S), label)] -> (uint8 (B, S, S, 3), int64 labels (B,))."""
    images = np.stack([np.asarray(image, dtype=np.uint8) for image, _ in items])
    return images, np.array([label for _, label in items], dtype=np.int64)


def choose_indices(total: int, max_images: int | None, arr_images: int, seed: int):
    """(indices used for the statistics, sorted; the subset of them stored in arr_0, sorted)."""
    rng = np.random.default_rng(seed)
    used = np.arange(total) if max_images is None or max_images >= total else np.sort(
        rng.choice(total, size=max_images, replace=False))
    stored = used if arr_images >= len(used) else np.sort(rng.choice(used, size=arr_images, replace=False))
    return used, stored


def build_reference_batch(data_path, image_size: int, extractor: InceptionFeatureExtractor, max_images=None,
                          arr_images: int = ADM_ARR_IMAGES, batch_size: int = 64, num_workers: int = 4,
                          seed: int = 0, dinov2: DinoV2FeatureExtractor | None = None) -> dict:
    """Arrays of the reference npz: arr_0 (M, S, S, 3) uint8, arr_1 (M,), mu, sigma, mu_s, sigma_s
    [, mu_dinov2, sigma_dinov2: FD_DINOv2's statistics of the same images, as EDM2's reference files hold]."""
    dataset = build_image_folder(data_path, transform=CenterCropArr(image_size))
    used, stored = choose_indices(len(dataset), max_images, arr_images, seed)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, used.tolist()), batch_size=batch_size,
                                         num_workers=num_workers, collate_fn=collate_uint8)
    keep = np.isin(used, stored)  # (len(used),) which loaded images go to arr_0
    arr_0 = np.empty((len(stored), image_size, image_size, 3), dtype=np.uint8)
    arr_1 = np.empty(len(stored), dtype=np.int64)
    pool_moments, spatial_moments, dinov2_moments = StatisticsAccumulator(), StatisticsAccumulator(), None
    if dinov2 is not None:
        dinov2_moments = StatisticsAccumulator()
    position, written = 0, 0
    for images, labels in tqdm(loader, desc="reference batch", file=sys.stderr, disable=None):
        pool, spatial, _ = extractor.features(images)
        pool_moments.update(pool.numpy())
        spatial_moments.update(spatial.numpy())
        if dinov2_moments is not None:
            dinov2_moments.update(dinov2.features(images))
        chosen = keep[position:position + len(images)]
        arr_0[written:written + chosen.sum()] = images[chosen]
        arr_1[written:written + chosen.sum()] = labels[chosen]
        position, written = position + len(images), written + int(chosen.sum())
    if dataset.num_skipped:
        print(f"warning: skipped {dataset.num_skipped} unreadable images (replaced by the next readable one)",
              file=sys.stderr)
    pool_stats, spatial_stats = pool_moments.statistics(), spatial_moments.statistics()
    arrays = {"arr_0": arr_0, "arr_1": arr_1, "mu": pool_stats.mu, "sigma": pool_stats.sigma,
              "mu_s": spatial_stats.mu, "sigma_s": spatial_stats.sigma}
    if dinov2_moments is not None:
        dinov2_stats = dinov2_moments.statistics()
        arrays.update(mu_dinov2=dinov2_stats.mu, sigma_dinov2=dinov2_stats.sigma)
    return arrays


def write_npz(arrays: dict, path: Path) -> None:
    """np.savez into a temporary file, then rename: never a half-written reference batch."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:  # a file object, so np.savez adds no second ".npz"
            np.savez(handle, **arrays)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-path", required=True, help="ImageFolder root (<class>/<image>)")
    parser.add_argument("--image-size", type=int, required=True, help="ADM center-crop size, e.g. 256")
    parser.add_argument("--inception-weights", required=True, help="weights-inception-2015-12-05-6726825d.pth")
    parser.add_argument("--output", required=True, help="npz to write, e.g. VIRTUAL_mydata256.npz")
    parser.add_argument("--fd-dinov2-weights", default=None,
                        help="DINOv2-L/14 weights: also store mu_dinov2/sigma_dinov2 (FD_DINOv2's reference)")
    parser.add_argument("--max-images", type=int, default=None, help="statistics over a seeded random subset")
    parser.add_argument("--arr-images", type=int, default=ADM_ARR_IMAGES, help="images kept in arr_0 (ADM: 10000)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = finish_parser(parser).parse_args(argv)
    for flag in ("image_size", "batch_size", "arr_images"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}.")
    if args.max_images is not None and args.max_images < 4:
        parser.error(f"--max-images must be at least 4 (Precision/Recall needs 4 images), got {args.max_images}.")
    if Path(args.output).suffix != ".npz":
        parser.error(f"--output must end in .npz, got {args.output}.")
    if not Path(args.output).resolve().parent.is_dir():
        parser.error(f"the folder of --output {args.output} does not exist; create it first.")
    return args


def main(argv=None):
    run_cli(write_reference_batch, parse_args(argv), prog="make_reference_batch")


def write_reference_batch(args) -> None:
    num_images = len(build_image_folder(args.data_path))  # a bad path costs seconds, not an Inception load
    if num_images < 4:
        raise UserError(f"{args.data_path} has {num_images} images; a reference batch needs at least 4.")
    extractor = InceptionFeatureExtractor(args.inception_weights, args.device)
    dinov2 = DinoV2FeatureExtractor(args.fd_dinov2_weights, args.device) if args.fd_dinov2_weights else None
    arrays = build_reference_batch(args.data_path, args.image_size, extractor, args.max_images,
                                   args.arr_images, args.batch_size, args.num_workers, args.seed, dinov2)
    output = Path(args.output)
    write_npz(arrays, output)
    print(f"wrote {output}: arr_0 {arrays['arr_0'].shape}, statistics of "
          f"{min(num_images, args.max_images or num_images)} images")


if __name__ == "__main__":
    main()
