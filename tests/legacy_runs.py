"""Tiny runs of the three trainers whose interrupted checkpoints are kept in tests/data/legacy_checkpoints/.

The files there were written by an older commit (see that folder's README) in the checkpoint layouts
the project used before the one resume record (`util.train_state`); tests/test_legacy_checkpoints.py
resumes them with today's code and compares against an uninterrupted run of the same flags.

    python tests/legacy_runs.py tests/data/legacy_checkpoints   # writes the three files (a few seconds)
"""
import json
import shutil
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
for folder in (REPO_ROOT, REPO_ROOT / "tests"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

LEGACY_DIR = REPO_ROOT / "tests" / "data" / "legacy_checkpoints"
# (file name, step the interrupted run stopped at, step the continuation runs to)
GENERATION = ("generation_DiT-S-2_step6.pt", 6, 10)  # 4 steps per epoch: stops at epoch 1, batch 2
PRETRAIN = ("pretrain_checkpoint-0.pth", 5, 12)  # 8 steps per epoch: stops mid-epoch 0, resumes across epoch 1
FINETUNE = ("finetune_checkpoint-last.pth", 3, None)  # 8 steps per epoch, 2 epochs; continues to the end


def generation_argv(results, data, vae, max_steps: int, *extra) -> list:
    """DiT-S/2-VAE-simple at width 16, depth 1 on 32 px: 64 images / batch 16 = 4 steps per epoch."""
    return ["--model", "DiT-S/2-VAE-simple", "--data-path", str(Path(data) / "train"), "--results-dir", str(results),
            "--image-size", "32", "--num-classes", "4", "--global-batch-size", "16", "--epochs", "100",
            "--vae-path", str(vae), "--num-workers", "0", "--log-every", "1", "--ckpt-every", "1000",
            "--eval-every", "0", "--device", "cpu", "--precision", "fp32", "--lr", "1e-3",
            "--model-kwargs", json.dumps({"hidden_size": 16, "depth": 1, "num_heads": 2}),
            "--max-steps", str(max_steps), *map(str, extra)]


def pretrain_argv(data, vae, output_dir, max_steps: int, *extra) -> list:
    """A width-16 latent MAE with 1x1 patches, batch 8 (8 steps per epoch), 2 epochs, --add_noise."""
    tiny = {"embed_dim": 16, "depth": 1, "num_heads": 2, "decoder_embed_dim": 16, "decoder_depth": 1,
            "decoder_num_heads": 2, "patch_size": 1}
    return [str(a) for a in [
        "--model", "vit_base_patch_vae", "--model_kwargs", json.dumps(tiny), "--input_size", "32",
        "--data_path", data, "--vae_path", vae, "--device", "cpu", "--precision", "fp32", "--batch_size", "8",
        "--epochs", "2", "--warmup_epochs", "1", "--blr", "1e-2", "--norm_pix_loss", "--add_noise",
        "--num_workers", "0", "--log_every", "1", "--output_dir", output_dir, "--log_dir", output_dir,
        "--max_steps", max_steps, *extra]]


def finetune_argv(data, vae, output_dir, max_steps=None, *extra) -> list:
    """A width-16 ViT on the latents, batch 8, 2 epochs, with Mixup/CutMix, random erasing, drop path and EMA."""
    flags = ["--device", "cpu", "--data_path", data, "--vae_path", vae, "--input_size", "32", "--nb_classes", "4",
             "--batch_size", "8", "--epochs", "2", "--warmup_epochs", "1", "--num_workers", "0", "--precision", "fp32",
             "--model", "vit_base_patch16_vae", "--model_kwargs",
             json.dumps({"embed_dim": 16, "depth": 1, "num_heads": 2}), "--output_dir", output_dir,
             "--log_every", "1", "--mixup", "0.8", "--cutmix", "1.0", "--reprob", "0.25", "--drop_path", "0.2",
             "--model_ema"]
    if max_steps is not None:
        flags += ["--max_steps", max_steps]
    return [str(a) for a in [*flags, *extra]]


def run_generation(argv) -> None:
    from generation.train import main

    main(argv)


def run_pretrain(argv) -> None:
    from pretrain import main_pretrain

    main_pretrain.main(main_pretrain.get_args_parser().parse_args(argv))


def run_finetune(argv):
    from pretrain import main_finetune

    return main_finetune.main(main_finetune.get_args_parser().parse_args(argv))


def write_legacy_checkpoints(destination: Path) -> None:
    """Runs the three interrupted runs on the tests' toy data and tiny VAE; copies their checkpoints out."""
    import torch
    from conftest import build_tiny_autoencoder_kl
    from demo.toy_dataset import write_toy_dataset

    torch.set_num_threads(1)  # as tests/conftest.py
    destination.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        data = write_toy_dataset(scratch / "toy", num_classes=4, train_per_class=16, val_per_class=4, image_size=32,
                                 seed=0)
        vae = scratch / "vae"
        build_tiny_autoencoder_kl().save_pretrained(vae)

        name, stop, _ = GENERATION
        run_generation(generation_argv(scratch / "gen", data, vae, stop))
        (experiment,) = (scratch / "gen").iterdir()
        shutil.copy(experiment / "checkpoints" / f"{stop:07d}.pt", destination / name)

        name, stop, _ = PRETRAIN
        run_pretrain(pretrain_argv(data, vae, scratch / "pre", stop))
        shutil.copy(scratch / "pre" / "checkpoint-0.pth", destination / name)

        name, stop, _ = FINETUNE
        run_finetune(finetune_argv(data, vae, scratch / "ft", stop))
        shutil.copy(scratch / "ft" / "checkpoint-last.pth", destination / name)


if __name__ == "__main__":
    write_legacy_checkpoints(Path(sys.argv[1]) if len(sys.argv) > 1 else LEGACY_DIR)
