"""The shell recipes in scripts/ run the papers' setting (USP's scripts and defaults) and print it first.

A stand-in `torchrun` on PATH records the command; each recipe's flags are then parsed by the entry point's
own parser, so a flag the code does not know fails here, and the values are compared with USP's setting.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_recipe(tmp_path, script, **env):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    record = tmp_path / "argv.txt"
    fake = bin_dir / "torchrun"
    fake.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > {record}\n')
    fake.chmod(0o755)
    full_env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", **env)
    result = subprocess.run(["bash", str(REPO / "scripts" / script)], env=full_env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    argv = record.read_text().splitlines()
    module_at = argv.index("-m")
    return argv[module_at + 1], argv[module_at + 2:], result.stderr


def parse(module, args):
    if module == "generation.sample_ddp":
        from generation.sample_ddp import parse_args
        return parse_args(args)
    parser = __import__(module, fromlist=["get_args_parser"]).get_args_parser()
    return parser.parse_args(args)


PAPER = {
    # USP's released DiT/SiT-XL weights: "pretrained for 1600 epochs" (AMAP-ML/USP README.md), XL encoder.
    "pretrain.sh": dict(precision="fp16", vae_precision="fp16", batch_size=64, blr=1.5e-4, epochs=1600,
                        warmup_epochs=40, mask_ratio=0.75, norm_pix_loss=True, input_size=224, save_every=40,
                        weight_decay=0.05, model="vit_xlarge_patch_vae", vae_version="d8", norm_image=False,
                        accum_iter=8),
    "train_dit.sh": dict(model="DiT-XL/2-VAE-simple", global_batch_size=256, max_steps=400000, precision="fp32",
                         ckpt_every=50000, image_size=256, lr=1e-4, ema_decay=0.9999, cfg_scale=1.0),
    # USP's SiT train.py: no autocast, TF32 (AMAP-ML/USP generation/SiT/train.py).
    "train_sit_repa.sh": dict(model="SiT-XL/2-VAE-simple", global_batch_size=256, max_steps=400000, precision="fp32",
                              repa=True, encoder_depth=8, proj_coeff=0.5, cfg_scale=1.0),
    "train_sit.sh": dict(model="SiT-XL/2-VAE-simple", global_batch_size=256, max_steps=400000, precision="fp32",
                         path_type="Linear", prediction="velocity", fid_mode="SDE", cfg_scale=1.0),
    "sample_dit.sh": dict(model="DiT-XL/2-VAE-simple", cfg_scale=1.0, num_sampling_steps=250, sampler="ddpm",
                          per_proc_batch_size=128, num_fid_samples=50000, precision="fp32", tf32=True),
    "sample_sit.sh": dict(model="SiT-XL/2-VAE-simple", mode="SDE", sampling_method="Euler", diffusion_form="sigma",
                          last_step="Mean", last_step_size=0.04, cfg_scale=1.0, num_sampling_steps=250,
                          per_proc_batch_size=128, precision="fp32"),
    "finetune.sh": dict(precision="fp16", vae_precision="fp16", blr=5e-4, layer_decay=0.65, mixup=0.8, cutmix=1.0,
                        image_mix=False, drop_path=0.1, smoothing=0.1, reprob=0.25, epochs=100, batch_size=32,
                        accum_iter=4),
    "linprobe.sh": dict(precision="fp16", vae_precision="fp16", blr=0.1, weight_decay=0.0, epochs=90,
                        batch_size=512, global_pool=False, accum_iter=4),
}
ENV = dict(DATA_PATH="/data/imagenet", VAE_PATH="/weights/sd-vae-ft-ema", FINETUNE="/ckpt/usp.pth", CKPT="/ckpt/x.pt",
           REPA_ENCODER="/ckpt/dinov2_vitb14_pretrain.pth")


@pytest.mark.parametrize("script", sorted(PAPER))
def test_recipe_runs_the_paper_setting_and_prints_it(tmp_path, script):
    module, args, printed = run_recipe(tmp_path, script, **ENV)
    parsed = vars(parse(module, args))
    assert {key: parsed[key] for key in PAPER[script]} == PAPER[script]
    assert "[recipe]" in printed and module in printed
    assert all(flag in printed for flag in args if flag.startswith("--"))  # every flag is shown


# USP's pretraining batch: 64 per GPU on 64 GPUs = 4096 (AMAP-ML/USP pretrain/PRETRAIN.md), worked out per count.
@pytest.mark.parametrize("nodes, gpus, per_gpu, accum_iter", [(1, 8, 64, 8), (2, 8, 64, 4), (8, 8, 64, 1),
                                                                (1, 1, 64, 64), (16, 8, 32, 1)])
def test_pretrain_recipe_reaches_batch_4096_on_any_gpu_count(tmp_path, nodes, gpus, per_gpu, accum_iter):
    _, args, printed = run_recipe(tmp_path, "pretrain.sh", NNODES=str(nodes), GPUS=str(gpus), **ENV)
    assert args[args.index("--accum_iter") + 1] == str(accum_iter)
    assert args[args.index("--batch_size") + 1] == str(per_gpu)
    assert f"effective batch 4096 = --batch_size {per_gpu} x {nodes * gpus} GPUs x --accum_iter {accum_iter}" in printed
    assert "lr = 1.5e-4 x batch / 256 = 0.0024" in printed and "cannot make" not in printed


def test_pretrain_recipe_says_when_the_gpu_count_cannot_reach_4096(tmp_path):
    _, args, printed = run_recipe(tmp_path, "pretrain.sh", NNODES="3", GPUS="4", **ENV)  # 768 per step
    assert args[args.index("--accum_iter") + 1] == "5"
    assert "12 GPUs x --batch_size 64 x --accum_iter 5 cannot make the paper's batch 4096" in printed


# MAE's fine-tuning (1024, blr 5e-4) and probe (16384, blr 0.1) batches (facebookresearch/mae FINETUNE.md, LINPROBE.md).
@pytest.mark.parametrize("script, accum_iter, lr", [("finetune.sh", 2, "0.002"), ("linprobe.sh", 2, "6.4")])
def test_understanding_recipes_reach_maes_batch_on_16_gpus(tmp_path, script, accum_iter, lr):
    _, args, printed = run_recipe(tmp_path, script, NNODES="2", GPUS="8", **ENV)
    assert args[args.index("--accum_iter") + 1] == str(accum_iter)
    assert f"x 16 GPUs x --accum_iter {accum_iter}; lr = " in printed and f" / 256 = {lr}\n" in printed


def test_sbatch_gives_srun_the_cpus_per_task(tmp_path):
    """Since Slurm 22.05 srun does not inherit --cpus-per-task from sbatch: the template passes it on."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "srun.txt"
    for name, body in {"srun": f'printf "%s\\n" "$@" > {record}', "scontrol": "echo node0", "scancel": "true"}.items():
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", RECIPE="dit", SLURM_JOB_ID="7",
               SLURM_JOB_NODELIST="node0", SLURM_CPUS_PER_TASK="16", SLURM_SUBMIT_DIR=str(tmp_path))
    result = subprocess.run(["bash", str(REPO / "scripts" / "slurm" / "train.sbatch")], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    argv = record.read_text().splitlines()
    assert argv[:2] == ["--kill-on-bad-exit=1", "--cpus-per-task=16"]
