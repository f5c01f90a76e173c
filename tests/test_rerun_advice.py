"""Reruns advised right (issue 27, items 2-4): a resume with a changed run-defining flag is refused in one sentence
(or accepted on purpose), a full disk names the exact command that continues the run and that command works, a
latent-cache shard whose bytes changed is named, and a recipe that fails under torchrun ends with the worker's
sentence and exit code.

The expected sentences and commands are written out by hand; the cache checksum is zlib's CRC-32 of the file.
"""
import argparse
import errno
import json
import os
import re
import shlex
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import safetensors.torch
import torch
from diffusers import AutoencoderKL

from conftest import REPO_ROOT, free_port
from models.latent_spec import get_latent_spec
from models.vae import LatentCodec
from pretrain.cache_latents import extract_latent_cache
from util.checkpoint import require_fitting_weights, require_same_args
from util.cli import advising_resume, continue_command
from util.disk import DiskFullError, disk_full_error
from util.errors import UserError
from util.latent_cache import CHECKSUMS, MANIFEST, LatentCacheDataset, shard_path, verify_shard

MAE_KWARGS = {"embed_dim": 32, "depth": 2, "num_heads": 2, "decoder_embed_dim": 32, "decoder_depth": 1,
              "decoder_num_heads": 2, "patch_size": 1}


# ------------------------------------------------------------------------ item 2: resume compares the flags

def test_changed_flag_is_refused_with_old_and_new_value():
    checkpoint = {"args": {"mask_ratio": 0.75, "seed": 0, "model": "m"}}
    args = argparse.Namespace(mask_ratio=0.5, seed=0, model="m")
    with pytest.raises(UserError) as info:
        require_same_args(checkpoint, args, ("model", "mask_ratio", "seed"), "run/checkpoint-3.pth", dashes=False)
    assert str(info.value) == ("--resume run/checkpoint-3.pth was trained with --mask_ratio 0.75 but this command "
                               "says 0.5; use the original value to continue that run, or pass --allow_changed_args "
                               "to change it on purpose.")


def test_several_changes_are_all_named_and_allow_logs_them():
    checkpoint = {"args": {"global_seed": 0, "image_size": 256}}
    args = argparse.Namespace(global_seed=1, image_size=256, allow_changed_args=True)
    also = [("the global batch", 256, 128)]
    with pytest.raises(UserError) as info:
        require_same_args(checkpoint, args, ("global_seed", "image_size"), "ck.pt", also=also)
    assert str(info.value) == ("--resume ck.pt was trained with --global-seed 0 but this command says 1 (and 1 more: "
                               "--global-seed 0 -> 1; the global batch 256 -> 128); use the original value to "
                               "continue that run, or pass --allow-changed-args to change it on purpose.")
    logged = []
    require_same_args(checkpoint, args, ("global_seed", "image_size"), "ck.pt", also=also, allow=True,
                      log=logged.append)
    assert logged == ["--allow-changed-args: continuing ck.pt with changed settings: --global-seed 0 -> 1; "
                      "the global batch 256 -> 128"]


def test_flags_a_checkpoint_does_not_record_are_not_compared():
    require_same_args({"args": {"seed": 0}}, argparse.Namespace(seed=0, drop_path=0.2), ("seed", "drop_path"), "ck")


def test_weight_mismatch_names_the_keys():
    with pytest.raises(UserError) as info:
        require_fitting_weights(torch.nn.Linear(2, 4), torch.nn.Linear(2, 3).state_dict(), "ck.pth", "--model m")
    assert str(info.value) == ("checkpoint ck.pth does not fit --model m (2 differences, e.g. weight (3, 2) vs (4, 2); "
                               "bias (3,) vs (4,)); pass the model settings the checkpoint was trained with.")
    with pytest.raises(UserError, match=r"\(1 differences, e.g. missing bias\)"):
        require_fitting_weights(torch.nn.Linear(2, 4), {"weight": torch.zeros(4, 2)}, "ck.pth", "--model m")


# ---------------------------------------------------------------- item 3: the command that continues the run

