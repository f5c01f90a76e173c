"""Per-channel latent statistics: streaming accumulators against torch's mean/std, the cache-driven
computation against the official algorithm (stack the chosen latents, mean/std over N, h, w), written
in LightningDiT's file layout and read back by the codec's ChannelNorm."""
import pytest
import torch
from diffusers import AutoencoderKL

from models.latent_norm import ChannelNorm
from models.latent_spec import get_latent_spec
from models.vae import LatentCodec
from pretrain.cache_latents import extract_latent_cache
from util.latent_cache import LatentCacheDataset
from util.latent_stats import RunningChannelStats, chosen_indices, compute_latent_stats, save_latent_stats
from util.rng import sample_generator


def test_streamed_stats_equal_torch_mean_and_unbiased_std():
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, 3, 2, 2, generator=gen) * torch.tensor([1.0, 5.0, 0.1]).view(1, 3, 1, 1) + 7
               for n in (1, 4, 2)]
    stats = RunningChannelStats(3)
    for batch in batches:
        stats.update(batch)
    mean, std = stats.mean_std()
    everything = torch.cat(batches)
    torch.testing.assert_close(mean, everything.mean(dim=[0, 2, 3], keepdim=True))
    torch.testing.assert_close(std, everything.std(dim=[0, 2, 3], keepdim=True))


def test_chosen_indices_are_a_seeded_subset():
    assert chosen_indices(5, None, 0) == [0, 1, 2, 3, 4] and chosen_indices(5, 10, 0) == [0, 1, 2, 3, 4]
    chosen = chosen_indices(100, 10, seed=3)
    assert len(set(chosen)) == 10 and chosen == chosen_indices(100, 10, seed=3) != chosen_indices(100, 10, seed=4)


@pytest.fixture(scope="module")
def tiny_cache(tiny_image_folder, tiny_vae_dir, tmp_path_factory):
    codec = LatentCodec.from_autoencoder(AutoencoderKL.from_pretrained(tiny_vae_dir), get_latent_spec("d8"))
    out = tmp_path_factory.mktemp("stats_cache")
    extract_latent_cache(tiny_image_folder / "train", out, codec, 32, batch_size=8, shard_size=16,
                         vae_version="d8", show_progress=False)
    return out


def test_cache_stats_follow_the_official_algorithm(tiny_cache):
    dataset = LatentCacheDataset(tiny_cache)
    chosen = chosen_indices(len(dataset), 20, seed=1)
    latents = []
    for index in chosen:  # official: the stored (un-flipped) posterior sample of each chosen image
        mean, logvar = dataset.moments(index, 0)
        latents.append(mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=sample_generator(1, 0, index)))
    latents = torch.stack(latents)
    mean, std = compute_latent_stats(dataset, max_samples=20, seed=1, show_progress=False)
    torch.testing.assert_close(mean, latents.mean(dim=[0, 2, 3], keepdim=True))
    torch.testing.assert_close(std, latents.std(dim=[0, 2, 3], keepdim=True))
    norm = ChannelNorm.load(save_latent_stats(tiny_cache / "stats" / "latents_stats.pt", mean, std))
    assert norm.mean.shape == (1, 4, 1, 1) and torch.equal(norm.std, std)
    normalised = norm.normalize(latents)
    torch.testing.assert_close(normalised.mean(dim=[0, 2, 3]), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(normalised.std(dim=[0, 2, 3]), torch.ones(4))


def test_fixed_posterior_sample_is_the_same_every_epoch(tiny_cache):
    fresh = LatentCacheDataset(tiny_cache, seed=3, random_flip=False)
    fixed = LatentCacheDataset(tiny_cache, seed=3, random_flip=False, fixed_posterior=True)
    assert not torch.equal(fresh[(0, 5)][0], fresh[(1, 5)][0])  # a new posterior sample each epoch
    assert torch.equal(fixed[(0, 5)][0], fixed[(7, 5)][0])  # LightningDiT: one stored sample per image
    mean, logvar = fixed.moments(5, 0)
    assert not torch.equal(fixed[(0, 5)][0], mean * fixed.scale)  # a sample, not the mean
