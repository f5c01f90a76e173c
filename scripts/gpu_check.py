"""One command that exercises every CUDA path of the project and reports what it measured.

    bash scripts/gpu_check.sh --out gpu_check_out                 # on one H100/H200, about 8 minutes
    bash scripts/gpu_check.sh --out /tmp/gc --dry-run             # the same steps at tiny scale on CPU/gloo

Steps (independent ones run in parallel, `--jobs`; the benchmark runs alone so its timings are clean):
  environment      GPU, driver, CUDA/cuDNN/NCCL, torch and our dependencies' versions
  assets           a toy ImageFolder, a random-weight VAE (SD-VAE's layout on GPU), random Inception weights
  benchmark        scripts/benchmark.py --preset gpu-check: DiT-XL/2 and SiT-XL/2 training images/s, MFU and
                   peak memory at batch 32 (baseline and optimised) and 256 (optimised), with and without
                   torch.compile, and the SD-VAE encode with channels_last vs NCHW (rows in benchmark.json)
  sdpa             which scaled_dot_product_attention kernel (flash / memory-efficient / cudnn / math) runs
                   in bf16, fp16 and fp32
  {mae,dit,sit}-{fp32,bf16,fp16}  a few steps of USP pretraining, then DiT and SiT finetuning from the USP
                   checkpoint the fp32 pretraining run wrote, under `torchrun --nproc_per_node=1` (NCCL on
                   CUDA, gloo on CPU); every loss finite, peak memory read from the run's log
  {dit,sit}-compile  the bf16 run again with --compile (pretraining has no --compile flag)
  {mae,dit,sit}-agreement  losses of steps 1-3 (same initial weights, batches and noise) of bf16 / fp16 / compiled
                   bf16 against fp32 (TF32 on, as training runs it): relative difference <= --loss-tolerance
  {mae,dit,sit}-resume  SIGTERM to the torchrun process group mid-run, then --resume from the run directory;
                   the resumed losses against the uninterrupted bf16 run (bit-exact required on CPU)
  latent-cache-fp16  the same images cached with fp32 and fp16 moments: stored and training-latent error
  sample-*         DDPM-250 (DiT-XL/2) and SDE (SiT-XL/2, 250 steps) sampling of a few images in bf16 and fp32,
                   pixel difference between the two (the dry run uses 25 steps)
  evaluator        random Inception weights (NOT FID): the feature statistics FID is computed from, on the
                   GPU against the CPU for the same images (relative difference <= --eval-tolerance), and
                   generation/evaluate.py end to end on the GPU

Writes to --out: gpu_check.json (rewritten after every step, so a killed run keeps what finished),
gpu_check.txt (the table), benchmark.json and gpu_check_logs.tar.gz (every subprocess's output). Scratch
files (checkpoints, caches) go to --work (a temporary folder by default), never to --out.
"""
import argparse
import json
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from scripts import gpu_check_steps as steps
from scripts.gpu_check_runner import Step, run_steps
from util.cli import finish_parser

TRAIN_SIZES = {  # --train-size: (MAE preset, DiT preset, SiT preset); the generators load the MAE encoder
    "B": ("vit_base_patch_vae", "DiT-B/2-VAE-simple", "SiT-B/2-VAE-simple"),
    "XL": ("vit_xlarge_patch_vae", "DiT-XL/2-VAE-simple", "SiT-XL/2-VAE-simple"),
}
TINY_MAE = {"embed_dim": 32, "depth": 2, "num_heads": 2, "decoder_embed_dim": 32, "decoder_depth": 1,
            "decoder_num_heads": 2}
TINY_GEN = {"hidden_size": 32, "depth": 2, "num_heads": 2}
VAE_LAYOUTS = {"sd": ((128, 256, 512, 512), 2, 32), "tiny": ((8, 8, 16, 16), 1, 4)}  # channels, layers, groups
PACKAGES = ("torch", "torchvision", "timm", "diffusers", "torch-fidelity", "torchdiffeq", "scipy", "numpy",
            "safetensors", "tensorboard", "pillow", "huggingface-hub", "tqdm")


