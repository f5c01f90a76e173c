"""The benchmark harness: optimisations change speed, not results; the script runs end to end on CPU.

Timings are never asserted (the host is shared); only that the numbers exist, are finite and positive.
"""
import json
import math
from copy import deepcopy

import pytest
import torch

from models.dit import DiT_models
from scripts import benchmark as bench
from scripts.benchmark_lib import (ModeConfig, count_flops, dit_forward_flops, dit_forward_macs, measure_matmul_peak,
                                   perturb_, update_ema_loop)
from util.ema import update_ema

TINY = ["--device", "cpu", "--sizes", "tiny", "--image-size", "16", "--batch-size", "4", "--sample-batch-size", "2",
        "--sample-steps", "2", "--vae", "tiny", "--threads", "1", "--seed", "0"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def modes_for_equivalence():
    """Baseline, the optimised fp32 path and the optimised bf16 path, as the CPU run builds them."""
    args = bench.parse_args(TINY)
    return args, bench.build_modes(args, torch.device("cpu"), cpu_bf16=True)


@pytest.mark.parametrize("workload", ["dit", "sit", "mae"])
def test_optimised_step_matches_fp32_baseline(workload):
    """Same weights, same batch: losses agree (fp32 paths to float precision, bf16 within bf16 tolerance),
    and after one optimizer step the next loss still agrees, so fused AdamW / cached latents take the same step
    as the plain loop."""
    args, modes = modes_for_equivalence()
    assert [mode.name for mode in modes] == ["baseline", "optimised", "optimised-bf16"]
    device = torch.device("cpu")
    codec = bench.load_codec(args, device)
    if workload == "mae":
        built = bench.build_mae_workload("tiny", args, modes, device, codec, perturb=0.02)
    else:
        built = bench.build_train_workload(workload, "tiny", args, modes, device, codec, perturb=0.02)
    first = {name: runner().item() for name, runner in built.runners.items()}
    second = {name: runner().item() for name, runner in built.runners.items()}
    for losses in (first, second):
        assert all(math.isfinite(value) and value > 0 for value in losses.values()), losses
        assert losses["optimised"] == pytest.approx(losses["baseline"], rel=1e-4), losses
        assert losses["optimised-bf16"] == pytest.approx(losses["baseline"], rel=3e-2), losses
    assert second["baseline"] != first["baseline"]  # the step really changed the weights


def test_ema_loop_equals_foreach_update():
    model = DiT_models["DiT-S/2"](input_size=4, hidden_size=32, depth=1, num_heads=2, num_classes=3)
    perturb_(model, 0.1, seed=1)
    ema_loop, ema_foreach = deepcopy(model), deepcopy(model)
    perturb_(model, 0.1, seed=2)
    update_ema_loop(ema_loop, model, decay=0.9)
    update_ema(ema_foreach, model, decay=0.9)
    for (name, a), b in zip(ema_loop.named_parameters(), ema_foreach.parameters()):
        torch.testing.assert_close(a, b, msg=name)


def test_flops_analytic_matches_paper_and_counter():
    # The DiT paper's 118.6 "GFLOPs" for DiT-XL/2 at 256 px are multiply-accumulates.
    assert dit_forward_macs(1152, 28, 256) / 1e9 == pytest.approx(118.6, abs=0.05)
    with torch.device("meta"):
        model = DiT_models["DiT-XL/2"](input_size=32)
        x, t, y = torch.randn(1, 4, 32, 32), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long)
        counted = count_flops(lambda: model(x, t, y))
    # FlopCounterMode counts 2 per MAC; embedders and the final layer add well under 1%.
    assert counted == pytest.approx(dit_forward_flops(1152, 28, 256), rel=0.01)


