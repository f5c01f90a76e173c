"""GPU readiness check: correctness first, then throughput, a verdict within 8 minutes on one H100.

    bash scripts/gpu_check.sh --out gpu_check_out            # one GPU: about 7.5 minutes
    bash scripts/gpu_check.sh --out /tmp/gc --dry-run        # the same steps at tiny scale on the CPU

Every step runs in a process of its own, one after another, under a time limit; a step that does not start
before the budget (--time-budget-min) is recorded as skipped. The correctness steps (DiT-B/2, SiT-B/2 and
ViT-B MAE on GPU) each state the comparison they made, its value and its limit:
  environment          GPU, driver, torch, CUDA, and every package found with its version (pure-Python or not)
  assets               toy images, a random VAE of SD-VAE's layout, random Inception weights (no download)
  sdpa                 which attention kernel a DiT forward + backward dispatches to in bf16, fp16 and fp32
  agreement-{mae,dit,sit}  trunk gradients and loss of TF32 / bf16 / fp16 (/ bf16 + torch.compile) against
                       exact fp32 on the same weights (output layers made non-zero) and batch; limit 16 unit
                       roundoffs of the format (see TOLERANCE_FACTOR)
  resume-{mae,dit,sit}  the CLI trainer under torchrun, SIGTERM to its process group after step 2, --resume
                       for 2 more steps; their losses against an uninterrupted run to the same step: bit-exact
                       (CPU, or --deterministic on GPU)
  latent-cache-fp16    fp16 cached VAE moments within fp16 rounding of the fp32 ones
  evaluator            Inception statistics on the device against the CPU, and generation.evaluate end to end
  bench-*              scripts/benchmark.py, one row per call at the recipes' per-GPU batch: DiT-XL/2 in the recipe's
                       configuration, bf16 and bf16 + compile, LightningDiT-XL/1, SiT-XL/2 + REPA, USP pretraining

Writes to --out: gpu_check.json (after every step), gpu_check.txt (the table and the verdict) and
gpu_check_logs.tar.gz. The exit code is 0 when every correctness step passed and no benchmark call crashed.
"""
import argparse
import json
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from util.cli import finish_parser

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("torch", "numpy", "torchvision", "timm", "diffusers", "torch-fidelity", "torchdiffeq", "scipy",
            "safetensors", "tensorboard", "pillow", "huggingface-hub", "tqdm")
# Unit roundoff of the format the matmul inputs are rounded to (TF32 keeps fp16's 10-bit mantissa).
UNIT_ROUNDOFF = {"fp32": 2.0**-24, "tf32": 2.0**-11, "fp16": 2.0**-11, "bf16": 2.0**-8}
# Each matmul of a variant rounds its inputs once (relative error <= u); the errors of a few dozen layers add up
# as a random walk, so a right computation stays within a few u of exact fp32 (tiny CPU models: ~1-3 u), while a
# wrong one (a block skipped, a wrong mask or timestep) moves the trunk gradient by tens of percent.
TOLERANCE_FACTOR = 16
RESUMED_STEPS = 2  # steps of the resumed run, compared with an uninterrupted run to the same step


class CheckFailed(RuntimeError):
    """A comparison is outside its limit (or a command failed); `result` keeps what was measured."""

    def __init__(self, message: str, result: dict | None = None):
        super().__init__(message)
        self.result = result


@dataclass
class Scale:
    device: str
    image_size: int
    batch: int
    mae: tuple           # (preset, kwargs)
    gen: dict            # family -> (model name, kwargs)
    vae: str             # random VAE layout (scripts/benchmark.py VAE_LAYOUTS)
    eval_images: int
    bench: list          # (row name, scripts/benchmark.py arguments)
    step_limit: float    # seconds one step may run
    budget_min: float | None
    leave_out: tuple = ()  # checks the scale does not run


def bench_rows(common: list, rows: list) -> list:
    return [(f"bench-{workload}-{config}", ["--workload", workload, "--config", config, *common, *extra])
            for workload, config, *extra in rows]