@dataclass
class Scale:
    """Sizes of one check run: the real one on a GPU, or the dry run on CPU."""

    device: str
    image_size: int
    classes: int
    images_per_class: int
    batch: int
    workers: int
    steps: int              # steps of each training run (the uninterrupted reference of the resume check)
    mae_model: str
    mae_kwargs: dict
    gen_models: dict
    gen_kwargs: dict
    vae_layout_name: str
    sdpa_model: str
    sdpa_kwargs: dict
    sample_models: dict
    sample_kwargs: dict
    sample_images: int
    sample_steps: int
    eval_images: int
    bench_runs: list        # argument lists of scripts/benchmark.py, one call each
    python: str = sys.executable
    run_timeout: float = 300.0
    resume_precision: str = "bf16"
    loss_tolerance: float = 0.05
    eval_tolerance: float = 1e-3
    extra: dict = field(default_factory=dict)


def gpu_scale(args) -> Scale:
    mae, dit, sit = TRAIN_SIZES[args.train_size]
    # Batch 32: baseline (fp32, the official recipe) vs optimised; with --compile and at batch 256 (where the fp32
    # baseline cannot fit) the optimised mode alone. The VAE encode (channels_last vs NCHW) runs in the first call.
    bench = [["--preset", "gpu-check", "--batch-size", "32"],
             ["--preset", "gpu-check", "--workloads", "dit", "sit", "--batch-size", "32", "--compile", "--modes", "optimised"],
             ["--preset", "gpu-check", "--workloads", "dit", "sit", "--batch-size", "256", "--modes", "optimised"],
             ["--preset", "gpu-check", "--workloads", "dit", "sit", "--batch-size", "256", "--compile", "--modes",
              "optimised"]]
    return Scale(device="cuda", image_size=256, classes=4, images_per_class=16, batch=16, workers=4, steps=22,
                 mae_model=mae, mae_kwargs={}, gen_models={"dit": dit, "sit": sit}, gen_kwargs={},
                 vae_layout_name="sd", sdpa_model="DiT-XL/2", sdpa_kwargs={},
                 sample_models={"dit": "DiT-XL/2", "sit": "SiT-XL/2"}, sample_kwargs={}, sample_images=4,
                 sample_steps=250, eval_images=128, bench_runs=bench)


def dry_scale(args) -> Scale:
    tiny = ["--workloads", "dit", "sit", "vae", "--sizes", "tiny", "--image-size", "32", "--device", "cpu", "--vae",
            "tiny", "--repeats", "1", "--iters", "1", "--warmup", "1", "--threads", "1", "--batch-size", "4",
            "--sample-batch-size", "2", "--opt-precision", "fp32"]
    return Scale(device="cpu", image_size=32, classes=2, images_per_class=8, batch=4, workers=0, steps=12,
                 mae_model="vit_base_patch_vae", mae_kwargs=TINY_MAE,
                 gen_models={"dit": "DiT-S/2-VAE-simple", "sit": "SiT-S/2-VAE-simple"}, gen_kwargs=TINY_GEN,
                 vae_layout_name="tiny", sdpa_model="DiT-S/2", sdpa_kwargs=TINY_GEN,
                 sample_models={"dit": "DiT-S/2", "sit": "SiT-S/2"}, sample_kwargs=TINY_GEN, sample_images=2,
                 sample_steps=25, eval_images=16, bench_runs=[tiny], run_timeout=600.0)


# ----------------------------------------------------------------------------------------------
# Steps that need this module's configuration
# ----------------------------------------------------------------------------------------------

def environment(scale) -> dict:
    from importlib import metadata

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda_build": torch.version.cuda,
            "packages": versions, "cuda_available": torch.cuda.is_available()}
    if scale.device == "cuda":
        if not torch.cuda.is_available():
            raise steps.CheckFailed("no CUDA device is visible; run with --dry-run on a machine without a GPU")
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}", gpu_memory_gib=props.total_memory / 2**30,
                    multiprocessors=props.multi_processor_count, cudnn=torch.backends.cudnn.version(),
                    nccl=".".join(map(str, torch.cuda.nccl.version())), bf16_supported=torch.cuda.is_bf16_supported())
        smi = shutil.which("nvidia-smi")
        if smi:
            query = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                                   text=True, timeout=30)
            info["driver"] = query.stdout.strip() or None
    return info


