"""Atomic, weights-only checkpoints: truncation fallback, code-execution refusal, rotation."""
import argparse
import os
from pathlib import Path

import pytest
import torch

from util.checkpoint import CheckpointManager, args_to_dict, load_checkpoint, resolve_resume, save_checkpoint
from util.errors import UserError
from util.loop import LoopPosition
from util.train_state import resume_position


def test_truncated_checkpoint_is_refused_and_previous_one_used(tmp_path):
    manager = CheckpointManager(tmp_path, lambda epoch: f"checkpoint-{epoch}.pth", keep_last=3)
    for epoch in range(3):
        manager.save({"model": {"w": torch.full((64,), float(epoch))}, "epoch": epoch}, epoch)
    newest = tmp_path / "checkpoint-2.pth"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a torn copy / full disk
    with pytest.raises(UserError, match="checkpoint-2.pth is truncated or corrupt"):
        load_checkpoint(newest)
    with pytest.warns(UserWarning, match="skipping unusable checkpoint"):
        path, state = resolve_resume(tmp_path)
    assert path.name == "checkpoint-1.pth" and state["epoch"] == 1
    with pytest.raises(UserError, match="truncated or corrupt"):
        resolve_resume(newest)  # an explicit file is never silently replaced by another


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_pickle_that_executes_code_is_refused(tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "payload": _RunsCode(marker)}, path)
    with pytest.raises(UserError, match=r"refused: it would run code when loaded "
                                              r"\(it references posix.mkdir\)"):
        load_checkpoint(path)
    assert not marker.exists()


def test_official_namespace_args_load_and_our_args_are_plain(tmp_path):
    official = argparse.Namespace(model="DiT-XL/2", image_size=256, data_path="/data")
    save_checkpoint({"model": {}, "args": official}, tmp_path / "official.pt")  # what DiT's train.py stores
    assert load_checkpoint(tmp_path / "official.pt")["args"].model == "DiT-XL/2"
    args = argparse.Namespace(model="DiT-XL/2", image_size=256, data_path=Path("/data"), betas=(0.9, 0.95))
    plain = args_to_dict(args)
    assert plain == {"model": "DiT-XL/2", "image_size": 256, "data_path": "/data", "betas": [0.9, 0.95]}
    save_checkpoint({"args": plain}, tmp_path / "ours.pt")
    assert torch.load(tmp_path / "ours.pt", weights_only=True)["args"] == plain


def test_missing_file_and_empty_dir_messages(tmp_path):
    with pytest.raises(UserError, match="does not exist; check the --resume"):
        load_checkpoint(tmp_path / "none.pth")
    with pytest.raises(UserError, match="no loadable checkpoint"):
        resolve_resume(tmp_path)


def test_rotation_keeps_last_k_plus_milestones_and_no_temp_files(tmp_path):
    manager = CheckpointManager(tmp_path / "checkpoints", lambda step: f"{step:07d}.pt", keep_last=2,
                                is_milestone=lambda step: step % 4 == 0)
    for step in range(1, 10):
        manager.save({"step": step}, step)
    names = sorted(os.listdir(tmp_path / "checkpoints"))
    assert names == ["0000004.pt", "0000007.pt", "0000008.pt", "0000009.pt"]
    # DiT layout: the run dir holds checkpoints/; resolve_resume finds them there.
    path, state = resolve_resume(tmp_path)
    assert path.name == "0000009.pt" and state["step"] == 9
    assert CheckpointManager(tmp_path / "other", is_main=False).save({"x": 1}, 1) is None
    assert not (tmp_path / "other").exists()


def test_load_checkpoint_maps_the_file_and_still_reads_legacy_files(tmp_path):
    """mmap=True (the default): tensors are backed by the file itself, not a private copy in RAM, so
    reading only `ema` never pages in the optimizer state; pre-1.6 (non-zip) files still load."""
    state = {"ema": {"w": torch.arange(6.0)}, "opt": {"m": torch.ones(4)}}
    mapped = tmp_path / "mapped.pt"
    torch.save(state, mapped)
    loaded = load_checkpoint(mapped)
    assert torch.equal(loaded["ema"]["w"], state["ema"]["w"])
    assert str(mapped) in Path("/proc/self/maps").read_text()  # the kernel lists the file as mapped
    copied = tmp_path / "copied.pt"
    torch.save(state, copied)
    kept = load_checkpoint(copied, mmap=False)
    assert torch.equal(kept["opt"]["m"], torch.ones(4)) and str(copied) not in Path("/proc/self/maps").read_text()

    legacy = tmp_path / "legacy.pt"
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    assert torch.equal(load_checkpoint(legacy)["opt"]["m"], torch.ones(4))


def test_resume_position_of_our_loop_record_and_of_official_layouts():
    """Hand-worked: a loop record of 3 batches x 4 images x 2 ranks is 24 images, i.e. batch 3 of a one-process run
    of 8 images per batch; an official MAE/USP checkpoint (only `epoch`, the finished one) continues at the next
    epoch; released weights (DiT, SiT) record no position."""
    loop = {"epoch": 2, "batch": 3, "global_step": 11, "batch_size": 4, "world_size": 2, "rng": None}
    position = resume_position({"model": {}, "loop": loop}, "ckpt.pth", batch_size=8, accum=1, batches_per_epoch=10)
    assert position == LoopPosition(epoch=2, batch=3, global_step=11)
    with pytest.raises(UserError, match="not a whole number of global batches of 16"):
        resume_position({"loop": loop}, "ckpt.pth", batch_size=8, accum=2, batches_per_epoch=10)
    official = {"model": {}, "optimizer": {}, "epoch": 4, "scaler": {}, "args": {}}
    assert resume_position(official, "mae.pth", batch_size=8, accum=1, batches_per_epoch=10) == LoopPosition(epoch=5)
    assert resume_position({"model": {}}, "DiT-XL-2-256x256.pt", batch_size=8, accum=1, batches_per_epoch=10) is None
