"""USP pretraining (pretrain/main_pretrain.py) on a tiny latent MAE, a tiny VAE and 32 px toy images.

32 px images through the factor-8 VAE give 4x4x4 latents; with 1x1 latent patches that is 16 tokens.
One reference run (as a file path, 1 process, global batch 8) is shared: the torchrun run, the
resumed run, the visualiser and the transfer checks all compare against or consume it.
"""
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import run_python, run_torchrun
from models.dit import DiT
from models.mae import create_mae
from models.sit import SiT
from models.transfer import transfer_pretrained
from models.vae import LatentCodec, vae_identity
from models.vit import create_vit
from pretrain import main_generate, main_pretrain
from pretrain.engine_pretrain import MaskedModelingDataset, prepare_batch
from util.data import SeededDataset, build_image_folder
from pretrain.cache_latents import extract_latent_cache
from util.latent_cache import LatentCacheDataset, cache_transform

pytestmark = pytest.mark.slow  # end-to-end runs (subprocesses / training loops): `pytest -m "not slow"` skips them

WIDTH, HEADS = 32, 2
TINY = {"embed_dim": WIDTH, "depth": 2, "num_heads": HEADS, "decoder_embed_dim": WIDTH, "decoder_depth": 1,
        "decoder_num_heads": HEADS, "patch_size": 1}
STEPS_PER_EPOCH = 8  # 64 training images / global batch 8
REFERENCE_STEPS = 32


def pretrain_args(data, vae, output_dir, batch_size=8, extra=()):
    return [
        "--model", "vit_base_patch_vae", "--model_kwargs", json.dumps(TINY), "--input_size", "32",
        "--data_path", data, "--vae_path", vae, "--device", "cpu", "--precision", "fp32",
        "--batch_size", batch_size, "--epochs", REFERENCE_STEPS // STEPS_PER_EPOCH, "--warmup_epochs", "1",
        "--blr", "1e-2", "--norm_pix_loss", "--add_noise", "--num_workers", "1", "--log_every", "1",
        "--output_dir", output_dir, "--log_dir", output_dir, *extra,
    ]


def step_losses(output_dir) -> dict:
    """{step: loss} from the per-step lines of log.txt (MAE's per-epoch lines have train_loss)."""
    lines = [json.loads(line) for line in (Path(output_dir) / "log.txt").read_text().splitlines()]
    return {line["step"]: line["loss"] for line in lines if "loss" in line}


