"""Issue 18 through the entry points (items 2, 4, 5, 6, 7, 10): every mistake a new user made gets one sentence
and the one documented exit code, before any model is built; nothing they trained is overwritten.

Each command is run as a user runs it, `python -m ...`, but in this process (`run_module`, runpy: no interpreter
start-up); what is checked is what they see: the exit code, the first line on stderr, and the files left behind.
`test_item10_one_exit_code_for_user_errors` starts a real interpreter for every entry point, so what an
interpreter start prints is checked there; runs that are signalled or run side by side are real processes too.
"""
import io
import json
import os
import re
import runpy
import signal
import subprocess
import sys
import warnings
from contextlib import redirect_stderr, redirect_stdout
from unittest import mock

import pytest
import torch

from conftest import REPO_ROOT, run_python
from util.checkpoint import save_checkpoint

EXIT_USER_ERROR = 2  # README "Exit codes": one code for every mistake a user can fix
pytestmark = pytest.mark.slow  # every test here starts a fresh interpreter (and some a short training run)
TINY_MAE = {"embed_dim": 32, "depth": 2, "num_heads": 2, "decoder_embed_dim": 32, "decoder_depth": 1,
            "decoder_num_heads": 2, "patch_size": 1}
TINY_VIT = {"embed_dim": 32, "depth": 2, "num_heads": 2}
TINY_DIT = {"hidden_size": 32, "depth": 2, "num_heads": 2}


def pretrain_argv(data, vae, out, *extra):
    return ["-m", "pretrain.main_pretrain", "--model", "vit_base_patch_vae", "--model_kwargs", json.dumps(TINY_MAE),
            "--input_size", "32", "--data_path", data, "--vae_path", vae, "--device", "cpu", "--precision", "fp32",
            "--batch_size", "8", "--epochs", "1", "--warmup_epochs", "1", "--num_workers", "0", "--log_every", "1",
            "--output_dir", out, "--log_dir", out, *map(str, extra)]


def finetune_argv(data, vae, out, *extra, module="pretrain.main_finetune"):
    return ["-m", module, "--model", "vit_base_patch16_vae", "--model_kwargs", json.dumps(TINY_VIT),
            "--input_size", "32", "--data_path", data, "--vae_path", vae, "--device", "cpu", "--precision", "fp32",
            "--nb_classes", "4", "--batch_size", "8", "--epochs", "1", "--warmup_epochs", "1", "--num_workers", "0",
            "--output_dir", out, *map(str, extra)]


def train_argv(data, vae, results, *extra):
    return ["-m", "generation.train", "--model", "DiT-S/2-VAE-simple", "--data-path", data, "--results-dir", results,
            "--image-size", "32", "--num-classes", "4", "--global-batch-size", "16", "--epochs", "1",
            "--vae-path", vae, "--num-workers", "0", "--log-every", "1", "--ckpt-every", "1000", "--eval-every", "0",
            "--device", "cpu", "--precision", "fp32", "--model-kwargs", json.dumps(TINY_DIT), *map(str, extra)]


def run_module(argv, check: bool = True) -> subprocess.CompletedProcess:
    """`python -m <module> <args>` (argv = ["-m", module, *args]) run in this process, as subprocess.run with
    capture_output=True would report it: the exit code, stdout and stderr."""
    module, args = argv[1], [str(arg) for arg in argv[2:]]
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with mock.patch.object(sys, "argv", [module, *args]), redirect_stdout(out), redirect_stderr(err), \
            warnings.catch_warnings():
        # runpy's note that the module was imported before (by another test) is not the command's output
        warnings.filterwarnings("ignore", message=".*found in sys.modules", category=RuntimeWarning)
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as stop:  # as the interpreter does: None is 0, a message goes to stderr with 1
            code = stop.code if isinstance(stop.code, int) else 0 if stop.code is None else 1
            if isinstance(stop.code, str):
                print(stop.code, file=err)
    result = subprocess.CompletedProcess(["python", *argv], code, out.getvalue(), err.getvalue())
    assert not check or code == 0, (code, result.stdout[-3000:], result.stderr[-3000:])
    return result