GPU_SCALE = Scale(device="cuda", image_size=256, batch=8, mae=("vit_base_patch_vae", {}),
                  gen={"dit": ("DiT-B/2", {}), "sit": ("SiT-B/2", {})}, vae="sd", eval_images=128,
                  bench=bench_rows(["--size", "XL"], [("dit", "recipe"), ("dit", "bf16"), ("lightningdit", "recipe"),
                                                      ("repa", "recipe"), ("dit", "bf16-compile"),
                                                      ("mae", "recipe", "--size", "B", "--image-size", "224")]),
                  step_limit=150, budget_min=7.5)
TINY_GEN = {"hidden_size": 32, "depth": 2, "num_heads": 2}
DRY_SCALE = Scale(device="cpu", image_size=32, batch=4,
                  mae=("vit_base_patch_vae", {"embed_dim": 32, "depth": 2, "num_heads": 2, "decoder_embed_dim": 32,
                                              "decoder_depth": 1, "decoder_num_heads": 2}),
                  gen={"dit": ("DiT-S/2", TINY_GEN), "sit": ("SiT-S/2", TINY_GEN)}, vae="tiny", eval_images=16,
                  bench=bench_rows(["--size", "tiny", "--device", "cpu", "--image-size", "32", "--vae", "tiny",
                                    "--batch-size", "4", "--warmup", "1", "--iters", "1"],
                                   [("dit", "recipe"), ("lightningdit", "recipe"), ("repa", "recipe"),
                                    ("mae", "recipe")]),
                  step_limit=240, budget_min=None, leave_out=("resume-sit",))  # SiT resumes through DiT's code


# ----------------------------------------------------------------------------------------------
# Comparisons
# ----------------------------------------------------------------------------------------------

def comparison(what: str, value, limit, rule: str = "<=") -> dict:
    passed = {"<=": lambda: value <= limit, "==": lambda: value == limit, ">=": lambda: value >= limit}[rule]()
    return {"what": what, "value": value, "rule": rule, "limit": limit, "passed": bool(passed)}


def judge(result: dict) -> dict:
    """Raises CheckFailed naming the first comparison outside its limit; else returns `result`."""
    for item in result["comparisons"]:
        if not item["passed"]:
            raise CheckFailed(f"{item['what']} is {item['value']}, not {item['rule']} {item['limit']}", result)
    return result


def tolerance(variant: str) -> float:
    return TOLERANCE_FACTOR * UNIT_ROUNDOFF[variant]


def agree(reference: tuple, other: tuple, variant: str, fmt: str) -> list:
    """Comparisons of (loss, trunk gradient) of `variant` (rounding to `fmt`) against the exact fp32 `reference`."""
    (ref_loss, ref_grad), (loss, grad) = reference, other
    if not (math.isfinite(loss) and bool(torch.isfinite(grad).all())):
        return [comparison(f"{variant}: loss and gradients finite", False, True, "==")]
    limit = tolerance(fmt)
    return [comparison(f"{variant}: relative loss difference", abs(loss - ref_loss) / abs(ref_loss), limit),
            comparison(f"{variant}: relative trunk-gradient difference",
                       float((grad - ref_grad).norm() / ref_grad.norm()), limit)]


# ----------------------------------------------------------------------------------------------
# Environment and assets
# ----------------------------------------------------------------------------------------------

def package_versions() -> dict:
    """name -> {"version", "pure_python"} of every package found (None if missing): what a node has to carry."""
    from importlib import metadata

    found = {}
    for name in PACKAGES:
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            found[name] = None
            continue
        binary = any(str(path).endswith((".so", ".pyd")) for path in dist.files or ())
        found[name] = {"version": dist.version, "pure_python": not binary}
    return found


