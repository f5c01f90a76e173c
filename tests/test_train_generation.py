"""DiT / SiT training (generation/train.py) on CPU with tiny models, the tiny VAE and 32 px toy images.

Single-process runs call `generation.train.main(argv)` in this process (no interpreter start-up);
the distributed path runs under `torchrun --nproc_per_node=2` on gloo.
"""
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import run_torchrun
from generation.train import main
from util.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow  # end-to-end runs (subprocesses / training loops): `pytest -m "not slow"` skips them

# hidden 32 / depth 2 / heads 2 on 4x4 latents (32 px / factor 8) with 2x2 patches: 4 tokens.
TINY = {"hidden_size": 32, "depth": 2, "num_heads": 2}
MODELS = {"diffusion": "DiT-S/2-VAE-simple", "transport": "SiT-S/2-VAE-simple"}


def train_argv(results: Path, data: Path, vae: Path, model: str, *extra) -> list:
    """A tiny, fast, fp32 run: 64 images / batch 16 = 4 steps per epoch, a log line every step.

    `extra` flags come last, so they override the defaults here (argparse keeps the last value).
    """
    return [
        "--model", model, "--data-path", str(data / "train"), "--results-dir", str(results),
        "--image-size", "32", "--num-classes", "4", "--global-batch-size", "16", "--epochs", "100",
        "--vae-path", str(vae), "--num-workers", "0", "--log-every", "1", "--ckpt-every", "1000",
        "--eval-every", "0", "--device", "cpu", "--precision", "fp32", "--lr", "1e-3",
        "--model-kwargs", json.dumps(TINY), *map(str, extra),
    ]


def experiment_dirs(results: Path) -> list:
    return sorted(path for path in results.iterdir() if path.is_dir())


def step_losses(experiment: Path) -> dict:
    """{step: loss} from the run's JSON-lines log (evaluation lines carry no loss)."""
    lines = [json.loads(line) for line in (experiment / "log.txt").read_text().splitlines()]
    return {line["step"]: line["loss"] for line in lines if "loss" in line}


def run_main(argv) -> None:
    main(argv)


def fail_main(argv, capsys) -> str:
    """Runs a command that must stop early with a one-sentence error; returns that sentence."""
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("generation.train: error: ") and "\n" not in message, message
    return message


@pytest.fixture(scope="module")
def tiny_usp_checkpoint(tmp_path_factory, tiny_image_folder, tiny_vae_dir):
    """A USP checkpoint made by pretrain/main_pretrain.py: a width-32 latent MAE, 8 masked-modeling steps."""
    from pretrain import main_pretrain

    output_dir = tmp_path_factory.mktemp("usp")
    mae_kwargs = {"embed_dim": 32, "depth": 2, "num_heads": 2, "decoder_embed_dim": 32, "decoder_depth": 1,
                  "decoder_num_heads": 2}
    main_pretrain.main(main_pretrain.get_args_parser().parse_args([
        "--model", "vit_base_patch_vae", "--model_kwargs", json.dumps(mae_kwargs), "--input_size", "32",
        "--data_path", str(tiny_image_folder), "--vae_path", str(tiny_vae_dir), "--device", "cpu",
        "--precision", "fp32", "--batch_size", "8", "--epochs", "1", "--warmup_epochs", "0", "--blr", "1e-3",
        "--num_workers", "0", "--output_dir", str(output_dir), "--log_dir", str(output_dir)]))
    (checkpoint,) = sorted(output_dir.glob("checkpoint-*.pth"))
    return checkpoint


