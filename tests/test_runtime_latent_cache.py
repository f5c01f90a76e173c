"""Latent cache: DDP extraction, byte-identical resume, equality with online encoding, manifest checks."""
import json
import shutil

import pytest
import torch
from diffusers import AutoencoderKL

from conftest import run_torchrun
from models.latent_spec import get_latent_spec
from models.vae import LatentCodec, vae_identity
from util.data import build_image_folder
from pretrain.cache_latents import extract_latent_cache
from util.latent_cache import LatentCacheDataset, cache_transform, shard_path
from util.errors import UserError

pytestmark = pytest.mark.slow  # end-to-end runs (subprocesses / training loops): `pytest -m "not slow"` skips them

SETTINGS = dict(image_size=32, crop="center", batch_size=4, shard_size=12)  # 64 images -> 6 shards


@pytest.fixture(scope="module")
def codec(tiny_vae_dir):
    return LatentCodec.from_autoencoder(AutoencoderKL.from_pretrained(tiny_vae_dir), get_latent_spec("d8"))


@pytest.fixture(scope="module")
def ddp_cache(tiny_image_folder, tiny_vae_dir, tmp_path_factory):
    """The cache made by the CLI under torchrun with 2 gloo ranks."""
    out = tmp_path_factory.mktemp("ddp_cache")
    run_torchrun(["-m", "pretrain.cache_latents", "--data_path", tiny_image_folder / "train", "--cached_path", out,
                  "--vae_version", "d8", "--vae_path", tiny_vae_dir, "--input_size", "32", "--batch_size", "4",
                  "--shard_size", "12", "--num_workers", "0", "--device", "cpu"])
    return out


class CrashingCodec:
    """Delegates to a codec but dies on the n-th encoder call, like a preempted extraction."""

    def __init__(self, codec, crash_on_call):
        self.codec, self.spec, self.device = codec, codec.spec, codec.device
        self.calls, self.crash_on_call = 0, crash_on_call

    def encode_moments(self, images):
        self.calls += 1
        if self.calls == self.crash_on_call:
            raise RuntimeError("simulated preemption")
        return self.codec.encode_moments(images)


def test_interrupted_extraction_resumes_to_byte_identical_shards(tiny_image_folder, tiny_vae_dir, codec, ddp_cache,
                                                                 tmp_path):
    identity = vae_identity("d8", tiny_vae_dir)
    kwargs = dict(SETTINGS, vae_identity=identity, vae_version="d8", show_progress=False)
    # Two encoder calls per batch, 3 batches per shard: call 14 dies inside the third shard.
    with pytest.raises(RuntimeError, match="simulated preemption"):
        extract_latent_cache(tiny_image_folder / "train", tmp_path, CrashingCodec(codec, 14), **kwargs)
    assert [shard_path(tmp_path, k).is_file() for k in range(6)] == [True, True, False, False, False, False]
    with pytest.raises(UserError, match="is incomplete"):
        LatentCacheDataset(tmp_path)
    first_shard_mtime = shard_path(tmp_path, 0).stat().st_mtime_ns
    manifest = extract_latent_cache(tiny_image_folder / "train", tmp_path, codec, **kwargs)
    assert shard_path(tmp_path, 0).stat().st_mtime_ns == first_shard_mtime  # finished shards are not redone
    assert manifest["complete"] and manifest["count"] == 64 and manifest["skipped"] == 0
    # Single process after a crash == 2 DDP ranks in one go, byte for byte.
    for k in range(6):
        assert shard_path(tmp_path, k).read_bytes() == shard_path(ddp_cache, k).read_bytes()
    assert json.loads((tmp_path / "manifest.json").read_text()) == json.loads((ddp_cache / "manifest.json").read_text())


