"""scripts/plot_convergence.py on synthetic curves whose answer is known by construction."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "scripts"))
import plot_convergence as pc  # noqa: E402

SCRIPT = REPO_ROOT / "scripts" / "plot_convergence.py"


def hyperbola(step: float, speed: float = 1.0) -> float:
    """A loss curve 1 / (1 + speed * step / 100): the same curve run `speed` times faster."""
    return 1.0 / (1.0 + speed * step / 100.0)


def write_jsonl(path: Path, steps, values, metric: str = "loss", noise_lines: bool = True) -> Path:
    lines = []
    for step, value in zip(steps, values):
        lines.append(json.dumps({"step": step, metric: value}))
        if noise_lines:  # other entries of a real log.txt (no such metric) are skipped
            lines.append(json.dumps({"step": step, "lr": 1e-4, "images_per_sec": 100.0}))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("not json: a header line\n" + "\n".join(lines) + "\n")
    return path


STEPS = list(range(0, 1001, 50))


def test_linear_interpolation_between_logged_points():
    # 1 - s/1000 logged every 100 steps: 0.55 is crossed between 400 (0.6) and 500 (0.5), at exactly 450.
    steps = list(range(0, 1001, 100))
    values = [1 - s / 1000 for s in steps]
    assert pc.steps_to_reach(steps, values, 0.55) == pytest.approx(450.0)
    assert pc.steps_to_reach(steps, values, 0.6) == pytest.approx(400.0)  # hit exactly on a logged point
    assert pc.steps_to_reach(steps, values, 2.0) == 0.0  # the first point already reaches it
    # Higher is better (e.g. IS): 10 + s/10 reaches 47 at step 370.
    assert pc.steps_to_reach(steps, [10 + s / 10 for s in steps], 47.0, higher_is_better=True) == pytest.approx(370.0)


def test_first_crossing_is_used_when_the_curve_wiggles():
    steps, values = [0, 100, 200, 300], [1.0, 0.4, 0.7, 0.2]
    assert pc.steps_to_reach(steps, values, 0.5) == pytest.approx(100 * (1.0 - 0.5) / (1.0 - 0.4))


def test_a_curve_that_never_reaches_the_target_is_not_extrapolated():
    # Straight line 1.0 -> 0.6 over 400 steps: extended, it would reach 0.5 at step 500; it must say "not reached".
    steps = [0, 100, 200, 300, 400]
    assert pc.steps_to_reach(steps, [1.0 - s / 1000 for s in steps], 0.5) is None
    assert pc.steps_to_reach(steps, [0.7] * 5, 0.5) is None


def test_speedup_of_a_four_times_faster_curve(tmp_path, capsys):
    # USP follows the scratch curve 4x faster; scratch's final value 1/11 (step 1000) is USP's value at step 250.
    scratch = write_jsonl(tmp_path / "scratch" / "log.txt", STEPS, [hyperbola(s) for s in STEPS])
    usp = write_jsonl(tmp_path / "usp.jsonl", STEPS, [hyperbola(s, speed=4) for s in STEPS])
    flat = write_jsonl(tmp_path / "flat.jsonl", STEPS, [0.5 - 0.0001 * s for s in STEPS])
    out = tmp_path / "out"
    results = pc.main([f"--run=scratch={scratch.parent}", f"--run=usp={usp}", f"--run=flat={flat}",
                       "--metric", "loss", "--output", str(out / "c.png"), "--json", str(out / "c.json")])
    assert results["usp"]["target"] == pytest.approx(1 / 11)
    assert results["usp"]["x_to_target"] == pytest.approx(250.0)
    assert results["usp"]["speedup"] == pytest.approx(4.0)
    assert results["scratch"]["speedup"] == pytest.approx(1.0)
    assert results["flat"]["x_to_target"] is None and results["flat"]["speedup"] is None
    printed = capsys.readouterr().out
    assert "usp: target 0.0909091 reached at step 250; 4.00x the speed of scratch" in printed
    assert "flat: target 0.0909091 not reached (last step 1000, last value 0.4)" in printed
    saved = json.loads((out / "c.json").read_text())
    assert saved["runs"]["usp"]["speedup"] == pytest.approx(4.0)
    assert saved["runs"]["flat"]["speedup"] is None
    assert (out / "c.png").stat().st_size > 1000


def test_explicit_target_and_a_reference_that_misses_it(tmp_path, capsys):
    scratch = write_jsonl(tmp_path / "scratch.jsonl", STEPS, [hyperbola(s) for s in STEPS])
    usp = write_jsonl(tmp_path / "usp.jsonl", STEPS, [hyperbola(s, speed=4) for s in STEPS])
    # Target 0.2: scratch reaches it at step 400, USP (4x) at step 100, both logged points -> exactly 4x.
    results = pc.main([f"--run=usp={usp}", f"--run=scratch={scratch}", "--reference", "scratch", "--target", "0.2",
                       "--metric", "loss"])
    assert results["usp"]["x_to_target"] == pytest.approx(100.0)
    assert results["usp"]["reference_x_to_target"] == pytest.approx(400.0)
    assert results["usp"]["speedup"] == pytest.approx(4.0)
    # Target 1/21: USP gets there (step 500), scratch never does (it ends at 1/11), so no factor is invented.
    results = pc.main([f"--run=usp={usp}", f"--run=scratch={scratch}", "--reference", "scratch",
                       "--target", repr(1 / 21), "--metric", "loss"])
    assert results["usp"]["x_to_target"] == pytest.approx(500.0)
    assert results["scratch"]["x_to_target"] is None and results["usp"]["speedup"] is None
    assert "the reference scratch does not reach it, so no speed-up" in capsys.readouterr().out


def test_groups_pair_each_run_with_its_own_reference(tmp_path):
    runs = []
    for group, speed in (("s0", 4.0), ("s1", 2.0)):
        scratch = write_jsonl(tmp_path / group / "scratch.jsonl", STEPS, [hyperbola(s) for s in STEPS])
        usp = write_jsonl(tmp_path / group / "usp.jsonl", STEPS, [hyperbola(s, speed=speed) for s in STEPS])
        runs += [f"--run={group}/usp={usp}", f"--run={group}/scratch={scratch}"]
    results = pc.main([*runs, "--reference", "scratch", "--metric", "loss"])
    assert results["s0/usp"]["reference"] == "s0/scratch" and results["s0/usp"]["speedup"] == pytest.approx(4.0)
    assert results["s1/usp"]["reference"] == "s1/scratch" and results["s1/usp"]["speedup"] == pytest.approx(2.0)


def test_images_seen_with_different_batch_sizes(tmp_path):
    # Same steps-to-target ratio 4 as above, but USP runs batch 128 and scratch 256: 8x fewer images.
    scratch = write_jsonl(tmp_path / "scratch.jsonl", STEPS, [hyperbola(s) for s in STEPS])
    usp = write_jsonl(tmp_path / "usp.jsonl", STEPS, [hyperbola(s, speed=4) for s in STEPS])
    results = pc.main([f"--run=scratch={scratch}", f"--run=usp={usp}", "--x", "images",
                       "--images-per-step", "256", "--images-per-step", "128", "--metric", "loss"])
    assert results["usp"]["x_to_target"] == pytest.approx(250 * 128)
    assert results["usp"]["speedup"] == pytest.approx(8.0)


def test_resumed_log_keeps_the_last_value_of_a_repeated_step(tmp_path):
    path = tmp_path / "log.txt"
    path.write_text("\n".join(json.dumps(entry) for entry in [
        {"step": 0, "fid": 100.0}, {"step": 100, "fid": 90.0}, {"step": 100, "fid": 80.0}, {"step": 200, "fid": 60.0}]))
    steps, values = pc.read_curve(path, "fid")
    assert steps.tolist() == [0, 100, 200] and values.tolist() == [100.0, 80.0, 60.0]


def test_tensorboard_event_files(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    for name, speed in (("scratch", 1.0), ("usp", 4.0)):
        writer = SummaryWriter(log_dir=str(tmp_path / name))
        for step in STEPS:
            writer.add_scalar("eval/fid", 100 * hyperbola(step, speed), step)
            writer.add_scalar("train/loss", 1.0, step)
        writer.close()
    results = pc.main([f"--run=scratch={tmp_path / 'scratch'}", f"--run=usp={tmp_path / 'usp'}", "--metric", "fid"])
    assert results["usp"]["target"] == pytest.approx(100 / 11, rel=1e-6)
    assert results["usp"]["speedup"] == pytest.approx(4.0, rel=1e-6)
    event_file = next((tmp_path / "usp").glob(pc.EVENT_GLOB))
    steps, values = pc.read_curve(event_file, "eval/fid")  # a file and the full tag work too
    assert steps.tolist() == STEPS and values[0] == pytest.approx(100.0)


@pytest.mark.parametrize("arguments, message", [
    (["--run=a={missing}"], "does not exist"),
    (["--run=a={log}", "--metric", "fid"], "has no 'fid' values"),
    (["--run=a={log}", "--metric", "loss", "--reference", "b"], "no run labelled 'b'"),
    (["--run=a={log}", "--metric", "loss", "--x", "images"], "--x images needs --images-per-step"),
    (["--run={log}"], "expected LABEL=PATH"),
])
def test_bad_input_stops_with_one_sentence(tmp_path, arguments, message):
    log = write_jsonl(tmp_path / "log.txt", [0, 100], [1.0, 0.5])
    arguments = [a.format(missing=tmp_path / "nope", log=log) for a in arguments]
    result = subprocess.run([sys.executable, str(SCRIPT), *arguments], capture_output=True, text=True, cwd=REPO_ROOT)
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr
