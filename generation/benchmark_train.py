"""Training-step throughput of DiT/SiT: images/s (and MFU on CUDA), cached latents vs online VAE encoding.

    python -m generation.benchmark_train --model DiT-B/2 SiT-B/2 --image-size 256 --batch-size 32 \
        --vae-path /path/to/sd-vae-ft-ema --device cuda

Runs `generation.engine.TrainStep` (the trainer's own step: autocast forward, objective loss, backward,
fused AdamW, foreach EMA) on synthetic batches that already sit in host memory, so the numbers measure the
step, not the image decoding of a data loader. "cached" feeds latents; "online" feeds images that the VAE
encodes inside the step, as training without --cached-path does.
"""
import argparse
import json
import sys
import time
from copy import deepcopy
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch.utils.flop_counter import FlopCounterMode

from generation.engine import TrainStep
from generation.objectives import NoiseBundle, build_objective
from models.dit import DiT_models
from models.latent_spec import get_latent_spec
from models.sit import SiT_models
from models.vae import LatentCodec
from util.logging import peak_memory_mb
from util.precision import add_precision_arg, enable_tf32, make_grad_scaler

ALL_MODELS = {**DiT_models, **SiT_models}
# Dense bf16 tensor-core peaks (TFLOP/s) for the MFU denominator; --peak-tflops overrides.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


def get_args_parser():
    parser = argparse.ArgumentParser("DiT / SiT training-step benchmark")
    parser.add_argument("--model", nargs="+", default=["DiT-B/2", "SiT-B/2"])
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=["cached", "online"], choices=["cached", "online"])
    parser.add_argument("--vae-version", default="d8", choices=["d8", "d16"])
    parser.add_argument("--vae-path", default=None,
                        help="VAE for the online mode; 'sd-vae-layout' = randomly initialised AutoencoderKL with "
                             "sd-vae-ft-ema's architecture (same FLOPs, no download)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    add_precision_arg(parser, "--precision", default="bf16")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--model-kwargs", default="{}")
    return parser


def sd_vae_layout_codec(device) -> LatentCodec:
    """sd-vae-ft-ema's architecture (4 levels 128-256-512-512, 2 res blocks, 4 latent channels), random weights."""
    from diffusers import AutoencoderKL

    autoencoder = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                                block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4)
    return LatentCodec.from_autoencoder(autoencoder, get_latent_spec("d8")).to(device)


def synthetic_batch(batch_size: int, image_size: int, latent_shape, num_classes: int, online: bool) -> dict:
    generator = torch.Generator().manual_seed(0)
    batch = {
        "y": torch.randint(0, num_classes, (batch_size,), generator=generator),
        "u": torch.rand(batch_size, generator=generator),
        "drop": (torch.rand(batch_size, generator=generator) < 0.1).long(),
        "noise": torch.randn(batch_size, *latent_shape, generator=generator),
    }
    if online:
        batch["x"] = torch.rand(batch_size, 3, image_size, image_size, generator=generator) * 2 - 1
        batch["posterior_noise"] = torch.randn(batch_size, *latent_shape, generator=generator)
    else:
        batch["x"] = torch.randn(batch_size, *latent_shape, generator=generator)
    return batch


def train_flops(step: TrainStep, batch: dict) -> float:
    """FLOPs of the network's forward + backward for one batch (the VAE encode is not counted)."""
    device_batch = {key: value.to(step.device) for key, value in batch.items()}
    latents = step.latents(device_batch)
    bundle = NoiseBundle(device_batch["u"], device_batch["noise"], device_batch["drop"])
    with FlopCounterMode(display=False) as counter:
        step.objective.loss(step.model_fn, latents, device_batch["y"], bundle).mean().backward()
    step.optimizer.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def benchmark(args, name: str, mode: str, device: torch.device) -> dict:
    spec = get_latent_spec(args.vae_version)
    latent_size = spec.latent_size(args.image_size)
    latent_shape = (spec.channels, latent_size, latent_size)
    model = ALL_MODELS[name](input_size=latent_size, num_classes=args.num_classes, in_channels=spec.channels,
                             **json.loads(args.model_kwargs)).to(device)
    ema = deepcopy(model).requires_grad_(False)
    network = torch.compile(model) if args.compile else model
    codec = None
    if mode == "online":
        codec = (sd_vae_layout_codec(device) if args.vae_path == "sd-vae-layout"
                 else LatentCodec.load(args.vae_version, args.vae_path, device=device))
    step = TrainStep(network, model, ema, build_objective(name, args.num_classes),
                     torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0, fused=device.type == "cuda"),
                     make_grad_scaler(device, args.precision), device, args.precision, codec=codec)
    batch = synthetic_batch(args.batch_size, args.image_size, latent_shape, args.num_classes, mode == "online")
    flops = train_flops(step, batch) if device.type == "cuda" else None
    for _ in range(args.warmup):
        step(batch)
    loss = step(batch)
    loss.item()  # drain the queue before timing
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(args.steps):
        loss = step(batch)
    loss.item()
    seconds = (time.perf_counter() - start) / args.steps
    cpu_seconds = (time.process_time() - cpu_start) / args.steps
    result = {"model": name, "mode": mode, "batch": args.batch_size, "image_size": args.image_size,
              "latent": f"{latent_shape[0]}x{latent_size}x{latent_size}", "precision": args.precision,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "images_per_sec": round(args.batch_size / seconds, 2), "step_ms": round(seconds * 1e3, 1),
              "peak_mem_mb": round(peak_memory_mb(device))}
    if device.type == "cpu":
        # On a shared CPU, wall time depends on the neighbours; process CPU time does not (one thread here).
        result["images_per_cpu_sec"] = round(args.batch_size / cpu_seconds, 2)
    if flops is not None:
        peak = args.peak_tflops or next((value for key, value in PEAK_BF16_TFLOPS.items()
                                         if key in result["device"]), None)
        result["model_tflops_per_sec"] = round(flops / seconds / 1e12, 1)
        if peak:
            result["mfu"] = round(flops / seconds / (peak * 1e12), 3)
    return result


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if "online" in args.modes and args.vae_path is None:
        sys.exit("generation.benchmark_train: error: the online mode encodes with a VAE; pass --vae-path "
                 "(a diffusers AutoencoderKL folder, or sd-vae-layout) or use --modes cached.")
    device = torch.device("cuda" if args.device == "cuda" and torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        enable_tf32()
    for name in args.model:
        for mode in args.modes:
            print(json.dumps(benchmark(args, name, mode, device)), flush=True)


if __name__ == "__main__":
    main()
