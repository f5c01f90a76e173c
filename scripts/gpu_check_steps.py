"""The checks of scripts/gpu_check.py, one function per step; each returns a dict of figures.

A step raises `CheckFailed` (one sentence) when a figure is outside its stated tolerance; any other
exception is recorded with its traceback's last lines. Training, sampling and evaluation run as
subprocesses through their public command lines (`torchrun --nproc_per_node=1 -m ...`), so the check
exercises exactly what users run; the SDPA probe and the latent-cache comparison of what `python -m
pretrain.cache_latents` wrote run in-process.
"""
import json
import math
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


class CheckFailed(RuntimeError):
    """A check ran but its result is outside the stated tolerance (or a command failed)."""


# time.monotonic() after which no subprocess may keep running (set by gpu_check.py from --time-budget-min),
# so the whole check ends inside the device call that runs it and its JSON is complete.
HARD_DEADLINE = None


def time_left(timeout: float) -> float:
    if HARD_DEADLINE is None:
        return timeout
    return max(1.0, min(timeout, HARD_DEADLINE - time.monotonic()))


# ----------------------------------------------------------------------------------------------
# Subprocesses
# ----------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def child_env(scale) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if scale.device == "cpu":
        env["OMP_NUM_THREADS"] = "1"  # the dry run shares a few cores between parallel steps
    return env


def torchrun_command(python: str, module: str, args: list) -> list:
    """`torchrun --nproc_per_node=1` (NCCL on CUDA, gloo on CPU) of `python -m module args`."""
    return [python, "-m", "torch.distributed.run", "--nproc_per_node=1", "--master_addr=127.0.0.1",
            f"--master_port={free_port()}", "-m", module, *map(str, args)]


def run_logged(command: list, log_path: Path, scale, timeout: float) -> None:
    """Runs `command` from the repo root, output to `log_path`; a non-zero exit is a CheckFailed."""
    timeout = time_left(timeout)
    what = command[command.index("-m") + 1] if "-m" in command else Path(command[1]).name
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        # A session of its own, so a timeout ends torchrun's workers too, not only torchrun.
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=child_env(scale), stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            returncode = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise CheckFailed(f"{what} ran past {timeout:.0f} s (log: {log_path.name})") from None
    if returncode != 0:
        raise CheckFailed(f"exit code {returncode}: {log_tail(log_path, 400)}")


def log_tail(path: Path, chars: int = 3000) -> str:
    text = Path(path).read_text(errors="replace") if Path(path).is_file() else ""
    return text[-chars:]


def read_log_lines(path: Path) -> list:
    """JSON lines of a run's log.txt (MAE's and DiT's format: {"step": ..., "loss": ...})."""
    if not path.is_file():
        return []
    lines = []
    for line in path.read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line being written right now
    return lines


def step_losses(log_file: Path) -> dict:
    return {line["step"]: line["loss"] for line in read_log_lines(log_file) if "loss" in line}


def peak_memory(log_file: Path) -> float | None:
    values = [line["peak_mem_mb"] for line in read_log_lines(log_file) if "peak_mem_mb" in line]
    return max(values) if values else None


# ----------------------------------------------------------------------------------------------
# Training runs (MAE pretraining, DiT, SiT)
# ----------------------------------------------------------------------------------------------

