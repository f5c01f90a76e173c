"""scripts/gpu_check.py: the step runner's bookkeeping, the figures' arithmetic, and the dry run end to end."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT
from scripts import gpu_check_steps as steps
from scripts.gpu_check_runner import Step, run_steps
from util.errors import UserError


def test_runner_records_each_step_and_skips_what_a_failure_blocks(tmp_path):
    """A failed step fails only itself; its dependents are skipped with the reason; the JSON on disk already
    holds a step's result while later steps are still to run (written as it goes)."""
    seen_on_disk = {}

    def late():
        seen_on_disk.update(json.loads((tmp_path / "gpu_check.json").read_text())["steps"])
        return {"value": 2}

    def broken():
        raise steps.CheckFailed("outside tolerance")

    graph = [Step("first", lambda: {"value": 1}), Step("broken", broken), Step("after-broken", late, deps=("broken",)),
             Step("late", late, deps=("first",)), Step("alone", lambda: {"value": 3}, exclusive=True)]
    record = run_steps(graph, tmp_path, {"mode": "test", "started": "now"}, jobs=2)
    result = json.loads((tmp_path / "gpu_check.json").read_text())["steps"]
    assert result["first"]["status"] == "ok" and result["first"]["result"] == {"value": 1}
    assert result["broken"] == {**result["broken"], "status": "failed", "error": "outside tolerance"}
    assert result["after-broken"] == {"status": "skipped", "reason": "needs broken"}
    assert result["late"]["status"] == "ok" and result["alone"]["status"] == "ok"
    assert seen_on_disk["first"]["status"] == "ok"
    assert not record.all_passed()
    table = (tmp_path / "gpu_check.txt").read_text()
    assert "broken" in table and "outside tolerance" in table and "needs broken" in table


def test_runner_skips_steps_after_the_time_budget_and_honours_only(tmp_path):
    graph = [Step("a", lambda: {}), Step("b", lambda: {}, deps=("a",)), Step("c", lambda: {})]
    run_steps(graph, tmp_path, {"mode": "test", "started": "now"}, jobs=1, only=["b"])
    result = json.loads((tmp_path / "gpu_check.json").read_text())["steps"]
    assert [result[name]["status"] for name in "abc"] == ["ok", "ok", "skipped"]
    run_steps(graph, tmp_path, {"mode": "test", "started": "now"}, jobs=1, budget_seconds=0)
    result = json.loads((tmp_path / "gpu_check.json").read_text())["steps"]
    assert [result[name]["reason"] for name in "abc"] == ["time budget spent", "needs a", "time budget spent"]


def test_precision_agreement_compares_the_first_three_steps_relative_to_fp32():
    fp32, bf16 = {"losses": [2.0, 1.0, 0.5, 9.0]}, {"losses": [2.0, 1.02, 0.5, 1.0]}
    result = steps.precision_agreement(fp32, bf16, 0.05, "bf16")
    assert result["relative_difference_per_step"] == pytest.approx([0.0, 0.02, 0.0])
    assert result["relative_difference"] == pytest.approx(0.02)  # step 4 differs a lot but is not compared
    with pytest.raises(steps.CheckFailed, match="at step 2 .* above the stated 0.01"):
        steps.precision_agreement(fp32, bf16, 0.01, "bf16")


def test_compare_samples_counts_pixel_differences(tmp_path):
    first = np.zeros((1, 2, 2, 3), np.uint8)
    second = first.copy()
    second[0, 0, 0] = [10, 0, 200]
    np.savez(tmp_path / "a.npz", arr_0=first)
    np.savez(tmp_path / "b.npz", arr_0=second)
    result = steps.compare_samples({"npz": tmp_path / "a.npz"}, {"npz": tmp_path / "b.npz"})
    assert result["max_abs_pixel_difference"] == 200
    assert result["mean_abs_pixel_difference"] == pytest.approx(210 / 12)
    assert result["fraction_pixels_off_by_more_than_8"] == pytest.approx(2 / 12)


DRY_RUN_STEPS = ["environment", "sdpa", "latent-cache-fp16", "mae-resume"]


@pytest.mark.slow
def test_dry_run_end_to_end(tmp_path):
    """`gpu_check.sh --dry-run` on CPU/gloo: the environment, SDPA and fp16-cache probes and one SIGTERM +
    resume under torchrun (bit-exact on CPU). The full dry run (every step) is
    `bash scripts/gpu_check.sh --out DIR --dry-run`; this subset keeps the suite's time down."""
    out = tmp_path / "out"
    result = subprocess.run(["bash", "scripts/gpu_check.sh", "--out", str(out), "--dry-run", "--only", *DRY_RUN_STEPS],
                            cwd=REPO_ROOT, env=dict(os.environ, PYTHON=sys.executable),
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    summary = json.loads((out / "gpu_check.json").read_text())
    ran = {name: entry for name, entry in summary["steps"].items() if entry["status"] != "skipped"}
    assert set(ran) == set(DRY_RUN_STEPS) | {"assets", "mae-bf16"}
    assert all(entry["status"] == "ok" for entry in ran.values()), ran
    resume = ran["mae-resume"]["result"]
    assert resume["checkpointed_at_step"] >= resume["signalled_at_step"]
    assert resume["max_abs_loss_difference_vs_uninterrupted"] == 0.0
    assert ran["sdpa"]["result"]["backend_by_precision"]["fp32"] != ["none found"]
    assert (out / "gpu_check.txt").read_text().startswith("gpu_check (dry-run")
    assert (out / "gpu_check_logs.tar.gz").is_file()


@pytest.mark.slow
def test_evaluator_smoke_test_runs_offline_and_labels_its_numbers_not_fid(tmp_path):
    """scripts/evaluator_smoke_test.py: random Inception weights, random npz files, the whole evaluator; the
    JSON says NOT FID and holds every metric, finite."""
    from scripts import evaluator_smoke_test

    argv = ["--device", "cpu", "--num-images", "8", "--image-size", "32", "--batch-size", "8"]
    evaluator_smoke_test.main(argv + ["--output-json", str(tmp_path / "smoke.json")])
    written = json.loads((tmp_path / "smoke.json").read_text())
    assert written["NOT_FID"].startswith("NOT FID") and written["ref_batch"] == "random"
    metrics = written["metrics_with_random_weights"]
    assert all(np.isfinite(metrics[key]) for key in ("fid", "sfid", "inception_score", "precision", "recall"))
    with pytest.raises(UserError, match="give both REF and SAMPLE"):
        evaluator_smoke_test.main([str(tmp_path / "smoke.json")])


def test_random_inception_weights_are_seeded_and_have_the_fid_layout():
    """The one random-weight builder (tests, the smoke test, gpu_check): same seed, same tensors; another seed,
    other tensors; the keys and shapes the 2015 FID Inception file has (its signature tensors included)."""
    import torch

    from generation.inception import SIGNATURE_SHAPES, random_inception_state_dict

    first, again, other = (random_inception_state_dict(seed) for seed in (0, 0, 1))
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not torch.equal(first["fc.weight"], other["fc.weight"])
    assert all(tuple(first[name].shape) == shape for name, shape in SIGNATURE_SHAPES.items())
    assert not any(name.endswith("num_batches_tracked") for name in first)
