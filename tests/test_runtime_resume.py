"""Exact resume after SIGKILL, graceful SIGTERM/SIGUSR1 stops, the non-finite guard (tests/toy_train.py)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO_ROOT, free_port, run_torchrun
from util.checkpoint import load_checkpoint
from util.errors import NonFiniteLossError
from util.errors import UserError

pytestmark = pytest.mark.slow  # end-to-end runs (subprocesses / training loops): `pytest -m "not slow"` skips them

TOY = "tests/toy_train.py"


def losses(run_dir):
    """step -> loss from log.txt; a resumed run re-logs steps after its checkpoint, the last entry wins."""
    result = {}
    for line in (run_dir / "log.txt").read_text().splitlines():
        record = json.loads(line)
        result[record["step"]] = record["loss"]
    return result


def toy_args(data, out, *extra):
    return [TOY, "--data_path", data / "train", "--output_dir", out, "--epochs", "2", *extra]


@pytest.fixture(scope="module")
def reference_run(tiny_image_folder, tmp_path_factory):
    """An uninterrupted 2-rank run: 64 images, 4 per rank per step -> 8 steps per epoch, 16 steps."""
    out = tmp_path_factory.mktemp("reference")
    run_torchrun(toy_args(tiny_image_folder, out))
    reference = losses(out)
    assert sorted(reference) == list(range(1, 17))
    return reference


def test_sigkill_mid_epoch_then_resume_gives_identical_losses(tiny_image_folder, tmp_path, reference_run):
    # Rank 0 is SIGKILLed right after step 11 (epoch 1, mid-epoch); the last checkpoint is step 9.
    killed = run_torchrun(toy_args(tiny_image_folder, tmp_path, "--die_at_step", "11"), check=False)
    assert killed.returncode != 0
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["0000006.pt", "0000009.pt"]
    # Resume with a DataLoader worker this time: batch contents must not depend on where they are made.
    run_torchrun(toy_args(tiny_image_folder, tmp_path, "--resume", tmp_path, "--num_workers", "1"))
    assert losses(tmp_path) == reference_run  # bit-for-bit: JSON keeps the full float repr


def wait_for_steps(run_dir, steps, process, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        log = run_dir / "log.txt"
        if log.exists() and len(log.read_text().splitlines()) >= steps:
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.1)
    pytest.fail("toy run did not reach the expected step")


def test_sigterm_on_one_rank_saves_and_exits_zero(tiny_image_folder, tmp_path, reference_run):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}",
               *map(str, toy_args(tiny_image_folder, tmp_path, "--step_sleep", "0.3", "--ckpt_every", "100"))]
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_steps(tmp_path, 3, process)
    # Only rank 1 is signalled; the flag reaches rank 0 through the periodic all-reduce.
    os.kill(int((tmp_path / "pid-rank1.txt").read_text()), signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output
    assert "a signal on another rank" in output
    checkpoints = sorted((tmp_path / "checkpoints").iterdir())
    assert len(checkpoints) == 1
    stopped_at = load_checkpoint(checkpoints[0])["train_steps"]
    assert 3 <= stopped_at < 16 and stopped_at % 2 == 0  # stops on a sync step (--sync_every 2)
    logged = losses(tmp_path)
    assert max(logged) == stopped_at  # finished the step it was in, started no other
    assert logged == {step: reference_run[step] for step in logged}


def test_sigusr1_single_process_saves_and_exits_zero(tiny_image_folder, tmp_path):
    command = [sys.executable, TOY, *map(str, toy_args(tiny_image_folder, tmp_path, "--step_sleep", "0.2")[1:])]
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_steps(tmp_path, 2, process)
    process.send_signal(signal.SIGUSR1)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    assert "SIGUSR1" in output
    last = sorted((tmp_path / "checkpoints").iterdir())[-1]
    assert load_checkpoint(last)["train_steps"] == max(losses(tmp_path))


def run_toy_in_process(*argv):
    from toy_train import get_args_parser, main

    main(get_args_parser().parse_args([str(a) for a in argv]))


def test_non_finite_loss_stops_without_overwriting_checkpoints(tiny_image_folder, tmp_path):
    with pytest.raises(NonFiniteLossError, match="loss is nan at step 6: training diverged"):
        run_toy_in_process(*toy_args(tiny_image_folder, tmp_path, "--nan_at_step", "6")[1:])
    # Step 6 would have been checkpointed (--ckpt_every 3): the guard runs first, so only step 3 exists.
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["0000003.pt"]


def test_missing_data_folder_is_one_sentence_before_any_model(tmp_path):
    with pytest.raises(UserError, match=r"^data folder .*nope does not exist; pass a folder") as error:
        run_toy_in_process("--data_path", tmp_path / "nope", "--output_dir", tmp_path / "out")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()  # stopped before touching outputs or building the model
