"""A SLURM stop played as slurmstepd plays it, through the recipes' launcher (scripts/launch.sh).

On scancel, a time limit or a preemption, slurmstepd sends SIGTERM to every process of the step at once (the
recipe's bash, torchrun, the workers and their DataLoader workers), and with `srun --kill-on-bad-exit=1` (as
scripts/slurm/train.sbatch runs) a task that exits non-zero gets the rest of the step SIGKILLed. The run must
save, the task exit 0, and `--resume` continue bit-exactly: its final weights equal an uninterrupted run's.
Two processes on CPU (gloo), tiny models.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO_ROOT, free_port
from util.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow  # end-to-end runs (subprocesses / training loops): `pytest -m "not slow"` skips them

MAE_KWARGS = {"embed_dim": 32, "depth": 2, "num_heads": 2, "decoder_embed_dim": 32, "decoder_depth": 1,
              "decoder_num_heads": 2}


def recipe_env(**extra) -> dict:
    """The recipe's environment: 2 processes on this node, the venv's torchrun first on PATH, one thread each."""
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", GPUS="2",
                MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it (torchrun's workers start their own sessions, so no process group
    holds them all; slurmstepd finds them through the step's cgroup, here through /proc)."""
    children = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo += children.get(current, [])
    return found


def signal_all(pids, signum) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def start_recipe(script: str, args, env: dict) -> subprocess.Popen:
    return subprocess.Popen(["bash", str(REPO_ROOT / "scripts" / script), *map(str, args)], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(task: subprocess.Popen, timeout: float, tree=()) -> str:
    """The task's output once it exits; if it exits non-zero or times out, SIGKILL what is left of its tree (as
    srun --kill-on-bad-exit does, and so that no stray worker outlives the test)."""
    try:
        output, _ = task.communicate(timeout=timeout)
    finally:
        if task.returncode != 0:
            signal_all(descendants(task.pid) + list(tree), signal.SIGKILL)
    return output


def run_recipe(script: str, args, env: dict, timeout: float = 120) -> None:
    task = start_recipe(script, args, env)
    output = finish(task, timeout)
    assert task.returncode == 0, output[-6000:]


def stop_like_slurmstepd(script: str, args, env: dict, started, timeout: float = 120) -> tuple[int, str]:
    """Runs the recipe as an srun task; once `started()` is true, SIGTERMs its whole tree at once. Returns the
    task's exit status and output."""
    task = start_recipe(script, args, env)
    deadline = time.time() + timeout
    while not started():
        if task.poll() is not None or time.time() > deadline:
            pytest.fail(f"the run ended or stalled before it started training:\n{finish(task, 1)[-6000:]}")
        time.sleep(0.05)
    tree = descendants(task.pid)
    assert len(tree) >= 4, tree  # the recipe's bash -> torchrun -> 2 workers (-> their DataLoader workers)
    signal_all(tree, signal.SIGTERM)
    output = finish(task, timeout, tree)
    return task.returncode, output


def logged_steps(log: Path) -> int:
    """The number of JSON log lines with a loss so far."""
    if not log.is_file():
        return 0
    return sum('"loss"' in line for line in log.read_text().splitlines())


def assert_same_weights(reference: dict, resumed: dict, keys) -> None:
    for key in keys:
        assert reference[key].keys() == resumed[key].keys()
        for name, value in reference[key].items():
            assert torch.equal(value, resumed[key][name]), (key, name)


@pytest.fixture(scope="module")
def tiny_usp_checkpoint(tmp_path_factory, tiny_image_folder, tiny_vae_dir):
    """A USP checkpoint made by pretrain/main_pretrain.py: a width-32 latent MAE, 8 masked-modeling steps."""
    from pretrain import main_pretrain

    output_dir = tmp_path_factory.mktemp("usp")
    main_pretrain.main(main_pretrain.get_args_parser().parse_args([
        "--model", "vit_base_patch_vae", "--model_kwargs", json.dumps(MAE_KWARGS), "--input_size", "32",
        "--data_path", str(tiny_image_folder), "--vae_path", str(tiny_vae_dir), "--device", "cpu",
        "--precision", "fp32", "--batch_size", "8", "--epochs", "1", "--warmup_epochs", "0", "--blr", "1e-3",
        "--num_workers", "0", "--output_dir", str(output_dir), "--log_dir", str(output_dir)]))
    (checkpoint,) = sorted(output_dir.glob("checkpoint-*.pth"))
    return checkpoint


def dit_args(results: Path, steps: int, *extra) -> list:
    """scripts/train_dit.sh's recipe shrunk: a width-32 DiT on 4x4 latents, batch 16 (4 steps per epoch)."""
    return ["--image-size", "32", "--num-classes", "4", "--global-batch-size", "16", "--max-steps", steps,
            "--log-every", "1", "--ckpt-every", "1000", "--eval-every", "0", "--device", "cpu", "--num-workers", "1",
            "--model-kwargs", json.dumps({"hidden_size": 32, "depth": 2, "num_heads": 2}), "--lr", "1e-3",
            "--results-dir", results, *extra]


def test_dit_recipe_stopped_by_slurm_saves_exits_zero_and_resumes_exactly(tmp_path, tiny_image_folder, tiny_vae_dir,
                                                                          tiny_usp_checkpoint):
    env = recipe_env(DATA_PATH=str(tiny_image_folder / "train"), FINETUNE=str(tiny_usp_checkpoint),
                     VAE_PATH=str(tiny_vae_dir), MODEL="DiT-S/2-VAE-simple")
    steps = 60
    run_recipe("train_dit.sh", dit_args(tmp_path / "reference", steps), env)
    stopped_dir = tmp_path / "stopped"
    status, output = stop_like_slurmstepd(
        "train_dit.sh", dit_args(stopped_dir, steps), env,
        started=lambda: any(logged_steps(path / "log.txt") >= 3 for path in stopped_dir.glob("*-usp")))
    assert status == 0, output[-6000:]
    (experiment,) = stopped_dir.glob("*-usp")
    (saved,) = sorted((experiment / "checkpoints").glob("*.pt"))
    stopped_at = load_checkpoint(saved)["loop"]["global_step"]
    assert 3 <= stopped_at < steps, stopped_at
    run_recipe("train_dit.sh", dit_args(stopped_dir, steps, "--resume", experiment), env)
    (reference,) = (tmp_path / "reference").glob("*-usp")
    name = f"{steps:07d}.pt"
    assert_same_weights(load_checkpoint(reference / "checkpoints" / name),
                        load_checkpoint(experiment / "checkpoints" / name), ("model", "ema"))


def pretrain_args(*extra) -> list:
    """scripts/pretrain.sh's recipe shrunk: a width-32 latent MAE on 32 px crops, batch 4 per process (8 steps per
    epoch), fp32 on CPU."""
    return ["--model_kwargs", json.dumps(MAE_KWARGS), "--input_size", "32", "--batch_size", "4", "--accum_iter", "1",
            "--precision", "fp32", "--vae_precision", "fp32", "--warmup_epochs", "1", "--blr", "1e-3", "--num_workers", "1",
            "--save_every", "1000", "--log_every", "1", "--device", "cpu", *extra]


def test_pretrain_recipe_stopped_by_slurm_saves_exits_zero_and_resumes_exactly(tmp_path, tiny_image_folder,
                                                                               tiny_vae_dir):
    epochs = 8
    env = dict(DATA_PATH=str(tiny_image_folder), VAE_PATH=str(tiny_vae_dir), EPOCHS=str(epochs))
    run_recipe("pretrain.sh", pretrain_args(), recipe_env(OUTPUT_DIR=str(tmp_path / "reference"), **env))
    stopped_dir = tmp_path / "stopped"
    env = recipe_env(OUTPUT_DIR=str(stopped_dir), **env)
    status, output = stop_like_slurmstepd("pretrain.sh", pretrain_args(), env,
                                          started=lambda: logged_steps(stopped_dir / "log.txt") >= 3)
    assert status == 0, output[-6000:]
    # checkpoint-0.pth (saved after epoch 0, as MAE does) and the stop's checkpoint.
    stopped_at = max(load_checkpoint(path)["loop"]["global_step"] for path in stopped_dir.glob("checkpoint-*.pth"))
    assert 3 <= stopped_at < 8 * epochs, stopped_at
    run_recipe("pretrain.sh", pretrain_args("--resume", stopped_dir), env)
    name = f"checkpoint-{epochs - 1}.pth"
    assert_same_weights(load_checkpoint(tmp_path / "reference" / name), load_checkpoint(stopped_dir / name),
                        ("model",))


def test_stop_during_the_fid_evaluation_saves_and_the_resumed_run_finishes_it(tmp_path, tiny_image_folder,
                                                                              tiny_vae_dir):
    """A stop during step 2's FID sampling (the recipes: FID-50K every 50K steps, tens of minutes) finishes the
    current batch of samples, keeps step 2's checkpoint (written before the evaluation) and exits 0; --resume
    completes step 2's samples, then trains on."""
    args = ["-m", "generation.train", "--model", "DiT-S/2-VAE-simple", "--data-path", tiny_image_folder / "train",
            "--vae-path", tiny_vae_dir, "--precision", "fp32", "--eval-images", "2",
            *dit_args(tmp_path, 4, "--eval-every", "2", "--num-fid-samples", "16", "--per-proc-batch-size", "2",
                      "--num-sampling-steps", "100")]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    process = subprocess.Popen([sys.executable, *map(str, args)], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not any(tmp_path.glob("*/samples/fid-0000002/*.png")):
        assert process.poll() is None and time.time() < deadline, process.communicate()[0][-6000:]
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output[-6000:]
    (experiment,) = tmp_path.glob("*-DiT-S-2-VAE-simple")
    assert [path.name for path in (experiment / "checkpoints").iterdir()] == ["0000002.pt"]
    written = len(list((experiment / "samples" / "fid-0000002").glob("*.png")))
    assert 0 < written < 16 and not (experiment / "samples" / "fid-0000002.npz").exists()
    resumed = subprocess.run([sys.executable, *map(str, args), "--resume", experiment], cwd=REPO_ROOT, env=env,
                             capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-6000:]
    assert "Finishing the evaluation of step 2" in resumed.stdout + resumed.stderr
    for step in (2, 4):
        assert np.load(experiment / "samples" / f"fid-{step:07d}.npz")["arr_0"].shape[0] == 16
    assert sorted(json.loads(line)["step"] for line in (experiment / "log.txt").read_text().splitlines()
                  if '"loss"' in line) == [1, 2, 3, 4]