def make_assets(scale, work: Path) -> dict:
    from diffusers import AutoencoderKL

    from generation.inception import save_random_inception_weights
    from demo.toy_dataset import write_toy_dataset

    data = write_toy_dataset(work / "data", num_classes=scale.classes, train_per_class=scale.images_per_class,
                             val_per_class=1, image_size=scale.image_size, seed=0)
    channels, layers, groups = VAE_LAYOUTS[scale.vae_layout_name]
    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=channels, layers_per_block=layers, latent_channels=4,
                        norm_num_groups=groups, sample_size=scale.image_size)
    vae.save_pretrained(work / "vae")
    inception = save_random_inception_weights(work / "inception-random.pth")
    return {"data": Path(data), "vae": work / "vae", "inception": inception}


def benchmark(scale, work: Path, out: Path) -> dict:
    """scripts/benchmark.py once per configuration; rows gathered into --out/benchmark.json."""
    rows, failures = [], []
    for index, argv in enumerate(scale.bench_runs):
        json_path = work / f"benchmark-{index}.json"
        command = [scale.python, str(steps.REPO_ROOT / "scripts" / "benchmark.py"), *argv, "--json", str(json_path)]
        try:
            steps.run_logged(command, work / "logs" / "benchmark.log", scale, scale.run_timeout * 2)
        except steps.CheckFailed as error:
            failures.append({"argv": argv, "error": str(error)})
        if json_path.is_file():
            result = json.loads(json_path.read_text())
            for row in result.get("rows", []):
                rows.append({"argv": " ".join(argv), **row})
        (out / "benchmark.json").write_text(json.dumps({"rows": rows, "failures": failures}, indent=1))
    if failures and not rows:
        raise steps.CheckFailed(f"every benchmark call failed; first: {failures[0]['error'][:300]}")
    return {"rows": len(rows), "failed_calls": len(failures), "json": str(out / "benchmark.json"),
            "figures": [{key: row.get(key) for key in ("argv", "workload", "mode", "config", "images_per_sec", "mfu",
                                                         "peak_mem_mb", "error")} for row in rows]}


# ----------------------------------------------------------------------------------------------
# The step graph
# ----------------------------------------------------------------------------------------------

def pretrain_has_compile() -> bool:
    from pretrain.main_pretrain import get_args_parser

    return any("--compile" in action.option_strings for action in get_args_parser()._actions)


