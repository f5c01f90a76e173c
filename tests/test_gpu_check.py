"""scripts/gpu_check.py: the tolerance arithmetic, agreement checks that catch a wrong computation, the verdict,
and the dry run end to end. Timings are never asserted."""
import json
import os
import subprocess
import sys
from copy import deepcopy
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import REPO_ROOT
from scripts import gpu_check as gc
from util.errors import UserError


def test_tolerance_is_sixteen_unit_roundoffs_of_the_format():
    # bf16 keeps 8 significant bits (u = 2^-8), fp16 and TF32 11 (u = 2^-11).
    assert gc.tolerance("bf16") == 0.0625
    assert gc.tolerance("fp16") == gc.tolerance("tf32") == 0.0078125


def test_agreement_hand_worked():
    """Gradient (3, 4) against (3, 4.05): |d| = 0.05, |g| = 5, relative 0.01: inside bf16's 0.0625, outside
    fp16's 0.0078; the loss 2.0 against 2.001 is 5e-4 relative."""
    reference = (2.0, torch.tensor([3.0, 4.0]))
    other = (2.001, torch.tensor([3.0, 4.05]))
    bf16 = gc.agree(reference, other, "bf16", "bf16")
    assert [item["value"] for item in bf16] == pytest.approx([5e-4, 0.01], rel=1e-5)
    assert all(item["passed"] for item in bf16)
    fp16 = gc.agree(reference, other, "fp16", "fp16")
    assert [item["passed"] for item in fp16] == [True, False]
    nan = gc.agree(reference, (float("nan"), other[1]), "bf16", "bf16")
    assert not nan[0]["passed"]
    with pytest.raises(gc.CheckFailed, match="fp16: relative trunk-gradient difference is 0.0100"):
        gc.judge({"comparisons": fp16})


def tiny_dit_case():
    from generation.objectives import build_objective
    from models.dit import DiT_models

    torch.manual_seed(0)
    model = DiT_models["DiT-S/2"](input_size=4, num_classes=10, hidden_size=32, depth=2, num_heads=2)
    gc.perturb_(model)
    g = torch.Generator().manual_seed(0)
    batch = {"x": torch.randn(4, 4, 4, 4, generator=g), "y": torch.randint(0, 10, (4,), generator=g),
             "noise": torch.randn(4, 4, 4, 4, generator=g), "drop": torch.zeros(4, dtype=torch.long),
             "index": torch.arange(4)}
    return model, build_objective("DiT-S/2", 10), batch


def test_agreement_passes_bf16_and_fails_a_skipped_block():
    """The DiT check on a tiny DiT: bf16 autocast is inside the bf16 limit; the same bf16 computation with the last
    block skipped (its output multiplied by 0, so its parameters stay in the gradient vector) is not."""
    model, objective, batch = tiny_dit_case()
    cpu = torch.device("cpu")
    reference = gc.generation_gradient(model, objective, batch, cpu, "fp32")
    assert float(reference[1].norm()) > 0  # the output layer is non-zero, so the trunk gets gradients
    right = gc.generation_gradient(model, objective, batch, cpu, "bf16")
    assert all(item["passed"] for item in gc.agree(reference, right, "bf16", "bf16"))
    wrong_model = deepcopy(model)
    block = wrong_model.blocks[-1]
    block.forward = lambda x, c, forward=block.forward: x + 0 * forward(x, c)
    wrong = gc.generation_gradient(wrong_model, objective, batch, cpu, "bf16")
    assert not gc.agree(reference, wrong, "bf16", "bf16")[1]["passed"]


def test_agreement_fails_a_wrong_mask_ratio_in_pretraining():
    from models.mae import create_mae
    from pretrain.engine_pretrain import masked_loss

    torch.manual_seed(0)
    model = create_mae("vit_base_patch_vae", 32, vae_version="d8", norm_pix_loss=True, embed_dim=32, depth=2,
                       num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    latents, noise, cpu = torch.randn(4, 4, 4, 4), torch.rand(4, model.patch_embed.num_patches), torch.device("cpu")

    def gradient(precision, mask_ratio):
        settings = SimpleNamespace(precision=precision, mask_ratio=mask_ratio)
        return gc.trunk_gradient(model, lambda: masked_loss(model, latents, latents, noise, settings, cpu),
                                 precision, cpu)
    reference = gradient("fp32", 0.75)
    assert all(item["passed"] for item in gc.agree(reference, gradient("bf16", 0.75), "bf16", "bf16"))
    assert not all(item["passed"] for item in gc.agree(reference, gradient("bf16", 0.5), "bf16", "bf16"))


def test_verdict_fails_a_skipped_check_but_not_a_timed_out_benchmark_row():
    steps = {"sdpa": {"kind": "check", "status": "ok"}, "bench-dit-recipe": {"kind": "bench", "status": "timeout"}}
    assert gc.verdict(steps) == "PASS"
    steps["evaluator"] = {"kind": "check", "status": "skipped"}
    steps["bench-mae-recipe"] = {"kind": "bench", "status": "failed"}
    assert gc.verdict(steps) == "FAIL (evaluator, bench-mae-recipe)"


@pytest.mark.slow
def test_dry_run_end_to_end(tmp_path):
    """`gpu_check.sh --dry-run` on the CPU: every step runs and passes, and every correctness step states the
    comparisons it made with their values and limits (resume: bit-exact against an uninterrupted run)."""
    out = tmp_path / "out"
    result = subprocess.run(["bash", "scripts/gpu_check.sh", "--out", str(out), "--dry-run"], cwd=REPO_ROOT,
                            env=dict(os.environ, PYTHON=sys.executable), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["verdict"] == "PASS"
    assert set(summary["steps"]) == set(gc.CHECKS) - {"resume-sit"} | {name for name, _ in gc.DRY_SCALE.bench}
    for name, entry in summary["steps"].items():
        assert entry["status"] == "ok", (name, entry)
        if entry["kind"] == "check":
            assert entry["result"]["comparisons"], name
            assert all({"value", "limit", "rule"} <= set(item) for item in entry["result"]["comparisons"])
        else:
            assert entry["result"]["images_per_sec"] > 0 and entry["result"]["gflops_per_image"] > 0
    resume = summary["steps"]["resume-dit"]["result"]["comparisons"]
    assert resume[-1]["what"].startswith("max |resumed loss") and resume[-1]["value"] == 0.0
    assert (out / "gpu_check.txt").read_text().startswith("gpu_check (dry run")
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
