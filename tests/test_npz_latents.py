"""MAR-style per-image .npz latent folders (MAR main_cache.py / USP CachedFolder), read without re-encoding."""
import numpy as np
import pytest
import torch

from util.rng import sample_generator
from util.npz_latents import NpzLatentFolder, is_npz_latent_folder
from util.errors import UserError


def write_mar_cache(root, classes=("cat", "dog"), per_class=2, channels=4, size=2):
    rng = np.random.default_rng(0)
    stored = {}
    for name in classes:
        (root / name).mkdir(parents=True)
        for k in range(per_class):
            moments = rng.normal(size=(2 * channels, size, size)).astype(np.float32)
            moments_flip = rng.normal(size=(2 * channels, size, size)).astype(np.float32)
            np.savez(root / name / f"img{k}.npz", moments=moments, moments_flip=moments_flip)
            stored[(name, k)] = (moments, moments_flip)
    return stored


def test_reads_mar_moments_like_cachedfolder(tmp_path):
    stored = write_mar_cache(tmp_path)
    assert is_npz_latent_folder(tmp_path)
    data = NpzLatentFolder(tmp_path, scale=0.5, expect_shape=(4, 2, 2), use_mean=True, random_flip=False)
    assert len(data) == 4 and data.manifest["classes"] == ["cat", "dog"]
    latents, label, index = data[(0, 3)]  # sorted: cat/img0, cat/img1, dog/img0, dog/img1
    moments = stored[("dog", 1)][0]
    assert label == 1 and index == 3
    # DiagonalGaussianDistribution: mean, logvar = chunk(moments, 2) on channels; USP scales the latents.
    torch.testing.assert_close(latents, torch.from_numpy(moments[:4]) * 0.5)
    sampled = NpzLatentFolder(tmp_path, scale=0.5, seed=1, random_flip=False)
    generator = sample_generator(1, 0, 3)  # without random flips the noise is the sample's first draw
    noise = torch.randn((4, 2, 2), generator=generator)
    logvar = torch.from_numpy(moments[4:]).clamp(-30, 20)
    expected = (torch.from_numpy(moments[:4]) + torch.exp(0.5 * logvar) * noise) * 0.5
    torch.testing.assert_close(sampled[(0, 3)][0], expected)


def test_shape_mismatch_and_not_a_cache_are_one_sentence(tmp_path):
    write_mar_cache(tmp_path / "cache")
    with pytest.raises(UserError, match="match --input_size"):
        NpzLatentFolder(tmp_path / "cache", scale=1.0, expect_shape=(4, 4, 4))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="is not a latent cache"):
        NpzLatentFolder(tmp_path / "empty", scale=1.0)