def training_args(kind: str, scale, assets: dict, out_dir: Path, precision: str, max_steps: int,
                  extra=()) -> tuple[str, list, Path]:
    """(module, argv, log.txt path) of one training run of `kind` (mae | dit | sit) in `out_dir`."""
    common_gen = ["--data-path", assets["data"] / "train", "--image-size", scale.image_size,
                  "--num-classes", scale.classes, "--global-batch-size", scale.batch, "--epochs", 100_000,
                  "--vae-path", assets["vae"], "--num-workers", scale.workers, "--log-every", 1,
                  "--ckpt-every", 10**9, "--eval-every", 0, "--device", scale.device, "--precision", precision,
                  "--max-steps", max_steps, "--global-seed", 0, "--exp-name", "check"]
    if kind == "mae":
        argv = ["--model", scale.mae_model, "--model_kwargs", json.dumps(scale.mae_kwargs),
                "--input_size", scale.image_size, "--data_path", assets["data"],
                "--vae_path", assets["vae"], "--device", scale.device, "--precision", precision,
                "--batch_size", scale.batch, "--epochs", 100_000, "--warmup_epochs", 1, "--blr", 1.5e-4,
                "--norm_pix_loss", "--num_workers", scale.workers, "--log_every", 1, "--save_every", 10**9,
                "--max_steps", max_steps, "--seed", 0, "--output_dir", out_dir, "--log_dir", out_dir, *extra]
        return "pretrain.main_pretrain", argv, out_dir / "log.txt"
    model = scale.gen_models[kind]
    argv = ["--model", model, "--model-kwargs", json.dumps(scale.gen_kwargs), "--results-dir", out_dir,
            "--finetune", assets["usp_checkpoint"], *common_gen, *extra]
    experiment = out_dir / ("000-" + model.replace("/", "-") + "-check")
    return "generation.train", argv, experiment / "log.txt"


def train_run(kind: str, precision: str, scale, assets: dict, work: Path, extra=(), tag: str = "") -> dict:
    """A few steps of `kind` at `precision`: every loss finite; returns losses and peak memory."""
    name = f"{kind}-{precision}{tag}"
    out_dir = work / name
    module, argv, log_file = training_args(kind, scale, assets, out_dir, precision, scale.steps, extra)
    log_path = work / "logs" / f"{name}.log"
    started = time.perf_counter()
    run_logged(torchrun_command(scale.python, module, argv), log_path, scale, scale.run_timeout)
    losses = step_losses(log_file)
    if sorted(losses) != list(range(1, scale.steps + 1)):
        raise CheckFailed(f"{name} logged steps {sorted(losses)}, expected 1..{scale.steps}")
    bad = {step: loss for step, loss in losses.items() if not math.isfinite(loss)}
    if bad:
        raise CheckFailed(f"{name} has non-finite losses {bad}")
    return {"losses": [losses[step] for step in sorted(losses)], "peak_mem_mb": peak_memory(log_file),
            "seconds": time.perf_counter() - started, "output_dir": str(out_dir)}


def usp_checkpoint(mae_fp32: dict) -> Path:
    """The newest checkpoint-N.pth the fp32 MAE run wrote: the USP initialisation of DiT and SiT."""
    found = sorted(Path(mae_fp32["output_dir"]).glob("checkpoint-*.pth"), key=lambda p: int(p.stem.split("-")[1]))
    if not found:
        raise CheckFailed("the MAE pretraining run wrote no checkpoint-*.pth to initialise DiT/SiT from")
    return found[-1]


AGREEMENT_STEPS = 3


def precision_agreement(reference: dict, other: dict, tolerance: float, label: str) -> dict:
    """Losses of steps 1..3 of `other` against the fp32 run: same initial weights, same batches and noise.

    Step 1 alone would not do: DiT/SiT's output layers start at zero (adaLN-Zero), so their first loss is
    the same in every precision; steps 2 and 3 carry the precision of the first updates' gradients.
    """
    first, second = reference["losses"][:AGREEMENT_STEPS], other["losses"][:AGREEMENT_STEPS]
    relative = [abs(b - a) / max(abs(a), 1e-12) for a, b in zip(first, second)]
    worst = max(relative)
    result = {"losses_fp32": first, f"losses_{label}": second, "relative_difference_per_step": relative,
              "relative_difference": worst, "tolerance": tolerance}
    if worst > tolerance:
        step = relative.index(worst) + 1
        raise CheckFailed(f"{label} loss at step {step} ({second[step - 1]:.6g}) differs from fp32's "
                          f"({first[step - 1]:.6g}) by {worst:.3g} (relative), above the stated {tolerance}")
    return result


