"""Throughput benchmark: the plain baseline vs the optimised path, side by side in one process.

    python scripts/benchmark.py --preset cpu-quick --json bench_cpu.json          # a few minutes, 1 CPU thread
    python scripts/benchmark.py --preset gpu --json bench_gpu.json                 # B and XL sizes on CUDA
    python scripts/benchmark.py --workloads dit --sizes XL --image-size 256 --batch-size 256 --device cuda

Workloads: MAE (USP) pretraining step, DiT and SiT training steps (`generation.engine.TrainStep`, the
trainer's own step), DDPM sampling (DiT), ODE sampling (SiT), VAE encoding, Inception feature extraction.
For each it reports images/s, FLOPs per image (FlopCounterMode, MAC = 2 FLOPs), achieved TFLOP/s, MFU
against a dense matmul measured in the same run (bf16 on CUDA, fp32 on CPU), and optimised/baseline.

Modes (see scripts.benchmark_lib.ModeConfig): "baseline" = fp32, eager, explicit-math attention, one-parameter-
at-a-time AdamW, official DiT's per-parameter EMA loop, VAE encoding inside the step (online), NCHW convs.
"optimised" = bf16 autocast (CUDA), TF32, SDPA, fused AdamW, foreach EMA, cached latents, channels_last
VAE/Inception, pinned host batches [+ --compile, --grad-ckpt, DDP static graph]. On CPU bf16 only helps
where the CPU has bf16 matrix units, so `--opt-precision auto` keeps "optimised" in fp32 there and adds an
"optimised-bf16" column that measures it. Modes are interleaved (A B A B ...) so a busy host slows each alike.

Networks are built with random weights (same shapes and FLOPs as the real ones), so nothing is downloaded:
the VAE is SD-VAE's architecture (`--vae sd`) or a tiny one (`--vae tiny`), or a local folder via --vae.
"""
import argparse
import json
import os
import sys
import tempfile
from copy import deepcopy
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn as nn

from generation.engine import TrainStep
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
from pretrain.engine_pretrain import prepare_batch
from scripts.benchmark_lib import (ModeConfig, build_adamw, count_flops, enable_gradient_checkpointing, host_load,
                            interleaved_timings, measure_matmul_peak, set_attention,
                            update_ema_loop)
from util.ema import update_ema
from util.errors import UserError
from util.precision import autocast, make_grad_scaler, tf32_enabled

