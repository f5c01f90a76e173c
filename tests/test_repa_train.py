"""REPA in the DiT/SiT trainer on CPU: tiny SiT/DiT, tiny random DINOv2 (tests/dinov2_reference.py), 32 px images.

At 32 px the encoder sees 28 px = a 2 x 2 grid, the same 4 tokens as the tiny DiT/SiT (4 x 4 latents, 2 x 2
patches), so the token grids line up as they do at 256 px (16 x 16 each).
"""
import contextlib
import json

import pytest
import torch

from conftest import run_torchrun
from dinov2_reference import TINY_VIT, hub_state_dict
from generation.objectives import NoiseBundle, build_objective
from generation.repa import Alignment, projection_loss
from models.repa import DinoV2Target
from models.sit import SiT_models
from test_train_generation import (MODELS, TINY, experiment_dirs, fail_main, run_main, step_losses,  # noqa: F401
                                   tiny_usp_checkpoint, train_argv)
from util.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def encoder_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("dinov2") / "dinov2_vitb14_pretrain.pth"
    torch.save(hub_state_dict(seed=11), path)
    return path


def repa_flags(weights, *extra) -> list:
    return ["--repa", "--enc-type", "dinov2-vit-b", "--repa-encoder-path", str(weights), "--encoder-depth", "1",
            "--projector-dim", "16", "--repa-encoder-kwargs", json.dumps(TINY_VIT), *map(str, extra)]


def log_lines(experiment):
    return [json.loads(line) for line in (experiment / "log.txt").read_text().splitlines()]


@pytest.mark.parametrize("family", ["diffusion", "transport"])
def test_repa_trains_and_keeps_projectors_in_the_training_checkpoint(family, tmp_path, tiny_image_folder,
                                                                     tiny_vae_dir, encoder_weights):
    results = tmp_path / "results"
    run_main(train_argv(results, tiny_image_folder, tiny_vae_dir, MODELS[family], "--max-steps", "4",
                        *repa_flags(encoder_weights, "--qk-norm", "--max-grad-norm", "1.0")))
    (experiment,) = experiment_dirs(results)
    lines = [line for line in log_lines(experiment) if "loss" in line]
    assert [line["step"] for line in lines] == [1, 2, 3, 4]
    assert all(-1.0 <= line["proj_loss"] <= 1.0 for line in lines)  # a mean negative cosine
    checkpoint = load_checkpoint(experiment / "checkpoints" / "0000004.pt")
    for key in ("model", "ema"):
        assert checkpoint[key]["projectors.0.4.weight"].shape == (32, 16)  # z_dim 32 (tiny DINOv2), 16 wide
        assert "blocks.0.attn.q_norm.weight" in checkpoint[key]
    assert checkpoint["args"]["repa"] and checkpoint["args"]["qk_norm"]


@pytest.mark.slow
def test_repa_from_a_usp_checkpoint_with_qk_norm(tmp_path, tiny_image_folder, tiny_vae_dir, encoder_weights,
                                                 tiny_usp_checkpoint, capsys):
    """USP init + REPA (the USP README's 6.26 row, at toy scale): the blocks come from USP, projectors and
    QK-norm start fresh, and training runs."""
    results = tmp_path / "results"
    run_main(train_argv(results, tiny_image_folder, tiny_vae_dir, MODELS["transport"], "--max-steps", "3",
                        "--finetune", tiny_usp_checkpoint, *repa_flags(encoder_weights, "--qk-norm")))
    assert f"Initialised {MODELS['transport']} from {tiny_usp_checkpoint}" in capsys.readouterr().out
    (experiment,) = experiment_dirs(results)
    ema = load_checkpoint(experiment / "checkpoints" / "0000003.pt")["ema"]
    mae = torch.load(tiny_usp_checkpoint, weights_only=True)["model"]
    assert torch.allclose(ema["blocks.1.attn.qkv.weight"], mae["blocks.1.attn.qkv.weight"], atol=1e-3)
    assert "projectors.0.0.weight" in ema and "blocks.1.attn.k_norm.bias" in ema

    # The USP encoder itself as the target (--enc-type usp): its tokens on the clean latents, 32 wide.
    run_main(train_argv(tmp_path / "usp_target", tiny_image_folder, tiny_vae_dir, MODELS["transport"],
                        "--max-steps", "2", "--finetune", tiny_usp_checkpoint, "--repa", "--enc-type", "usp",
                        "--repa-encoder-path", tiny_usp_checkpoint, "--encoder-depth", "1", "--projector-dim", "16"))
    (usp_run,) = experiment_dirs(tmp_path / "usp_target")
    assert [line["step"] for line in log_lines(usp_run) if "proj_loss" in line] == [1, 2]
    usp_ema = load_checkpoint(usp_run / "checkpoints" / "0000002.pt")["ema"]
    assert usp_ema["projectors.0.4.weight"].shape == (32, 16)