def environment(scale, work: Path) -> dict:
    from scripts.benchmark import datasheet_peak, matmul_peak

    packages = package_versions()
    for name, entry in packages.items():
        print(f"{name:16} {entry['version'] + (' (pure Python)' if entry['pure_python'] else '') if entry else '-'}")
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda_build": torch.version.cuda,
            "packages": packages}
    missing = [name for name in ("torch", "numpy", "timm", "diffusers", "scipy") if packages[name] is None]
    comparisons = [comparison("required packages missing", ", ".join(missing) or "none", "none", "==")]
    if scale.device == "cuda":
        comparisons.append(comparison("CUDA devices visible", torch.cuda.device_count(), 1, ">="))
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                        gpu_memory_gib=round(props.total_memory / 2**30, 1), cudnn=torch.backends.cudnn.version(),
                        nccl=".".join(map(str, torch.cuda.nccl.version())),
                        datasheet_bf16=datasheet_peak(props.name, "bf16"))
            smi = shutil.which("nvidia-smi")
            if smi:
                info["driver"] = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                                                capture_output=True, text=True, timeout=30).stdout.strip()
    info["measured_matmul_peak"] = matmul_peak(torch.device(scale.device if torch.cuda.is_available() else "cpu"))
    return judge({**info, "comparisons": comparisons})


