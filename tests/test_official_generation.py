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


def test_training_evaluation_defaults_are_usps():
    """AMAP-ML/USP generation/DiT/train.py (and SiT/train.py): --eval-every 100000, --per-proc-batch-size 128,
    --cfg-scale 1.0, and `model_kwargs = dict(y=y, cfg_scale=args.cfg_scale)` for the FID samples."""
    from generation.eval_hooks import fid_eval_hook
    from generation.objectives import build_objective
    from generation.train import get_args_parser

    args = get_args_parser().parse_args(["--model", "DiT-S/2", "--data-path", "unused", "--cfg-scale", "1.5"])
    assert (args.eval_every, args.per_proc_batch_size) == (100_000, 128)
    assert get_args_parser().parse_args(["--model", "DiT-S/2", "--data-path", "unused"]).cfg_scale == 1.0
    args.vae_version, args.image_size, args.num_classes = "d8", 32, 4
    hook = fid_eval_hook(args, build_objective("DiT-S/2", num_classes=4), codec=None, sample_dir="unused",
                         dist_env=None)
    assert hook.guidance.scale == 1.5


def test_training_loss_draws_timesteps_through_the_sampler_hook():
    """A TimestepSampler's u maps to DiT's t = floor(u * 1000); its weights scale the per-sample losses and
    `update` sees the unweighted ones (the contract of generation/objectives.py's hook)."""
    from generation.objectives import TimestepSampler, build_objective

    class Fixed(TimestepSampler):
        def sample(self, generators):
            assert len(generators) == 3
            return torch.tensor([0.0, 0.5, 0.9999]), torch.tensor([2.0, 0.0, 1.0])

        def update(self, u, losses):
            self.seen = (u, losses)

    objective = build_objective("DiT-S/2", num_classes=4)
    objective.timestep_sampler = Fixed()
    seen_t = []

    def model_fn(x, t, y, force_drop_ids):
        seen_t.append(t)
        return torch.zeros(len(x), 8, *x.shape[2:])  # learned sigma: 2 x 4 channels

    latents, noise = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    losses = objective.training_loss(model_fn, latents, torch.tensor([0, 1, 2]), noise, torch.zeros(3).long(),
                                     seed=0, step=7, sample_ids=torch.tensor([5, 9, 11]))
    assert seen_t[0].tolist() == [0, 500, 999]
    u, unweighted = objective.timestep_sampler.seen
    assert u.tolist() == torch.tensor([0.0, 0.5, 0.9999]).tolist()
    torch.testing.assert_close(losses, unweighted * torch.tensor([2.0, 0.0, 1.0]))


def test_uniform_timesteps_depend_on_seed_step_and_sample_only():
    """The same (seed, step, sample index) gives the same u in any batch order or size; other keys differ."""
    from generation.objectives import TIMESTEP_STREAM_OFFSET, TimestepSampler
    from util.rng import sample_generator

    def draw(seed, step, ids):
        return TimestepSampler().sample([sample_generator(seed + TIMESTEP_STREAM_OFFSET, step, i) for i in ids])[0]

    both = draw(0, 3, [4, 8])
    assert draw(0, 3, [8])[0] == both[1] and draw(0, 3, [4])[0] == both[0]
    assert draw(0, 4, [4])[0] != both[0] and draw(1, 3, [4])[0] != both[0]
