"""OpenAI ADM's evaluator (guided-diffusion `evaluations/evaluator.py`) in PyTorch: IS, FID, sFID, P/R.

    python -m generation.evaluate REF.npz SAMPLE.npz --inception-weights weights-inception-2015-12-05-6726825d.pth

Both npz files hold `arr_0`: uint8 images (N, H, W, 3). A reference batch may also hold `mu`,
`sigma` (pool_3) and `mu_s`, `sigma_s` (spatial) statistics, which are then used instead of the
ones of its `arr_0` (ADM's ImageNet batches store statistics of the whole training set and 10k
images for Precision/Recall). What follows ADM exactly, because it moves the numbers:

- Inception Score: softmax over the 1008 logits without the fc bias, in consecutive chunks of
  5000 samples (no shuffle), exp(mean KL(p(y|x) || p(y))) per chunk, averaged over chunks.
- FID / sFID: mean and np.cov(rowvar=False) of the activations; Fréchet distance with
  scipy.linalg.sqrtm of sigma_sample @ sigma_ref; a non-finite root means a singular product:
  warn and add 1e-6 to both diagonals; an imaginary diagonal beyond 1e-3 is an error, else the
  real part is kept.
- Precision / Recall: ADM's ManifoldEstimator on pool_3 with k = 3: each point's radius is the
  distance to its 3rd nearest neighbour in its own set (itself excluded); distances are squared
  Euclidean ||u||^2 - 2 u.v + ||v||^2 clamped at 0, computed in fp16 and redone in fp32 when a
  block overflows, in 10000 x 10000 blocks. Precision = share of samples inside some reference
  ball, recall = share of reference images inside some sample ball.

The output lines are ADM's (`Inception Score: ...`, `FID: ...`, `sFID: ...`, `Precision: ...`,
`Recall: ...`), and the same numbers go to a JSON file next to the sample npz. The statistics are in
generation/adm_metrics.py; this module reads the npz batches, runs Inception and is the command line.

`--fd-dinov2-weights dinov2_vitl14_pretrain.pth` adds `FD_DINOv2: ...` from the same npz files (EDM2's
preprocessing, reference statistics stored in the npz or cached beside it; see generation/fd_dinov2.py).
"""
import argparse
import json
import sys
import warnings
import zipfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from generation.adm_metrics import (NEAREST_K, Activations, FIDStatistics, StatisticsAccumulator, inception_score,
                                    precision_recall)
from generation.fd_dinov2 import DinoV2FeatureExtractor, ReferenceCache, stored_reference
from generation.inception import POOL_DIM, SPATIAL_DIM, InceptionFeatureExtractor
from util.checkpoint import atomic_open
from util.cli import finish_parser, positive_int
from util.disk import ensure_writable_file
from util.errors import UserError, run_cli
from util.progress import progress_bar as tqdm
from util.precision import configure_cuda

STAT_SHAPES = {"mu": (POOL_DIM,), "sigma": (POOL_DIM, POOL_DIM),
               "mu_s": (SPATIAL_DIM,), "sigma_s": (SPATIAL_DIM, SPATIAL_DIM)}
MIN_IMAGES = NEAREST_K + 1  # a k-th neighbour other than the point itself




# ----------------------------------------------------------------------------- npz batches