def assets(scale, work: Path) -> dict:
    """Toy ImageFolder (2 classes x 8 images), a random VAE in diffusers format, random Inception weights."""
    from diffusers import AutoencoderKL
    from PIL import Image

    from generation.inception import save_random_inception_weights
    from scripts.benchmark import VAE_LAYOUTS

    rng = np.random.default_rng(0)
    for label in range(2):
        folder = work / "data" / "train" / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(8):
            pixels = rng.integers(0, 256, (scale.image_size, scale.image_size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{index}.png")
    channels, layers, groups = VAE_LAYOUTS[scale.vae]
    torch.manual_seed(0)
    AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  block_out_channels=channels, layers_per_block=layers, latent_channels=4, norm_num_groups=groups,
                  sample_size=scale.image_size).save_pretrained(work / "vae")
    save_random_inception_weights(work / "inception-random.pth")
    written = len(list((work / "data" / "train").glob("*/*.png")))
    return judge({"comparisons": [comparison("toy images written", written, 16, "==")]})


# ----------------------------------------------------------------------------------------------
# In-process probes
# ----------------------------------------------------------------------------------------------

SDPA_KERNELS = (("flash_attention_for_cpu", "cpu-flash"), ("flash_attention_backward_for_cpu", "cpu-flash"),
                ("cudnn_attention", "cudnn"), ("efficient_attention", "memory-efficient"),
                ("flash_attention", "flash"), ("attention_math", "math"))


def sdpa(scale, work: Path) -> dict:
    """Which SDPA kernel a DiT forward + backward dispatches to per precision (profiler on the main thread)."""
    from torch.profiler import ProfilerActivity, profile

    from models.dit import DiT_models
    from util.precision import autocast, configure_cuda

    device = torch.device(scale.device)
    if device.type == "cuda":
        configure_cuda()
    name, kwargs = scale.gen["dit"]
    latent = scale.image_size // 8
    model = DiT_models[name](input_size=latent, num_classes=10, **kwargs).to(device)
    x, t, y = torch.randn(2, 4, latent, latent, device=device), torch.tensor([1, 500], device=device), \
        torch.tensor([0, 1], device=device)
    found = {}
    for precision in ("bf16", "fp16", "fp32"):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            with autocast(device, precision):
                out = model(x, t, y)
            out.float().square().mean().backward()
        names = {event.name for event in prof.events()}
        found[precision] = sorted({backend for fragment, backend in SDPA_KERNELS
                                   if any(fragment in event for event in names)})
    comparisons = [comparison(f"{precision}: SDPA kernels found", len(kernels), 1, ">=")
                   for precision, kernels in found.items()]
    return judge({"model": name, "head_dim": model.blocks[0].attn.head_dim, "kernels": found,
                  "comparisons": comparisons})


def perturb_(model: torch.nn.Module, std: float = 0.02, seed: int = 1) -> None:
    """Adds N(0, std) to every weight, so the zero-initialised output layers (adaLN-Zero) pass gradients on."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * std)


def trunk_gradient(model: torch.nn.Module, loss_fn, precision: str, device: torch.device) -> tuple:
    """(loss, flattened gradient of model.blocks) of one backward of `loss_fn()` with the trainer's fp16 scaling."""
    from util.precision import make_grad_scaler

    model.zero_grad(set_to_none=True)
    scaler = make_grad_scaler(device, precision)
    loss = loss_fn()
    scaler.scale(loss).backward()
    scale = scaler.get_scale() if scaler.is_enabled() else 1.0
    grads = [param.grad.float().flatten() / scale for param in model.blocks.parameters() if param.grad is not None]
    return float(loss.detach()), torch.cat(grads).cpu()


def generation_gradient(model, objective, batch: dict, device, precision: str, compile: bool = False) -> tuple:
    """(loss, trunk gradient) of the training objective through TrainStep.model_fn (autocast as the trainer)."""
    from generation.train import TrainStep

    network = torch.compile(model) if compile else model
    step = TrainStep(network, model, model, objective, None, None, device, precision)
    return trunk_gradient(model, lambda: objective.training_loss(
        step.model_fn, batch["x"], batch["y"], batch["noise"], batch["drop"], seed=0, step=0,
        sample_ids=batch["index"]).mean(), precision, device)


def variants(device: torch.device, compile: bool) -> dict:
    """name -> (autocast precision, TF32, torch.compile, tolerance format), as the trainers run them."""
    found = {"tf32": ("fp32", True, False, "tf32")} if device.type == "cuda" else {}
    found.update({"bf16": ("bf16", True, False, "bf16"), "fp16": ("fp16", True, False, "fp16")})
    if compile and device.type == "cuda":  # on the CPU a cold compile alone takes minutes
        found["bf16+compile"] = ("bf16", True, True, "bf16")
    return found


def run_agreement(gradient, device, compile: bool) -> dict:
    """gradient(precision, compile) -> (loss, trunk gradient); every variant against exact fp32 (TF32 off)."""
    from util.precision import tf32_enabled

    with tf32_enabled(False):
        reference = gradient("fp32", False)
    comparisons, losses = [], {"fp32": reference[0]}
    for name, (precision, tf32, compiled, fmt) in variants(device, compile).items():
        with tf32_enabled(tf32):
            other = gradient(precision, compiled)
        losses[name] = other[0]
        comparisons += agree(reference, other, name, fmt)
    return judge({"losses": losses, "trunk_parameters": int(reference[1].numel()), "comparisons": comparisons})


def agreement_generation(family: str):
    def check(scale, work: Path) -> dict:
        from generation.objectives import build_objective
        from models.dit import DiT_models
        from models.sit import SiT_models

        device = torch.device(scale.device)
        name, kwargs = scale.gen[family]
        latent = scale.image_size // 8
        torch.manual_seed(0)
        model = {**DiT_models, **SiT_models}[name](input_size=latent, num_classes=10, **kwargs)
        perturb_(model)
        model.to(device)
        objective = build_objective(name, 10)
        g, n = torch.Generator().manual_seed(0), scale.batch
        batch = {"x": torch.randn(n, 4, latent, latent, generator=g), "y": torch.randint(0, 10, (n,), generator=g),
                 "noise": torch.randn(n, 4, latent, latent, generator=g), "drop": torch.zeros(n, dtype=torch.long)}
        batch = {key: value.to(device) for key, value in batch.items()}
        batch["index"] = torch.arange(n)
        return run_agreement(lambda precision, compile: generation_gradient(model, objective, batch, device,
                                                                            precision, compile), device, True)
    return check


def agreement_mae(scale, work: Path) -> dict:
    """The pretraining loss (engine_pretrain.masked_loss: mask 0.75, norm_pix_loss) and its trunk gradients."""
    from models.mae import create_mae
    from pretrain.engine_pretrain import masked_loss

    device = torch.device(scale.device)
    preset, kwargs = scale.mae
    torch.manual_seed(0)
    model = create_mae(preset, scale.image_size, vae_version="d8", norm_pix_loss=True, **kwargs).to(device)
    g, latent = torch.Generator().manual_seed(0), scale.image_size // 8
    latents = torch.randn(scale.batch, 4, latent, latent, generator=g).to(device)
    mask_noise = torch.rand(scale.batch, model.patch_embed.num_patches, generator=g).to(device)

    def gradient(precision, compile):
        settings = SimpleNamespace(precision=precision, mask_ratio=0.75)
        return trunk_gradient(model, lambda: masked_loss(model, latents, latents, mask_noise, settings, device),
                              precision, device)
    return run_agreement(gradient, device, False)


# ----------------------------------------------------------------------------------------------
# The trainers under torchrun: preemption and resume
# ----------------------------------------------------------------------------------------------

def torchrun(module: str, argv: list) -> list:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--master_addr=127.0.0.1",
            f"--master_port={port}", "-m", module, *map(str, argv)]


