"""FD_DINOv2 on tiny random DINOv2 weights against an independent computation of EDM2's recipe.

Independent side: the plain-torch DINOv2 of tests/dinov2_reference.py with the hub's own position
interpolation (bicubic, no antialias, scale factor (16 + 0.1) / 37), EDM2's preprocessing written out,
np.cov statistics and the Fréchet distance through eigenvalues (dgm-eval's "efficient" form).
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dinov2_reference import TINY_VIT, hub_state_dict, reference_tokens
from generation.evaluate import NpzBatch, fd_dinov2
from generation.fd_dinov2 import DinoV2FeatureExtractor
from util.errors import UserError

HUB_GRID = 37  # the official 518-px table


def independent_features(state, images_nhwc: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(images_nhwc).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(224, 224), mode="bicubic", antialias=True) / 255
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    x = (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    table = state["pos_embed"]
    patches = table[:, 1:].reshape(1, HUB_GRID, HUB_GRID, -1).permute(0, 3, 1, 2)
    scale = (16 + 0.1) / HUB_GRID
    patches = F.interpolate(patches, scale_factor=(scale, scale), mode="bicubic", antialias=False)
    table = torch.cat([table[:, :1], patches.permute(0, 2, 3, 1).reshape(1, 256, -1)], dim=1)
    with torch.no_grad():
        cls, _ = reference_tokens(state, x, table)
    return cls.double().numpy()


def independent_fd(features_1: np.ndarray, features_2: np.ndarray) -> float:
    mu_1, mu_2 = features_1.mean(0), features_2.mean(0)
    sigma_1, sigma_2 = np.cov(features_1, rowvar=False), np.cov(features_2, rowvar=False)
    sqrt_trace = np.real(np.sqrt(np.linalg.eigvals(sigma_1 @ sigma_2).astype(complex))).sum()
    return float(((mu_1 - mu_2) ** 2).sum() + np.trace(sigma_1) + np.trace(sigma_2) - 2 * sqrt_trace)


@pytest.fixture
def setup(tmp_path):
    state = hub_state_dict(seed=3, hub_grid=HUB_GRID)
    weights = tmp_path / "dinov2_vitl14_pretrain.pth"
    torch.save(state, weights)
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 256, size=(40, 32, 32, 3), dtype=np.uint8)
    samples = np.clip(ref[:36].astype(int) + rng.integers(-60, 60, size=(36, 32, 32, 3)), 0, 255).astype(np.uint8)
    np.savez(tmp_path / "ref.npz", arr_0=ref)
    np.savez(tmp_path / "samples.npz", arr_0=samples)
    return state, weights, ref, samples, tmp_path


def test_fd_dinov2_matches_an_independent_frechet_computation(setup):
    state, weights, ref, samples, tmp_path = setup
    extractor = DinoV2FeatureExtractor(weights, model_kwargs=TINY_VIT)
    ref_batch, sample_batch = NpzBatch(tmp_path / "ref.npz"), NpzBatch(tmp_path / "samples.npz")
    expected = independent_fd(independent_features(state, samples), independent_features(state, ref))
    logs = []
    first = fd_dinov2(ref_batch, sample_batch, extractor, batch_size=16, log=lambda *a: logs.append(a))
    assert first["fd_dinov2_reference"] == "arr_0"
    assert first["fd_dinov2"] == pytest.approx(expected, rel=1e-4)
    assert expected > 0

    # The reference statistics are cached beside the npz and reused.
    assert (tmp_path / "ref.fd_dinov2.npz").is_file()
    second = fd_dinov2(ref_batch, sample_batch, extractor, batch_size=16, log=lambda *a: None)
    assert second["fd_dinov2_reference"] == "cached" and second["fd_dinov2"] == first["fd_dinov2"]

    # Statistics stored in the reference npz itself take precedence.
    ref_features = independent_features(state, ref)
    np.savez(tmp_path / "ref_stored.npz", arr_0=ref, mu_dinov2=ref_features.mean(0),
             sigma_dinov2=np.cov(ref_features, rowvar=False))
    third = fd_dinov2(NpzBatch(tmp_path / "ref_stored.npz"), sample_batch, extractor, log=lambda *a: None)
    assert third["fd_dinov2_reference"] == "stored" and third["fd_dinov2"] == pytest.approx(expected, rel=1e-4)


def test_missing_dinov2_weights_are_one_sentence(tmp_path):
    with pytest.raises(UserError, match="do not exist"):
        DinoV2FeatureExtractor(tmp_path / "nope.pth")


@pytest.mark.slow
def test_reference_batch_stores_dinov2_statistics_of_all_its_images(tiny_image_folder, tmp_path):
    """make_reference_batch --fd-dinov2-weights: mu_dinov2/sigma_dinov2 over every image (not only arr_0)."""
    from generation.inception import InceptionFeatureExtractor
    from scripts.make_reference_batch import build_reference_batch
    from test_evaluate import random_inception_state_dict
    from util.data import CenterCropArr, build_image_folder

    inception_path = tmp_path / "inception.pth"
    torch.save(random_inception_state_dict(), inception_path)
    weights = tmp_path / "dinov2.pth"
    torch.save(hub_state_dict(seed=4, hub_grid=HUB_GRID), weights)
    dinov2 = DinoV2FeatureExtractor(weights, model_kwargs=TINY_VIT)
    arrays = build_reference_batch(tiny_image_folder / "val", 24, InceptionFeatureExtractor(inception_path),
                                   arr_images=6, batch_size=5, num_workers=0, dinov2=dinov2)
    folder = build_image_folder(tiny_image_folder / "val", transform=CenterCropArr(24))
    images = np.stack([np.asarray(folder[i][0], dtype=np.uint8) for i in range(len(folder))])  # all 16
    features = independent_features(hub_state_dict(seed=4, hub_grid=HUB_GRID), images)
    assert len(arrays["arr_0"]) == 6
    np.testing.assert_allclose(arrays["mu_dinov2"], features.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(arrays["sigma_dinov2"], np.cov(features, rowvar=False), rtol=1e-3, atol=1e-5)
