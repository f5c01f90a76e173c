"""The fast demo end to end: `bash scripts/demo.sh --fast` runs every stage through the real CLIs,
writes report.md with finite numbers and its plots, and a second run skips what is done."""
import json
import math
import re
import subprocess
import time
from pathlib import Path

import pytest
from PIL import Image

from demo.stages import RUNS
from conftest import REPO_ROOT

pytestmark = pytest.mark.slow  # end-to-end runs (subprocesses / training loops): `pytest -m "not slow"` skips them


def run_demo(out: Path, *flags, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    result = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "demo.sh"), "--out", str(out), *flags],
                            capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        pytest.fail(f"demo exited {result.returncode}\nSTDOUT:\n{result.stdout[-4000:]}\nSTDERR:\n{result.stderr[-4000:]}")
    return result


@pytest.fixture(scope="module")
def fast_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo_out"
    started = time.time()
    result = run_demo(out, "--fast")
    return out, result, time.time() - started


def finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def test_report_and_plots_exist(fast_demo):
    out, result, _ = fast_demo
    assert "finished in" in result.stdout
    report = (out / "report.md").read_text()
    for section in ("## Generation: USP init vs scratch", "## Understanding: linear probe", "## Toy metrics",
                    "## Time per stage", "loss_curves.png", "samples.png", "recon/reconstruction.png"):
        assert section in report
    for picture in ("loss_curves.png", "samples.png", "recon/reconstruction.png"):
        with Image.open(out / picture) as image:
            assert min(image.size) >= 64  # a real picture, not an empty placeholder


def table_row(report: str, title: str) -> list:
    line = next(line for line in report.splitlines() if line.startswith(f"| {title}"))
    return [cell.strip() for cell in line.strip("|").split("|")[1:]]


def test_report_numbers_are_finite(fast_demo):
    out, _, _ = fast_demo
    report = (out / "report.md").read_text()
    for title in ("held-out loss at the last step", "held-out loss of the EMA weights", "toy FD of samples"):
        cells = table_row(report, title)
        assert len(cells) == len(RUNS)
        assert all(finite(float(cell)) for cell in cells), (title, cells)
    accuracies = table_row(report, "toy class accuracy of samples")
    assert all(re.fullmatch(r"\d+\.\d%", cell) for cell in accuracies), accuracies
    for encoder in ("USP-pretrained", "randomly initialised"):
        assert re.search(rf"\| {encoder} \| \d+\.\d%", report), encoder

    for run in RUNS:
        curve = json.loads((out / "heldout" / f"{run}.json").read_text())
        assert curve["steps"] and all(finite(v) for v in curve["loss"] + curve["ema_loss"])
    toy = json.loads((out / "toy_metrics.json").read_text())
    assert set(toy["samples"]) == set(RUNS)
    for metrics in [toy["real_val"], toy["vae_reconstruction"], *toy["samples"].values()]:
        assert finite(metrics["class_accuracy"]) and finite(metrics["toy_fd"]) and metrics["toy_fd"] >= 0


def test_measured_vae_scale_reaches_the_pipeline(fast_demo):
    """The tiny VAE's 1/std scale travels through --vae_path (config.json) into the latent cache."""
    out, _, _ = fast_demo
    stats = json.loads((out / "vae" / "vae_stats.json").read_text())
    assert finite(stats["scale"]) and stats["scale"] > 0
    assert stats["scale"] == pytest.approx(1.0 / stats["latent_std"])
    for split in ("train", "val"):
        manifest = json.loads((out / "cache" / split / "manifest.json").read_text())
        assert manifest["scale"] == pytest.approx(stats["scale"])


def test_rerun_skips_finished_stages_and_redo_reruns_downstream(fast_demo):
    out, _, first_seconds = fast_demo
    markers = {path.name: path.stat().st_mtime_ns for path in (out / ".stages").glob("*.json")}
    bookkeeping = {".stages", "demo_config.json", "timings.json"}  # the runner's own records, rewritten each call
    outputs = {path: path.stat().st_mtime_ns for path in out.rglob("*")
               if path.is_file() and not bookkeeping & set(path.relative_to(out).parts)}
    again = run_demo(out, "--fast")
    assert "everything is up to date" in again.stdout
    assert markers == {path.name: path.stat().st_mtime_ns for path in (out / ".stages").glob("*.json")}
    # No stage ran again: every file a stage wrote is untouched (instead of a wall-clock bound, which is noise).
    assert all(path.stat().st_mtime_ns == stamp for path, stamp in outputs.items() if path.exists())

    redo = run_demo(out, "--fast", "--redo", "toy_metrics")
    timings = json.loads((out / "timings.json").read_text())
    assert timings["invocations"][-1]["ran"] == ["toy_metrics", "report"]
    assert "skipping finished stages" in redo.stdout
    assert (out / ".stages" / "pretrain.json").stat().st_mtime_ns == markers["pretrain.json"]


def test_bad_flags_fail_with_one_sentence(fast_demo):
    out, _, _ = fast_demo
    mixed = run_demo(out, check=False)  # a full run into the --fast run's folder
    assert mixed.returncode != 0 and "--redo all" in mixed.stderr and "Traceback" not in mixed.stderr
    unknown = run_demo(out, "--fast", "--redo", "nonsense", check=False)
    assert unknown.returncode != 0 and "is not a stage" in unknown.stderr