def refused(argv, fragment):
    """Runs the command, expects the user-error exit code and ONE line on stderr containing `fragment`."""
    result = run_module(argv, check=False)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == EXIT_USER_ERROR, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len(lines) == 1 and fragment in lines[0], result.stderr[-3000:]
    return lines[0]


# ------------------------------------------------------------------------------------------- item 2

def test_item2_pretrain_rerun_into_a_used_folder_is_refused(tiny_image_folder, tiny_vae_dir, tmp_path):
    save_checkpoint({"model": {}, "epoch": 12}, tmp_path / "checkpoint-12.pth")
    refused(pretrain_argv(tiny_image_folder, tiny_vae_dir, tmp_path), "already holds another run's checkpoints")
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["checkpoint-12.pth"]


def test_item2_finetune_rerun_cannot_replace_the_best_checkpoint(tiny_image_folder, tiny_vae_dir, tmp_path):
    save_checkpoint({"model": {}, "acc1": 58.3}, tmp_path / "checkpoint-best.pth")
    refused(finetune_argv(tiny_image_folder, tiny_vae_dir, tmp_path), "already holds another run's checkpoints")
    assert torch.load(tmp_path / "checkpoint-best.pth", weights_only=True)["acc1"] == 58.3


def test_item2_two_generation_runs_started_together_get_two_folders(tiny_image_folder, tiny_vae_dir, tmp_path):
    results = tmp_path / "results"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    commands = [[sys.executable, *map(str, train_argv(tiny_image_folder / "train", tiny_vae_dir, results,
                                                      "--max-steps", "1"))] for _ in range(2)]
    runs = [subprocess.Popen(c, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for c in commands]
    outputs = [run.communicate(timeout=600) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    assert len([p for p in results.iterdir() if p.is_dir()]) == 2


# ------------------------------------------------------------------------------------------- item 4

def test_item4_generation_training_reports_skipped_images(tiny_image_folder, tiny_vae_dir, tmp_path):
    import shutil

    data = tmp_path / "train"
    shutil.copytree(tiny_image_folder / "train", data)
    victim = sorted(data.rglob("*.png"))[2]
    victim.write_bytes(victim.read_bytes()[:40])
    result = run_module(train_argv(data, tiny_vae_dir, tmp_path / "results"))
    assert f"1 unreadable image skipped so far, each replaced by the next readable one: {victim}" in result.stderr
    (experiment,) = [p for p in (tmp_path / "results").iterdir() if p.is_dir()]
    logged = [json.loads(line) for line in (experiment / "log.txt").read_text().splitlines()]
    assert any(line.get("skipped_images") == 1 for line in logged)
    refused(train_argv(data, tiny_vae_dir, tmp_path / "strict", "--strict-data"), f"image {victim} cannot be read")


# ------------------------------------------------------------------------------------------- item 5

@pytest.mark.parametrize("ratio", ["0", "1", "1.5", "-0.1"])
def test_item5_mask_ratio_outside_0_1_is_refused_before_the_model(tiny_image_folder, tiny_vae_dir, tmp_path, ratio):
    line = refused(pretrain_argv(tiny_image_folder, tiny_vae_dir, tmp_path / "out", "--mask_ratio", ratio),
                   f"--mask_ratio {ratio}")
    assert "between 0 and 1" in line


@pytest.mark.parametrize("entry, kwargs, fragment", [
    ("pretrain", {**TINY_MAE, "bogus": 1}, "bogus"),
    ("pretrain", {**TINY_MAE, "num_heads": 5}, "\"num_heads\": 5"),
    ("finetune", {**TINY_VIT, "bogus": 1}, "bogus"),
    ("finetune", {**TINY_VIT, "num_heads": 5}, "\"num_heads\": 5"),
])
def test_item5_bad_model_kwargs_are_one_sentence(tiny_image_folder, tiny_vae_dir, tmp_path, entry, kwargs, fragment):
    build = pretrain_argv if entry == "pretrain" else finetune_argv
    refused(build(tiny_image_folder, tiny_vae_dir, tmp_path / "out", "--model_kwargs", json.dumps(kwargs)), fragment)


def test_item5_resume_from_a_raw_state_dict_is_one_sentence(tiny_image_folder, tiny_vae_dir, tmp_path):
    raw = tmp_path / "weights.pth"
    torch.save({"blocks.0.attn.qkv.weight": torch.zeros(96, 32)}, raw)  # a state dict, not a training checkpoint
    refused(pretrain_argv(tiny_image_folder, tiny_vae_dir, tmp_path / "a", "--resume", raw), "not a training checkpoint")
    refused(finetune_argv(tiny_image_folder, tiny_vae_dir, tmp_path / "b", "--resume", raw), "not a training checkpoint")
    refused(train_argv(tiny_image_folder / "train", tiny_vae_dir, tmp_path / "c", "--resume", raw),
            "not a training checkpoint")


@pytest.mark.parametrize("entry", ["pretrain", "finetune", "generation"])
def test_item5_zero_epochs_is_refused(tiny_image_folder, tiny_vae_dir, tmp_path, entry):
    argv = {"pretrain": lambda: pretrain_argv(tiny_image_folder, tiny_vae_dir, tmp_path / "o", "--epochs", "0"),
            "finetune": lambda: finetune_argv(tiny_image_folder, tiny_vae_dir, tmp_path / "o", "--epochs", "0"),
            "generation": lambda: train_argv(tiny_image_folder / "train", tiny_vae_dir, tmp_path / "o", "--epochs", "0"),
            }[entry]()
    refused(argv, "--epochs")


def test_item5_ctrl_c_saves_and_exits_like_sigterm(tiny_image_folder, tiny_vae_dir, tmp_path):
    argv = train_argv(tiny_image_folder / "train", tiny_vae_dir, tmp_path / "results", "--epochs", "1000")
    run = subprocess.Popen([sys.executable, *map(str, argv)], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1",
                                                                      PYTHONUNBUFFERED="1"))
    try:
        for line in run.stdout:
            if "step=" in line or '"loss"' in line or "loss" in line.lower():
                break
        run.send_signal(signal.SIGINT)
        out, err = run.communicate(timeout=300)
    finally:
        run.kill()
    assert "KeyboardInterrupt" not in err and "Traceback" not in err, err[-3000:]
    assert run.returncode == 0, err[-3000:]
    (experiment,) = [p for p in (tmp_path / "results").iterdir() if p.is_dir()]
    assert list((experiment / "checkpoints").glob("*.pt")), "Ctrl-C must save like SIGTERM"


# ------------------------------------------------------------------------------------------- item 6

@pytest.mark.parametrize("entry", ["pretrain", "finetune", "linprobe", "generation", "latent_cache"])
def test_item6_file_where_the_output_folder_should_be(tiny_image_folder, tiny_vae_dir, tmp_path, entry):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    out = blocker / "run"
    argv = {
        "pretrain": lambda: pretrain_argv(tiny_image_folder, tiny_vae_dir, out),
        "finetune": lambda: finetune_argv(tiny_image_folder, tiny_vae_dir, out),
        "linprobe": lambda: finetune_argv(tiny_image_folder, tiny_vae_dir, out, module="pretrain.main_linprobe"),
        "generation": lambda: train_argv(tiny_image_folder / "train", tiny_vae_dir, out),
        "latent_cache": lambda: ["-m", "pretrain.cache_latents", "--data_path", tiny_image_folder / "train",
                                 "--cached_path", out, "--vae_path", tiny_vae_dir, "--input_size", "32",
                                 "--device", "cpu"],
    }[entry]()
    refused(argv, f"{blocker} is a file, not a folder")


# ------------------------------------------------------------------------------------------- item 7

def test_item7_generation_data_root_with_splits(tiny_image_folder, tiny_vae_dir, tmp_path):
    refused(train_argv(tiny_image_folder, tiny_vae_dir, tmp_path / "r"), f"point the data path at "
                                                                        f"{tiny_image_folder / 'train'}")


# ------------------------------------------------------------------------------------------- item 10

@pytest.mark.parametrize("module, shown", [
    ("pretrain.main_pretrain", ["--device DEVICE", "(default: cuda)", "(default: 400)"]),
    ("pretrain.main_finetune", ["(default: cuda)"]),
    ("pretrain.main_linprobe", ["(default: cuda)"]),
    ("generation.train", ["(default: cuda)", "(default: 1400)", "--cfg-scale"]),
    ("generation.sample_ddp", ["--cfg-scale", "(default: 8)"]),
])
def test_item10_help_shows_defaults(module, shown):
    result = run_module(["-m", module, "--help"])
    text = " ".join(result.stdout.split()).split(" options: ", 1)[-1]  # the option list, not the usage line
    for fragment in shown:
        assert fragment in text, (fragment, result.stdout[:3000])
    if "--cfg-scale" in text:  # whatever the default is (issue 13 sets the official one), --help says it
        option = re.search(r"^  --cfg-scale .*?(?=^  -|\Z)", result.stdout, re.S | re.M).group(0)
        assert "(default: " in option, option


def test_item10_short_generation_run_prints_a_first_loss(tiny_image_folder, tiny_vae_dir, tmp_path):
    result = run_module(train_argv(tiny_image_folder / "train", tiny_vae_dir, tmp_path / "r", "--log-every", "100",
                                   "--max-steps", "2"))
    assert "loss" in result.stdout.lower() and "step 1" in result.stdout.lower().replace("=", " "), result.stdout


def test_item10_data_workers_default_to_what_the_machine_has():
    from pretrain import main_finetune, main_linprobe

    available = len(os.sched_getaffinity(0))
    for module in (main_finetune, main_linprobe):
        args = module.get_args_parser().parse_args([])
        assert args.num_workers == min(10, available)


def test_item10_finetune_prints_the_base_lr_as_base_lr(tiny_image_folder, tiny_vae_dir, tmp_path):
    result = run_module(finetune_argv(tiny_image_folder, tiny_vae_dir, tmp_path / "o", "--blr", "1e-3",
                                      "--max_steps", "1"))
    # MAE: absolute lr = blr * effective batch / 256 = 1e-3 * 8 / 256
    assert "base lr: 1.000e-03" in result.stdout and "actual lr: 3.125e-05" in result.stdout, result.stdout


def test_item10_log_does_not_repeat_steps_after_resume(tiny_image_folder, tiny_vae_dir, tmp_path):
    out = tmp_path / "o"
    run_module(pretrain_argv(tiny_image_folder, tiny_vae_dir, out, "--epochs", "3", "--max_steps", "3"))
    run_module(pretrain_argv(tiny_image_folder, tiny_vae_dir, out, "--epochs", "3", "--max_steps", "6",
                             "--resume", out))
    steps = [json.loads(line)["step"] for line in (out / "log.txt").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == sorted(set(steps)), steps


@pytest.mark.parametrize("argv", [
    ["-m", "pretrain.main_pretrain", "--data_path", "/no/such/folder", "--device", "cpu"],
    ["-m", "pretrain.main_finetune", "--data_path", "/no/such/folder", "--device", "cpu"],
    ["-m", "pretrain.main_linprobe", "--data_path", "/no/such/folder", "--device", "cpu"],
    ["-m", "generation.train", "--data-path", "/no/such/folder", "--device", "cpu"],
    ["-m", "generation.sample_ddp", "--ckpt", "/no/such/file.pt", "--device", "cpu"],
    ["-m", "generation.evaluate", "/no/such/ref.npz", "/no/such/s.npz", "--inception-weights", "/no/w.pth"],
    ["-m", "pretrain.cache_latents", "--data_path", "/no/such/folder", "--cached_path", "/tmp/x", "--device", "cpu"],
])
def test_item10_one_exit_code_for_user_errors(argv, tmp_path):
    argv = [str(tmp_path) if a == "/tmp/x" else a for a in argv]
    result = run_python(argv, check=False, timeout=300)  # a real interpreter start, for every entry point
    assert result.returncode == EXIT_USER_ERROR, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1, result.stderr[-2000:]
