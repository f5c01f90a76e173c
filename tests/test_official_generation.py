"""Generation behaviours that must match the official DiT / SiT / USP code, each stated independently."""
import torch

from generation.train import TrainStep
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


def test_training_fid_hook_samples_sit_with_the_sde_in_fp32():
    """USP's SiT train.py: `sample(..., mode='SDE')` with SiT's SDE defaults, no autocast, cfg 1.0."""
    from types import SimpleNamespace

    from generation.eval_hooks import fid_eval_hook
    from generation.objectives import build_objective

    args = SimpleNamespace(vae_version="d8", image_size=32, num_fid_samples=4, per_proc_batch_size=2,
                           num_sampling_steps=5, num_classes=4, global_seed=0, precision="bf16")
    objective = build_objective("SiT-S/2", num_classes=4)
    hook = fid_eval_hook(args, objective, codec=None, sample_dir="unused", dist_env=None)
    assert hook.precision == "fp32" and hook.mode == "SDE" and hook.guidance.scale == 1.0
    _, stochastic = hook._sample_fn(None)
    assert stochastic  # the SDE draws noise every step (the ODE would not)