def test_alignment_gradients_reach_projector_and_blocks_up_to_encoder_depth_only(encoder_weights):
    torch.manual_seed(0)
    model = SiT_models["SiT-S/2"](input_size=4, num_classes=4, **TINY, z_dims=[32], projector_dim=16,
                                  encoder_depth=1)
    with torch.no_grad():  # off adaLN-Zero's identity start, so every block passes gradient
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.normal_(0, 0.05)
    target = DinoV2Target("dinov2-vit-b", str(encoder_weights), 32, model_kwargs=TINY_VIT)
    objective = build_objective("SiT-S/2", 4)
    alignment = Alignment([target], proj_coeff=0.5, autocast_fn=contextlib.nullcontext)
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    batch = {"x": images}
    bundle = NoiseBundle(u=torch.rand(3), noise=torch.randn(3, 4, 4, 4), drop=torch.zeros(3, dtype=torch.long))
    latents, labels = torch.randn(3, 4, 4, 4), torch.tensor([0, 1, 2])
    _, proj = alignment.loss(lambda fn: objective.loss(fn, latents, labels, bundle), model, batch, latents)
    proj.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    for name in ("projectors.0.0.weight", "projectors.0.4.weight", "blocks.0.attn.qkv.weight",
                 "blocks.0.mlp.fc1.weight", "x_embedder.proj.weight"):
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    for name in ("blocks.1.attn.qkv.weight", "final_layer.linear.weight"):  # after encoder_depth: untouched
        assert grads[name] is None or grads[name].abs().sum() == 0, name
    assert all(not p.requires_grad and p.grad is None for p in target.parameters())


def test_proj_coeff_zero_trains_bit_identically_to_plain_training(tmp_path, tiny_image_folder, tiny_vae_dir,
                                                                  encoder_weights):
    model = MODELS["transport"]
    run_main(train_argv(tmp_path / "plain", tiny_image_folder, tiny_vae_dir, model, "--max-steps", "5"))
    run_main(train_argv(tmp_path / "repa", tiny_image_folder, tiny_vae_dir, model, "--max-steps", "5",
                        *repa_flags(encoder_weights, "--proj-coeff", "0")))
    (plain,) = experiment_dirs(tmp_path / "plain")
    (repa,) = experiment_dirs(tmp_path / "repa")
    assert step_losses(plain) == step_losses(repa)
    plain_ckpt = load_checkpoint(plain / "checkpoints" / "0000005.pt")
    repa_ckpt = load_checkpoint(repa / "checkpoints" / "0000005.pt")
    for key in ("model", "ema"):
        assert set(repa_ckpt[key]) - set(plain_ckpt[key]) == {n for n in repa_ckpt[key] if n.startswith("projectors.")}
        for name, value in plain_ckpt[key].items():
            assert torch.equal(value, repa_ckpt[key][name]), (key, name)


def test_resume_with_repa_continues_the_exact_run(tmp_path, tiny_image_folder, tiny_vae_dir, encoder_weights):
    model = MODELS["diffusion"]
    flags = repa_flags(encoder_weights)
    run_main(train_argv(tmp_path / "full", tiny_image_folder, tiny_vae_dir, model, "--max-steps", "6", *flags))
    run_main(train_argv(tmp_path / "split", tiny_image_folder, tiny_vae_dir, model, "--max-steps", "3", *flags))
    (split,) = experiment_dirs(tmp_path / "split")
    run_main(train_argv(tmp_path / "split", tiny_image_folder, tiny_vae_dir, model, "--max-steps", "6",
                        "--resume", split, *flags))
    (full,) = experiment_dirs(tmp_path / "full")
    assert [line for line in log_lines(split) if "loss" in line] != []
    full_lines = {line["step"]: (line["loss"], line["proj_loss"]) for line in log_lines(full) if "loss" in line}
    split_lines = {line["step"]: (line["loss"], line["proj_loss"]) for line in log_lines(split) if "loss" in line}
    assert split_lines == full_lines
    final_full = load_checkpoint(full / "checkpoints" / "0000006.pt")
    final_split = load_checkpoint(split / "checkpoints" / "0000006.pt")
    for key in ("model", "ema"):
        for name, value in final_full[key].items():
            assert torch.equal(value, final_split[key][name]), (key, name)


