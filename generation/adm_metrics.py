"""ADM's metrics on Inception features: Fréchet distance (FID, sFID), Inception Score, Precision / Recall.

The statistics half of OpenAI ADM's evaluator (guided-diffusion `evaluations/evaluator.py`), in numpy / torch;
`generation/evaluate.py` reads the npz batches, runs Inception and calls these (every name here is also importable
from `generation.evaluate`). What follows ADM exactly is listed in that module's docstring.
"""
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from scipy import linalg
from scipy.special import log_softmax, xlogy

from generation.inception import full_fp32

IS_SPLIT_SIZE = 5000
NEAREST_K = 3
PR_BATCH_SIZE = 10000


@dataclass
class Activations:
    """Inception outputs for one batch file: pool (N, 2048), spatial (N, 2023), logits (N, 1008)."""
    pool: np.ndarray
    spatial: np.ndarray
    logits: np.ndarray


@dataclass
class FIDStatistics:
    """Mean (D,) and covariance (D, D) of a set of activations."""
    mu: np.ndarray
    sigma: np.ndarray

    @classmethod
    def from_activations(cls, activations: np.ndarray) -> "FIDStatistics":
        return cls(np.mean(activations, axis=0), np.cov(activations, rowvar=False))

    def frechet_distance(self, other: "FIDStatistics", eps: float = 1e-6) -> float:
        return frechet_distance(self.mu, self.sigma, other.mu, other.sigma, eps)