def test_continue_command_replaces_resume_and_keeps_the_launcher(tmp_path, monkeypatch):
    (tmp_path / "checkpoint-0.pth").write_bytes(b"")
    monkeypatch.setattr(sys, "argv", [str(REPO_ROOT / "pretrain" / "main_pretrain.py"), "--epochs", "2", "--resume",
                                      "old", "--output_dir", "my out", "--resume=older"])
    for name in ("TORCHELASTIC_RUN_ID", "LOCAL_WORLD_SIZE", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    rest = f"-m pretrain.main_pretrain --epochs 2 --output_dir 'my out' --resume {tmp_path}"
    assert continue_command(tmp_path, "pretrain.main_pretrain") == f"continue the run with `{sys.executable} {rest}`"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.setenv("WORLD_SIZE", "16")
    assert (continue_command(tmp_path, "pretrain.main_pretrain")
            == f"continue the run with `torchrun --nnodes=2 --nproc_per_node=8 {rest}`")
    # Called in-process by another program (pytest here, the demo): the flag, not a wrong command.
    assert (continue_command(tmp_path, "generation.train")
            == f"continue the run with the same command plus --resume {tmp_path}")


def test_a_run_without_checkpoints_is_started_again(tmp_path):
    assert continue_command(tmp_path, "pretrain.main_pretrain") == "rerun the same command"


def test_full_disk_in_a_trainer_names_the_continue_command(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "0000002.pt").write_bytes(b"")

    def save():
        raise disk_full_error(tmp_path / "checkpoints" / "0000004.pt")

    with pytest.raises(DiskFullError) as info:
        advising_resume(save, tmp_path, None)()
    folder = re.escape(str(tmp_path))
    assert re.fullmatch(rf"disk full at {folder}/checkpoints/0000004\.pt \(\d+ MiB free\); free some space, then "
                        rf"continue the run with the same command plus --resume {folder}\.", str(info.value))


# A sitecustomize that makes one checkpoint save fail as on a full disk, in a trainer started as users start it.
FULL_DISK_AT = '''
import builtins, errno, os
_open = builtins.open
def _failing_open(file, mode="r", *args, **kwargs):
    if os.environ["FULL_DISK_AT"] in str(file) and ".tmp-" in str(file):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return _open(file, mode, *args, **kwargs)
builtins.open = _failing_open
'''


def run_until_full_disk(tmp_path, args, fail_at: str) -> str:
    """Runs `python args` with the save of `fail_at` failing for lack of space; returns the command it advises."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(FULL_DISK_AT)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{hook}:{REPO_ROOT}", FULL_DISK_AT=fail_at)
    failed = subprocess.run([sys.executable, *map(str, args)], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert failed.returncode == 2, failed.stderr[-4000:]
    last = failed.stderr.strip().splitlines()[-1]
    assert "disk full at " in last and fail_at in last and "Traceback" not in failed.stderr, failed.stderr[-4000:]
    return re.search(r"continue the run with `(.+)`\.$", last).group(1)


def run_advised(command: str):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(shlex.split(command), cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


@pytest.mark.slow
def test_pretraining_after_a_full_disk_continues_with_the_advised_command(tmp_path, tiny_image_folder, tiny_vae_dir):
    out = tmp_path / "out"
    args = ["pretrain/main_pretrain.py", "--model", "vit_base_patch_vae", "--model_kwargs", json.dumps(MAE_KWARGS),
            "--input_size", "32", "--data_path", tiny_image_folder, "--vae_path", tiny_vae_dir, "--device", "cpu",
            "--precision", "fp32", "--batch_size", "16", "--epochs", "2", "--warmup_epochs", "0", "--num_workers", "0",
            "--output_dir", out, "--log_dir", out]
    command = run_until_full_disk(tmp_path, args, "checkpoint-1.pth")  # checkpoint-0.pth was saved
    assert command.endswith(f"--resume {out}") and "-m pretrain.main_pretrain" in command
    done = run_advised(command)
    assert "resumed" in done.stdout + done.stderr
    assert sorted(path.name for path in out.glob("checkpoint-*.pth")) == ["checkpoint-0.pth", "checkpoint-1.pth"]


@pytest.mark.slow
def test_generation_after_a_full_disk_continues_the_same_experiment(tmp_path, tiny_image_folder, tiny_vae_dir):
    results = tmp_path / "results"
    args = ["-m", "generation.train", "--model", "DiT-S/2", "--data-path", tiny_image_folder / "train",
            "--vae-path", tiny_vae_dir, "--image-size", "32", "--num-classes", "4", "--global-batch-size", "16",
            "--max-steps", "4", "--ckpt-every", "2", "--eval-every", "0", "--device", "cpu", "--precision", "fp32",
            "--num-workers", "0", "--model-kwargs", json.dumps({"hidden_size": 32, "depth": 2, "num_heads": 2}),
            "--results-dir", results]
    command = run_until_full_disk(tmp_path, args, "0000004.pt")
    (experiment,) = results.iterdir()
    assert command.endswith(f"--resume {experiment}")
    run_advised(command)
    assert [path.name for path in results.iterdir()] == [experiment.name]  # no experiment 001
    assert sorted(path.name for path in (experiment / "checkpoints").iterdir()) == ["0000002.pt", "0000004.pt"]


@pytest.mark.slow
def test_pretraining_resume_with_another_mask_ratio_is_refused_or_allowed(tmp_path, tiny_image_folder, tiny_vae_dir,
                                                                          capsys):
    from pretrain import main_pretrain

    def run(*extra):
        main_pretrain.main(main_pretrain.get_args_parser().parse_args(list(map(str, [
            "--model", "vit_base_patch_vae", "--model_kwargs", json.dumps(MAE_KWARGS), "--input_size", "32",
            "--data_path", tiny_image_folder, "--vae_path", tiny_vae_dir, "--device", "cpu", "--precision", "fp32",
            "--batch_size", "16", "--epochs", "1", "--warmup_epochs", "0", "--num_workers", "0",
            "--output_dir", tmp_path, "--log_dir", tmp_path, *extra]))))

    run("--max_steps", "1")
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        run("--max_steps", "2", "--resume", tmp_path, "--mask_ratio", "0.5")
    assert stopped.value.code == 2
    assert capsys.readouterr().err == (f"main_pretrain: error: --resume {tmp_path}/checkpoint-0.pth was trained with "
                                       "--mask_ratio 0.75 but this command says 0.5; use the original value to "
                                       "continue that run, or pass --allow_changed_args to change it on purpose.\n")
    run("--max_steps", "2", "--resume", tmp_path, "--mask_ratio", "0.5", "--allow_changed_args")
    assert (f"--allow_changed_args: continuing {tmp_path}/checkpoint-0.pth with changed settings: --mask_ratio "
            "0.75 -> 0.5") in capsys.readouterr().out


# ------------------------------------------------------------------------------- item 3: the latent cache

def test_overwritten_shard_bytes_are_named(tmp_path):
    data = safetensors.torch.save({"mean": torch.zeros(4, 2, 4, 4)})
    shard = shard_path(tmp_path, 0)
    shard.write_bytes(data)
    manifest = {CHECKSUMS: [zlib.crc32(data)]}
    verify_shard(tmp_path, manifest, 0)  # intact
    shard.write_bytes(data[:-8] + b"\xff" * 8)  # the last two floats become NaN
    with pytest.raises(UserError) as info:
        verify_shard(tmp_path, manifest, 0)
    assert str(info.value) == (f"latent cache shard {shard} is corrupt (its checksum differs from the one recorded "
                               "when it was written); delete that file and rerun the same `python -m "
                               "pretrain.cache_latents` command to rewrite it.")
    verify_shard(tmp_path, {}, 0)  # a cache from before checksums: not checked


def test_cache_records_checksums_and_refuses_a_damaged_shard(tiny_image_folder, tiny_vae_dir, tmp_path):
    codec = LatentCodec.from_autoencoder(AutoencoderKL.from_pretrained(tiny_vae_dir), get_latent_spec("d8"))
    root = tmp_path / "cache"
    with pytest.raises(UserError, match=r"^--shard_size must be at least 1, got 0\.$"):
        extract_latent_cache(tiny_image_folder / "val", root, codec, 32, shard_size=0, show_progress=False)
    assert not (root / MANIFEST).exists()
    # A plan left by an older version (settings written, no shard yet) gives way to the corrected command.
    root.mkdir()
    (root / MANIFEST).write_text(json.dumps({"shard_size": 0, "complete": False}))
    manifest = extract_latent_cache(tiny_image_folder / "val", root, codec, 32, shard_size=8, show_progress=False)
    assert manifest[CHECKSUMS] == [zlib.crc32(shard_path(root, k).read_bytes()) for k in range(2)]
    data = shard_path(root, 1).read_bytes()
    shard_path(root, 1).write_bytes(data[:-64] + b"\xff" * 64)
    cache = LatentCacheDataset(root)
    cache.moments(0, 0)  # shard 0 is intact
    with pytest.raises(UserError, match=rf"^latent cache shard {shard_path(root, 1)} is corrupt"):
        cache.moments(8, 0)


# ----------------------------------------------------------------------------------- item 4: the launcher

@pytest.mark.slow
def test_failed_recipe_ends_with_the_workers_sentence_and_exit_code(tmp_path):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", GPUS="2",
               MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    launch = (f"set -euo pipefail; source {REPO_ROOT}/scripts/launch.sh; launch -m pretrain.main_pretrain "
              f"--device cpu --data_path {tmp_path}/missing --output_dir {tmp_path}/out --log_dir {tmp_path}/out")
    done = subprocess.run(["bash", "-c", launch], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-4000:]
    assert done.stderr.strip().splitlines()[-1].startswith("main_pretrain: error: "), done.stderr[-4000:]
    assert "ChildFailedError" not in done.stderr and "Traceback" not in done.stderr, done.stderr[-4000:]