def start(command: list, log: Path) -> subprocess.Popen:
    """`command` from the repo root in a session of its own (so its whole tree can be signalled)."""
    with open(log, "a") as handle:
        handle.write(f"$ {' '.join(command)}\n")
        handle.flush()
        return subprocess.Popen(command, cwd=REPO_ROOT, stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True)


def finish(process: subprocess.Popen, log: Path, timeout: float) -> None:
    try:
        code = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise CheckFailed(f"{log.name} ran past {timeout:.0f} s") from None
    if code != 0:
        raise CheckFailed(f"exit code {code}: {log.read_text(errors='replace')[-400:]}")


def losses(log_file: Path) -> dict:
    """step -> loss of a run's log.txt (JSON lines); a line being written is left out."""
    found = {}
    for line in log_file.read_text().splitlines() if log_file.is_file() else ():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in entry:
            found[entry["step"]] = entry["loss"]
    return found


def trainer(kind: str, scale, work: Path, out_dir: Path, max_steps: int, extra=()) -> tuple:
    """(module, argv, log.txt) of the CLI trainer: MAE pretraining, or DiT/SiT from the MAE run's checkpoint."""
    precision, device = ("bf16", ["--deterministic"]) if scale.device == "cuda" else ("fp32", [])
    if kind == "mae":
        preset, kwargs = scale.mae
        argv = ["--model", preset, "--model_kwargs", json.dumps(kwargs), "--input_size", scale.image_size,
                "--data_path", work / "data", "--vae_path", work / "vae", "--device", scale.device, "--precision",
                precision, "--batch_size", scale.batch, "--epochs", 100_000, "--warmup_epochs", 1, "--norm_pix_loss",
                "--num_workers", 0, "--log_every", 1, "--save_every", 10**9, "--max_steps", max_steps, "--seed", 0,
                "--output_dir", out_dir, "--log_dir", out_dir, *device, *extra]
        return "pretrain.main_pretrain", argv, out_dir / "log.txt"
    found = sorted((work / "resume-mae" / "reference").glob("checkpoint-*.pth"))
    if not found:
        raise CheckFailed("no USP checkpoint from resume-mae to start DiT/SiT from; run resume-mae first")
    name, kwargs = scale.gen[kind]
    argv = ["--model", f"{name}-VAE-simple", "--model-kwargs", json.dumps(kwargs), "--results-dir", out_dir,
            "--finetune", found[-1], "--data-path", work / "data" / "train", "--image-size", scale.image_size,
            "--num-classes", 2, "--global-batch-size", scale.batch, "--epochs", 100_000, "--vae-path", work / "vae",
            "--num-workers", 0, "--log-every", 1, "--ckpt-every", 10**9, "--eval-every", 0, "--device", scale.device,
            "--precision", precision, "--max-steps", max_steps, "--global-seed", 0, "--exp-name", "check", *device,
            *extra]
    return "generation.train", argv, out_dir / f"000-{name.replace('/', '-')}-VAE-simple-check" / "log.txt"