# FLOPs are counted on this many images and scaled: a full-batch fp32 forward+backward at DiT-XL batch 256 needs
# ~186 GiB of saved activations, more than any GPU has, and the count is linear in the batch anyway.
FLOPS_IMAGES = 2
WORKLOADS = ("mae", "dit", "sit", "lightningdit", "repa", "sample-ddpm", "sample-ode", "vae", "inception")
# LightningDiT trains on VA-VAE latents (32 channels, factor 16) with patch 1, so LightningDiT-B/1 at a given
# image size sees as many tokens as DiT-B/2 on SD-VAE latents; its released block switches and recipe are on.
LIGHTNINGDIT_BLOCKS = dict(use_swiglu=True, use_rope=True, use_rmsnorm=True)
SIZES = ("tiny", "S", "B", "L", "XL")
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
PRESETS = {
    # 2 CPU cores, one thread per process (the machine is shared): finishes in a few minutes. The tiny VAE keeps
    # the online baseline affordable; `--vae sd` measures SD-VAE's real encoder cost (one 64 px image ~ 1 s).
    "cpu-quick": dict(device="cpu", workloads=list(WORKLOADS), sizes=["tiny", "S"], image_size=64, batch_size=8,
                      sample_batch_size=4, sample_steps=10, vae="tiny", repeats=3, iters=1, warmup=1, threads=1),
    # One GPU: the B and XL sizes at 256 px, the official per-GPU batch 32 for the training steps (the fp32 baseline
    # fits there; at batch 256 it needs ~186 GiB: measure 256 with `--batch-size 256 --modes optimised`).
    "gpu": dict(device="cuda", workloads=list(WORKLOADS), sizes=["B", "XL"], image_size=256, batch_size=32,
                sample_batch_size=64, sample_steps=50, vae="sd", repeats=5, iters=5, warmup=3),
    # scripts/gpu_check.py's short run (about a minute per call): DiT-XL/2 and SiT-XL/2 training and the VAE encode
    # (channels_last vs NCHW); it adds --batch-size, --compile and --modes per call.
    "gpu-check": dict(device="cuda", workloads=["dit", "sit", "vae"], sizes=["XL"], image_size=256, batch_size=32,
                      sample_batch_size=32, vae="sd", repeats=3, iters=3, warmup=2),
}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("USP throughput benchmark: baseline vs optimised")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="a set of defaults (explicit flags still win)")
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=["dit"])
    parser.add_argument("--sizes", nargs="+", choices=SIZES, default=["tiny"],
                        help="transformer sizes for mae/dit/sit/sampling (tiny = width 64, depth 2)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32, help="per-step batch of the training workloads")
    parser.add_argument("--sample-batch-size", type=int, default=32, help="batch of sampling / VAE / Inception")
    parser.add_argument("--sample-steps", type=int, default=50, help="DDPM steps / ODE steps of the samplers")
    parser.add_argument("--ode-method", default="euler", help="torchdiffeq method of sample-ode (fixed-step: euler, "
                                                              "heun3, rk4; dopri5 is adaptive)")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--vae", default="sd", help="sd | tiny (random weights, that architecture) | a diffusers folder")
    parser.add_argument("--vae-version", default="d8", choices=["d8", "d16"])
    parser.add_argument("--inception-weights", default=None, help="FID Inception weights (default: random, same net)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds per mode")
    parser.add_argument("--iters", type=int, default=3, help="calls per timing round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--peak-size", type=int, default=None, help="matrix side of the peak measurement")
    parser.add_argument("--json", default=None, help="write the results to this JSON file (after every workload)")
    parser.add_argument("--modes", nargs="+", default=None, choices=["baseline", "optimised", "optimised-bf16"],
                        help="measure only these modes (e.g. optimised alone at a batch the fp32 baseline cannot fit)")
    parser.add_argument("--seed", type=int, default=0)
    # The optimised mode; every optimisation can be switched off or changed.
    parser.add_argument("--opt-precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                        help="auto: bf16 on CUDA; on CPU fp32 plus a measured optimised-bf16 column")
    parser.add_argument("--opt-attention", default="sdpa", choices=["sdpa", "math"])
    parser.add_argument("--opt-optimizer", default="fused", choices=["fused", "foreach", "loop"])
    parser.add_argument("--opt-ema", default="foreach", choices=["foreach", "loop"])
    parser.add_argument("--no-tf32", action="store_true")
    parser.add_argument("--no-latent-cache", action="store_true")
    parser.add_argument("--no-channels-last", action="store_true")
    parser.add_argument("--no-pin-memory", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the optimised network")
    parser.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing of the optimised blocks")
    parser.add_argument("--ddp", action="store_true",
                        help="wrap training steps in DDP (under torchrun: all ranks; else a 1-process group); the "
                             "optimised mode uses static_graph + gradient_as_bucket_view")
    parser.add_argument("--no-static-graph", action="store_true")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = get_args_parser()
    preset = parser.parse_known_args(argv)[0].preset
    if preset is not None:
        parser.set_defaults(**PRESETS[preset])
    args = parser.parse_args(argv)
    for flag in ("batch_size", "sample_batch_size", "sample_steps", "repeats", "iters", "image_size"):
        if getattr(args, flag) <= 0:
            parser.error(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}.")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}.")
    spec = get_latent_spec(args.vae_version)
    try:
        spec.latent_size(args.image_size)
    except UserError as error:
        parser.error(str(error))
    if (args.image_size // spec.factor) % 2:
        parser.error(f"--image-size {args.image_size} gives an odd latent side; the /2 models need a multiple of "
                     f"{2 * spec.factor}.")
    if args.vae not in VAE_LAYOUTS and not Path(args.vae).exists():
        parser.error(f"--vae {args.vae} is neither sd, tiny nor an existing diffusers folder; pass one of those.")
    if args.inception_weights is not None and not Path(args.inception_weights).is_file():
        parser.error(f"--inception-weights {args.inception_weights} does not exist; pass the FID Inception file "
                     f"or leave it out for random weights.")
    return args


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        print("benchmark: CUDA is not available, measuring on the CPU instead.", file=sys.stderr)
        return torch.device("cpu")
    return torch.device(requested)


def build_modes(args, device: torch.device, cpu_bf16: bool = True) -> List[ModeConfig]:
    """The baseline, the optimised mode, and on CPU with --opt-precision auto an optimised-bf16 column
    (only when `cpu_bf16`: `run` sets it from a measurement of bf16 vs fp32 matmuls on this CPU)."""
    cuda = device.type == "cuda"
    precision = ("bf16" if cuda else "fp32") if args.opt_precision == "auto" else args.opt_precision
    optimised = ModeConfig(
        name="optimised", precision=precision, tf32=cuda and not args.no_tf32, attention=args.opt_attention,
        optimizer=args.opt_optimizer, ema=args.opt_ema, latent_cache=not args.no_latent_cache,
        channels_last=not args.no_channels_last, compile=args.compile, grad_ckpt=args.grad_ckpt,
        static_graph=args.ddp and not args.no_static_graph, pin_memory=cuda and not args.no_pin_memory)
    modes = [ModeConfig(), optimised]
    if args.opt_precision == "auto" and not cuda and cpu_bf16:
        modes.append(optimised.with_(name="optimised-bf16", precision="bf16"))
    if args.modes:
        modes = [mode for mode in modes if mode.name in args.modes]
    if not modes:
        raise UserError(f"--modes {' '.join(args.modes)} selects no mode on this device; use baseline and/or optimised.")
    return modes


# ----------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------

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


def perturb_(model: nn.Module, std: float, seed: int) -> None:
    """Adds N(0, std) to every trainable weight, so zero-initialised layers (adaLN-Zero) compute something.

    Used by the equivalence test: a fresh DiT outputs zeros, which every precision reproduces exactly.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * std)


def prepare_network(model: nn.Module, mode: ModeConfig, device: torch.device, blocks_attr: str = "blocks",
                    ddp: bool = False):
    """Moves `model` to `device` with the mode's attention / checkpointing / DDP / compile. Returns the
    module that runs forward (possibly wrapped)."""
    model.to(device)
    set_attention(model, mode.attention)
    if mode.grad_ckpt:
        for attr in blocks_attr.split(","):
            enable_gradient_checkpointing(getattr(model, attr))
    network = model
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        network = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                      static_graph=mode.static_graph, gradient_as_bucket_view=mode.static_graph)
    if mode.compile:
        network = torch.compile(network)
    return network


def host_batch(batch: Dict[str, torch.Tensor], mode: ModeConfig, device: torch.device) -> Dict[str, torch.Tensor]:
    """The batch as a data loader would hand it over: in host memory, page-locked if the mode pins."""
    if mode.pin_memory and device.type == "cuda":
        return {key: value.pin_memory() for key, value in batch.items()}
    return batch


def in_mode(mode: ModeConfig, fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """`fn` run with the mode's global switches (TF32) set, so interleaved modes do not leak into each other."""
    def run():
        with tf32_enabled(mode.tf32):
            return fn()
    return run


@dataclass
class Workload:
    """One row group of the table: what runs, how many images a call handles, and its FLOPs per image.

    runners: mode name -> a call doing one unit of work (a training step, a full sampling run, one
    encoder batch) that returns a device tensor (the step's loss, the samples, the features).
    """

    name: str
    config: str
    images_per_call: int
    flops_per_image: Optional[float]
    runners: Dict[str, Callable[[], torch.Tensor]]
    notes: str = ""
    extra_modes: List[ModeConfig] = field(default_factory=list)  # this workload's own extra columns
    extra: dict = field(default_factory=dict)
    modes: Optional[List[ModeConfig]] = None  # a workload's own columns (repa: its four variants); None = the modes


# ----------------------------------------------------------------------------------------------
# Workloads
# ----------------------------------------------------------------------------------------------

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
                         codec=None if mode.latent_cache else codec,
                         ema_update=update_ema if mode.ema == "foreach" else update_ema_loop)
        batch = host_batch(cached if mode.latent_cache else online, mode, device)
        steps[mode.name] = step
        runners[mode.name] = in_mode(mode, lambda step=step, batch=batch: step(batch))

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
                         codec=None if mode.latent_cache else codec, alignment=alignment,
                         ema_update=update_ema if mode.ema == "foreach" else update_ema_loop)
        runners[variant] = in_mode(mode, lambda step=step, batch=host_batch(batch, mode, device): step(batch))

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
    settings = SimpleNamespace(vae_precision="fp32", add_noise=False)

    runners = {}
    for mode in modes:
        model = deepcopy(reference)
        network = prepare_network(model, mode, device, blocks_attr="blocks,decoder_blocks", ddp=ddp)
        groups = param_groups_weight_decay(model, 0.05)
        optimizer = build_adamw(groups, 1.5e-4, mode.optimizer, device, betas=(0.9, 0.95))
        scaler = make_grad_scaler(device, mode.precision)
        mode_codec = None if mode.latent_cache else codec
        batch = host_batch(cached if mode.latent_cache else online, mode, device)

        def step(network=network, optimizer=optimizer, scaler=scaler, mode=mode, codec=mode_codec, batch=batch):
            inputs, target, noise = prepare_batch(batch, codec, settings, device)
            with autocast(device, mode.precision):
                loss, _, _ = network(inputs, mask_ratio=0.75, target=target, noise=noise)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            return loss.detach()

        runners[mode.name] = in_mode(mode, step)

    reference.to(device)
    k = min(FLOPS_IMAGES, n)
    device_latents, device_noise = latents[:k].to(device), mask_noise[:k].to(device)
    flops = count_flops(lambda: reference(device_latents, mask_ratio=0.75, noise=device_noise)[0].backward()) * n / k
    reference.cpu()
    return Workload("mae-train", f"{preset}{' tiny' if size == 'tiny' else ''} {args.image_size}px batch {n}", n,
                    flops / n, runners, notes="FLOPs = MAE fwd+bwd on 25% visible tokens")


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


def build_workloads(args, modes: List[ModeConfig], device: torch.device, codec: LatentCodec, ddp: bool = False,
                    perturb: float = 0.0):
    """Yields (label, build) for the workloads named by --workloads x --sizes (VAE and Inception have no
    size); `build()` makes the Workload, so a caller can catch an out-of-memory error of one of them."""
    for workload in args.workloads:
        if workload == "vae":
            yield workload, lambda: build_vae_workload(args, modes, device, codec)
        elif workload == "inception":
            yield workload, lambda: build_inception_workload(args, modes, device)
        else:
            for size in args.sizes:
                if workload in ("dit", "sit"):
                    build = lambda w=workload, s=size: build_train_workload(w, s, args, modes, device, codec, perturb,
                                                                            ddp)
                elif workload == "lightningdit":
                    build = lambda s=size: build_train_workload("lightningdit", s, args, modes, device,
                                                                vavae_codec(args, device), perturb, ddp)
                elif workload == "repa":
                    build = lambda s=size: build_repa_workload(s, args, modes, device, codec)
                elif workload == "mae":
                    build = lambda s=size: build_mae_workload(s, args, modes, device, codec, perturb, ddp)
                else:
                    build = lambda w=workload, s=size: build_sampling_workload(w, s, args, modes, device, codec)
                yield f"{workload} {size} batch {args.batch_size}", build


# ----------------------------------------------------------------------------------------------
# Measuring and reporting
# ----------------------------------------------------------------------------------------------

def measure(workload: Workload, modes: List[ModeConfig], args, device: torch.device, peak_tflops: float) -> List[dict]:
    modes = workload.modes or modes
    timings = interleaved_timings(workload.runners, device, repeats=args.repeats, iters=args.iters,
                                  warmup=args.warmup)
    baseline = timings[modes[0].name]
    rows = []
    for mode in modes + workload.extra_modes:
        timing = timings[mode.name]
        seconds = timing.median_wall
        row = {"workload": workload.name, "config": workload.config, "mode": mode.name, "settings": mode.describe(),
               "images_per_sec": workload.images_per_call / seconds,
               "seconds_per_call": seconds, "wall_seconds": timing.wall,
               "ratio": baseline.median_wall / seconds,
               "gflops_per_image": workload.flops_per_image / 1e9 if workload.flops_per_image else None}
        if device.type == "cpu":
            row["images_per_cpu_sec"] = workload.images_per_call / timing.median_cpu
            row["ratio_cpu_time"] = baseline.median_cpu / timing.median_cpu
        if workload.flops_per_image:
            achieved = workload.flops_per_image * row["images_per_sec"] / 1e12
            row["tflops"] = achieved
            row["mfu"] = achieved / peak_tflops
        if device.type == "cuda":
            row.update(mode_peak_memory(workload.runners[mode.name], device))
        row.update(workload.extra)
        rows.append(row)
    return rows


def mode_peak_memory(runner: Callable[[], torch.Tensor], device: torch.device) -> dict:
    """Peak CUDA memory of one more call of `runner`, the peak counter reset just before it.

    `peak_mem_mb` includes whatever else is resident (the other modes' weights and optimizer states, which
    the benchmark keeps on the device to interleave them); `call_peak_extra_mb` is the part this call adds
    (activations, gradients, temporaries).
    """
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    runner()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return {"peak_mem_mb": peak / 2**20, "call_peak_extra_mb": (peak - before) / 2**20}


def out_of_memory_errors() -> tuple:
    """The exception types a CUDA (or other accelerator) allocation failure raises on this torch."""
    found = [getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None)]
    return tuple({error for error in found if error is not None})


