"""Checkpoints written by an older commit (tests/data/legacy_checkpoints/, old resume layouts) keep resuming exactly.

Each file is an interrupted tiny run (tests/legacy_runs.py); resuming it with today's code must give the same
losses after the interruption and the same final weights as today's code running the same flags uninterrupted.
"""
import json
import shutil
from pathlib import Path

import pytest
import torch

from legacy_runs import (FINETUNE, GENERATION, LEGACY_DIR, PRETRAIN, finetune_argv, generation_argv,
                         pretrain_argv, run_finetune, run_generation, run_pretrain)

pytestmark = pytest.mark.slow  # training loops


def logged_losses(log_file: Path) -> dict:
    """{step: loss} of the per-step lines (epoch and evaluation lines carry other keys)."""
    lines = [json.loads(line) for line in log_file.read_text().splitlines()]
    return {line["step"]: line["loss"] for line in lines if "loss" in line and "acc1" not in line}


def assert_same_weights(first: dict, second: dict, keys) -> None:
    for key in keys:
        assert first[key].keys() == second[key].keys(), key
        for name, value in first[key].items():
            assert torch.equal(value, second[key][name]), (key, name)


def assert_same_position(first: dict, second: dict) -> None:
    """Both runs end at the same place with the same generator states (the new layout's `loop` record)."""
    loop_a, loop_b = first["loop"], second["loop"]
    assert {k: v for k, v in loop_a.items() if k != "rng"} == {k: v for k, v in loop_b.items() if k != "rng"}
    assert torch.equal(loop_a["rng"][0]["torch"], loop_b["rng"][0]["torch"])


def test_generation_checkpoint_of_b222488_resumes_exactly(tmp_path, tiny_image_folder, tiny_vae_dir):
    name, stop, end = GENERATION
    run_generation(generation_argv(tmp_path / "full", tiny_image_folder, tiny_vae_dir, end))
    experiment = tmp_path / "split" / "000-DiT-S-2-VAE-simple"
    (experiment / "checkpoints").mkdir(parents=True)
    shutil.copy(LEGACY_DIR / name, experiment / "checkpoints" / f"{stop:07d}.pt")
    run_generation(generation_argv(tmp_path / "split", tiny_image_folder, tiny_vae_dir, end, "--resume", experiment))

    (full,) = (tmp_path / "full").iterdir()
    full_losses = logged_losses(full / "log.txt")
    assert logged_losses(experiment / "log.txt") == {s: full_losses[s] for s in range(stop + 1, end + 1)}
    final_full = torch.load(full / "checkpoints" / f"{end:07d}.pt", weights_only=True)
    final_split = torch.load(experiment / "checkpoints" / f"{end:07d}.pt", weights_only=True)
    assert_same_weights(final_full, final_split, ("model", "ema"))
    assert_same_position(final_full, final_split)


def test_pretrain_checkpoint_of_b222488_resumes_exactly(tmp_path, tiny_image_folder, tiny_vae_dir):
    name, stop, end = PRETRAIN
    run_pretrain(pretrain_argv(tiny_image_folder, tiny_vae_dir, tmp_path / "full", end))
    split = tmp_path / "split"
    split.mkdir()
    shutil.copy(LEGACY_DIR / name, split / "checkpoint-0.pth")
    run_pretrain(pretrain_argv(tiny_image_folder, tiny_vae_dir, split, end, "--resume", split))

    full_losses = logged_losses(tmp_path / "full" / "log.txt")
    assert logged_losses(split / "log.txt") == {s: full_losses[s] for s in range(stop + 1, end + 1)}
    final_full = torch.load(tmp_path / "full" / "checkpoint-1.pth", weights_only=True)
    final_split = torch.load(split / "checkpoint-1.pth", weights_only=True)
    assert_same_weights(final_full, final_split, ("model",))
    assert_same_position(final_full, final_split)


def test_finetune_checkpoint_of_b222488_resumes_exactly(tmp_path, tiny_image_folder, tiny_vae_dir):
    name, stop, _ = FINETUNE
    run_finetune(finetune_argv(tiny_image_folder, tiny_vae_dir, tmp_path / "full"))
    split = tmp_path / "split"
    split.mkdir()
    shutil.copy(LEGACY_DIR / name, split / "checkpoint-last.pth")
    run_finetune(finetune_argv(tiny_image_folder, tiny_vae_dir, split, None, "--resume", split))

    full_losses = logged_losses(tmp_path / "full" / "log.txt")
    assert len(full_losses) == 16
    assert logged_losses(split / "log.txt") == {s: full_losses[s] for s in range(stop + 1, 17)}
    final_full = torch.load(tmp_path / "full" / "checkpoint-last.pth", weights_only=True)
    final_split = torch.load(split / "checkpoint-last.pth", weights_only=True)
    assert_same_weights(final_full, final_split, ("model", "model_ema"))
    assert_same_position(final_full, final_split)