@pytest.mark.parametrize("family", ["diffusion", "transport"])
def test_trains_from_scratch_and_writes_checkpoint_and_grid(family, tmp_path, tiny_image_folder, tiny_vae_dir):
    """Loss falls over 24 steps; the checkpoint holds DiT's keys + resume state; an EMA grid is written."""
    results = tmp_path / "results"
    run_main(train_argv(results, tiny_image_folder, tiny_vae_dir, MODELS[family], "--max-steps", "24",
                        "--eval-every", "24", "--num-sampling-steps", "3", "--cfg-scale", "1.5",
                        "--eval-images", "4", "--exp-name", "tiny"))
    (experiment,) = experiment_dirs(results)
    assert experiment.name == "000-" + MODELS[family].replace("/", "-") + "-tiny"
    losses = step_losses(experiment)
    assert sorted(losses) == list(range(1, 25))
    first, last = [losses[s] for s in range(1, 6)], [losses[s] for s in range(20, 25)]
    assert sum(last) / 5 < 0.9 * sum(first) / 5, losses

    checkpoint = load_checkpoint(experiment / "checkpoints" / "0000024.pt")
    assert {"model", "ema", "opt", "args", "scaler", "loop"} <= set(checkpoint)
    assert isinstance(checkpoint["args"], dict) and checkpoint["args"]["model"] == MODELS[family]
    loop = checkpoint["loop"]  # 24 steps of 4 per epoch: epoch 5 was trained to its end, so it continues at epoch 6
    assert (loop["global_step"], loop["epoch"], loop["batch"], loop["batch_size"], loop["world_size"]) == (24, 6, 0, 16, 1)
    # EMA with decay 0.9999 barely moves from its initial copy, while the trained model moved.
    name = "blocks.0.attn.qkv.weight"
    assert not torch.allclose(checkpoint["ema"][name], checkpoint["model"][name], atol=1e-4)

    grid = experiment / "samples" / "0000024.png"
    with Image.open(grid) as image:
        assert image.size == (4 * 32 + 5 * 2, 32 + 2 * 2)  # save_image: 4 tiles in a row, 2 px padding


@pytest.mark.parametrize("family", ["diffusion", "transport"])
def test_finetunes_from_a_usp_checkpoint(family, tmp_path, tiny_image_folder, tiny_vae_dir, tiny_usp_checkpoint,
                                         capsys):
    """--finetune loads the MAE encoder blocks (report printed) and the EMA starts from those weights."""
    results = tmp_path / "results"
    run_main(train_argv(results, tiny_image_folder, tiny_vae_dir, MODELS[family], "--max-steps", "8",
                        "--finetune", tiny_usp_checkpoint))
    out = capsys.readouterr().out
    assert f"Initialised {MODELS[family]} from {tiny_usp_checkpoint}" in out
    (experiment,) = experiment_dirs(results)
    losses = step_losses(experiment)
    assert sorted(losses) == list(range(1, 9)) and all(torch.isfinite(torch.tensor(list(losses.values()))))
    mae = torch.load(tiny_usp_checkpoint, weights_only=True)["model"]
    ema = load_checkpoint(experiment / "checkpoints" / "0000008.pt")["ema"]
    # After 8 steps at decay 0.9999 the EMA is still (almost exactly) the transferred weights.
    for name in ("blocks.1.attn.qkv.weight", "blocks.0.mlp.fc2.bias", "blocks.0.norm1.weight"):
        assert torch.allclose(ema[name], mae[name], atol=1e-3), name


@pytest.mark.parametrize("family", ["diffusion", "transport"])
def test_resume_continues_the_exact_run(family, tmp_path, tiny_image_folder, tiny_vae_dir):
    """6 steps + resume to 12 (mid-epoch: 4 batches per epoch) logs the same losses as 12 uninterrupted steps."""
    model = MODELS[family]
    run_main(train_argv(tmp_path / "full", tiny_image_folder, tiny_vae_dir, model, "--max-steps", "12"))
    run_main(train_argv(tmp_path / "split", tiny_image_folder, tiny_vae_dir, model, "--max-steps", "6"))
    (split,) = experiment_dirs(tmp_path / "split")
    run_main(train_argv(tmp_path / "split", tiny_image_folder, tiny_vae_dir, model, "--max-steps", "12",
                        "--resume", split))
    assert len(experiment_dirs(tmp_path / "split")) == 1  # resuming continues in the same folder
    (full,) = experiment_dirs(tmp_path / "full")
    full_losses, split_losses = step_losses(full), step_losses(split)
    assert sorted(split_losses) == list(range(1, 13))
    assert split_losses == full_losses  # bit-identical on CPU
    final_full = load_checkpoint(full / "checkpoints" / "0000012.pt")
    final_split = load_checkpoint(split / "checkpoints" / "0000012.pt")
    for key in ("model", "ema"):
        for name, value in final_full[key].items():
            assert torch.equal(value, final_split[key][name]), (key, name)