def write_json(path, result: dict) -> None:
    """Rewrites the JSON summary (tmp file + rename), after every workload: a crash keeps the rows so far."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str))
    os.replace(tmp, path)


def format_table(rows: List[dict]) -> str:
    header = f"{'workload':<12} {'mode':<15} {'img/s':>9} {'GFLOP/img':>10} {'TFLOP/s':>8} {'MFU':>6} {'ratio':>6}"
    cpu = any("ratio_cpu_time" in row for row in rows)
    if cpu:
        header += f" {'ratio(cpu-t)':>12}"
    lines, last = [], None
    for row in rows:
        if "error" in row:
            lines.append(f"# {row['workload']}: {row['error']}")
            continue
        if (row["workload"], row["config"]) != last:
            last = (row["workload"], row["config"])
            lines.append(f"# {row['workload']}: {row['config']}")
            lines.append(header)
        gflops = f"{row['gflops_per_image']:.3g}" if row["gflops_per_image"] else "-"
        tflops = f"{row['tflops']:.3g}" if "tflops" in row else "-"
        mfu = f"{100 * row['mfu']:.1f}%" if "mfu" in row else "-"
        line = (f"{row['workload']:<12} {row['mode']:<15} {row['images_per_sec']:>9.2f} {gflops:>10} {tflops:>8} "
                f"{mfu:>6} {row['ratio']:>5.2f}x")
        if cpu:
            line += f" {row.get('ratio_cpu_time', float('nan')):>11.2f}x"
        lines.append(line)
    return "\n".join(lines)


def setup_process_group(args, device: torch.device) -> bool:
    """DDP needs a process group: torchrun's, or a single-process one on localhost for a 1-device measurement."""
    if not args.ddp:
        return False
    import socket

    import torch.distributed as dist

    from util.distributed import init_distributed

    if "WORLD_SIZE" not in os.environ:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="1", RANK="0", LOCAL_RANK="0")
    init_distributed(device.type)
    return dist.is_initialized()