@pytest.fixture(scope="module")
def reference_run(tiny_image_folder, tiny_vae_dir, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("pretrain_reference")
    run_python(["pretrain/main_pretrain.py", *pretrain_args(tiny_image_folder, tiny_vae_dir, output_dir)])
    return output_dir


def test_loss_falls_and_checkpoint_has_mae_keys(reference_run):
    losses = step_losses(reference_run)
    assert sorted(losses) == list(range(1, REFERENCE_STEPS + 1))
    first, last = sum(losses[s] for s in (1, 2, 3)) / 3, sum(losses[s] for s in (30, 31, 32)) / 3
    assert last < 0.6 * first, (first, last)

    epoch_lines = [json.loads(line) for line in (reference_run / "log.txt").read_text().splitlines()
                   if "train_loss" in line]
    assert [line["epoch"] for line in epoch_lines] == [0, 1, 2, 3]

    last_epoch = REFERENCE_STEPS // STEPS_PER_EPOCH - 1
    checkpoint = torch.load(reference_run / f"checkpoint-{last_epoch}.pth", weights_only=True)
    assert {"model", "optimizer", "epoch", "scaler", "args", "loop"} <= set(checkpoint)
    assert checkpoint["epoch"] == last_epoch and checkpoint["args"]["model"] == "vit_base_patch_vae"
    assert checkpoint["loop"]["global_step"] == REFERENCE_STEPS
    # USP/MAE's cadence (`epoch % 40 == 0 or epoch + 1 == epochs`): of epochs 0..3, epoch 0 and the last.
    assert sorted(path.name for path in reference_run.glob("checkpoint-*.pth")) == ["checkpoint-0.pth", "checkpoint-3.pth"]


def test_two_processes_match_one_with_same_global_batch(reference_run, tiny_image_folder, tiny_vae_dir, tmp_path):
    run_torchrun(["-m", "pretrain.main_pretrain",
                  *pretrain_args(tiny_image_folder, tiny_vae_dir, tmp_path, batch_size=4, extra=["--max_steps", "10"])])
    reference, distributed = step_losses(reference_run), step_losses(tmp_path)
    assert sorted(distributed) == list(range(1, 11))
    for step, loss in distributed.items():
        assert loss == pytest.approx(reference[step], rel=1e-5, abs=1e-6), step


def run_in_process(arguments):
    """main_pretrain.main in this process (saves an interpreter start-up; same single-thread kernels)."""
    main_pretrain.main(main_pretrain.get_args_parser().parse_args([str(a) for a in arguments]))


def test_resume_continues_the_exact_curve(reference_run, tiny_image_folder, tiny_vae_dir, tmp_path):
    # Stop mid-epoch (step 5 of 8), then resume from the run directory and cross an epoch boundary.
    run_in_process(pretrain_args(tiny_image_folder, tiny_vae_dir, tmp_path, extra=["--max_steps", "5"]))
    saved = torch.load(tmp_path / "checkpoint-0.pth", weights_only=True)
    assert (saved["loop"]["epoch"], saved["loop"]["batch"], saved["loop"]["batch_size"]) == (0, 5, 8)
    run_in_process(pretrain_args(tiny_image_folder, tiny_vae_dir, tmp_path,
                                 extra=["--max_steps", "12", "--resume", tmp_path]))
    reference, resumed = step_losses(reference_run), step_losses(tmp_path)
    assert sorted(resumed) == list(range(1, 13))
    assert [resumed[s] for s in range(1, 13)] == [reference[s] for s in range(1, 13)]


def user_error_line(error, capsys) -> str:
    """The one line a user error prints on stderr (exit code 2), without its `main_pretrain: error: ` prefix."""
    assert error.value.code == 2
    printed = capsys.readouterr().err
    assert printed.startswith("main_pretrain: error: ") and printed.endswith("\n"), printed
    return printed[len("main_pretrain: error: "):-1]


def test_resume_with_another_model_is_one_sentence(reference_run, tiny_image_folder, tiny_vae_dir, tmp_path, capsys):
    wider = json.dumps({**TINY, "embed_dim": 64})
    args = pretrain_args(tiny_image_folder, tiny_vae_dir, tmp_path, extra=["--resume", reference_run,
                                                                         "--model_kwargs", wider])
    with pytest.raises(SystemExit) as error:
        run_in_process(args)
    message = user_error_line(error, capsys)
    assert "does not fit --model vit_base_patch_vae" in message and "(1, 1, 32) vs (1, 1, 64)" in message
    assert "\n" not in message


@pytest.fixture(scope="module")
def latent_cache(tiny_image_folder, tiny_vae_dir, tmp_path_factory):
    cache_dir = tmp_path_factory.mktemp("latent_cache")
    codec = LatentCodec.load("d8", tiny_vae_dir)
    extract_latent_cache(Path(tiny_image_folder) / "train", cache_dir, codec, 32, crop="center", batch_size=16,
                         vae_identity=vae_identity("d8", tiny_vae_dir), vae_version="d8", show_progress=False)
    return cache_dir, codec


def test_cached_latents_equal_online_encoding(latent_cache, tiny_image_folder):
    cache_dir, codec = latent_cache
    args = main_pretrain.get_args_parser().parse_args(["--device", "cpu", "--add_noise"])
    model = create_mae("vit_base_patch_vae", 32, **TINY)
    shape = (model.in_chans, model.img_size, model.img_size)
    cached = MaskedModelingDataset(LatentCacheDataset(cache_dir, use_mean=True, seed=0), 16, shape,
                                                 add_noise=True, seed=0)
    folder = build_image_folder(Path(tiny_image_folder) / "train")
    online = MaskedModelingDataset(SeededDataset(folder, cache_transform(32), seed=0), 16, shape,
                                                 add_noise=True, seed=0)
    keys = [(1, index) for index in range(12)]
    cached_items = [cached[key] for key in keys]
    online_items = [online[key] for key in keys]
    images = torch.stack([item["images"] for item in online_items])
    online_latents = {}  # flipped? -> (N, C, h, w): the cache stores both orientations, its dataset picks one
    for flip in (False, True):
        batch = {"images": images.flip(-1) if flip else images,
                 "mask_noise": torch.stack([item["mask_noise"] for item in online_items]),
                 "t": torch.ones(len(keys)), "eps": torch.zeros(len(keys), *shape)}
        inputs, online_latents[flip], _ = prepare_batch(batch, codec, args, torch.device("cpu"))
        assert torch.equal(inputs, online_latents[flip])  # t = 1: no noise mixed in
    picked_flip = []
    for row, item in enumerate(cached_items):
        matches = [torch.allclose(item["images"], online_latents[flip][row], atol=1e-5) for flip in (False, True)]
        assert any(matches), f"cached latents of {keys[row]} match neither orientation of the online encoding"
        picked_flip.append(matches[1] and not matches[0])
        # Masking and --add_noise randomness depend on the key only, not on where the latents come from.
        for name in ("mask_noise", "t", "eps"):
            assert torch.equal(item[name], online_items[row][name])
    assert 0 < sum(picked_flip) < len(keys)  # random flips from the cache, both orientations used


def test_training_from_the_cache_and_cache_mismatch(latent_cache, tmp_path, capsys):
    cache_dir, _ = latent_cache
    base = ["--model", "vit_base_patch_vae", "--model_kwargs", json.dumps(TINY), "--device", "cpu",
            "--precision", "fp32", "--batch_size", "8", "--num_workers", "0", "--log_every", "1",
            "--use_cached", "--cached_path", str(cache_dir), "--output_dir", str(tmp_path), "--log_dir", str(tmp_path)]
    run_in_process(base + ["--input_size", "32", "--max_steps", "3"])
    losses = step_losses(tmp_path)
    assert sorted(losses) == [1, 2, 3] and all(loss == loss for loss in losses.values())

    # A second run goes to its own folder (the first run's folder is refused by the output-folder guard).
    capsys.readouterr()  # the first run's progress bars
    other = ["--output_dir", str(tmp_path / "second"), "--log_dir", str(tmp_path / "second")]
    with pytest.raises(SystemExit) as error:
        main_pretrain.main(main_pretrain.get_args_parser().parse_args(
            base + other + ["--input_size", "64", "--model_kwargs", json.dumps({**TINY, "patch_size": 2})]))
    message = user_error_line(error, capsys)
    assert "image_size=32" in message and "(needed 64)" in message and "\n" not in message


def test_cached_posterior_sample_and_mar_npz_folder(latent_cache, tmp_path):
    """USP's --use_cached: DiagonalGaussianDistribution(moments).sample() * scale every step (flag), and MAR's
    per-image .npz folders (moments / moments_flip = cat(mean, logvar)) read as the same latents."""
    import numpy as np

    from util.rng import sample_generator

    cache_dir, _ = latent_cache
    model = create_mae("vit_base_patch_vae", 32, **TINY)
    common = ["--model", "vit_base_patch_vae", "--input_size", "32", "--use_cached", "--device", "cpu"]
    sampled = main_pretrain.build_dataset(main_pretrain.get_args_parser().parse_args(
        common + ["--cached_path", str(cache_dir), "--cached_posterior_sample"]), model, pixel=False).base
    shards = LatentCacheDataset(cache_dir, use_mean=True, seed=0)
    latents, _, _ = sampled[(2, 5)]
    generator = sample_generator(0, 2, 5)
    flip = int(torch.randint(0, 2, (1,), generator=generator))
    mean, logvar = shards.moments(5, flip)
    expected = (mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=generator)) * shards.scale
    torch.testing.assert_close(latents, expected)

    mar = tmp_path / "mar"
    for index in range(6):
        label = int(shards.labels[index])
        (mar / f"class{label}").mkdir(parents=True, exist_ok=True)
        moments = [torch.cat(shards.moments(index, flip)).numpy() for flip in (0, 1)]
        np.savez(mar / f"class{label}" / f"img{index:03d}.npz", moments=moments[0], moments_flip=moments[1])
    from_mar = main_pretrain.build_dataset(main_pretrain.get_args_parser().parse_args(
        common + ["--cached_path", str(mar)]), model, pixel=False).base
    for index in range(6):
        got, label, _ = from_mar[(0, index)]
        want, want_label, _ = shards[(0, index)]
        assert label == want_label
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("flags, fragment", [
    (["--model", "vit_gigantic_patch_vae"], "unknown MAE model"),
    (["--input_size", "36"], "not divisible by the VAE factor 8"),
    (["--input_size", "40", "--model_kwargs", "{}"], "not divisible by the patch size 2"),
    (["--vae_path", "/nonexistent/sd-vae"], "was not found"),
    (["--model_kwargs", "[1, 2]"], "JSON object"),
])
def test_bad_input_is_one_sentence(flags, fragment, tiny_image_folder, tiny_vae_dir, tmp_path, capsys):
    args = ["--model", "vit_base_patch_vae", "--model_kwargs", json.dumps(TINY), "--input_size", "32",
            "--data_path", str(tiny_image_folder), "--vae_path", str(tiny_vae_dir), "--device", "cpu",
            "--output_dir", str(tmp_path), "--log_dir", str(tmp_path), *flags]
    with pytest.raises(SystemExit) as error:
        main_pretrain.main(main_pretrain.get_args_parser().parse_args(args))
    message = user_error_line(error, capsys)
    assert fragment in message and "\n" not in message, message
    assert not list(tmp_path.glob("checkpoint-*"))


