"""Issue 18, items 3, 6 (sampling), 7, 8 and 9: one true sentence where a user met a misleading one, a
sampling folder that two runs cannot share by racing, an evaluator that says what a non-standard score
means, and shell recipes that keep the user's relative paths."""
import errno
import hashlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from util.checkpoint import load_checkpoint, save_checkpoint
from util.data import build_image_folder
from util.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------- item 3

def test_item3_settings_check_is_atomic_against_a_run_started_at_the_same_moment(tmp_path, monkeypatch):
    """Run A (cfg 1.0) checks the empty folder; run B (cfg 4.0) records its settings right after that check.
    Before the fix A then overwrote B's record and both sampled into one folder."""
    import generation.sampling as sampling

    sample_dir = tmp_path / "samples"
    record = sample_dir / sampling.SAMPLING_CONFIG_NAME
    real_mkdir = Path.mkdir

    def other_run_records_its_settings(self, *args, **kwargs):
        real_mkdir(self, *args, **kwargs)
        if self == sample_dir and not record.exists():
            record.write_text(json.dumps({"cfg_scale": 4.0, "seed": 0}))

    monkeypatch.setattr(sampling.Path, "mkdir", other_run_records_its_settings)
    with pytest.raises(sampling.UserError, match=r"holds samples made with cfg_scale=4.0 but this run has "
                                                     r"cfg_scale=1.0"):
        sampling.check_sample_folder(sample_dir, {"cfg_scale": 1.0, "seed": 0}, is_main=True)
    assert json.loads(record.read_text())["cfg_scale"] == 4.0  # the other run's record is intact
    assert sorted(p.name for p in sample_dir.iterdir()) == [sampling.SAMPLING_CONFIG_NAME]  # no tmp left


def test_item3_same_settings_resume_and_first_record(tmp_path):
    from generation.sampling import SAMPLING_CONFIG_NAME, check_sample_folder

    check_sample_folder(tmp_path / "s", {"cfg_scale": 1.0}, is_main=True)
    check_sample_folder(tmp_path / "s", {"cfg_scale": 1.0}, is_main=True)  # a resume with the same settings
    assert json.loads((tmp_path / "s" / SAMPLING_CONFIG_NAME).read_text()) == {"cfg_scale": 1.0}


# ------------------------------------------------------------------------------------------- item 6 (sampling)

def test_item6_full_disk_while_sampling_leaves_no_partial_png(tmp_path, monkeypatch):
    from PIL import Image

    from generation.sampling import write_png
    from util.disk import DiskFullError

    def full_disk_save(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"")  # PIL has created the file when the write fails
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Image.Image, "save", full_disk_save)
    with pytest.raises(DiskFullError, match=f"^disk full at {tmp_path / '000000.png'}"):
        write_png(tmp_path / "000000.png", np.zeros((8, 8, 3), np.uint8), 3)
    assert list(tmp_path.iterdir()) == []  # no 0-byte .tmp PNG


# ------------------------------------------------------------------------------------------- item 7

def test_item7_vae_path_messages_name_the_real_problem(tmp_path, tiny_vae_dir):
    import shutil

    from models.vae import LatentCodec, UserError

    garbage = tmp_path / "vae.bin"
    garbage.write_bytes(b"garbage" * 10)
    with pytest.raises(UserError, match="is a file, but d8 needs a diffusers AutoencoderKL folder"):
        LatentCodec.load("d8", garbage)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no config.json"):
        LatentCodec.load("d8", tmp_path / "empty")
    bad_json = tmp_path / "bad_json"
    shutil.copytree(tiny_vae_dir, bad_json)
    (bad_json / "config.json").write_text("{oops")
    with pytest.raises(UserError, match="config.json is not valid JSON"):
        LatentCodec.load("d8", bad_json)
    bad_weights = tmp_path / "bad_weights"
    shutil.copytree(tiny_vae_dir, bad_weights)
    (bad_weights / "diffusion_pytorch_model.safetensors").write_bytes(b"x" * 100)
    with pytest.raises(UserError, match="are not a readable safetensors file"):
        LatentCodec.load("d8", bad_weights)
    with pytest.raises(UserError, match="holds a diffusers AutoencoderKL \\(the d8 SD-VAE layout\\), not the "
                                              "LDM KL-16 checkpoint"):
        LatentCodec.load("d16", tiny_vae_dir / "diffusion_pytorch_model.safetensors")


def test_item10_vae_load_prints_no_accelerate_warning(tiny_vae_dir):
    result = subprocess.run([sys.executable, "-c", "from models.vae import LatentCodec; "
                             f"LatentCodec.load('d8', {str(tiny_vae_dir)!r})"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "accelerate" not in result.stderr + result.stdout


def test_item7_checkpoint_given_a_run_directory(tmp_path):
    save_checkpoint({"model": {}}, tmp_path / "checkpoints" / "0000100.pt")
    save_checkpoint({"model": {}}, tmp_path / "checkpoints" / "0000200.pt")
    with pytest.raises(UserError) as info:
        load_checkpoint(tmp_path)
    assert str(info.value) == (f"{tmp_path} is a folder; a checkpoint file is needed here, so pass one such as "
                               f"{tmp_path / 'checkpoints' / '0000200.pt'}.")


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_item7_legacy_pickle_that_would_run_code_is_refused_not_called_corrupt(tmp_path, protocol):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"model": {}, "payload": _RunsCode(marker)}, protocol=protocol))
    with pytest.raises(UserError) as info:
        load_checkpoint(path)
    assert "refused: it would run code when loaded (it references posix.mkdir)" in str(info.value)
    assert "truncated or corrupt" not in str(info.value)
    assert not marker.exists()


