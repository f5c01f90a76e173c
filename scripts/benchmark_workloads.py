"""The benchmark's workloads: what each row of `scripts/benchmark.py`'s table runs, in every mode.

Each `build_*_workload` returns a `scripts.benchmark_lib.Workload`: one runner per mode (a call doing one unit of
work: a training step, a full sampling run, one encoder batch) and the FLOPs per image. The training rows run the
project's own code: `generation.train.TrainStep` (DiT/SiT/LightningDiT/REPA) and the pretraining step of
`pretrain.engine_pretrain` (`prepare_batch` -> `masked_loss` -> `util.loop.backward_micro_batch` ->
`util.loop.optimizer_step`). The `ema` row times `util.ema.update_ema` (what TrainStep runs) against official DiT's
per-parameter loop. Networks get random weights of the real architecture, so nothing is downloaded.
"""
import tempfile
from copy import deepcopy
from pathlib import Path
from types import SimpleNamespace
from typing import List

import torch

from generation.train import TrainStep
from generation.objectives import NoiseBundle, build_objective
from generation.repa import Alignment
from generation.sampling import diffusion_sampler, transport_sampler
from generation.transport import create_transport
from models.dit import DiT_models
from models.lightningdit import LightningDiT_models
from models.latent_spec import get_latent_spec
from models.mae import create_mae
from models.repa import DinoV2Target
from models.sit import SiT_models
from models.sizes import size_kwargs
from models.vae import LatentCodec
from pretrain.engine_pretrain import masked_loss, prepare_batch
from scripts.benchmark_lib import (ModeConfig, Workload, build_adamw, count_flops, host_batch, in_mode, perturb_,
                                   prepare_network, update_ema_loop)
from util.ema import update_ema
from util.errors import UserError
from util.loop import LoopPosition, backward_micro_batch, optimizer_step
from util.precision import autocast, make_grad_scaler

# FLOPs are counted on this many images and scaled: a full-batch fp32 forward+backward at DiT-XL batch 256 needs
# ~186 GiB of saved activations, more than any GPU has, and the count is linear in the batch anyway.
FLOPS_IMAGES = 2
# LightningDiT trains on VA-VAE latents (32 channels, factor 16) with patch 1, so LightningDiT-B/1 at a given
# image size sees as many tokens as DiT-B/2 on SD-VAE latents; its released block switches and recipe are on.
LIGHTNINGDIT_BLOCKS = dict(use_swiglu=True, use_rope=True, use_rmsnorm=True)
# Tiny transformer used by tests and the quick CPU preset (a DiT/MAE override, not a paper size).
TINY_DIT = dict(hidden_size=64, depth=2, num_heads=4)
TINY_VIT = dict(embed_dim=64, depth=2, num_heads=4)  # tiny DINOv2 target of the repa workload
REPA_ENCODER_DEPTH = {"tiny": 1, "S": 4, "B": 4, "L": 8, "XL": 8}  # REPA: 8 for L/XL, 4 in its B ablations
TINY_MAE = dict(embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4)
MAE_PRESETS = {"tiny": ("vit_base_patch_vae", TINY_MAE),
               "S": ("vit_base_patch_vae", size_kwargs("S")),
               "B": ("vit_base_patch_vae", {}), "L": ("vit_large_patch_vae", {}), "XL": ("vit_xlarge_patch_vae", {})}
VAE_LAYOUTS = {  # diffusers AutoencoderKL(block_out_channels, layers_per_block) with SD's factor 8
    "sd": ((128, 256, 512, 512), 2),  # stabilityai/sd-vae-ft-ema
    "tiny": ((16, 16, 32, 32), 1),
}


def random_codec(layout: str, vae_version: str = "d8") -> LatentCodec:
    """A LatentCodec around a randomly initialised AutoencoderKL with a known layout (no download)."""
    from diffusers import AutoencoderKL

    channels, layers = VAE_LAYOUTS[layout]
    spec = get_latent_spec(vae_version)
    if vae_version != "d8":
        raise UserError("the random VAE layouts are d8 (factor 8, 4 channels); pass a kl16 file via --vae for d16.")
    autoencoder = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                                block_out_channels=channels, layers_per_block=layers, latent_channels=spec.channels,
                                norm_num_groups=min(32, channels[0]))
    return LatentCodec.from_autoencoder(autoencoder, spec)


