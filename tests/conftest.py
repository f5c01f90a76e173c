"""Fixtures shared by the CPU test suite: tiny data, a tiny VAE, and a torchrun launcher."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# Two cores on CI: keep each process to one intra-op thread so torchrun pairs don't thrash.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_image_folder(tmp_path_factory):
    """ImageFolder root with train/ and val/ splits: 4 classes, 32 px, 16 train + 4 val per class."""
    from demo.toy_dataset import write_toy_dataset

    root = tmp_path_factory.mktemp("toy_images")
    return write_toy_dataset(root, num_classes=4, train_per_class=16, val_per_class=4, image_size=32, seed=0)


def build_tiny_autoencoder_kl(latent_channels: int = 4, seed: int = 0):
    """A diffusers AutoencoderKL with the SD-VAE layout (factor 8) but a few thousand weights."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=32,
    )


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory):
    """A local diffusers folder (save_pretrained) holding a tiny factor-8, 4-channel AutoencoderKL."""
    path = tmp_path_factory.mktemp("tiny_vae")
    build_tiny_autoencoder_kl().save_pretrained(path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(args, nproc: int = 2, timeout: float = 600, env=None, check: bool = True):
    """Runs `torchrun --nproc_per_node=nproc <args>` from the repo root on gloo/CPU.

    `args` is e.g. ["-m", "pretrain.main_pretrain", "--epochs", "1"]. Returns the CompletedProcess;
    with `check`, a non-zero exit fails the test with the processes' output.
    """
    command = ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", *args]
    return run_python(command, timeout, env, check)


def run_python(args, timeout: float = 600, env=None, check: bool = True):
    """Runs `python <args>` from the repo root in a fresh process, one intra-op thread per process."""
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    full_env.update(env or {})
    result = subprocess.run([sys.executable, *map(str, args)], cwd=REPO_ROOT, env=full_env,
                            capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(map(str, args[:3]))} exited {result.returncode}\n"
                    f"STDOUT:\n{result.stdout[-6000:]}\nSTDERR:\n{result.stderr[-6000:]}")
    return result
