"""scripts/benchmark.py: the FLOP count, the datasheet peaks and the MFU arithmetic against hand-worked numbers,
and every workload end to end on the CPU at tiny size. Timings are never asserted (the host is shared)."""
import json
import math

import pytest
import torch

from models.dit import DiT_models
from scripts import benchmark as bench


def test_flops_analytic_matches_paper_and_counter():
    # The DiT paper's 118.6 "GFLOPs" for DiT-XL/2 at 256 px are multiply-accumulates.
    assert bench.dit_forward_macs(1152, 28, 256) / 1e9 == pytest.approx(118.6, abs=0.05)
    with torch.device("meta"):
        model = DiT_models["DiT-XL/2"](input_size=32)
        x, t, y = torch.randn(1, 4, 32, 32), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long)
        counted = bench.count_flops(lambda: model(x, t, y))
    # FlopCounterMode counts 2 per MAC; embedders and the final layer add well under 1%.
    assert counted == pytest.approx(2 * bench.dit_forward_macs(1152, 28, 256), rel=0.01)


@pytest.mark.parametrize("name, precision, expected", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.0),      # H100 SXM datasheet, dense bf16
    ("NVIDIA H100 80GB HBM3", "fp32", 494.5),      # tf32 is half of bf16
    ("NVIDIA H100 PCIe", "bf16", 756.0),
    ("NVIDIA H200", "fp16", 989.0),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
    ("NVIDIA A100-SXM4-80GB", "fp32", 156.0),
    ("Tesla V100-SXM2-32GB", "bf16", None),
])
def test_datasheet_peak(name, precision, expected):
    peak, label = bench.datasheet_peak(name, precision)
    assert peak == expected
    if expected is None:
        assert label.startswith("unknown GPU")


def test_mfu_hand_worked():
    """DiT-XL/2 training: 3 x 2 x 118.6e9 = 711.6e9 FLOPs per image; 400 img/s = 284.64 TFLOP/s, which is
    28.78% of an H100 SXM's 989 and 57.6% of its 494.5 tf32."""
    assert bench.mfu(711.6e9, 400, 989.0) == pytest.approx(0.28781, rel=1e-4)
    assert bench.mfu(711.6e9, 400, 494.5) == pytest.approx(0.57562, rel=1e-4)
    assert bench.mfu(711.6e9, 400, None) is None


@pytest.mark.parametrize("workload", ["dit", "sit", "lightningdit", "repa", "mae"])
def test_workload_runs_on_cpu(workload, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        row = bench.main(["--workload", workload, "--size", "tiny", "--device", "cpu", "--image-size", "32",
                          "--vae", "tiny", "--batch-size", "2", "--warmup", "1", "--iters", "1",
                          "--json", str(tmp_path / "row.json")])
    finally:
        torch.set_num_threads(threads)
    assert json.loads((tmp_path / "row.json").read_text())["workload"] == workload
    assert row["images_per_sec"] > 0 and math.isfinite(row["images_per_sec"])
    assert row["gflops_per_image"] > 0 and row["mfu_datasheet"] is None  # no datasheet peak on a CPU
    assert row["precision"] == bench.RECIPE_PRECISION[workload]


def test_bad_flags_are_refused_in_one_sentence(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--workload", "dit", "--device", "cpu", "--image-size", "100"])
    assert "multiple of 32" in capsys.readouterr().err