class StatisticsAccumulator:
    """Streaming mean and unbiased covariance of (B, D) activation batches, for sets too large to keep.

    Sums are taken in float64 around a shift (the first batch's mean), which keeps the
    sum-of-products formula as accurate as np.cov on the stacked activations.
    """

    def __init__(self):
        self.count, self.shift, self.total, self.products = 0, None, None, None

    def update(self, activations: np.ndarray) -> None:
        batch = np.asarray(activations, dtype=np.float64)
        if self.shift is None:
            self.shift = batch.mean(axis=0)
            self.total = np.zeros_like(self.shift)
            self.products = np.zeros((len(self.shift), len(self.shift)))
        centred = batch - self.shift  # (B, D)
        self.count += len(batch)
        self.total += centred.sum(axis=0)
        self.products += centred.T @ centred  # (D, D)

    def statistics(self) -> "FIDStatistics":
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 activations, got {self.count}.")
        mean_centred = self.total / self.count
        sigma = (self.products - self.count * np.outer(mean_centred, mean_centred)) / (self.count - 1)
        return FIDStatistics(self.shift + mean_centred, sigma)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr(sqrtm(S1 S2)), with ADM's singular/imaginary handling.

    ADM calls it as sample.frechet_distance(ref): (mu1, sigma1) are the samples'.
    """
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
                         f"{sigma2.shape}; both must come from the same Inception feature.")
    diff = mu1 - mu2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)  # the finiteness check below decides
        covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        warnings.warn(f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"the Fréchet distance's matrix square root has an imaginary component of "
                             f"{np.max(np.abs(covmean.imag))}; the covariances are not valid statistics.")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(logits_or_probs: np.ndarray, split_size: int = IS_SPLIT_SIZE, from_logits: bool = True) -> float:
    """Mean over consecutive chunks of exp(E_x KL(p(y|x) || p(y))); input (N, C) logits (or probabilities).

    Classes with p = 0 contribute 0 (0 log 0 = 0) where ADM's float32 numpy would give NaN.
    """
    values = np.asarray(logits_or_probs, dtype=np.float64)
    probs = np.exp(log_softmax(values, axis=1)) if from_logits else values
    scores = []
    for start in range(0, len(probs), split_size):
        part = probs[start:start + split_size]
        marginal = part.mean(axis=0, keepdims=True)  # (1, C)
        kl = (xlogy(part, part) - xlogy(part, marginal)).sum(axis=1)  # (n,)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores))


class ManifoldEstimator:
    """ADM's k-NN manifold estimate (Kynkäänniemi et al. 2019) on feature sets, in torch.

    `manifold_radii(features (N, D)) -> (N, K)` squared distance to each point's k-th neighbour
    (k in `nhood_sizes`, the point itself at rank 0); `evaluate_pr(f1, r1, f2, r2)` -> (share of
    f2 inside some f1 ball, share of f1 inside some f2 ball), each (K,).
    """

    def __init__(self, device="cpu", row_batch_size: int = PR_BATCH_SIZE, col_batch_size: int = PR_BATCH_SIZE,
                 nhood_sizes=(NEAREST_K,)):
        self.device = torch.device(device)
        self.row_batch_size = row_batch_size
        self.col_batch_size = col_batch_size
        self.nhood_sizes = tuple(nhood_sizes)

    def pairwise_distances(self, u: np.ndarray, v: np.ndarray) -> torch.Tensor:
        """Squared distances (B1, B2) float32 on `device`; fp16 unless that overflows somewhere."""
        u = torch.as_tensor(u, dtype=torch.float32, device=self.device)
        v = torch.as_tensor(v, dtype=torch.float32, device=self.device)
        with full_fp32(self.device):
            distances = _squared_distances(u.half(), v.half())
            if not torch.isfinite(distances).all():
                distances = _squared_distances(u, v)
        return distances.float()

    def manifold_radii(self, features: np.ndarray) -> np.ndarray:
        num = len(features)
        radii = np.zeros((num, len(self.nhood_sizes)), dtype=np.float32)
        for begin1 in range(0, num, self.row_batch_size):
            rows = features[begin1:begin1 + self.row_batch_size]
            distances = torch.cat([self.pairwise_distances(rows, features[begin2:begin2 + self.col_batch_size])
                                   for begin2 in range(0, num, self.col_batch_size)], dim=1)  # (B, N)
            # The row's own zero distance is the smallest, so the k-th order statistic (0-based)
            # is the k-th neighbour: ADM takes index k of a partition over 0..k.
            ranked = torch.topk(distances, max(self.nhood_sizes) + 1, dim=1, largest=False).values
            radii[begin1:begin1 + len(rows)] = ranked[:, list(self.nhood_sizes)].cpu().numpy()
        return radii

    def evaluate_pr(self, features_1, radii_1, features_2, radii_2):
        status_1 = torch.zeros((len(features_1), radii_2.shape[1]), dtype=torch.bool, device=self.device)
        status_2 = torch.zeros((len(features_2), radii_1.shape[1]), dtype=torch.bool, device=self.device)
        radii_1 = torch.as_tensor(radii_1, device=self.device)
        radii_2 = torch.as_tensor(radii_2, device=self.device)
        for begin1 in range(0, len(features_1), self.row_batch_size):
            end1 = begin1 + self.row_batch_size
            for begin2 in range(0, len(features_2), self.col_batch_size):
                end2 = begin2 + self.col_batch_size
                distances = self.pairwise_distances(features_1[begin1:end1], features_2[begin2:end2])[..., None]
                status_1[begin1:end1] |= (distances <= radii_2[begin2:end2]).any(dim=1)  # (B1, K)
                status_2[begin2:end2] |= (distances <= radii_1[begin1:end1, None]).any(dim=0)  # (B2, K)
        return (status_2.double().mean(dim=0).cpu().numpy(), status_1.double().mean(dim=0).cpu().numpy())


def _squared_distances(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """max(||u||^2 - 2 u.v + ||v||^2, 0) in the dtype of u, v: (B1, D), (B2, D) -> (B1, B2).

    In fp16 every elementwise step rounds to fp16 as in ADM's TF graph; the matmul and the norm
    sums accumulate in fp32 (exact products of fp16 values) and round once, as GPU kernels do.
    """
    norm_u = (u * u).float().sum(dim=1).to(u.dtype)[:, None]  # (B1, 1)
    norm_v = (v * v).float().sum(dim=1).to(v.dtype)[None, :]  # (1, B2)
    dot = (u.float() @ v.float().T).to(u.dtype)  # (B1, B2)
    return torch.clamp_min(norm_u - 2 * dot + norm_v, 0)


def precision_recall(ref_features: np.ndarray, sample_features: np.ndarray, device="cpu") -> tuple[float, float]:
    """ADM's compute_prec_recall on pool_3 features (N_ref, D), (N_sample, D) -> (precision, recall)."""
    estimator = ManifoldEstimator(device)
    ref_radii = estimator.manifold_radii(ref_features)
    sample_radii = estimator.manifold_radii(sample_features)
    precision, recall = estimator.evaluate_pr(ref_features, ref_radii, sample_features, sample_radii)
    return float(precision[0]), float(recall[0])

