"""FD_DINOv2: the Fréchet distance in DINOv2-L/14 feature space (Stein et al., 2023, "Exposing flaws of
generative model evaluation metrics"), as EDM2 and RAE report it next to FID.

Preprocessing and features follow EDM2's `calculate_metrics.py` DINOv2Detector (itself "modeled after"
layer6ai-labs/dgm-eval), with the network loaded through timm from a local file:
- uint8 images (N, 3, H, W) as float 0..255, resized to 224 x 224 with
  `F.interpolate(mode="bicubic", antialias=True)` (EDM2's default "torch" resize; dgm-eval resizes with
  PIL bicubic, which EDM2 calls "almost the same");
- / 255, ImageNet mean/std;
- the official torch.hub `dinov2_vitl14` forward = the class token after the final LayerNorm (1024-d);
  its position table is interpolated the hub's way (`models.dinov2`, mode "hub"), in fp32 with TF32 off;
- mean and unbiased covariance (float64), FD = ||mu1 - mu2||^2 + tr(S1 + S2 - 2 sqrtm(S1 S2)) with the
  same square root handling as FID (computed by `generation.evaluate --fd-dinov2-weights`).

Reference statistics: `mu_dinov2` / `sigma_dinov2` stored in the reference npz are used when present
(e.g. statistics of a whole training set); otherwise they are computed from its `arr_0` once and cached
beside it in `<ref stem>.fd_dinov2.npz`, keyed by the reference file's size/mtime and the weights file's
SHA-256, so a changed file or other weights recompute them.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from generation.inception import full_fp32, to_nchw_uint8
from models.dinov2 import build_dinov2, class_token, file_sha256, normalize_imagenet

FD_MODEL = "vit_large_patch14_dinov2"  # torch.hub dinov2_vitl14
FD_INPUT_SIZE = 224
STORED_KEYS = ("mu_dinov2", "sigma_dinov2")


class DinoV2FeatureExtractor:
    """uint8 images (N, H, W, 3) or (N, 3, H, W) at any size -> DINOv2-L/14 class tokens, float64 numpy (N, 1024)."""

    def __init__(self, weights, device="cpu", model_kwargs: dict | None = None):
        self.device = torch.device(device)
        self.weights = Path(weights)
        self.model = build_dinov2(FD_MODEL, weights, FD_INPUT_SIZE, pos_embed_mode="hub",
                                  model_kwargs=model_kwargs).to(self.device)

    @torch.no_grad()
    def features(self, images) -> np.ndarray:
        batch = to_nchw_uint8(images).to(self.device).float()
        with full_fp32(self.device):
            batch = F.interpolate(batch, size=(FD_INPUT_SIZE, FD_INPUT_SIZE), mode="bicubic", antialias=True)
            tokens = class_token(self.model, normalize_imagenet(batch / 255))
        return tokens.double().cpu().numpy()


def stored_reference(ref_path):
    """(mu, sigma) stored in the reference npz itself as mu_dinov2 / sigma_dinov2, else None."""
    with np.load(ref_path) as arrays:
        if all(key in arrays.files for key in STORED_KEYS):
            return arrays["mu_dinov2"], arrays["sigma_dinov2"]
    return None


class ReferenceCache:
    """`<ref stem>.fd_dinov2.npz` beside the reference npz: its DINOv2 (mu, sigma) for one weights file."""

    def __init__(self, ref_path, weights_path):
        ref_path = Path(ref_path)
        self.path = ref_path.with_name(f"{ref_path.stem}.fd_dinov2.npz")
        stat = ref_path.stat()
        self.key = {"ref_size": np.int64(stat.st_size), "ref_mtime_ns": np.int64(stat.st_mtime_ns),
                    "weights_sha256": np.array(file_sha256(weights_path))}

    def load(self):
        """(mu, sigma) if the cache exists and was made from this reference file and these weights, else None."""
        if not self.path.is_file():
            return None
        with np.load(self.path) as cached:
            if all(name in cached.files and cached[name] == value for name, value in self.key.items()):
                return cached["mu"], cached["sigma"]
        return None

    def save(self, mu: np.ndarray, sigma: np.ndarray) -> Path:
        tmp = self.path.with_name(f".{self.path.stem}.tmp-{os.getpid()}.npz")
        np.savez(tmp, mu=mu, sigma=sigma, **self.key)
        os.replace(tmp, self.path)  # a reader never sees half a cache
        return self.path