def test_item7_truncated_checkpoint_is_still_called_corrupt(tmp_path):
    save_checkpoint({"model": {"w": torch.zeros(100)}}, tmp_path / "ok.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "ok.pth").read_bytes()[:300])
    with pytest.raises(UserError, match="is truncated or corrupt"):
        load_checkpoint(tmp_path / "cut.pth")


def test_item7_data_root_with_splits_says_point_at_train(tiny_image_folder):
    with pytest.raises(UserError) as info:
        build_image_folder(tiny_image_folder)  # holds train/ and val/
    assert str(info.value) == (f"data folder {tiny_image_folder} holds the splits train/, val/ rather than class "
                               f"folders; point the data path at {tiny_image_folder / 'train'} instead.")


# ------------------------------------------------------------------------------------------- item 8

def _npz(path, count, size, seed=0):
    np.savez(path, arr_0=np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8))
    return path


def test_item8_resolution_mismatch_is_refused_unless_allowed(tmp_path):
    from generation.evaluate import NpzBatch, UserError, comparison_warnings

    ref, samples = NpzBatch(_npz(tmp_path / "ref.npz", 8, 16)), NpzBatch(_npz(tmp_path / "s.npz", 8, 8))
    with pytest.raises(UserError, match="the samples are 8x8 px but the reference images are 16x16 px, so the "
                                       "scores would measure the resizing"):
        comparison_warnings(ref, samples)
    notes = comparison_warnings(ref, samples, allow_resolution_mismatch=True)
    assert notes[0].startswith("the samples are 8x8 px but the reference images are 16x16 px")


def test_item8_too_few_samples_and_fewer_than_reference_are_warned(tmp_path, monkeypatch):
    import generation.evaluate as ev

    ref, four = ev.NpzBatch(_npz(tmp_path / "ref.npz", 12, 8)), ev.NpzBatch(_npz(tmp_path / "s.npz", 4, 8))
    (note,) = ev.comparison_warnings(ref, four)
    assert note.startswith("only 4 samples (fewer than the 2048 Inception features), so the sample covariance is "
                           "singular") and "not comparable to published FID-50K" in note
    monkeypatch.setattr(ev, "MIN_SAMPLES_FOR_FID", 4)  # the same rule at a size a test can build
    eight = ev.NpzBatch(_npz(tmp_path / "s8.npz", 8, 8))
    (note,) = ev.comparison_warnings(ref, eight)
    assert note.startswith("8 samples against 12 reference images: FID is biased upward")
    assert ev.comparison_warnings(ref, ev.NpzBatch(_npz(tmp_path / "s12.npz", 12, 8))) == []


def test_item6_evaluate_checks_the_json_path_before_any_work(tmp_path, capsys):
    import generation.evaluate as ev

    _npz(tmp_path / "ref.npz", 8, 8)
    _npz(tmp_path / "s.npz", 8, 8)
    (tmp_path / "blocker").write_text("a file")
    with pytest.raises(SystemExit) as info:  # the weights do not exist either: the JSON path is checked first
        ev.main([str(tmp_path / "ref.npz"), str(tmp_path / "s.npz"), "--inception-weights", str(tmp_path / "no.pth"),
                 "--output-json", str(tmp_path / "blocker" / "m.json")])
    message = capsys.readouterr().err
    assert info.value.code == 2 and "--output-json" in message and "is a file, not a folder" in message


# ------------------------------------------------------------------------------------------- item 9

def _venv_ready() -> bool:
    """scripts/setup_env.sh would install packages unless this interpreter's venv is up to date."""
    stamp = Path(sys.prefix) / ".requirements.sha256"
    wanted = hashlib.sha256((REPO_ROOT / "requirements.txt").read_bytes()).hexdigest()
    return sys.prefix != sys.base_prefix and stamp.is_file() and stamp.read_text().strip() == wanted


@pytest.mark.skipif(not _venv_ready(), reason="needs the test interpreter's venv with an up-to-date stamp")
def test_item9_eval_sh_activates_the_venv_and_keeps_relative_paths(tmp_path):
    _npz(tmp_path / "ref.npz", 8, 8)
    _npz(tmp_path / "samples.npz", 8, 8)
    env = {"PATH": "/usr/bin:/bin", "USP_VENV": sys.prefix, "HOME": str(tmp_path)}  # no venv python on PATH
    result = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "eval.sh"), "ref.npz", "samples.npz",
                             "--device", "cpu"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert "No module named" not in result.stderr
    # The npz files were found where the user named them; the next problem is the missing Inception weights,
    # looked for (by default) under the user's folder too.
    assert "error: Inception weights file" in result.stderr.strip().splitlines()[-1], result.stderr
    assert str(tmp_path / "pretrained") in result.stderr or "pretrained/weights-inception" in result.stderr


def test_item9_launch_sh_keeps_the_callers_folder(tmp_path):
    script = (f"source {REPO_ROOT / 'scripts' / 'launch.sh'}; pwd; "
              f"{sys.executable} -c 'import util.checkpoint, sys; print(util.checkpoint.__file__)'")
    result = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr
    folder, module = result.stdout.split()
    assert folder == str(tmp_path)  # relative paths in the user's command still mean what they typed
    assert Path(module).resolve() == (REPO_ROOT / "util" / "checkpoint.py").resolve()  # -m modules still found