def test_feature_cache_gives_the_same_alignment_loss_as_online_features(tmp_path, tiny_image_folder, tiny_vae_dir,
                                                                        encoder_weights):
    from generation.cache_features import extract_feature_cache
    from generation.train_data import GenerationTrainSet
    from pretrain import cache_latents
    from util import feature_cache, latent_cache
    from util.data import build_image_folder

    root = tiny_image_folder / "train"
    cache, features = tmp_path / "latents", tmp_path / "features"
    cache_latents.main(cache_latents.get_args_parser().parse_args([
        "--data_path", str(root), "--cached_path", str(cache), "--vae_path", str(tiny_vae_dir), "--input_size", "32",
        "--batch_size", "16", "--num_workers", "0", "--device", "cpu"]))
    target = DinoV2Target("dinov2-vit-b", str(encoder_weights), 32, model_kwargs=TINY_VIT)
    from models.repa import encoder_identity
    extract_feature_cache(root, features, target, encoder_identity("dinov2-vit-b", encoder_weights),
                          image_size=32, dtype="float32", show_progress=False)

    base = latent_cache.LatentCacheDataset(cache, seed=3)
    dataset = GenerationTrainSet(base, (4, 4, 4), seed=3, class_dropout_prob=0.1, online_vae=False,
                                 features=feature_cache.FeatureCache(features))
    folder, crop = build_image_folder(root), latent_cache.cache_transform(32, "center")
    keys = [(epoch, index) for epoch in (0, 1) for index in (0, 5, 17, 40)]
    flips = [base.flip_of(*key) for key in keys]
    assert 0 in flips and 1 in flips  # both orientations are exercised
    cached = torch.stack([dataset[key]["repa_features"] for key in keys])
    images = torch.stack([crop(folder.load(int(base.image_index[index]))[0]) for _, index in keys])
    images = torch.where(torch.tensor(flips).view(-1, 1, 1, 1) == 1, images.flip(-1), images)
    projections = [torch.randn(len(keys), 4, 32)]
    cached_loss = projection_loss([cached], projections)
    online_loss = projection_loss([target(images)], projections)
    torch.testing.assert_close(cached_loss, online_loss, rtol=1e-5, atol=1e-6)

    # And the trainer runs from the two caches without loading the encoder.
    results = tmp_path / "results"
    run_main(train_argv(results, tiny_image_folder, tiny_vae_dir, MODELS["transport"], "--cached-path", cache,
                        "--max-steps", "3", "--repa", "--repa-feature-cache", features, "--encoder-depth", "1",
                        "--projector-dim", "16"))
    (experiment,) = experiment_dirs(results)
    assert [line["step"] for line in log_lines(experiment) if "proj_loss" in line] == [1, 2, 3]


def test_repa_flags_that_cannot_work_stop_with_one_sentence(tmp_path, tiny_image_folder, tiny_vae_dir,
                                                             encoder_weights, capsys):
    model, results = MODELS["transport"], tmp_path / "results"
    message = fail_main(train_argv(results, tiny_image_folder, tiny_vae_dir, model, "--repa"), capsys)
    assert "--repa-encoder-path" in message
    message = fail_main(train_argv(results, tiny_image_folder, tiny_vae_dir, model, "--repa",
                                   "--repa-encoder-path", tmp_path / "missing.pth"), capsys)
    assert "do not exist" in message
    message = fail_main(train_argv(results, tiny_image_folder, tiny_vae_dir, model,
                                   *repa_flags(encoder_weights, "--encoder-depth", "5")), capsys)
    assert "encoder_depth 5 is outside 1..2" in message
    message = fail_main(train_argv(results, tiny_image_folder, tiny_vae_dir, model, "--cached-path", tmp_path,
                                   *repa_flags(encoder_weights)), capsys)
    assert "--repa-feature-cache" in message
    assert not results.exists() or not any(results.iterdir())


@pytest.mark.slow
def test_repa_under_torchrun_matches_one_process(tmp_path, tiny_image_folder, tiny_vae_dir, encoder_weights):
    model = MODELS["transport"]
    flags = repa_flags(encoder_weights)
    run_torchrun(["-m", "generation.train", *train_argv(tmp_path / "ddp", tiny_image_folder, tiny_vae_dir, model,
                                                        "--max-steps", "4", *flags)], nproc=2)
    run_main(train_argv(tmp_path / "single", tiny_image_folder, tiny_vae_dir, model, "--max-steps", "4", *flags))
    (ddp,) = experiment_dirs(tmp_path / "ddp")
    (single,) = experiment_dirs(tmp_path / "single")
    ddp_lines = {line["step"]: line for line in log_lines(ddp) if "loss" in line}
    for line in log_lines(single):
        if "loss" in line:
            assert ddp_lines[line["step"]]["loss"] == pytest.approx(line["loss"], rel=1e-4, abs=1e-5)
            assert ddp_lines[line["step"]]["proj_loss"] == pytest.approx(line["proj_loss"], rel=1e-4, abs=1e-5)