def resume(kind: str):
    def check(scale, work: Path) -> dict:
        """SIGTERM to the run's process group once it logged step 2 (as SLURM signals every process of a step),
        then --resume to 2 steps past the stop, beside an uninterrupted run to the same step."""
        root, limit = work / f"resume-{kind}", scale.step_limit / 3
        module, argv, log_file = trainer(kind, scale, work, root / "stopped", 10**6)
        log = work / "logs" / f"resume-{kind}.log"
        stopped = start(torchrun(module, argv), log)
        deadline = time.monotonic() + limit
        while max(losses(log_file), default=0) < 2:
            if stopped.poll() is not None or time.monotonic() > deadline:
                os.killpg(stopped.pid, signal.SIGKILL)
                raise CheckFailed(f"resume-{kind} never reached step 2: {log.read_text(errors='replace')[-400:]}")
            time.sleep(0.2)
        os.killpg(stopped.pid, signal.SIGTERM)
        try:  # its exit code is recorded, not judged: torchrun itself exits 1 on SIGTERM
            exit_code = stopped.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(stopped.pid, signal.SIGKILL)
            raise CheckFailed(f"resume-{kind} did not stop within {limit:.0f} s of SIGTERM") from None
        stopped_at = max(losses(log_file))
        target = stopped_at + RESUMED_STEPS
        module, argv, reference_log = trainer(kind, scale, work, root / "reference", target)
        reference = start(torchrun(module, argv), work / "logs" / f"resume-{kind}-reference.log")
        module, argv, _ = trainer(kind, scale, work, root / "stopped", target, ["--resume", log_file.parent])
        finish(start(torchrun(module, argv), log), log, limit)
        finish(reference, work / "logs" / f"resume-{kind}-reference.log", limit)
        resumed, uninterrupted = losses(log_file), losses(reference_log)
        compared = list(range(stopped_at + 1, target + 1))
        difference = max((abs(resumed[s] - uninterrupted[s]) for s in compared if s in resumed and s in uninterrupted),
                         default=math.inf)
        return judge({"stopped_at_step": stopped_at, "exit_code_after_sigterm": exit_code, "comparisons": [
            comparison("resumed steps logged", sorted(s for s in resumed if s > stopped_at), compared, "=="),
            comparison("uninterrupted steps logged", sorted(uninterrupted), list(range(1, target + 1)), "=="),
            comparison("max |resumed loss - uninterrupted loss|", difference, 0.0)]})
    return check


# ----------------------------------------------------------------------------------------------
# Latent cache and evaluator
# ----------------------------------------------------------------------------------------------

def latent_cache_fp16(scale, work: Path) -> dict:
    """The same images cached with fp32 and fp16 moments: the fp16 means within fp16 rounding of the fp32 ones."""
    from util.latent_cache import LatentCacheDataset

    means = {}
    for dtype in ("fp32", "fp16"):
        cache, log = work / f"latent-cache-{dtype}", work / "logs" / f"latent-cache-{dtype}.log"
        finish(start([sys.executable, "-m", "pretrain.cache_latents", "--data_path", str(work / "data" / "train"),
                      "--cached_path", str(cache), "--vae_version", "d8", "--vae_path", str(work / "vae"),
                      "--input_size", str(scale.image_size), "--batch_size", str(scale.batch), "--shard_size", "64",
                      "--num_workers", "0", "--device", scale.device, "--moments_dtype", dtype], log), log,
               scale.step_limit / 2)
        data = LatentCacheDataset(cache, seed=0)
        means[dtype] = torch.stack([data.moments(index, flip)[0] for index in range(len(data)) for flip in (0, 1)])
    error = (means["fp16"] - means["fp32"]).abs()
    excess = float((error - (2.0**-11 * means["fp32"].abs() + 2.0**-25)).max())  # round to nearest, subnormals
    return judge({"images": len(means["fp32"]) // 2, "max_abs_error": float(error.max()), "comparisons": [
        comparison("max(|fp16 - fp32| - fp16 rounding bound) of cached means", excess, 0.0)]})