def vavae_codec(args, device: torch.device) -> LatentCodec:
    """A random VA-VAE-layout codec (LDM ch_mult (1, 1, 2, 2, 4), 32 latent channels, attention at the lowest
    level): width 128 as the release with `--vae sd`, width 32 with `--vae tiny`; unit per-channel statistics."""
    from diffusers import AutoencoderKL

    width = 128 if args.vae == "sd" else 32
    autoencoder = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4 + ("AttnDownEncoderBlock2D",),
                                up_block_types=("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * 4,
                                block_out_channels=tuple(width * m for m in (1, 1, 2, 2, 4)), layers_per_block=2,
                                latent_channels=32, norm_num_groups=32)
    return LatentCodec.from_autoencoder(autoencoder, get_latent_spec("vavae_f16d32")).to(device)


def load_codec(args, device: torch.device) -> LatentCodec:
    if args.vae in VAE_LAYOUTS:
        return random_codec(args.vae, args.vae_version).to(device)
    return LatentCodec.load(args.vae_version, args.vae, device=device)



def generation_model_name(family: str, size: str) -> str:
    if family == "lightningdit":
        return f"LightningDiT-{'B' if size in ('tiny', 'S') else size}/1"  # LightningDiT has no S preset
    prefix = "DiT" if family in ("dit", "sample-ddpm") else "SiT"
    return f"{prefix}-{'S' if size == 'tiny' else size}/2"


def training_batches(args, codec: LatentCodec, latent_shape) -> tuple:
    """(online, cached) host batches of `--batch-size` samples for the training steps: the online one holds images
    in [-1, 1] and posterior noise; the cached one the same images encoded once by `codec` with that noise, so
    both paths train on identical latents."""
    generator = torch.Generator().manual_seed(args.seed)
    n = args.batch_size
    online = {
        "x": torch.rand(n, 3, args.image_size, args.image_size, generator=generator) * 2 - 1,
        "posterior_noise": torch.randn(n, *latent_shape, generator=generator),
        "y": torch.randint(0, args.num_classes, (n,), generator=generator),
        "u": torch.rand(n, generator=generator),
        "drop": (torch.rand(n, generator=generator) < 0.1).long(),
        "noise": torch.randn(n, *latent_shape, generator=generator),
        "index": torch.arange(n),
    }
    with torch.no_grad():
        mean, logvar = codec.encode_moments(online["x"].to(codec.device))
        latents = codec.latents_from_moments(mean, logvar, sample=True,
                                             noise=online["posterior_noise"].to(codec.device)).cpu()
    cached = {**{key: value for key, value in online.items() if key != "posterior_noise"}, "x": latents}
    return online, cached