def build_steps(scale, work: Path, out: Path) -> list:
    ctx = {}  # results of finished steps, read by the steps that depend on them

    def keep(name, function):
        def run():
            ctx[name] = function()
            return ctx[name]
        return run

    def assets():
        return ctx["assets"]

    def training(kind, precision, extra=(), tag=""):
        def run():
            if kind != "mae":
                ctx["assets"]["usp_checkpoint"] = steps.usp_checkpoint(ctx["mae-fp32"])
            return steps.train_run(kind, precision, scale, assets(), work, extra=extra, tag=tag)
        return run

    def agreement(kind, compiled):
        def run():
            result = {precision: steps.precision_agreement(ctx[f"{kind}-fp32"], ctx[f"{kind}-{precision}"],
                                                           scale.loss_tolerance, precision)
                      for precision in ("bf16", "fp16")}
            if compiled:
                result["compile"] = steps.precision_agreement(ctx[f"{kind}-bf16"], ctx[f"{kind}-compile"],
                                                              scale.loss_tolerance, "bf16+compile")
            return result
        return run

    graph = [
        Step("environment", keep("environment", lambda: environment(scale))),
        Step("assets", keep("assets", lambda: make_assets(scale, work))),
        Step("benchmark", lambda: benchmark(scale, work, out), exclusive=True),
        Step("sdpa", lambda: steps.sdpa_backends(scale)),
        Step("latent-cache-fp16", lambda: steps.latent_cache_precision(scale, assets(), work), deps=("assets",)),
    ]
    mae_compile = pretrain_has_compile()
    for kind in ("mae", "dit", "sit"):
        base = ("assets",) if kind == "mae" else ("assets", "mae-fp32")
        for precision in ("fp32", "bf16", "fp16"):
            name = f"{kind}-{precision}"
            graph.append(Step(name, keep(name, training(kind, precision)), deps=base))
        compiled = kind != "mae" or mae_compile
        if compiled:
            graph.append(Step(f"{kind}-compile", keep(f"{kind}-compile", training(kind, "bf16", ["--compile"],
                                                                                  "-compile")), deps=base))
        graph.append(Step(f"{kind}-agreement", agreement(kind, compiled),
                          deps=tuple(f"{kind}-{p}" for p in ("fp32", "bf16", "fp16")) + ((f"{kind}-compile",)
                                                                                         if compiled else ())))
        graph.append(Step(f"{kind}-resume", lambda kind=kind: steps.preempt_and_resume(
            kind, scale, assets(), work, ctx[f"{kind}-bf16"]), deps=(f"{kind}-bf16",)))
    for family in ("dit", "sit"):
        checkpoint = f"sample-checkpoint-{family}"

        def save(family=family):
            path = steps.save_sampling_checkpoint(family, scale, work / f"sample-{family}.pt")
            ctx["assets"][f"sample_ckpt_{family}"] = path
            return {"checkpoint": str(path), "model": scale.sample_models[family]}
        graph.append(Step(checkpoint, save, deps=("assets",)))
        for precision in ("bf16", "fp32"):
            name = f"sample-{family}-{precision}"
            graph.append(Step(name, keep(name, lambda family=family, precision=precision: steps.sample_run(
                family, precision, scale, assets(), work)), deps=(checkpoint,)))
        graph.append(Step(f"sample-{family}-bf16-vs-fp32", lambda family=family: steps.compare_samples(
            ctx[f"sample-{family}-bf16"], ctx[f"sample-{family}-fp32"]),
            deps=(f"sample-{family}-bf16", f"sample-{family}-fp32")))
    graph.append(Step("evaluator", lambda: steps.evaluator_parity(scale, assets(), work), deps=("assets",)))
    return graph


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("GPU readiness check (see the module docstring)")
    parser.add_argument("--out", required=True, help="folder for gpu_check.json, gpu_check.txt, benchmark.json, logs")
    parser.add_argument("--work", default=None, help="scratch folder (default: a new temporary folder, removed after)")
    parser.add_argument("--dry-run", action="store_true", help="tiny scale on CPU with gloo (checks the script itself)")
    parser.add_argument("--train-size", default="B", choices=sorted(TRAIN_SIZES),
                        help="size of the MAE/DiT/SiT training checks on GPU (the benchmark always measures XL)")
    parser.add_argument("--jobs", type=int, default=None, help="steps run at once (default: 4 on GPU, 2 dry)")
    parser.add_argument("--only", nargs="+", default=None, help="run only these steps (and what they need)")
    parser.add_argument("--skip", nargs="+", default=[], help="steps to leave out, e.g. benchmark")
    parser.add_argument("--time-budget-min", type=float, default=None,
                        help="steps not started by then are skipped and subprocesses are stopped 90 s after it "
                             "(default: 7 on GPU, so the whole check ends within about 8.5 minutes; none dry)")
    parser.add_argument("--loss-tolerance", type=float, default=0.05,
                        help="largest relative loss difference (steps 1-3) of bf16/fp16/compile from fp32")
    parser.add_argument("--eval-tolerance", type=float, default=1e-3,
                        help="largest relative difference of the GPU's Inception statistics from the CPU's")
    parser.add_argument("--python", default=sys.executable, help="interpreter of the subprocesses")
    return finish_parser(parser)


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    scale = dry_scale(args) if args.dry_run else gpu_scale(args)
    scale.python, scale.loss_tolerance, scale.eval_tolerance = args.python, args.loss_tolerance, args.eval_tolerance
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu_check_"))
    (work / "logs").mkdir(parents=True, exist_ok=True)
    budget = args.time_budget_min if args.time_budget_min is not None else (None if args.dry_run else 7.0)
    meta = {"mode": "dry-run (CPU, gloo, tiny sizes)" if args.dry_run else "GPU", "device": scale.device,
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "argv": sys.argv[1:] if argv is None else list(argv),
            "loss_tolerance": scale.loss_tolerance, "eval_tolerance": scale.eval_tolerance,
            "train_models": {"mae": scale.mae_model, **scale.gen_models}, "image_size": scale.image_size}
    if budget is not None:  # steps start until the budget is spent; subprocesses stop 90 s after it
        steps.HARD_DEADLINE = time.monotonic() + budget * 60 + 90
    graph = build_steps(scale, work, out)
    try:
        record = run_steps(graph, out, meta, jobs=args.jobs or (2 if args.dry_run else 4),
                           budget_seconds=None if budget is None else budget * 60, only=args.only, skip=args.skip)
    finally:
        with tarfile.open(out / "gpu_check_logs.tar.gz", "w:gz") as archive:
            archive.add(work / "logs", arcname="logs")
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print((out / "gpu_check.txt").read_text())
    return 0 if record.all_passed() else 1


if __name__ == "__main__":
    sys.exit(main())