def test_cached_moments_equal_online_encoding(tiny_image_folder, codec, ddp_cache):
    folder = build_image_folder(tiny_image_folder / "train")
    transform = cache_transform(32, "center")
    indices = [0, 13, 40, 63]
    images = torch.stack([transform(folder.load(i)[0]) for i in indices])
    online_mean, online_logvar = codec.encode_moments(images)
    flip_mean, flip_logvar = codec.encode_moments(images.flip(-1))
    cache = LatentCacheDataset(ddp_cache, expect={"image_size": 32, "vae_version": "d8"})
    for row, index in enumerate(indices):
        mean, logvar = cache.moments(index, flip=0)
        torch.testing.assert_close(mean, online_mean[row], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(logvar, online_logvar[row], rtol=1e-5, atol=1e-6)
        mean, logvar = cache.moments(index, flip=1)
        torch.testing.assert_close(mean, flip_mean[row], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(logvar, flip_logvar[row], rtol=1e-5, atol=1e-6)
    assert cache.labels.tolist() == [label for _, label in folder.samples]


def test_cache_dataset_draws_per_sample_flip_and_noise(ddp_cache):
    sampled = LatentCacheDataset(ddp_cache, seed=1)
    latents, label, index = sampled[(2, 9)]
    assert latents.shape == (4, 4, 4) and index == 9
    assert torch.equal(latents, sampled[(2, 9)][0]) and not torch.equal(latents, sampled[(3, 9)][0])
    means = LatentCacheDataset(ddp_cache, use_mean=True, seed=1)
    flips = {torch.equal(means[(epoch, 9)][0], means.moments(9, 1)[0] * 0.18215) for epoch in range(12)}
    assert flips == {True, False}  # both orientations show up across epochs
    assert torch.allclose(means[(0, 9)][0], latents, atol=1.0)


def test_cache_for_other_settings_is_refused(tiny_image_folder, codec, ddp_cache, tmp_path):
    with pytest.raises(UserError, match=r"was made with image_size=32 \(needed 64\)"):
        LatentCacheDataset(ddp_cache, expect={"image_size": 64})
    with pytest.raises(UserError, match=r"vae_identity='d8:folder"):
        LatentCacheDataset(ddp_cache, expect={"vae_identity": "d8:hub:stabilityai/sd-vae-ft-ema"})
    copy = tmp_path / "cache"
    shutil.copytree(ddp_cache, copy)
    with pytest.raises(UserError, match=r"already holds a latent cache made with other settings \(.*crop="):
        extract_latent_cache(tiny_image_folder / "train", copy, codec, **dict(SETTINGS, crop="eval"))


def test_corrupt_image_is_skipped_in_the_cache(tiny_image_folder, codec, tmp_path):
    root = tmp_path / "images"
    shutil.copytree(tiny_image_folder / "val", root)  # 16 images
    victim = sorted(root.rglob("*.png"))[3]
    victim.write_bytes(b"not a png")
    manifest = extract_latent_cache(root, tmp_path / "cache", codec, **dict(SETTINGS, show_progress=False))
    assert manifest["count"] == 15 and manifest["skipped"] == 1 and manifest["skipped_files"] == [str(victim)]
    cache = LatentCacheDataset(tmp_path / "cache")
    assert len(cache) == 15 and 3 not in cache.image_index.tolist()


def test_fp16_moments_halve_the_shards_within_fp16_rounding(tiny_image_folder, codec, ddp_cache, tmp_path):
    """--moments_dtype fp16: every stored moment is the fp32 one rounded to half precision (relative error at
    most 2^-11, absolute 2^-25 below fp16's normal range), read back as float32, in shards half the size."""
    half = tmp_path / "fp16"
    manifest = extract_latent_cache(tiny_image_folder / "train", half, codec, 32, batch_size=4, shard_size=12,
                                    show_progress=False, moments_dtype="fp16")
    assert manifest["moments_dtype"] == "fp16"
    full, reduced = LatentCacheDataset(ddp_cache), LatentCacheDataset(half)
    for index in range(len(full)):
        for flip in (0, 1):
            for exact, rounded in zip(full.moments(index, flip), reduced.moments(index, flip)):
                assert rounded.dtype == torch.float32
                assert torch.equal(rounded, exact.half().float())
                assert bool(((rounded - exact).abs() <= 2.0**-11 * exact.abs() + 2.0**-25).all())
    full_bytes = sum(path.stat().st_size for path in ddp_cache.glob("shard-*.safetensors"))
    half_bytes = sum(path.stat().st_size for path in half.glob("shard-*.safetensors"))
    assert half_bytes < 0.6 * full_bytes