def evaluator(scale, work: Path) -> dict:
    """Inception statistics (random weights: NOT FID) on the device against the CPU (not on a CPU, where they are
    the same computation); generation.evaluate end to end."""
    from generation.inception import InceptionFeatureExtractor

    rng = np.random.default_rng(0)
    pair = [work / "eval-ref.npz", work / "eval-sample.npz"]
    for path in pair:
        np.savez(path, arr_0=rng.integers(0, 256, (scale.eval_images, 64, 64, 3), dtype=np.uint8))
    images = np.load(pair[1])["arr_0"]
    weights = work / "inception-random.pth"
    features = {device: InceptionFeatureExtractor(weights, device).features(images)
                for device in (("cpu", scale.device) if scale.device != "cpu" else ())}
    comparisons = []
    for label, index in (("pool", 0), ("spatial", 1), ("logits", 2)) if features else ():
        a, b = features["cpu"][index].double(), features[scale.device][index].double()
        comparisons += [comparison(f"{label} mean, relative difference to the CPU",
                                   float((b.mean(0) - a.mean(0)).norm() / a.mean(0).norm()), 1e-3),
                        comparison(f"{label} covariance, relative difference to the CPU",
                                   float((torch.cov(b.T) - torch.cov(a.T)).norm() / torch.cov(a.T).norm()), 1e-3)]
    log = work / "logs" / "evaluate.log"
    finish(start([sys.executable, "-m", "generation.evaluate", *map(str, pair), "--inception-weights", str(weights),
                  "--batch-size", str(min(64, scale.eval_images)), "--device", scale.device, "--output-json",
                  str(work / "eval.json")], log), log, scale.step_limit / 2)
    metrics = json.loads((work / "eval.json").read_text())
    comparisons.append(comparison("generation.evaluate FID (random weights) finite", math.isfinite(metrics["fid"]),
                                  True, "=="))
    return judge({"note": "random Inception weights: NOT FID", "comparisons": comparisons})


CHECKS = {"environment": environment, "assets": assets, "sdpa": sdpa, "agreement-mae": agreement_mae,
          "agreement-dit": agreement_generation("dit"), "agreement-sit": agreement_generation("sit"),
          "resume-mae": resume("mae"), "resume-dit": resume("dit"), "resume-sit": resume("sit"),
          "latent-cache-fp16": latent_cache_fp16, "evaluator": evaluator}


# ----------------------------------------------------------------------------------------------
# Running the steps: each in its own process, one after another, inside the time budget
# ----------------------------------------------------------------------------------------------

def run_check_here(name: str, scale, work: Path) -> None:
    """Runs one correctness step in this process and writes {status, result | error} to results/NAME.json."""
    try:
        entry = {"status": "ok", "result": CHECKS[name](scale, work)}
    except CheckFailed as error:
        entry = {"status": "failed", "error": str(error), "result": error.result}
    except Exception as error:  # a bug or an environment problem: the message is the finding
        entry = {"status": "failed", "error": f"{type(error).__name__}: {error}"}
    (work / "results" / f"{name}.json").write_text(json.dumps(entry, indent=1, default=str))


def step_commands(scale, work: Path, dry_run: bool) -> list:
    """(name, kind, command): the correctness checks first, then one scripts/benchmark.py call per row."""
    me = [sys.executable, str(Path(__file__).resolve()), "--work", str(work), "--out", str(work)]
    steps = [(name, "check", [*me, "--run-step", name, *(["--dry-run"] if dry_run else [])]) for name in CHECKS
             if name not in scale.leave_out]
    bench = str(REPO_ROOT / "scripts" / "benchmark.py")
    return steps + [(name, "bench", [sys.executable, bench, *argv, "--json", str(work / "results" / f"{name}.json")])
                    for name, argv in scale.bench]


def run_step(name: str, kind: str, command: list, work: Path, timeout: float) -> dict:
    """Runs one step's command under `timeout` and reads back what it wrote."""
    log, result_file = work / "logs" / f"{name}.log", work / "results" / f"{name}.json"
    result_file.unlink(missing_ok=True)  # a reused --work folder must not answer for this run
    began = time.perf_counter()
    try:
        finish(start(command, log), log, timeout)
        error = None
    except CheckFailed as failure:
        error = str(failure)
    entry = json.loads(result_file.read_text()) if result_file.is_file() else {}
    if kind == "bench":
        entry = {"status": "ok", "result": entry} if entry and error is None else \
            {"status": "timeout" if "ran past" in (error or "") else "failed", "error": error}
    elif not entry:
        entry = {"status": "failed", "error": error or "the step wrote no result"}
    return {"kind": kind, **entry, "seconds": round(time.perf_counter() - began, 1)}


def verdict(steps: dict) -> str:
    """PASS when every correctness step passed and no benchmark call crashed (a timed-out row is reported)."""
    bad = [name for name, entry in steps.items()
           if (entry["kind"] == "check" and entry["status"] != "ok") or entry["status"] == "failed"]
    return "PASS" if not bad else f"FAIL ({', '.join(bad)})"