def test_two_processes_match_one(tmp_path, tiny_image_folder, tiny_vae_dir):
    """torchrun x2 (gloo, 2 workers each) splits the same global batches: losses match the 1-process run."""
    model = MODELS["diffusion"]
    run_torchrun(["-m", "generation.train",
                  *train_argv(tmp_path / "ddp", tiny_image_folder, tiny_vae_dir, model, "--max-steps", "6",
                              "--eval-every", "6", "--num-sampling-steps", "2", "--eval-images", "2",
                              "--num-workers", "2")], nproc=2)
    run_main(train_argv(tmp_path / "single", tiny_image_folder, tiny_vae_dir, model, "--max-steps", "6"))
    (ddp,) = experiment_dirs(tmp_path / "ddp")
    (single,) = experiment_dirs(tmp_path / "single")
    ddp_losses, single_losses = step_losses(ddp), step_losses(single)
    assert sorted(ddp_losses) == list(range(1, 7))
    for step, loss in single_losses.items():
        assert ddp_losses[step] == pytest.approx(loss, rel=1e-4, abs=1e-5), step
    assert (ddp / "samples" / "0000006.png").is_file()
    assert load_checkpoint(ddp / "checkpoints" / "0000006.pt")["loop"]["global_step"] == 6


def test_bad_input_stops_with_one_sentence(tmp_path, tiny_image_folder, tiny_vae_dir, capsys):
    results = tmp_path / "results"
    model = MODELS["diffusion"]

    message = fail_main(train_argv(results, tiny_image_folder, tiny_vae_dir, model, "--image-size", "36"), capsys)
    assert "image size 36 is not divisible by the VAE factor 8" in message

    message = fail_main(train_argv(results, tiny_image_folder, tiny_vae_dir, model, "--num-classes", "10"), capsys)
    assert "has 4 classes but --num-classes is 10" in message

    empty = tmp_path / "empty_run"
    (empty / "checkpoints").mkdir(parents=True)
    message = fail_main(train_argv(results, tiny_image_folder, tiny_vae_dir, model, "--resume", empty), capsys)
    assert "no loadable checkpoint" in message

    from models.mae import create_mae
    wide = create_mae("vit_base_patch_vae", input_size=32, embed_dim=64, depth=2, num_heads=2,
                      decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    wide_path = tmp_path / "wide.pth"
    torch.save({"model": wide.state_dict(), "epoch": 0, "args": {}}, wide_path)
    message = fail_main(train_argv(results, tiny_image_folder, tiny_vae_dir, model, "--finetune", wide_path), capsys)
    assert "64" in message and "32" in message  # both widths named

    message = fail_main(train_argv(results, tiny_image_folder, tiny_vae_dir, model, "--global-batch-size", "128"),
                        capsys)
    assert "fewer than its batch of 128" in message
    assert not results.exists() or not any(results.iterdir())  # no half-made experiment folder


def test_trains_from_the_latent_cache(tmp_path, tiny_image_folder, tiny_vae_dir, capsys):
    """--cached-path feeds stored moments (posterior noise per sample) instead of encoding online."""
    from pretrain import cache_latents

    cache = tmp_path / "cache"
    cache_latents.main(cache_latents.get_args_parser().parse_args([
        "--data_path", str(tiny_image_folder / "train"), "--cached_path", str(cache), "--vae_path", str(tiny_vae_dir),
        "--input_size", "32", "--batch_size", "16", "--num_workers", "0", "--device", "cpu"]))
    results = tmp_path / "results"
    run_main(train_argv(results, tiny_image_folder, tiny_vae_dir, MODELS["transport"], "--cached-path", cache,
                        "--max-steps", "4", "--eval-every", "4", "--num-sampling-steps", "2", "--eval-images", "2"))
    (experiment,) = experiment_dirs(results)
    assert sorted(step_losses(experiment)) == [1, 2, 3, 4]
    assert (experiment / "samples" / "0000004.png").is_file()

    capsys.readouterr()
    message = fail_main(train_argv(tmp_path / "other", tiny_image_folder, tiny_vae_dir, MODELS["transport"],
                                   "--cached-path", cache, "--image-size", "64"), capsys)
    assert "image_size" in message


def test_non_finite_loss_stops_with_one_sentence_and_keeps_last_checkpoint(tmp_path, tiny_image_folder, tiny_vae_dir,
                                                                          capsys, monkeypatch):
    """A diverged run stops with exit 1 and one sentence; the checkpoint saved before it is left as it was."""
    from generation import train

    results = tmp_path / "results"
    run_main(train_argv(results, tiny_image_folder, tiny_vae_dir, MODELS["diffusion"], "--max-steps", "2",
                        "--ckpt-every", "2"))
    (experiment,) = experiment_dirs(results)
    saved = experiment / "checkpoints" / "0000002.pt"
    before = saved.read_bytes()
    capsys.readouterr()

    real_call = train.TrainStep.__call__
    monkeypatch.setattr(train.TrainStep, "__call__",
                        lambda self, batch, step: real_call(self, batch, step) * float("nan"))
    with pytest.raises(SystemExit) as stopped:
        main(train_argv(results, tiny_image_folder, tiny_vae_dir, MODELS["diffusion"], "--max-steps", "4",
                        "--ckpt-every", "2", "--resume", str(experiment)))
    assert stopped.value.code == 1
    message = capsys.readouterr().err.strip()
    assert message.startswith("generation.train: error: ") and "\n" not in message, message
    assert sorted(p.name for p in (experiment / "checkpoints").iterdir()) == ["0000002.pt"]
    assert saved.read_bytes() == before


def test_evaluate_only_scores_a_checkpoint_without_training(tmp_path, tiny_image_folder, tiny_vae_dir, capsys):
    """USP's train.py --evaluate: sample (and score) the --resume checkpoint, then stop; no optimizer step."""
    results = tmp_path / "results"
    run_main(train_argv(results, tiny_image_folder, tiny_vae_dir, MODELS["transport"], "--max-steps", "2",
                        "--ckpt-every", "2"))
    (experiment,) = experiment_dirs(results)
    checkpoint_path = experiment / "checkpoints" / "0000002.pt"
    before = load_checkpoint(checkpoint_path)
    metrics = main(train_argv(results, tiny_image_folder, tiny_vae_dir, MODELS["transport"], "--evaluate",
                              "--resume", str(checkpoint_path), "--eval-every", "1", "--num-fid-samples", "4",
                              "--per-proc-batch-size", "2", "--num-sampling-steps", "3", "--eval-images", "2"))
    assert "fid_sampling_images_per_s" in metrics
    with __import__("numpy").load(experiment / "samples" / "fid-0000002.npz") as data:
        assert data["arr_0"].shape == (4, 32, 32, 3)
    assert sorted(p.name for p in (experiment / "checkpoints").glob("*.pt")) == ["0000002.pt"]
    after = load_checkpoint(checkpoint_path)
    assert all(torch.equal(before["ema"][key], after["ema"][key]) for key in before["ema"])
    assert fail_main(train_argv(results, tiny_image_folder, tiny_vae_dir, MODELS["transport"], "--evaluate"),
                     capsys).endswith("(add --num-fid-samples N for FID).")