class NpzBatch:
    """An ADM-layout npz, checked on opening and streamed in batches without loading all images.

    `arr_0` is uint8 (N, H, W, 3); optional `mu`/`sigma`/`mu_s`/`sigma_s` statistics are checked
    for shape and finiteness and exposed as `stored_statistics` (None when absent).
    """

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"npz file {self.path} does not exist; pass a batch written by np.savez with arr_0.")
        try:
            with zipfile.ZipFile(self.path) as archive:
                members = set(archive.namelist())
                if "arr_0.npy" not in members:
                    raise UserError(f"{self.path} has no arr_0; ADM batches keep their images in arr_0 "
                                   "(save with np.savez(path, arr_0=images_uint8_NHWC)).")
                with archive.open("arr_0.npy") as stream:
                    self.shape, self.fortran_order, self.dtype = _read_npy_header(stream, self.path)
        except zipfile.BadZipFile as error:
            raise UserError(f"{self.path} is not an npz archive; write batches with np.savez.") from error
        if self.dtype != np.uint8:
            raise UserError(f"{self.path}: arr_0 has dtype {self.dtype}, expected uint8 images in 0..255; "
                           "convert with np.clip(np.round(x), 0, 255).astype(np.uint8).")
        if len(self.shape) != 4 or self.shape[3] != 3 or min(self.shape[1:3]) < 1:
            raise UserError(f"{self.path}: arr_0 has shape {self.shape}, expected (N, H, W, 3) RGB images "
                           "(transpose NCHW batches with x.transpose(0, 2, 3, 1)).")
        if self.shape[0] < MIN_IMAGES:
            raise UserError(f"{self.path}: arr_0 holds {self.shape[0]} images; Precision/Recall needs at "
                           f"least {MIN_IMAGES} (each image's {NEAREST_K}rd nearest neighbour).")
        self.stored_statistics = self._read_statistics(members)

    def __len__(self) -> int:
        return self.shape[0]

    def _read_statistics(self, members):
        present = [name for name in STAT_SHAPES if f"{name}.npy" in members]
        if not present:
            return None
        missing = [name for name in STAT_SHAPES if name not in present]
        if missing:
            raise UserError(f"{self.path} has {', '.join(present)} but not {', '.join(missing)}; a reference "
                           "batch needs all of mu, sigma, mu_s, sigma_s (or none of them).")
        with np.load(self.path) as arrays:
            stats = {name: arrays[name] for name in STAT_SHAPES}
        for name, shape in STAT_SHAPES.items():
            if stats[name].shape != shape:
                raise UserError(f"{self.path}: {name} has shape {stats[name].shape}, expected {shape} "
                               "(statistics of the 2015-12-05 Inception's pool_3 / mixed_6 features).")
            if not np.isfinite(stats[name]).all():
                raise UserError(f"{self.path}: {name} contains NaN or Inf values; rebuild the reference batch "
                               "(scripts/make_reference_batch.py).")
        return (FIDStatistics(stats["mu"], stats["sigma"]), FIDStatistics(stats["mu_s"], stats["sigma_s"]))

    def batches(self, batch_size: int):
        """Yields uint8 arrays (B, H, W, 3) in file order."""
        if self.fortran_order:  # rare (np.asfortranarray before saving): no streaming, read it whole
            with np.load(self.path) as arrays:
                images = np.ascontiguousarray(arrays["arr_0"])
            for start in range(0, len(images), batch_size):
                yield images[start:start + batch_size]
            return
        with zipfile.ZipFile(self.path) as archive, archive.open("arr_0.npy") as stream:
            _read_npy_header(stream, self.path)
            for start in range(0, len(self), batch_size):
                count = min(batch_size, len(self) - start)
                images = np.empty((count, *self.shape[1:]), dtype=np.uint8)
                if stream.readinto(memoryview(images).cast("B")) != images.nbytes:
                    raise UserError(f"{self.path}: arr_0 is truncated after about {start} images; rewrite the file.")
                yield images


def _read_npy_header(stream, path):
    """(shape, fortran_order, dtype) of an .npy stream, leaving it at the first data byte."""
    try:
        version = np.lib.format.read_magic(stream)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}[version]
        shape, fortran_order, dtype = read_header(stream)
    except (ValueError, KeyError) as error:
        raise UserError(f"{path}: arr_0 is not a readable .npy array ({error}); rewrite it with np.savez.") from error
    return shape, fortran_order, dtype


# ----------------------------------------------------------------------------- npz -> metrics

