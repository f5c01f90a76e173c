"""Training throughput of the project's own steps on one GPU: images/s, MFU, peak memory, one row per call.

    python scripts/benchmark.py --workload dit --size XL --config recipe --json row.json
    python scripts/benchmark.py --workload sit --size XL --config bf16-compile

Workloads run the real training code with random weights of the real architecture (nothing is downloaded):
mae is pretrain/engine_pretrain.py's step (prepare_batch -> masked_loss -> backward -> AdamW); dit, sit,
lightningdit and repa (SiT + REPA, DINOv2-B/14 target) are generation/train.py's TrainStep with its objective.
Configs: `recipe` is what the recipe runs (DiT/SiT/REPA: fp32 with TF32; LightningDiT: bf16; USP pretraining:
fp16 with an fp16 VAE), always with SDPA attention and the VAE encoding inside the step (online); `bf16` is the
same with bf16 autocast; `bf16-compile` adds torch.compile. MFU is against the datasheet dense peak of the
detected GPU (tf32: half of bf16), with the matmul peak measured in this process beside it.
"""
import argparse
import json
import statistics
import sys
import time
from copy import deepcopy
from pathlib import Path
from types import SimpleNamespace

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch.utils.flop_counter import FlopCounterMode

from util.cli import finish_parser

# Dense bf16 TFLOP/s from the vendors' datasheets (without sparsity); tf32 is half of it, fp16 equals it.
DATASHEET_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))
# Published training throughput, images/s per GPU (end to end, 256 px).
ANCHORS = {"dit": "DiT-XL/2: official DiT ~26 img/s/A100, fast-DiT ~107 img/s/A100",
           "sit": "SiT-XL/2 costs as DiT-XL/2: official ~26 img/s/A100, fast-DiT ~107 img/s/A100",
           "repa": "SiT-XL/2 without REPA: ~26 (official) / ~107 (fast-DiT) img/s/A100",
           "lightningdit": "LightningDiT-XL/1: ~285 img/s/H800"}