def show(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return f"[{value[0]}..{value[-1]}]" if isinstance(value, list) and len(value) > 3 else str(value)


def summary(entry: dict) -> str:
    from scripts.benchmark import format_row

    if entry["status"] != "ok":
        return entry.get("error") or entry.get("reason", "")
    if entry["kind"] == "bench":
        return format_row(entry["result"])
    return "; ".join(f"{item['what']} {show(item['value'])} {item['rule']} {show(item['limit'])}"
                     for item in entry["result"]["comparisons"])


def write_report(out: Path, data: dict) -> None:
    lines = [f"gpu_check ({data['meta']['mode']}): {data['verdict']} after {data['meta']['elapsed_seconds']} s",
             f"{'step':<26} {'status':<8} {'secs':>6}  comparison / figures"]
    lines += [f"{name:<26} {entry['status']:<8} {entry.get('seconds', ''):>6}  {summary(entry)}"[:600]
              for name, entry in data["steps"].items()]
    for name, text in (("gpu_check.json", json.dumps(data, indent=1, default=str)),
                       ("gpu_check.txt", "\n".join(lines) + "\n")):
        (out / f".{name}").write_text(text)
        os.replace(out / f".{name}", out / name)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("GPU readiness check (see the module docstring)")
    parser.add_argument("--out", required=True, help="folder for gpu_check.json, gpu_check.txt and the logs")
    parser.add_argument("--work", default=None, help="scratch folder (default: a new temporary folder, removed after)")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (checks the script itself)")
    parser.add_argument("--only", nargs="+", default=None, help="run only these steps, in the usual order")
    parser.add_argument("--skip", nargs="+", default=[], help="leave these steps out")
    parser.add_argument("--time-budget-min", type=float, default=None,
                        help="no step starts after this and each ends by it (default: 7.5 on GPU, none dry)")
    parser.add_argument("--run-step", default=None, choices=sorted(CHECKS), help=argparse.SUPPRESS)
    return finish_parser(parser)


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    scale = DRY_SCALE if args.dry_run else GPU_SCALE
    if args.run_step:
        run_check_here(args.run_step, scale, Path(args.work))
        return 0
    out = Path(args.out)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu_check_"))
    for folder in (out, work / "logs", work / "results"):
        folder.mkdir(parents=True, exist_ok=True)
    commands = step_commands(scale, work, args.dry_run)
    unknown = (set(args.only or []) | set(args.skip)) - {name for name, _, _ in commands}
    if unknown:
        raise SystemExit(f"gpu_check: unknown step(s) {', '.join(sorted(unknown))}; choose from "
                         f"{', '.join(name for name, _, _ in commands)}.")
    budget = args.time_budget_min if args.time_budget_min is not None else scale.budget_min
    began = time.monotonic()
    deadline = math.inf if budget is None else began + budget * 60
    data = {"meta": {"mode": "dry run (CPU, tiny sizes)" if args.dry_run else "GPU", "started":
                     time.strftime("%Y-%m-%d %H:%M:%S %Z"), "budget_min": budget, "elapsed_seconds": 0},
            "verdict": "running", "steps": {}}
    for name, kind, command in commands:
        if (args.only and name not in args.only) or name in args.skip:
            continue
        left = deadline - time.monotonic()
        if left < 15:
            data["steps"][name] = {"kind": kind, "status": "skipped", "reason": "time budget spent"}
        else:
            print(f"[gpu_check] {name} ...", flush=True)
            data["steps"][name] = run_step(name, kind, command, work, min(scale.step_limit, left))
            print(f"[gpu_check] {name}: {data['steps'][name]['status']}", flush=True)
        data["meta"]["elapsed_seconds"] = round(time.monotonic() - began, 1)
        write_report(out, data)
    data["verdict"] = verdict(data["steps"])
    write_report(out, data)
    with tarfile.open(out / "gpu_check_logs.tar.gz", "w:gz") as archive:
        archive.add(work / "logs", arcname="logs")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    print((out / "gpu_check.txt").read_text())
    return 0 if data["verdict"] == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