def build_train_workload(family: str, size: str, args, modes: List[ModeConfig], device: torch.device,
                         codec: LatentCodec, perturb: float = 0.0, ddp: bool = False) -> Workload:
    """DiT (diffusion) / SiT (transport) / LightningDiT training step: TrainStep with each mode's settings.

    The cached-latent batch is the online batch encoded once by the same VAE with the same posterior noise,
    so the two paths train on identical latents.
    """
    name = generation_model_name(family, size)
    spec = codec.spec
    latent_size = spec.latent_size(args.image_size)
    latent_shape = (spec.channels, latent_size, latent_size)
    overrides = TINY_DIT if size == "tiny" else {}
    lightning = family == "lightningdit"
    if lightning:
        overrides = {**overrides, **LIGHTNINGDIT_BLOCKS}
    torch.manual_seed(args.seed)
    reference = {**DiT_models, **SiT_models, **LightningDiT_models}[name](
        input_size=latent_size, num_classes=args.num_classes, in_channels=spec.channels, **overrides)
    if perturb:
        perturb_(reference, perturb, args.seed)
    objective = build_objective(name, args.num_classes, use_lognorm=lightning, use_cosine_loss=lightning)

    n = args.batch_size
    online, cached = training_batches(args, codec, latent_shape)

    runners, steps = {}, {}
    for mode in modes:
        model = deepcopy(reference)
        network = prepare_network(model, mode, device, ddp=ddp)
        ema = deepcopy(model).requires_grad_(False).eval()
        step = TrainStep(network, model, ema, objective,
                         build_adamw(model.parameters(), 1e-4, mode.optimizer, device, weight_decay=0),
                         make_grad_scaler(device, mode.precision), device, mode.precision,
                         codec=None if mode.latent_cache else codec)
        batch = host_batch(cached if mode.latent_cache else online, mode, device)
        steps[mode.name] = step
        runners[mode.name] = in_mode(mode, lambda step=step, batch=batch: step(batch, 0))

    # Model FLOPs (forward + backward of the transformer; the VAE encode is not model work).
    baseline = steps[modes[0].name]
    k = min(FLOPS_IMAGES, n)
    device_batch = {key: value[:k].to(device) for key, value in cached.items()}
    bundle = NoiseBundle(device_batch["u"], device_batch["noise"], device_batch["drop"])
    reference_step = TrainStep(reference.to(device), reference, reference, objective, baseline.optimizer,
                               baseline.scaler, device, "fp32")
    flops = count_flops(lambda: objective.loss(reference_step.model_fn, device_batch["x"], device_batch["y"],
                                               bundle).mean().backward()) * n / k
    reference.cpu()
    vae_flops = count_flops(lambda: codec.encode_moments(online["x"][:1]))
    return Workload(f"{family}-train", f"{name}{' tiny' if size == 'tiny' else ''} {args.image_size}px "
                    f"latent {'x'.join(map(str, latent_shape))} batch {n}", n, flops / n, runners,
                    notes="FLOPs = transformer fwd+bwd; baseline also encodes with the VAE",
                    extra={"vae_encode_gflops_per_image": vae_flops / 1e9})


