"""USP + VA-VAE end to end on CPU with a tiny LDM-layout VA-VAE (32 channels, factor 16: 2x2 latents of 32 px
images): latent cache + statistics under torchrun x2, USP pretraining with LightningDiT encoder blocks, a linear
probe on the 32-channel latents, LightningDiT-B/1 training from the USP checkpoint with LightningDiT's recipe
flags (exact resume, torchrun x2 = 1 process), and sampling with the 64-epoch settings."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_python, run_torchrun
from generation import sample_ddp
from generation.train import main as train_main
from models.latent_norm import ChannelNorm
from models.vae import VAVAE_FILENAME
from test_vavae import LDMAutoencoderKL
from util.checkpoint import load_checkpoint
from util.latent_stats import save_latent_stats

pytestmark = pytest.mark.slow

TINY_DIT = {"hidden_size": 32, "depth": 2, "num_heads": 2}
TINY_MAE = {"embed_dim": 32, "depth": 2, "num_heads": 2, "decoder_embed_dim": 32, "decoder_depth": 1,
            "decoder_num_heads": 2}
BLOCKS = ["--use-swiglu", "--use-rope", "--use-rmsnorm"]  # the released LightningDiT configuration
RECIPE = ["--use-lognorm", "--use-cosine-loss", "--beta2", "0.95", "--max-grad-norm", "1.0", "--lr", "2e-4"]


@pytest.fixture(scope="module")
def vavae_dir(tmp_path_factory):
    """The layout of huggingface.co/hustvl/vavae-imagenet256-f16d32-dinov2: the LDM checkpoint + latents_stats.pt."""
    folder = tmp_path_factory.mktemp("vavae_release")
    torch.manual_seed(0)
    torch.save({"state_dict": LDMAutoencoderKL().state_dict()}, folder / VAVAE_FILENAME)
    save_latent_stats(folder / "latents_stats.pt", torch.linspace(-0.5, 0.5, 32), torch.linspace(0.5, 2.0, 32))
    return folder


def steps_logged(experiment: Path) -> dict:
    lines = [json.loads(line) for line in (experiment / "log.txt").read_text().splitlines()]
    return {line["step"]: line["loss"] for line in lines if "loss" in line}


def train_argv(results, data, vavae, *extra):
    return ["--model", "LightningDiT-B/1", "--data-path", str(data / "train"), "--results-dir", str(results),
            "--image-size", "32", "--num-classes", "4", "--global-batch-size", "16", "--epochs", "100",
            "--vae-version", "vavae_f16d32", "--vae-path", str(vavae), "--num-workers", "0", "--log-every", "1",
            "--ckpt-every", "1000", "--eval-every", "0", "--device", "cpu", "--precision", "fp32",
            "--model-kwargs", json.dumps(TINY_DIT), *BLOCKS, *RECIPE, *map(str, extra)]


@pytest.fixture(scope="module")
def usp_checkpoint(tmp_path_factory, tiny_image_folder, vavae_dir):
    """USP pretraining (masked latent modeling) with LightningDiT-block encoder on VA-VAE latents."""
    from pretrain import main_pretrain

    out = tmp_path_factory.mktemp("usp_vavae")
    main_pretrain.main(main_pretrain.get_args_parser().parse_args([
        "--model", "lightningdit_base_patch_vae", "--model_kwargs", json.dumps(TINY_MAE), "--input_size", "32",
        "--vae_version", "vavae_f16d32", "--vae_path", str(vavae_dir), "--data_path", str(tiny_image_folder),
        "--device", "cpu", "--precision", "fp32", "--batch_size", "16", "--epochs", "1", "--warmup_epochs", "0",
        "--blr", "1e-3", "--num_workers", "0", "--output_dir", str(out), "--log_dir", str(out)]))
    (checkpoint,) = sorted(out.glob("checkpoint-*.pth"))
    return checkpoint


def test_latent_cache_statistics_under_torchrun_match_one_process(vavae_dir, tmp_path):
    from PIL import Image

    data = tmp_path / "images"  # 2 classes x 6 images: the two ranks get 3 shards of 4 between them
    generator = np.random.default_rng(0)
    for index in range(12):
        folder = data / f"class{index % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(generator.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    common = ["-m", "pretrain.cache_latents", "--data_path", data, "--vae_version", "vavae_f16d32", "--vae_path",
              vavae_dir, "--input_size", "32", "--batch_size", "4", "--shard_size", "4", "--num_workers", "0",
              "--device", "cpu", "--latent_stats", "--stats_max_samples", "10"]
    run_torchrun([*common, "--cached_path", tmp_path / "two"])
    run_python([*common, "--cached_path", tmp_path / "one"])
    two, one = ChannelNorm.load(tmp_path / "two" / "latents_stats.pt"), ChannelNorm.load(tmp_path / "one" / "latents_stats.pt")
    assert two.mean.shape == (1, 32, 1, 1)
    torch.testing.assert_close(two.mean, one.mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(two.std, one.std, rtol=1e-6, atol=1e-6)


def test_linear_probe_on_vavae_latents(usp_checkpoint, tiny_image_folder, vavae_dir, tmp_path):
    from pretrain import main_linprobe

    out = tmp_path / "probe"
    main_linprobe.main(main_linprobe.get_args_parser().parse_args([
        "--model", "lightningdit_base_vae", "--model_kwargs", json.dumps({"embed_dim": 32, "depth": 2, "num_heads": 2}),
        "--vae_version", "vavae_f16d32", "--vae_path", str(vavae_dir), "--finetune", str(usp_checkpoint),
        "--data_path", str(tiny_image_folder), "--input_size", "32", "--nb_classes", "4", "--batch_size", "16",
        "--epochs", "1", "--warmup_epochs", "0", "--num_workers", "0", "--precision", "fp32", "--device", "cpu",
        "--output_dir", str(out), "--log_every", "1", "--cls_token"]))
    last = torch.load(out / "checkpoint-last.pth", weights_only=True)["model"]
    pretrained = torch.load(usp_checkpoint, weights_only=True)["model"]
    for name in ("blocks.1.mlp.w12.weight", "blocks.0.norm1.weight", "patch_embed.proj.weight"):
        assert torch.equal(last[name], pretrained[name]), name  # the frozen encoder is the USP encoder


def test_lightningdit_from_usp_resumes_exactly(usp_checkpoint, tiny_image_folder, vavae_dir, tmp_path, capsys):
    extra = ["--finetune", usp_checkpoint]
    train_main(train_argv(tmp_path / "full", tiny_image_folder, vavae_dir, "--max-steps", "6", *extra))
    train_main(train_argv(tmp_path / "split", tiny_image_folder, vavae_dir, "--max-steps", "3", *extra))
    (split,) = [p for p in (tmp_path / "split").iterdir() if p.is_dir()]
    train_main(train_argv(tmp_path / "split", tiny_image_folder, vavae_dir, "--max-steps", "6", *extra,
                          "--resume", split))
    (full,) = [p for p in (tmp_path / "full").iterdir() if p.is_dir()]
    assert steps_logged(split) == steps_logged(full) and sorted(steps_logged(full)) == list(range(1, 7))
    final_full, final_split = (load_checkpoint(run / "checkpoints" / "0000006.pt") for run in (full, split))
    for key in ("model", "ema"):
        for name, value in final_full[key].items():
            assert torch.equal(value, final_split[key][name]), (key, name)
    report = capsys.readouterr().out
    assert "blocks[0-1]: norm1, norm2, attn, mlp - 20 tensors" in report  # the transfer report: every block loaded
    assert final_full["args"]["beta2"] == 0.95 and tuple(final_full["opt"]["param_groups"][0]["betas"]) == (0.9, 0.95)


def test_lightningdit_torchrun_matches_one_process_then_samples(tiny_image_folder, vavae_dir, tmp_path):
    run_torchrun(["-m", "generation.train", *train_argv(tmp_path / "ddp", tiny_image_folder, vavae_dir, "--max-steps",
                                                          "4", "--eval-every", "4", "--num-sampling-steps", "3",
                                                          "--eval-images", "2", "--timestep-shift", "0.3")])
    train_main(train_argv(tmp_path / "one", tiny_image_folder, vavae_dir, "--max-steps", "4"))
    (ddp,), (one,) = ([p for p in (tmp_path / name).iterdir() if p.is_dir()] for name in ("ddp", "one"))
    ddp_losses, one_losses = steps_logged(ddp), steps_logged(one)
    assert sorted(ddp_losses) == [1, 2, 3, 4]
    for step, loss in one_losses.items():
        assert ddp_losses[step] == pytest.approx(loss, rel=1e-4, abs=1e-5), step
    assert (ddp / "samples" / "0000004.png").is_file()

    # Sampling with the 64-epoch settings: Euler ODE, shift 0.3, cfg 10 from t = 0.10, first 3 channels.
    samples = tmp_path / "samples"
    sample_ddp.main(["ODE", "--model", "LightningDiT-B/1", "--ckpt", str(ddp / "checkpoints" / "0000004.pt"),
                     "--sample-dir", str(samples), "--model-kwargs", json.dumps(TINY_DIT), *BLOCKS,
                     "--image-size", "32", "--num-classes", "4", "--vae-version", "vavae_f16d32",
                     "--vae-path", str(vavae_dir), "--device", "cpu", "--num-fid-samples", "4",
                     "--per-proc-batch-size", "2", "--num-sampling-steps", "4", "--sampling-method", "euler",
                     "--timestep-shift", "0.3", "--cfg-scale", "10", "--guidance-interval", "0.10", "1.0",
                     "--cfg-channels", "legacy3", "--no-progress"])
    with np.load(f"{samples}.npz") as data:
        assert data["arr_0"].shape == (4, 32, 32, 3) and data["arr_0"].dtype == np.uint8