@pytest.mark.parametrize("no_decay_tokens", [False, True])
def test_weight_decay_groups_follow_mae(no_decay_tokens):
    """MAE/USP (timm param_groups_weight_decay, empty skip list): decay unless the parameter is 1-D or a bias."""
    model = create_mae("vit_base_patch_vae", 32, **TINY)
    args = main_pretrain.get_args_parser().parse_args(["--no_decay_tokens"] if no_decay_tokens else [])
    optimizer = main_pretrain.build_optimizer(model, args, 1e-3, torch.device("cpu"))
    decay_of = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert id(param) not in decay_of, name  # frozen sin-cos position embeddings: not optimised
            continue
        official = 0.0 if param.ndim <= 1 or name.endswith(".bias") else 0.05
        if no_decay_tokens and name in ("cls_token", "mask_token"):
            official = 0.0
        assert decay_of[id(param)] == official, name
    assert decay_of[id(model.cls_token)] == (0.0 if no_decay_tokens else 0.05)
    assert optimizer.defaults["betas"] == (0.9, 0.95)


def test_visualiser_writes_a_png_grid(reference_run, tiny_image_folder, tiny_vae_dir, tmp_path):
    output = tmp_path / "grid.png"
    args = main_generate.get_args_parser().parse_args([
        "--checkpoint", str(reference_run), "--data_path", str(tiny_image_folder), "--vae_path", str(tiny_vae_dir),
        "--num_images", "4", "--device", "cpu", "--output", str(output)])
    assert main_generate.main(args) == output
    with Image.open(output) as grid:
        # 4 rows x 3 columns of 32 px tiles with torchvision's 2 px padding.
        assert grid.size == (3 * 34 + 2, 4 * 34 + 2)
        pixels = torch.tensor(list(grid.convert("RGB").getdata()), dtype=torch.float32).view(grid.size[1], grid.size[0], 3)
    masked_tile = pixels[2:34, 36:68]
    grey = (masked_tile - 128).abs().amax(dim=-1) <= 1
    # 75% of the 16 latent patches are masked, each a 8x8 pixel square painted grey.
    assert grey.float().mean().item() == pytest.approx(0.75, abs=0.1)


@pytest.mark.parametrize("family", ["DiT", "SiT", "ViT"])
def test_checkpoint_initialises_dit_sit_and_vit(reference_run, family):
    checkpoint = reference_run / f"checkpoint-{REFERENCE_STEPS // STEPS_PER_EPOCH - 1}.pth"
    if family == "ViT":
        model = create_vit("vit_base_patch16_vae", 32, num_classes=4, embed_dim=WIDTH, depth=2, num_heads=HEADS,
                           patch_size=1)
    else:
        cls = DiT if family == "DiT" else SiT
        model = cls(input_size=4, patch_size=1, in_channels=4, hidden_size=WIDTH, depth=2, num_heads=HEADS,
                    num_classes=4, affine_norm=True)
    report = transfer_pretrained(model, str(checkpoint))
    pretrained = torch.load(checkpoint, weights_only=True)["model"]
    assert torch.equal(model.blocks[1].attn.qkv.weight, pretrained["blocks.1.attn.qkv.weight"])
    embed = model.patch_embed if family == "ViT" else model.x_embedder
    assert torch.equal(embed.proj.weight, pretrained["patch_embed.proj.weight"])
    assert "blocks.0.mlp.fc2.weight" in report.loaded and "decoder_pred.weight" in report.ignored
