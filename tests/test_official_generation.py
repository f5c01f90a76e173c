"""Generation behaviours that must match the official DiT / SiT / USP code, each stated independently."""
import torch

from generation.engine import TrainStep
from models.latent_spec import get_latent_spec
from models.vae import LatentCodec


def test_online_vae_encoding_is_fp32_under_a_bf16_run(tiny_vae_dir):
    """DiT/SiT's train.py encode with `vae.encode(x).latent_dist.sample().mul_(0.18215)` outside any autocast."""
    from diffusers import AutoencoderKL

    autoencoder = AutoencoderKL.from_pretrained(tiny_vae_dir)
    codec = LatentCodec(autoencoder, get_latent_spec("d8"))
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    noise = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    step = TrainStep(None, None, None, None, None, None, torch.device("cpu"), "bf16", codec=codec)
    got = step.latents({"x": images, "posterior_noise": noise})
    with torch.no_grad():
        posterior = autoencoder.encode(images).latent_dist
        expected = (posterior.mean + posterior.std * noise) * 0.18215
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