RECIPE_PRECISION = {"mae": "fp16", "dit": "fp32", "sit": "fp32", "repa": "fp32", "lightningdit": "bf16"}
RECIPE_BATCH = {"mae": 64, "dit": 32, "sit": 32, "repa": 32, "lightningdit": 32}  # per GPU
MAE_PRESETS = {"B": "vit_base_patch_vae", "L": "vit_large_patch_vae", "XL": "vit_xlarge_patch_vae"}
TINY_DIT = dict(hidden_size=32, depth=2, num_heads=2)
TINY_MAE = dict(embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
TINY_VIT = dict(embed_dim=32, depth=1, num_heads=2)
VAE_LAYOUTS = {"sd": ((128, 256, 512, 512), 2, 32), "tiny": ((8, 8, 16, 16), 1, 4)}  # channels, layers, groups
FLOPS_IMAGES = 2  # FLOPs are counted on 2 images and scaled (the count is linear in the batch)


def datasheet_peak(gpu_name: str, precision: str, tf32: bool = True):
    """(TFLOP/s, label) of the datasheet dense peak for `precision` on `gpu_name`; (None, why) if not known."""
    if precision == "fp32" and not tf32:
        return None, "fp32 without TF32 has no tensor-core peak"
    for key, bf16 in DATASHEET_BF16_TFLOPS:
        if key in gpu_name and "NVL" not in gpu_name:
            return (bf16 / 2, f"{key} tf32 datasheet") if precision == "fp32" else (bf16, f"{key} {precision} datasheet")
    return None, f"unknown GPU ({gpu_name})"


def mfu(flops_per_image: float, images_per_sec: float, peak_tflops):
    """Achieved model FLOP/s over the peak (both in TFLOP/s); None without a peak."""
    return None if not peak_tflops else flops_per_image * images_per_sec / 1e12 / peak_tflops


def dit_forward_macs(hidden_size: int, depth: int, tokens: int, mlp_ratio: float = 4.0) -> int:
    """Multiply-accumulates of one DiT forward per image as the DiT paper (fvcore) counts them: per block
    qkv 3D^2T + proj D^2T + MLP 2rD^2T + attention 2T^2D + adaLN 6D^2 (DiT-XL/2 at 256 px: 118.6e9)."""
    d, t = hidden_size, tokens
    return int(depth * ((4 + 2 * mlp_ratio) * d * d * t + 2 * t * t * d + 6 * d * d))


def count_flops(fn) -> int:
    """Floating-point operations (a multiply-accumulate counts 2) that `fn()` dispatches, counted by shape."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, min_seconds: float = 0.5) -> dict:
    """Best dense square matmul throughput seen: bf16 8192 on CUDA, fp32 1024 on CPU."""
    dtype, size = (torch.bfloat16, 8192) if device.type == "cuda" else (torch.float32, 1024)
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    torch.mm(a, b)
    synchronize(device)
    best, spent = float("inf"), 0.0
    while spent < min_seconds:
        start = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        elapsed = time.perf_counter() - start
        best, spent = min(best, elapsed), spent + elapsed
    return {"tflops": 2 * size ** 3 / best / 1e12, "dtype": str(dtype).replace("torch.", "")}


def random_codec(layout: str, device: torch.device):
    """SD-VAE's layout (`sd`) or a tiny one, random weights: the encoder's real cost without a download."""
    from diffusers import AutoencoderKL

    from models.latent_spec import get_latent_spec
    from models.vae import LatentCodec

    channels, layers, groups = VAE_LAYOUTS[layout]
    autoencoder = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                                block_out_channels=channels, layers_per_block=layers, latent_channels=4,
                                norm_num_groups=groups)
    return LatentCodec.from_autoencoder(autoencoder, get_latent_spec("d8")).to(device)


def vavae_codec(layout: str, device: torch.device):
    """VA-VAE's layout (LDM ch_mult (1, 1, 2, 2, 4), 32 channels, factor 16), random weights."""
    from diffusers import AutoencoderKL

    from models.latent_spec import get_latent_spec
    from models.vae import LatentCodec

    width = 128 if layout == "sd" else 32
    autoencoder = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4 + ("AttnDownEncoderBlock2D",),
                                up_block_types=("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * 4,
                                block_out_channels=tuple(width * m for m in (1, 1, 2, 2, 4)), layers_per_block=2,
                                latent_channels=32, norm_num_groups=32)
    return LatentCodec.from_autoencoder(autoencoder, get_latent_spec("vavae_f16d32")).to(device)


def generation_step(args, precision: str, device: torch.device):
    """(step(), flops per image, what ran): TrainStep of DiT / SiT / LightningDiT / SiT+REPA, online VAE."""
    from generation.objectives import NoiseBundle, build_objective
    from generation.repa import Alignment
    from generation.train import TrainStep
    from models.dit import DiT_models
    from models.lightningdit import LightningDiT_models
    from models.repa import DinoV2Target
    from models.sit import SiT_models
    from util.precision import autocast, make_grad_scaler

    lightning, tiny = args.workload == "lightningdit", args.size == "tiny"
    size = "S" if tiny else args.size
    name = f"LightningDiT-{'B' if tiny else size}/1" if lightning else \
        f"{'DiT' if args.workload == 'dit' else 'SiT'}-{size}/2"
    codec = (vavae_codec if lightning else random_codec)(args.vae, device)
    latent_size, channels = codec.spec.latent_size(args.image_size), codec.spec.channels
    kwargs = dict(input_size=latent_size, num_classes=1000, in_channels=channels, **(TINY_DIT if tiny else {}))
    if lightning:
        kwargs.update(use_swiglu=True, use_rope=True, use_rmsnorm=True)
    target, alignment = None, None
    if args.workload == "repa":
        target = DinoV2Target("dinov2-vit-b", None, args.image_size, model_kwargs=TINY_VIT if tiny else None).to(device)
        kwargs.update(z_dims=[target.z_dim], encoder_depth=1 if tiny else 8)  # REPA: block 8 for L/XL
        alignment = Alignment([target], 0.5, lambda: autocast(device, precision))
    torch.manual_seed(0)
    model = {**DiT_models, **SiT_models, **LightningDiT_models}[name](**kwargs).to(device)
    objective = build_objective(name, 1000, use_lognorm=lightning, use_cosine_loss=lightning)
    network = torch.compile(model) if args.config.endswith("compile") else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0, fused=device.type == "cuda")
    ema = deepcopy(model).requires_grad_(False).eval()
    step = TrainStep(network, model, ema, objective, optimizer, make_grad_scaler(device, precision), device,
                     precision, codec=codec, alignment=alignment, max_grad_norm=1.0 if alignment else None)
    g, n = torch.Generator().manual_seed(0), args.batch_size
    batch = {"x": torch.rand(n, 3, args.image_size, args.image_size, generator=g) * 2 - 1,
             "posterior_noise": torch.randn(n, channels, latent_size, latent_size, generator=g),
             "y": torch.randint(0, 1000, (n,), generator=g), "drop": (torch.rand(n, generator=g) < 0.1).long(),
             "noise": torch.randn(n, channels, latent_size, latent_size, generator=g), "index": torch.arange(n)}
    # Model FLOPs: the transformer's forward + backward (the VAE and the REPA target are not trained).
    k = min(FLOPS_IMAGES, n)
    latents = batch["noise"][:k].to(device)
    bundle = NoiseBundle(torch.rand(k, generator=g).to(device), latents, batch["drop"][:k].to(device))
    fp32_step = TrainStep(model, model, model, objective, None, None, device, "fp32")
    flops = count_flops(lambda: objective.loss(fp32_step.model_fn, latents, batch["y"][:k].to(device),
                                               bundle).mean().backward()) / k
    model.zero_grad(set_to_none=True)
    counter = iter(range(10**9))
    label = f"{name}{' + REPA' if alignment else ''}{' (tiny)' if tiny else ''}"
    return (lambda: step(batch, next(counter))), flops, label