def run(args) -> dict:
    """Builds and measures every selected workload; returns {"device", "peak", "rows", ...}."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if device.type == "cuda" and device.index is None:
        # Under torchrun each rank drives GPU LOCAL_RANK; current_device() is still 0 before anything set it.
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
        torch.cuda.set_device(device)
    ddp = setup_process_group(args, device)
    peak = measure_matmul_peak(device, size=args.peak_size)
    cpu_bf16 = True
    if device.type == "cpu" and args.opt_precision == "auto":
        # bf16 autocast only pays on CPUs with bf16 matrix units (AVX512-BF16 / AMX); elsewhere it is emulated.
        bf16_peak = measure_matmul_peak(device, dtype=torch.bfloat16, size=args.peak_size)
        cpu_bf16 = bf16_peak["tflops"] > peak["tflops"]
        print(f"cpu bf16 matmul {bf16_peak['tflops']:.3g} vs fp32 {peak['tflops']:.3g} TFLOP/s: "
              f"{'measuring an optimised-bf16 column' if cpu_bf16 else 'bf16 autocast would slow this CPU down, skipped (force it with --opt-precision bf16)'}",
              flush=True)
    modes = build_modes(args, device, cpu_bf16)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device: {device_name}; measured matmul peak {peak['tflops']:.3g} TFLOP/s ({peak['dtype']}, "
          f"{peak['size']}^3); load average {host_load()}", flush=True)
    for mode in modes:
        print(f"mode {mode.name}: {mode.describe()}", flush=True)
    codec = load_codec(args, device)
    rows = []
    result = {"device": device_name, "torch": torch.__version__, "peak": peak, "load_average": host_load(),
              "modes": [asdict(mode) for mode in modes], "args": vars(args), "rows": rows}
    for label, build in build_workloads(args, modes, device, codec, ddp=ddp):
        # On a shared host the neighbours' load moves the peak too: re-measure it around every workload and
        # keep the best, which is what the hardware can do.
        peak = max(peak, measure_matmul_peak(device, size=args.peak_size), key=lambda value: value["tflops"])
        result["peak"] = peak
        workload = None
        try:
            workload = build()
            workload_rows = measure(workload, modes, args, device, peak["tflops"])
        except out_of_memory_errors() as error:
            workload_rows = [{"workload": label, "error": f"out of memory ({str(error).splitlines()[0][:160]})"}]
        del workload
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows.extend(workload_rows)
        print(format_table(workload_rows), flush=True)
        if args.json:
            write_json(args.json, result)
    peak = max(peak, measure_matmul_peak(device, size=args.peak_size), key=lambda value: value["tflops"])
    result.update(peak=peak, load_average=host_load())
    for row in rows:
        if "tflops" in row:
            row["mfu"] = row["tflops"] / peak["tflops"]
    return result


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = run(args)
    print(f"\nMFU against the best matmul peak seen in this run: {result['peak']['tflops']:.3g} TFLOP/s "
          f"({result['peak']['dtype']}) on {result['device']}")
    print(format_table(result["rows"]))
    print(f"load average at the end: {host_load()}")
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