def build_repa_workload(size: str, args, modes: List[ModeConfig], device: torch.device, codec: LatentCodec) -> Workload:
    """SiT training step with REPA (DINOv2-B/14 target, random weights, proj-coeff 0.5), in the optimised mode:

    sit-cached   cached latents, no REPA (the reference column)
    repa-cached  cached latents + cached target features (--repa-feature-cache): projector, loss, feature copy
    sit-online   VAE encoding in the step, no REPA
    repa-online  VAE + DINOv2-B forward in the step (REPA's own setting)
    so repa-cached vs sit-cached is REPA's cost with the feature cache, repa-online vs sit-online without it.
    """
    optimised = modes[1] if len(modes) > 1 else modes[0]
    name = generation_model_name("sit", size)
    spec = codec.spec
    latent_size = spec.latent_size(args.image_size)
    latent_shape = (spec.channels, latent_size, latent_size)
    overrides = TINY_DIT if size == "tiny" else {}
    with torch.random.fork_rng(devices=[]):
        target = DinoV2Target("dinov2-vit-b", None, args.image_size,
                              model_kwargs=TINY_VIT if size == "tiny" else None).to(device)
    common = dict(input_size=latent_size, num_classes=args.num_classes, in_channels=spec.channels, **overrides)
    torch.manual_seed(args.seed)
    plain = SiT_models[name](**common)
    encoder_depth = min(REPA_ENCODER_DEPTH[size], len(plain.blocks))
    torch.manual_seed(args.seed)
    with_projector = SiT_models[name](**common, z_dims=[target.z_dim], encoder_depth=encoder_depth)
    objective = build_objective(name, args.num_classes)

    n = args.batch_size
    online, cached = training_batches(args, codec, latent_shape)
    with torch.no_grad():
        features = target(online["x"].to(device)).cpu()  # what the feature cache would hold for this batch
    variants = {"sit-cached": (plain, cached, False),
                "repa-cached": (with_projector, {**cached, "repa_features": features}, True),
                "sit-online": (plain, online, False), "repa-online": (with_projector, online, True)}

    runners, variant_modes = {}, []
    for variant, (reference, batch, repa) in variants.items():
        mode = optimised.with_(name=variant, latent_cache=variant.endswith("cached"))
        variant_modes.append(mode)
        model = deepcopy(reference)
        network = prepare_network(model, mode, device)
        ema = deepcopy(model).requires_grad_(False).eval()
        alignment = None
        if repa:
            online_targets = [target] if not mode.latent_cache else None
            alignment = Alignment(online_targets, 0.5, lambda mode=mode: autocast(device, mode.precision))
        step = TrainStep(network, model, ema, objective,
                         build_adamw(model.parameters(), 1e-4, mode.optimizer, device, weight_decay=0),
                         make_grad_scaler(device, mode.precision), device, mode.precision,
                         codec=None if mode.latent_cache else codec, alignment=alignment)
        runners[variant] = in_mode(mode, lambda step=step, batch=host_batch(batch, mode, device): step(batch, 0))

    k = min(FLOPS_IMAGES, n)  # counted on k images and scaled (see FLOPS_IMAGES)
    device_batch = {key: value[:k].to(device) for key, value in cached.items()}
    bundle = NoiseBundle(device_batch["u"], device_batch["noise"], device_batch["drop"])
    plain.to(device)
    flops = count_flops(lambda: objective.loss(plain, device_batch["x"], device_batch["y"], bundle).mean().backward())
    flops = flops * n / k
    plain.cpu()
    encoder_flops = count_flops(lambda: target(online["x"][:1].to(device)))
    return Workload("repa-train", f"{name}{' tiny' if size == 'tiny' else ''} {args.image_size}px, DINOv2-B/14 target "
                    f"({target.num_tokens} tokens x {target.z_dim}), encoder-depth {encoder_depth}, batch {n}", n,
                    flops / n, runners, notes="FLOPs = SiT fwd+bwd without REPA",
                    extra={"dinov2_gflops_per_image": encoder_flops / 1e9}, modes=variant_modes)