def pretrain_step(args, precision: str, device: torch.device):
    """(step(), flops per image, what ran): engine_pretrain's step (mask 0.75, norm_pix_loss, AdamW 0.9/0.95)."""
    from models.mae import create_mae
    from pretrain.engine_pretrain import masked_loss, prepare_batch
    from util.loop import LoopPosition, backward_micro_batch, optimizer_step
    from util.precision import make_grad_scaler

    tiny = args.size == "tiny"
    preset = MAE_PRESETS["B" if tiny else args.size]
    torch.manual_seed(0)
    model = create_mae(preset, args.image_size, vae_version="d8", norm_pix_loss=True,
                       **(TINY_MAE if tiny else {})).to(device)
    network = torch.compile(model) if args.config.endswith("compile") else model
    codec = random_codec(args.vae, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.5e-4, betas=(0.9, 0.95), fused=device.type == "cuda")
    scaler = make_grad_scaler(device, precision)
    settings = SimpleNamespace(vae_precision="fp16" if args.config == "recipe" else precision, add_noise=False,
                               precision=precision, mask_ratio=0.75)
    g, n = torch.Generator().manual_seed(0), args.batch_size
    batch = {"images": torch.rand(n, 3, args.image_size, args.image_size, generator=g) * 2 - 1,
             "mask_noise": torch.rand(n, model.patch_embed.num_patches, generator=g)}
    position = LoopPosition(epoch=0)

    def step():
        inputs, target, mask_noise = prepare_batch(batch, codec, settings, device)
        loss = backward_micro_batch(network, scaler, lambda: masked_loss(network, inputs, target, mask_noise,
                                                                         settings, device), 1, True)
        optimizer_step(optimizer, scaler, position)
        return loss

    k = min(FLOPS_IMAGES, n)
    latents = torch.randn(k, 4, args.image_size // 8, args.image_size // 8, device=device)
    noise = batch["mask_noise"][:k].to(device)
    flops = count_flops(lambda: model(latents, mask_ratio=0.75, noise=noise)[0].backward()) / k
    model.zero_grad(set_to_none=True)
    return step, flops, f"{preset}{' (tiny)' if tiny else ''}"


def time_steps(step, device: torch.device, warmup: int, iters: int) -> list:
    """Seconds of each of `iters` steps after `warmup` steps (compilation, autotuning, allocator)."""
    for _ in range(warmup):
        step().item()
    seconds = []
    for _ in range(iters):
        synchronize(device)
        start = time.perf_counter()
        step().item()  # reading the loss drains the queue
        seconds.append(time.perf_counter() - start)
    return seconds


def run(args) -> dict:
    from util.precision import configure_cuda

    device = torch.device(args.device)
    if device.type == "cuda":
        configure_cuda()  # TF32 on, cuDNN autotuning: what every trainer sets
        torch.cuda.reset_peak_memory_stats(device)
    precision = RECIPE_PRECISION[args.workload] if args.config == "recipe" else "bf16"
    build = pretrain_step if args.workload == "mae" else generation_step
    step, flops, model = build(args, precision, device)
    seconds = time_steps(step, device, args.warmup, args.iters)
    images_per_sec = args.batch_size / statistics.median(seconds)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peak, peak_label = datasheet_peak(gpu, precision) if device.type == "cuda" else (None, "CPU: no datasheet peak")
    measured = matmul_peak(device)
    return {"workload": args.workload, "model": model, "config": args.config, "precision": precision,
            "tf32": device.type == "cuda", "attention": "sdpa", "vae": "online", "batch": args.batch_size,
            "image_size": args.image_size, "device": gpu, "torch": torch.__version__,
            "images_per_sec": images_per_sec, "seconds_per_step": seconds, "gflops_per_image": flops / 1e9,
            "tflops": flops * images_per_sec / 1e12, "datasheet_peak_tflops": peak, "datasheet_peak": peak_label,
            "mfu_datasheet": mfu(flops, images_per_sec, peak), "measured_matmul_peak": measured,
            "mfu_measured_peak": mfu(flops, images_per_sec, measured["tflops"]),
            "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            "anchor": ANCHORS.get(args.workload, "")}


def format_row(row: dict) -> str:
    def pct(value):
        return "n/a" if value is None else f"{100 * value:.1f}%"
    memory = "" if row["peak_mem_gib"] is None else f", peak {row['peak_mem_gib']:.1f} GiB"
    return (f"{row['model']} {row['config']} ({row['precision']}, batch {row['batch']}): "
            f"{row['images_per_sec']:.1f} img/s, MFU {pct(row['mfu_datasheet'])} of {row['datasheet_peak']}, "
            f"{pct(row['mfu_measured_peak'])} of the measured {row['measured_matmul_peak']['tflops']:.3g} TFLOP/s "
            f"{row['measured_matmul_peak']['dtype']} matmul{memory}; published: {row['anchor'] or 'none'}")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Training throughput of one workload in one configuration")
    parser.add_argument("--workload", required=True, choices=sorted(RECIPE_PRECISION))
    parser.add_argument("--size", default="XL", choices=["tiny", "B", "L", "XL"],
                        help="tiny = width 32, depth 2 (CPU tests)")
    parser.add_argument("--config", default="recipe", choices=["recipe", "bf16", "bf16-compile"])
    parser.add_argument("--batch-size", type=int, default=None, help="per-GPU batch (default: the recipe's)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--vae", default="sd", choices=sorted(VAE_LAYOUTS), help="random VAE of this layout")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--json", default=None, help="write the row to this file")
    return finish_parser(parser)


def main(argv=None) -> dict:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    args.batch_size = args.batch_size or RECIPE_BATCH[args.workload]
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is visible; pass --device cpu or run on a GPU node.")
    if min(args.batch_size, args.iters) < 1 or args.warmup < 0 or args.image_size % 32:
        parser.error("--batch-size and --iters must be positive, --warmup >= 0 and --image-size a multiple of 32.")
    row = run(args)
    print(format_row(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=1) + "\n")
    return row


if __name__ == "__main__":
    main()