def compute_activations(batch: NpzBatch, extractor: InceptionFeatureExtractor, batch_size: int = 64,
                        desc: str = "inception") -> Activations:
    outputs = [extractor.features(images)
               for images in tqdm(batch.batches(batch_size), total=-(-len(batch) // batch_size), desc=desc,
                                  file=sys.stderr, disable=None)]
    pool, spatial, logits = (torch.cat(parts).numpy() for parts in zip(*outputs))
    return Activations(pool, spatial, logits)


def compute_npz_statistics(batch: NpzBatch, extractor: InceptionFeatureExtractor, batch_size: int = 64,
                           desc: str = "inception"):
    """ADM's read_activations + read_statistics: (Activations, pool FIDStatistics, spatial FIDStatistics).

    Statistics stored in the npz (mu, sigma, mu_s, sigma_s) take precedence over those of arr_0.
    """
    activations = compute_activations(batch, extractor, batch_size, desc)
    if batch.stored_statistics is not None:
        return (activations, *batch.stored_statistics)
    return (activations, FIDStatistics.from_activations(activations.pool),
            FIDStatistics.from_activations(activations.spatial))


def streamed_statistics(batch: NpzBatch, features_fn, batch_size: int = 64, desc: str = "features") -> FIDStatistics:
    """Mean and unbiased covariance of `features_fn(uint8 (B, H, W, 3)) -> (B, D)` over arr_0, in batches."""
    moments = StatisticsAccumulator()
    for images in tqdm(batch.batches(batch_size), total=-(-len(batch) // batch_size), desc=desc, file=sys.stderr,
                       disable=None):
        moments.update(features_fn(images))
    return moments.statistics()


def fd_dinov2(ref_batch: NpzBatch, sample_batch: NpzBatch, extractor: DinoV2FeatureExtractor, batch_size: int = 64,
              log=print) -> dict:
    """FD_DINOv2 of SAMPLE against REF; REF's statistics: stored in its npz > cached beside it > its arr_0."""
    stored, source = stored_reference(ref_batch.path), "stored"
    if stored is None:
        cache = ReferenceCache(ref_batch.path, extractor.weights)
        stored, source = cache.load(), "cached"
        if stored is None:
            log("computing DINOv2 reference statistics...")
            ref_stats = streamed_statistics(ref_batch, extractor.features, batch_size, "reference (dinov2)")
            stored, source = (ref_stats.mu, ref_stats.sigma), "arr_0"
            log(f"cached them in {cache.save(*stored)}")
    log("computing DINOv2 sample statistics...")
    sample_stats = streamed_statistics(sample_batch, extractor.features, batch_size, "samples (dinov2)")
    value = sample_stats.frechet_distance(FIDStatistics(*stored))
    log("FD_DINOv2:", value)
    return {"fd_dinov2": value, "fd_dinov2_reference": source, "dinov2_weights": str(extractor.weights)}


# Below this many samples the 2048 x 2048 sample covariance is singular and FID mostly measures the bias of
# estimating it; the published numbers (FID-50K) are not comparable then.
MIN_SAMPLES_FOR_FID = POOL_DIM
STANDARD_NUM_SAMPLES = 50_000


def comparison_warnings(ref_batch: NpzBatch, sample_batch: NpzBatch, allow_resolution_mismatch: bool = False) -> list:
    """Sentences saying what the metrics of this comparison mean when it is not the standard one.

    A resolution mismatch is refused (UserError) unless `allow_resolution_mismatch`: ADM's evaluator resizes
    both to 299 px, so the scores would measure the resizing as much as the model.
    """
    notes = []
    sample_size, ref_size = sample_batch.shape[1:3], ref_batch.shape[1:3]
    if sample_size != ref_size:
        message = (f"the samples are {sample_size[0]}x{sample_size[1]} px but the reference images are "
                   f"{ref_size[0]}x{ref_size[1]} px, so the scores would measure the resizing as much as the model")
        if not allow_resolution_mismatch:
            raise UserError(f"{message}; sample at the reference's resolution, or pass --allow-resolution-mismatch "
                           "to score them anyway (ADM's evaluator does not check).")
        notes.append(message + ".")
    num_samples, num_ref = len(sample_batch), len(ref_batch)
    if num_samples < MIN_SAMPLES_FOR_FID:
        notes.append(f"only {num_samples} samples (fewer than the {MIN_SAMPLES_FOR_FID} Inception features), so the "
                     "sample covariance is singular: FID, sFID and Inception Score are dominated by the small "
                     f"sample and are not comparable to published FID-{STANDARD_NUM_SAMPLES // 1000}K numbers.")
    elif num_samples < num_ref:
        notes.append(f"{num_samples} samples against {num_ref} reference images: FID is biased upward with fewer "
                     f"samples, so compare it only with FID computed from {num_samples} samples (published numbers "
                     f"use {STANDARD_NUM_SAMPLES}).")
    return notes


def evaluate_npz(ref_path, sample_path, inception_weights, batch_size: int = 64, device="cpu", log=print,
                 fd_dinov2_weights=None, allow_resolution_mismatch: bool = False) -> dict:
    """Runs ADM's evaluation of SAMPLE against REF (+ FD_DINOv2 with its weights); returns the metrics (and logs
    ADM's lines).

    Non-standard comparisons (few samples, another resolution) are warned about on stderr and listed under
    "warnings" in the metrics; see `comparison_warnings`.
    """
    ref_batch, sample_batch = NpzBatch(ref_path), NpzBatch(sample_path)  # refuse bad files before any work
    notes = comparison_warnings(ref_batch, sample_batch, allow_resolution_mismatch)
    for note in notes:
        print(f"warning: {note}", file=sys.stderr, flush=True)
    dinov2 = DinoV2FeatureExtractor(fd_dinov2_weights, device) if fd_dinov2_weights is not None else None
    extractor = InceptionFeatureExtractor(inception_weights, device)
    log("computing reference batch activations...")
    ref_acts, ref_stats, ref_stats_spatial = compute_npz_statistics(ref_batch, extractor, batch_size, "reference")
    log("computing sample batch activations...")
    sample_acts, sample_stats, sample_stats_spatial = compute_npz_statistics(sample_batch, extractor, batch_size,
                                                                             "samples")
    log("Computing evaluations...")
    metrics = {"inception_score": inception_score(sample_acts.logits)}
    log("Inception Score:", metrics["inception_score"])
    metrics["fid"] = sample_stats.frechet_distance(ref_stats)
    log("FID:", metrics["fid"])
    metrics["sfid"] = sample_stats_spatial.frechet_distance(ref_stats_spatial)
    log("sFID:", metrics["sfid"])
    metrics["precision"], metrics["recall"] = precision_recall(ref_acts.pool, sample_acts.pool, device)
    log("Precision:", metrics["precision"])
    log("Recall:", metrics["recall"])
    metrics.update(num_samples=len(sample_batch), num_reference_images=len(ref_batch),
                   reference_statistics="stored" if ref_batch.stored_statistics is not None else "arr_0",
                   ref_batch=str(ref_path), sample_batch=str(sample_path), inception_weights=str(inception_weights),
                   warnings=notes)
    if dinov2 is not None:
        metrics.update(fd_dinov2(ref_batch, sample_batch, dinov2, batch_size, log))
    return metrics


def default_json_path(sample_path) -> Path:
    """samples.npz -> samples.metrics.json (next to it)."""
    sample_path = Path(sample_path)
    return sample_path.with_name(f"{sample_path.stem}.metrics.json")


def write_json(metrics: dict, path) -> Path:
    """Writes via a temporary file and a rename, so a crash never leaves half a JSON."""
    path = Path(path)
    with atomic_open(path) as handle:
        handle.write((json.dumps(metrics, indent=2) + "\n").encode())
    return path


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("ref_batch", help="reference npz (arr_0 uint8 NHWC, optional mu/sigma/mu_s/sigma_s)")
    parser.add_argument("sample_batch", help="sample npz (arr_0 uint8 NHWC)")
    parser.add_argument("--inception-weights", required=True,
                        help="local weights-inception-2015-12-05-6726825d.pth (torch-fidelity / pytorch-fid layout)")
    parser.add_argument("--fd-dinov2-weights", default=None,
                        help="local DINOv2-L/14 weights (dinov2_vitl14_pretrain.pth or timm's model.safetensors): "
                             "also report FD_DINOv2")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="images per Inception forward (ADM: 64)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output-json", default=None, help="default: <sample stem>.metrics.json next to it")
    parser.add_argument("--allow-resolution-mismatch", action="store_true",
                        help="score samples whose resolution differs from the reference's (refused by default)")
    return finish_parser(parser)


def parse_args(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        warnings.warn("CUDA is not available; evaluating on CPU (slow: about 5 images/s).")
        args.device = "cpu"
    return args


def evaluate_to_json(args) -> tuple:
    """(metrics, JSON path): the output path is checked writable before the minutes of Inception work."""
    json_path = ensure_writable_file(args.output_json or default_json_path(args.sample_batch), "--output-json")
    metrics = evaluate_npz(args.ref_batch, args.sample_batch, args.inception_weights, args.batch_size,
                           args.device, fd_dinov2_weights=args.fd_dinov2_weights,
                           allow_resolution_mismatch=args.allow_resolution_mismatch)
    return metrics, write_json(metrics, json_path)


def main(argv=None):
    args = parse_args(argv)
    if torch.device(args.device).type == "cuda":
        configure_cuda(tf32=False)  # Inception runs in exact fp32 (ADM parity); its convs are fixed-shape
    metrics, json_path = run_cli(evaluate_to_json, args, prog="generation.evaluate")
    print(f"wrote {json_path}")
    return metrics


if __name__ == "__main__":
    main()