def build_mae_workload(size: str, args, modes: List[ModeConfig], device: torch.device, codec: LatentCodec,
                       perturb: float = 0.0, ddp: bool = False) -> Workload:
    """USP pretraining step: masked latent modeling (mask 0.75, norm_pix_loss) with AdamW(0.9, 0.95)."""
    from timm.optim import param_groups_weight_decay

    preset, overrides = MAE_PRESETS[size]
    torch.manual_seed(args.seed)
    reference = create_mae(preset, args.image_size, vae_version=args.vae_version, norm_pix_loss=True, **overrides)
    if perturb:
        perturb_(reference, perturb, args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    n = args.batch_size
    images = torch.rand(n, 3, args.image_size, args.image_size, generator=generator) * 2 - 1
    mask_noise = torch.rand(n, reference.patch_embed.num_patches, generator=generator)
    with torch.no_grad():
        latents = codec.encode(images, sample=False).cpu()  # USP encodes to the posterior mean
    online, cached = {"images": images, "mask_noise": mask_noise}, {"images": latents, "mask_noise": mask_noise}
    runners = {}
    for mode in modes:
        model = deepcopy(reference)
        network = prepare_network(model, mode, device, blocks_attr="blocks,decoder_blocks", ddp=ddp)
        groups = param_groups_weight_decay(model, 0.05)
        optimizer = build_adamw(groups, 1.5e-4, mode.optimizer, device, betas=(0.9, 0.95))
        scaler = make_grad_scaler(device, mode.precision)
        settings = SimpleNamespace(vae_precision="fp32", add_noise=False, precision=mode.precision, mask_ratio=0.75)
        mode_codec = None if mode.latent_cache else codec
        batch = host_batch(cached if mode.latent_cache else online, mode, device)

        def step(network=network, optimizer=optimizer, scaler=scaler, settings=settings, codec=mode_codec,
                 batch=batch, position=LoopPosition(epoch=0)):
            # train_one_epoch's step without gradient accumulation (accum_iter 1: every batch is a boundary)
            inputs, target, mask_noise = prepare_batch(batch, codec, settings, device)
            loss = backward_micro_batch(network, scaler, lambda: masked_loss(network, inputs, target, mask_noise,
                                                                             settings, device), 1, True)
            optimizer_step(optimizer, scaler, position)
            return loss

        runners[mode.name] = in_mode(mode, step)

    reference.to(device)
    k = min(FLOPS_IMAGES, n)
    device_latents, device_noise = latents[:k].to(device), mask_noise[:k].to(device)
    flops = count_flops(lambda: reference(device_latents, mask_ratio=0.75, noise=device_noise)[0].backward()) * n / k
    reference.cpu()
    return Workload("mae-train", f"{preset}{' tiny' if size == 'tiny' else ''} {args.image_size}px batch {n}", n,
                    flops / n, runners, notes="FLOPs = MAE fwd+bwd on 25% visible tokens")


def build_ema_workload(size: str, args, modes: List[ModeConfig], device: torch.device, codec: LatentCodec) -> Workload:
    """The EMA update that follows every DiT/SiT training step, on the DiT of that size: `util.ema.update_ema` (one
    foreach lerp, what TrainStep runs) where the mode says ema="foreach", else official DiT's per-parameter loop
    (`scripts.benchmark_lib.update_ema_loop`). One call = the update after one step of --batch-size images."""
    name = generation_model_name("dit", size)
    latent_size = codec.spec.latent_size(args.image_size)
    torch.manual_seed(args.seed)
    model = DiT_models[name](input_size=latent_size, num_classes=args.num_classes, in_channels=codec.spec.channels,
                             **(TINY_DIT if size == "tiny" else {})).to(device)
    runners = {}
    for mode in modes:
        ema = deepcopy(model).requires_grad_(False)
        update = update_ema if mode.ema == "foreach" else update_ema_loop

        def run(ema=ema, update=update):
            update(ema, model, 0.9999)
            return ema.final_layer.linear.weight
        runners[mode.name] = in_mode(mode, run)
    parameters = sum(param.numel() for param in model.parameters())
    n = args.batch_size
    # Counted by hand (FlopCounterMode counts no elementwise ops): ema += (1 - decay) * (model - ema) is 3 FLOPs
    # per parameter, the same for the official mul_ + add_(alpha=).
    return Workload("ema-update", f"{name}{' tiny' if size == 'tiny' else ''} EMA of {parameters / 1e6:.3g}M "
                    f"parameters, per step of batch {n}", n, 3 * parameters / n, runners,
                    notes="FLOPs = 3 per parameter (lerp); only the ema switch differs between modes")


def build_sampling_workload(kind: str, size: str, args, modes: List[ModeConfig], device: torch.device,
                            codec: LatentCodec) -> Workload:
    """A full sampling run (no guidance, as the FID tables): DDPM with DiT or a probability-flow ODE with SiT."""
    name = generation_model_name(kind, size)
    spec = codec.spec
    latent_size = spec.latent_size(args.image_size)
    overrides = TINY_DIT if size == "tiny" else {}
    torch.manual_seed(args.seed)
    reference = {**DiT_models, **SiT_models}[name](input_size=latent_size, num_classes=args.num_classes,
                                                   in_channels=spec.channels, **overrides).eval()
    perturb_(reference, 0.02, args.seed)  # a zero-init net would make the ODE trivial; FLOPs are the same
    if kind == "sample-ddpm":
        sample = diffusion_sampler(args.sample_steps, "ddpm")
        label = f"DDPM {args.sample_steps} steps"
    else:
        sample = transport_sampler(create_transport(), "ODE", args.sample_steps, sampling_method=args.ode_method)
        label = f"ODE {args.ode_method} {args.sample_steps} steps"
    generator = torch.Generator().manual_seed(args.seed)
    n = args.sample_batch_size
    z = torch.randn(n, spec.channels, latent_size, latent_size, generator=generator)
    y = torch.randint(0, args.num_classes, (n,), generator=generator)

    def make_runner(network, mode, count=n):
        def model_fn(x, t, **kwargs):
            with autocast(device, mode.precision):
                return network(x, t, **kwargs).float()

        @torch.no_grad()
        def run():
            return sample(model_fn, z[:count].to(device), dict(y=y[:count].to(device)), None)
        return run

    runners = {}
    for mode in modes:
        network = prepare_network(deepcopy(reference), mode, device)
        runners[mode.name] = in_mode(mode, make_runner(network, mode))
    k = min(FLOPS_IMAGES, n)
    flops = count_flops(make_runner(reference.to(device), ModeConfig(), k)) * n / k
    reference.cpu()
    return Workload(kind, f"{name}{' tiny' if size == 'tiny' else ''} {args.image_size}px {label} batch {n}", n,
                    flops / n, runners, notes="FLOPs = all network evaluations of the run")


def build_vae_workload(args, modes: List[ModeConfig], device: torch.device, codec: LatentCodec) -> Workload:
    """VAE encoder forward (what the latent cache does once instead of every epoch)."""
    generator = torch.Generator().manual_seed(args.seed)
    n = args.sample_batch_size
    images = torch.rand(n, 3, args.image_size, args.image_size, generator=generator) * 2 - 1
    # channels_last vs NCHW is measured, not assumed: GroupNorm needs NCHW, so on CUDA every GroupNorm of a
    # channels_last VAE may copy its input twice. The optimised mode's other layout is an extra column.
    extra_modes = [mode.with_(name=f"{mode.name}-{'nchw' if mode.channels_last else 'nhwc'}",
                              channels_last=not mode.channels_last) for mode in modes if mode.name == "optimised"]
    runners = {}
    for mode in modes + extra_modes:
        autoencoder = deepcopy(codec.autoencoder)
        memory_format = torch.channels_last if mode.channels_last else torch.contiguous_format
        autoencoder.to(device, memory_format=memory_format)
        batch = host_batch({"x": images}, mode, device)["x"]

        @torch.no_grad()
        def run(autoencoder=autoencoder, mode=mode, batch=batch, memory_format=memory_format):
            x = batch.to(device, non_blocking=True).contiguous(memory_format=memory_format)
            with autocast(device, mode.precision):
                return autoencoder.encode(x).latent_dist.mean

        runners[mode.name] = in_mode(mode, run)
    with torch.no_grad():
        flops = count_flops(lambda: codec.autoencoder.encode(images[:1].to(device)))
    return Workload("vae-encode", f"{args.vae} VAE {args.image_size}px batch {n}", n, flops, runners,
                    extra_modes=extra_modes)


def build_inception_workload(args, modes: List[ModeConfig], device: torch.device) -> Workload:
    """ADM's Inception features (pool, spatial, logits) of uint8 images; always fp32 (FID parity)."""
    from generation.inception import InceptionFeatureExtractor, save_random_inception_weights

    weights = args.inception_weights
    tmp = None
    if weights is None:
        tmp = tempfile.TemporaryDirectory()
        weights = Path(tmp.name) / "inception-random.pth"
        save_random_inception_weights(weights, seed=args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    n = args.sample_batch_size
    images = torch.randint(0, 256, (n, args.image_size, args.image_size, 3), dtype=torch.uint8, generator=generator)
    runners = {}
    extractor = None
    for mode in modes:
        extractor = InceptionFeatureExtractor(weights, device)
        if mode.channels_last:
            extractor.network.to(memory_format=torch.channels_last)
        runners[mode.name] = in_mode(mode, lambda extractor=extractor: extractor.features(images)[0])
    flops = count_flops(lambda: extractor.features(images[:1]))
    if tmp is not None:
        tmp.cleanup()
    return Workload("inception", f"FID Inception-v3 {args.image_size}px -> 299 batch {n}", n, flops, runners,
                    notes="fp32 by design (ADM parity); optimised = channels_last only")