def preempt_and_resume(kind: str, scale, assets: dict, work: Path, reference: dict) -> dict:
    """SIGTERM to the whole torchrun process group mid-run (as SLURM signals every process of a job step),
    then `--resume` from the run directory; the resumed losses are compared with an uninterrupted run."""
    name = f"{kind}-resume"
    out_dir = work / name
    module, argv, log_file = training_args(kind, scale, assets, out_dir, scale.resume_precision, 10**6)
    log_path = work / "logs" / f"{name}.log"
    with open(log_path, "a") as log:
        process = subprocess.Popen(torchrun_command(scale.python, module, argv), cwd=REPO_ROOT, env=child_env(scale),
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + time_left(scale.run_timeout)
        while max(step_losses(log_file), default=0) < 2:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise CheckFailed(f"{name} never reached step 2 (exit {process.poll()}): {log_tail(log_path, 400)}")
            time.sleep(0.2)
        signalled_at = max(step_losses(log_file))
        os.killpg(process.pid, signal.SIGTERM)
        try:
            exit_code = process.wait(timeout=time_left(scale.run_timeout))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            raise CheckFailed(f"{name} did not stop within {scale.run_timeout} s of SIGTERM") from None
    stopped_at = max(step_losses(log_file))
    resume_from = out_dir if kind == "mae" else log_file.parent
    target = stopped_at + 2
    extra = ["--resume", resume_from] + (["--max_steps", target] if kind == "mae" else ["--max-steps", target])
    module, argv, _ = training_args(kind, scale, assets, out_dir, scale.resume_precision, target)
    run_logged(torchrun_command(scale.python, module, argv + extra), log_path, scale, scale.run_timeout)
    resumed = step_losses(log_file)
    if max(resumed) != target:
        raise CheckFailed(f"{name} resumed run ended at step {max(resumed)}, expected {target}")
    result = {"signalled_at_step": signalled_at, "checkpointed_at_step": stopped_at, "torchrun_exit_code": exit_code,
              "resumed_to_step": target}
    compared = [step for step in (stopped_at + 1, target) if step <= len(reference["losses"])]
    if compared:
        diffs = [abs(resumed[step] - reference["losses"][step - 1]) for step in compared]
        result.update(compared_steps=compared, max_abs_loss_difference_vs_uninterrupted=max(diffs))
        if scale.device == "cpu" and max(diffs) != 0.0:
            raise CheckFailed(f"{name}: resumed losses differ from the uninterrupted run by {max(diffs):.3g} on CPU, "
                              "where resume is bit-exact")
    return result


# ----------------------------------------------------------------------------------------------
# In-process probes
# ----------------------------------------------------------------------------------------------

SDPA_KERNELS = (  # aten op name fragment -> backend
    ("_scaled_dot_product_flash_attention_for_cpu", "cpu-flash"), ("_scaled_dot_product_flash_attention_backward_for_cpu", "cpu-flash"), ("_scaled_dot_product_cudnn_attention", "cudnn"),
    ("_scaled_dot_product_efficient_attention", "memory-efficient"), ("_efficient_attention", "memory-efficient"),
    ("_scaled_dot_product_flash_attention", "flash"), ("_flash_attention", "flash"),
    ("_scaled_dot_product_attention_math", "math"),
)


def sdpa_backends(scale) -> dict:
    """Which SDPA kernel one forward+backward of the generation transformer dispatches to, per precision."""
    from torch.profiler import ProfilerActivity, profile

    from models.dit import DiT_models
    from util.precision import autocast, configure_cuda

    device = torch.device(scale.device)
    if device.type == "cuda":
        configure_cuda()
    latent = scale.image_size // 8
    model = DiT_models[scale.sdpa_model](input_size=latent, num_classes=scale.classes, **scale.sdpa_kwargs).to(device)
    x = torch.randn(2, 4, latent, latent, device=device)
    t = torch.randint(0, 1000, (2,), device=device)
    y = torch.randint(0, scale.classes, (2,), device=device)
    found = {}
    for precision in ("bf16", "fp16", "fp32"):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            with autocast(device, precision):
                out = model(x, t, y)
            out.float().square().mean().backward()
        names = {event.name for event in prof.events()}
        kernels = sorted({next(backend for fragment, backend in SDPA_KERNELS if fragment in name)
                          for name in names if any(fragment in name for fragment, _ in SDPA_KERNELS)})
        found[precision] = kernels or ["none found"]
    attention = model.blocks[0].attn
    return {"model": scale.sdpa_model, "head_dim": attention.head_dim, "heads": attention.num_heads,
            "tokens": model.x_embedder.num_patches, "timm_fused_attn": bool(getattr(attention, "fused_attn", True)),
            "backend_by_precision": found}


def latent_cache_precision(scale, assets: dict, work: Path) -> dict:
    """The same images cached with fp32 and fp16 moments: how far apart the stored moments and the
    training latents (mean + std * noise, times the scale factor) are, absolute and relative."""
    from util.latent_cache import LatentCacheDataset

    data = {}
    for dtype in ("fp32", "fp16"):
        cache = work / f"latent-cache-{dtype}"
        run_logged([scale.python, "-m", "pretrain.cache_latents", "--data_path", str(assets["data"] / "train"),
                    "--cached_path", str(cache), "--vae_version", "d8", "--vae_path", str(assets["vae"]),
                    "--input_size", str(scale.image_size), "--batch_size", str(scale.batch), "--shard_size", "64",
                    "--num_workers", "0", "--device", scale.device, "--moments_dtype", dtype],
                   work / "logs" / f"latent-cache-{dtype}.log", scale, scale.run_timeout)
        data[dtype] = LatentCacheDataset(cache, seed=0)
    count = len(data["fp32"])
    mean32, mean16, lat32, lat16 = [], [], [], []
    for index in range(count):
        for flip in (0, 1):
            mean32.append(data["fp32"].moments(index, flip)[0])
            mean16.append(data["fp16"].moments(index, flip)[0])
        lat32.append(data["fp32"][(0, index)][0])
        lat16.append(data["fp16"][(0, index)][0])
    mean32, mean16 = torch.stack(mean32), torch.stack(mean16)
    lat32, lat16 = torch.stack(lat32), torch.stack(lat16)
    mean_error = (mean16 - mean32).abs()
    latent_error = (lat16 - lat32).abs()
    bound = 2.0**-11 * mean32.abs() + 2.0**-25  # round-to-nearest in fp16 (subnormals: absolute 2^-25)
    result = {
        "vae": scale.vae_layout_name, "images": count, "image_size": scale.image_size,
        "mean_max_abs_error": float(mean_error.max()), "mean_max_relative_error":
            float((mean_error / mean32.abs().clamp_min(1e-6)).max()),
        "latent_rms": float(lat32.square().mean().sqrt()), "latent_max_abs_error": float(latent_error.max()),
        "latent_rms_error": float((lat16 - lat32).square().mean().sqrt()),
        "bytes_per_image_fp32": int(mean32[0].numel() * 2 * 2 * 4), "bytes_per_image_fp16": int(mean32[0].numel() * 2 * 2 * 2),
    }
    result["latent_relative_rms_error"] = result["latent_rms_error"] / max(result["latent_rms"], 1e-12)
    if bool((mean_error > bound).any()):
        raise CheckFailed("fp16 cached means differ from fp32 by more than fp16 rounding (2^-11 relative)")
    return result


# ----------------------------------------------------------------------------------------------
# Sampling and evaluation
# ----------------------------------------------------------------------------------------------

def save_sampling_checkpoint(family: str, scale, path: Path) -> Path:
    """A randomly initialised XL network (perturbed so adaLN-Zero layers compute something) saved as `ema`."""
    from models.dit import DiT_models
    from models.sit import SiT_models

    model_name = scale.sample_models[family]
    registry = DiT_models if family == "dit" else SiT_models
    torch.manual_seed(0)
    model = registry[model_name](input_size=scale.image_size // 8, num_classes=scale.classes, **scale.sample_kwargs)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.02)
    torch.save({"ema": model.state_dict()}, path)
    return path


def sample_run(family: str, precision: str, scale, assets: dict, work: Path) -> dict:
    """DDPM-250 (DiT) or SDE (SiT) sampling of a few images through generation/sample_ddp.py."""
    name = f"sample-{family}-{precision}"
    sample_dir = work / name
    argv = ["--model", scale.sample_models[family], "--model-kwargs", json.dumps(scale.sample_kwargs),
            "--ckpt", assets[f"sample_ckpt_{family}"], "--vae-path", assets["vae"], "--image-size", scale.image_size,
            "--num-classes", scale.classes, "--num-fid-samples", scale.sample_images,
            "--per-proc-batch-size", scale.sample_images, "--num-sampling-steps", scale.sample_steps,
            "--cfg-scale", 1.5, "--precision", precision, "--sample-dir", sample_dir, "--device", scale.device,
            "--global-seed", 0, "--no-progress"]
    if family == "sit":
        argv = ["SDE", *argv]
    started = time.perf_counter()
    run_logged(torchrun_command(scale.python, "generation.sample_ddp", argv), work / "logs" / f"{name}.log",
               scale, scale.run_timeout)
    images = np.load(f"{sample_dir}.npz")["arr_0"]
    return {"npz": f"{sample_dir}.npz", "shape": list(images.shape), "seconds": time.perf_counter() - started}


def compare_samples(bf16: dict, fp32: dict) -> dict:
    first = np.load(bf16["npz"])["arr_0"].astype(np.int16)
    second = np.load(fp32["npz"])["arr_0"].astype(np.int16)
    difference = np.abs(first - second)
    return {"mean_abs_pixel_difference": float(difference.mean()), "max_abs_pixel_difference": int(difference.max()),
            "fraction_pixels_off_by_more_than_8": float((difference > 8).mean())}


def evaluator_parity(scale, assets: dict, work: Path) -> dict:
    """The evaluator on `scale.device` against the CPU, random Inception weights (NOT FID):

    - in-process: Inception features of the same uint8 images on the CPU and on the device, and the
      statistics FID is computed from (mean and covariance of pool_3, of the spatial features);
    - the command line `python -m generation.evaluate REF SAMPLE --device <device>` end to end.
    """
    from generation.inception import InceptionFeatureExtractor

    generator = np.random.default_rng(0)
    pair = []
    for name in ("ref", "sample"):
        path = work / f"eval-{name}.npz"
        np.savez(path, arr_0=generator.integers(0, 256, (scale.eval_images, 64, 64, 3), dtype=np.uint8))
        pair.append(path)
    images = np.load(pair[1])["arr_0"]
    features = {device: InceptionFeatureExtractor(assets["inception"], device).features(images)
                for device in dict.fromkeys(("cpu", scale.device))}
    cpu, other = features["cpu"], features[scale.device]
    relative = {}
    for label, index in (("pool", 0), ("spatial", 1), ("logits", 2)):
        a, b = cpu[index].double(), other[index].double()
        relative[f"{label}_mean"] = float((b.mean(0) - a.mean(0)).norm() / a.mean(0).norm().clamp_min(1e-12))
        cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
        relative[f"{label}_covariance"] = float((cov_b - cov_a).norm() / cov_a.norm().clamp_min(1e-12))
    out = work / "eval-metrics.json"
    command = [scale.python, "-m", "generation.evaluate", *map(str, pair), "--inception-weights",
               str(assets["inception"]), "--batch-size", str(min(64, scale.eval_images)), "--device", scale.device,
               "--output-json", str(out)]
    run_logged(command, work / "logs" / "evaluator.log", scale, scale.run_timeout * 2)
    metrics = json.loads(out.read_text())
    worst = max(relative.values())
    result = {"note": "random Inception weights: these numbers are NOT FID/IS", "device": scale.device,
              "images": scale.eval_images, "statistics_relative_difference_vs_cpu": relative,
              "worst_relative_difference": worst, "tolerance": scale.eval_tolerance,
              "cli_metrics_random_weights": metrics}
    if worst > scale.eval_tolerance:
        raise CheckFailed(f"Inception statistics on {scale.device} differ from the CPU's by {worst:.3g} (relative), "
                          f"above {scale.eval_tolerance}")
    return result
