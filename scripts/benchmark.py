"""Throughput benchmark: the plain baseline vs the optimised path, side by side in one process.

    python scripts/benchmark.py --preset cpu-quick --json bench_cpu.json          # a few minutes, 1 CPU thread
    python scripts/benchmark.py --preset gpu --json bench_gpu.json                 # B and XL sizes on CUDA
    python scripts/benchmark.py --workloads dit --sizes XL --image-size 256 --batch-size 256 --device cuda

Workloads (scripts/benchmark_workloads.py): MAE (USP) pretraining step (`pretrain.engine_pretrain`'s step), DiT,
SiT and LightningDiT training steps and REPA's cost (`generation.train.TrainStep`, the trainer's own step), the EMA
update (`util.ema.update_ema` vs official DiT's per-parameter loop), DDPM sampling (DiT), ODE sampling (SiT), VAE
encoding, Inception feature extraction. For each it reports images/s, FLOPs per image (FlopCounterMode, MAC = 2
FLOPs), achieved TFLOP/s, MFU against a dense matmul measured in the same run (bf16 on CUDA, fp32 on CPU), and
optimised/baseline.

Modes (see scripts.benchmark_lib.ModeConfig): "baseline" = fp32, eager, explicit-math attention, one-parameter-
at-a-time AdamW, VAE encoding inside the step (online), NCHW convs, and in the ema workload official DiT's
per-parameter EMA loop. "optimised" = bf16 autocast (CUDA), TF32, SDPA, fused AdamW, cached latents, channels_last
VAE/Inception, pinned host batches, foreach EMA [+ --compile, --grad-ckpt, DDP static graph]. On CPU bf16 only helps
where the CPU has bf16 matrix units, so `--opt-precision auto` keeps "optimised" in fp32 there and adds an
"optimised-bf16" column that measures it. Modes are interleaved (A B A B ...) so a busy host slows each alike.

Networks are built with random weights (same shapes and FLOPs as the real ones), so nothing is downloaded:
the VAE is SD-VAE's architecture (`--vae sd`) or a tiny one (`--vae tiny`), or a local folder via --vae.
"""
import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Callable, List

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from models.latent_spec import get_latent_spec
from models.vae import LatentCodec
from scripts.benchmark_lib import ModeConfig, Workload, host_load, interleaved_timings, measure_matmul_peak
from scripts.benchmark_workloads import (VAE_LAYOUTS, build_ema_workload, build_inception_workload, build_mae_workload,
                                         build_repa_workload, build_sampling_workload, build_train_workload,
                                         build_vae_workload, load_codec, vavae_codec)
from util.cli import finish_parser
from util.errors import UserError

WORKLOADS = ("mae", "dit", "sit", "lightningdit", "repa", "ema", "sample-ddpm", "sample-ode", "vae", "inception")
SIZES = ("tiny", "S", "B", "L", "XL")
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
    parser.add_argument("--opt-ema", default="foreach", choices=["foreach", "loop"],
                        help="the ema workload's optimised update (the training steps always run TrainStep's own)")
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
    return finish_parser(parser)


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
                elif workload == "ema":
                    build = lambda s=size: build_ema_workload(s, args, modes, device, codec)
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