@pytest.mark.slow
def test_benchmark_end_to_end_tiny(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main(TINY + ["--workloads", *bench.WORKLOADS, "--repeats", "1", "--iters", "1",
                       "--warmup", "0", "--peak-size", "256", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["peak"]["tflops"] > 0
    names = {row["workload"] for row in saved["rows"]}
    assert names == {"dit-train", "sit-train", "lightningdit-train", "repa-train", "mae-train", "ema-update",
                     "sample-ddpm", "sample-ode", "vae-encode", "inception"}
    assert [row["mode"] for row in saved["rows"] if row["workload"] == "repa-train"] == [
        "sit-cached", "repa-cached", "sit-online", "repa-online"]  # REPA's cost with and without the feature cache
    for row in saved["rows"]:
        for key in ("images_per_sec", "images_per_cpu_sec", "gflops_per_image", "tflops", "mfu", "ratio"):
            assert math.isfinite(row[key]) and row[key] > 0, (row["workload"], row["mode"], key, row[key])
    baseline_ratios = [row["ratio"] for row in saved["rows"] if row["mode"] in ("baseline", "sit-cached")]
    assert baseline_ratios == [1.0] * len(baseline_ratios)
    # The derived columns follow their definitions (BENCHMARKS.md) from the measured ones.
    baseline_speed = {row["workload"]: row["images_per_sec"] for row in saved["rows"]
                      if row["mode"] in ("baseline", "sit-cached")}
    for row in saved["rows"]:
        assert row["ratio"] == pytest.approx(row["images_per_sec"] / baseline_speed[row["workload"]], rel=1e-9)
        assert row["tflops"] == pytest.approx(row["gflops_per_image"] * row["images_per_sec"] / 1e3, rel=1e-9)
        assert row["mfu"] == pytest.approx(row["tflops"] / saved["peak"]["tflops"], rel=1e-9)
    table = capsys.readouterr().out
    assert "cpu bf16 matmul" in table and "MFU" in table


def test_matmul_peak_is_positive():
    peak = measure_matmul_peak(torch.device("cpu"), size=128, min_seconds=0.01)
    assert peak["dtype"] == "float32" and peak["tflops"] > 0


def test_bad_input_is_one_sentence(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "cpu", "--image-size", "36"])
    assert "36" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "cpu", "--vae", "/does/not/exist"])
    assert "--vae /does/not/exist is neither" in capsys.readouterr().err
    with pytest.raises(ValueError, match="precision"):
        ModeConfig(precision="fp8")


def test_gradient_checkpointing_changes_memory_not_results():
    """--grad-ckpt recomputes blocks in the backward pass: same losses, same step, same state-dict names."""
    args = bench.parse_args(TINY)
    device = torch.device("cpu")
    modes = [ModeConfig(), ModeConfig(name="checkpointed", grad_ckpt=True, attention="sdpa", latent_cache=True)]
    built = bench.build_train_workload("dit", "tiny", args, modes, device, bench.load_codec(args, device), perturb=0.02)
    for _ in range(2):
        losses = {name: runner().item() for name, runner in built.runners.items()}
        assert losses["checkpointed"] == pytest.approx(losses["baseline"], rel=1e-4), losses


def test_flops_are_counted_on_two_images_and_scale_with_the_batch():
    """FLOPs per image do not depend on the batch (the count runs on 2 images and is scaled): a batch of 2
    and a batch of 6 report the same GFLOPs per image."""
    per_image = []
    for batch in ("2", "6"):
        args = bench.parse_args(TINY + ["--workloads", "dit", "--batch-size", batch])
        modes = bench.build_modes(args, torch.device("cpu"), cpu_bf16=False)
        codec = bench.load_codec(args, torch.device("cpu"))
        per_image.append(bench.build_train_workload("dit", "tiny", args, modes, torch.device("cpu"), codec).flops_per_image)
    assert per_image[0] == pytest.approx(per_image[1], rel=1e-9)


@pytest.mark.slow
def test_out_of_memory_is_recorded_per_workload_and_json_is_written_as_it_goes(tmp_path, monkeypatch):
    """A workload that runs out of memory becomes an error row; the next workload still runs; the JSON on
    disk already holds the rows of the finished workloads while later ones are measured."""
    out = tmp_path / "bench.json"
    oom = bench.out_of_memory_errors()[0]
    real_sampling = bench.build_sampling_workload
    seen = []

    def failing_train(*args, **kwargs):
        raise oom("CUDA out of memory. Tried to allocate 186.00 GiB")

    def sampling_after_json(*args, **kwargs):
        seen.append(json.loads(out.read_text())["rows"])
        return real_sampling(*args, **kwargs)

    monkeypatch.setattr(bench, "build_train_workload", failing_train)
    monkeypatch.setattr(bench, "build_sampling_workload", sampling_after_json)
    bench.main(TINY + ["--workloads", "dit", "sample-ddpm", "--repeats", "1", "--iters", "1", "--warmup", "0",
                       "--peak-size", "64", "--modes", "optimised", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert rows[0] == {"workload": "dit tiny batch 4", "error": "out of memory (CUDA out of memory. Tried to "
                                                                "allocate 186.00 GiB)"}
    assert [row["mode"] for row in rows[1:]] == ["optimised"] and rows[1]["workload"] == "sample-ddpm"
    assert seen == [rows[:1]]