@pytest.mark.slow
def test_repa_checkpoints_sample_with_the_normal_sample_ddp(tmp_path, tiny_image_folder, tiny_vae_dir, encoder_weights):
    """Our REPA-trained checkpoint (projectors + QK-norm) samples without the encoder; REPA's own SiT layout
    samples with --repa-checkpoint, which equals sampling its time-converted twin."""
    from generation import sample_ddp
    from models.repa import convert_time_convention
    from test_repa_model import RefREPASiT

    results = tmp_path / "results"
    run_main(train_argv(results, tiny_image_folder, tiny_vae_dir, MODELS["transport"], "--max-steps", "2",
                        *repa_flags(encoder_weights, "--qk-norm")))
    (experiment,) = experiment_dirs(results)
    common = ["--image-size", "32", "--num-classes", "4", "--vae-path", str(tiny_vae_dir), "--device", "cpu",
              "--num-fid-samples", "2", "--per-proc-batch-size", "2", "--num-sampling-steps", "2", "--no-progress"]
    sample_ddp.main(["SDE", "--model", MODELS["transport"], "--ckpt", str(experiment / "checkpoints" / "0000002.pt"),
                     "--model-kwargs", json.dumps(TINY), "--sample-dir", str(tmp_path / "ours"), *common])
    assert (tmp_path / "ours.npz").is_file()

    torch.manual_seed(0)
    repa_sit = RefREPASiT(input_size=4, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=4,
                          encoder_depth=1, z_dims=(8,), projector_dim=16, qk_norm=True)
    torch.save({"ema": repa_sit.state_dict()}, tmp_path / "repa.pt")
    converted = {k: v for k, v in convert_time_convention(repa_sit.state_dict()).items() if not k.startswith("proj")}
    torch.save(converted, tmp_path / "converted.pt")
    tiny = json.dumps(TINY)
    sample_ddp.main(["ODE", "--model", "SiT-S/2", "--ckpt", str(tmp_path / "repa.pt"), "--repa-checkpoint",
                     "--model-kwargs", tiny, "--sample-dir", str(tmp_path / "theirs"), "--sampling-method", "euler",
                     *common])
    sample_ddp.main(["ODE", "--model", "SiT-S/2", "--ckpt", str(tmp_path / "converted.pt"), "--model-kwargs",
                     json.dumps({**TINY, "learn_sigma": False}), "--sample-dir", str(tmp_path / "twin"),
                     "--sampling-method", "euler", *common])
    import numpy as np
    with np.load(tmp_path / "theirs.npz") as theirs, np.load(tmp_path / "twin.npz") as twin:
        assert np.array_equal(theirs["arr_0"], twin["arr_0"])


def test_sigusr1_stops_a_repa_run_with_a_checkpoint_that_resumes_exactly(tmp_path, tiny_image_folder, tiny_vae_dir,
                                                                          encoder_weights, monkeypatch, capsys):
    """Preemption with REPA on: SIGUSR1 during step 2 -> the step finishes, step 2 is saved, the run stops;
    resuming to 5 gives the same losses and weights as 5 uninterrupted steps."""
    import os
    import signal

    from generation import train

    model, flags = MODELS["transport"], repa_flags(encoder_weights)
    run_main(train_argv(tmp_path / "full", tiny_image_folder, tiny_vae_dir, model, "--max-steps", "5", *flags))
    real_call, calls = train.TrainStep.__call__, []

    def signalled_call(self, batch, step):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGUSR1)  # what SLURM / Kubernetes send before a preemption
        return real_call(self, batch, step)

    monkeypatch.setattr(train.TrainStep, "__call__", signalled_call)
    run_main(train_argv(tmp_path / "split", tiny_image_folder, tiny_vae_dir, model, "--max-steps", "5", *flags))
    monkeypatch.setattr(train.TrainStep, "__call__", real_call)
    (split,) = experiment_dirs(tmp_path / "split")
    assert "Stopped at step 2 on SIGUSR1" in capsys.readouterr().out
    assert sorted(path.name for path in (split / "checkpoints").iterdir()) == ["0000002.pt"]
    run_main(train_argv(tmp_path / "split", tiny_image_folder, tiny_vae_dir, model, "--max-steps", "5",
                        "--resume", split, *flags))
    (full,) = experiment_dirs(tmp_path / "full")
    full_lines = {line["step"]: (line["loss"], line["proj_loss"]) for line in log_lines(full) if "loss" in line}
    split_lines = {line["step"]: (line["loss"], line["proj_loss"]) for line in log_lines(split) if "loss" in line}
    assert split_lines == full_lines
    final_full = load_checkpoint(full / "checkpoints" / "0000005.pt")["ema"]
    final_split = load_checkpoint(split / "checkpoints" / "0000005.pt")["ema"]
    assert all(torch.equal(value, final_split[name]) for name, value in final_full.items())
