"""generation/sample_ddp.py + generation/sampling.py on CPU with tiny DiT/SiT models and a tiny VAE.

Most runs call `sample_ddp.main` in this process (start-up of a fresh interpreter costs more than the
sampling itself); the world-size test runs the real thing: torchrun with 2 gloo processes vs plain python.
"""
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from conftest import run_python, run_torchrun
from generation import sample_ddp
from generation.sampling import (Guidance, ImageGenerator, diffusion_sampler, global_batches, index_inputs,
                                 npz_path_for, sample_to_folder, transport_sampler)
from generation.transport import create_transport
from models.dit import DiT_models
from models.sit import SiT_models
from models.vae import LatentCodec

TINY = {"hidden_size": 32, "depth": 2, "num_heads": 2}
IMAGE_SIZE, NUM_CLASSES = 32, 4
LATENT_SHAPE = (4, IMAGE_SIZE // 8, IMAGE_SIZE // 8)


def tiny_model(name: str, seed: int):
    """A tiny DiT/SiT whose zero-initialised adaLN/output layers are perturbed, so outputs depend on the input."""
    registry = DiT_models if name.startswith("DiT") else SiT_models
    torch.manual_seed(seed)
    model = registry[name](input_size=LATENT_SHAPE[1], num_classes=NUM_CLASSES, in_channels=4, **TINY)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model.eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """DiT training checkpoint ({model, ema, args}), DiT model-only checkpoint, SiT raw state dict."""
    root = tmp_path_factory.mktemp("sampling_ckpts")
    dit_ema, dit_model = tiny_model("DiT-S/2", 0), tiny_model("DiT-S/2", 1)
    paths = {"dit": root / "dit.pt", "dit_model_only": root / "dit_model_only.pt", "sit": root / "sit.pt",
             "dit_ema_raw": root / "dit_ema_raw.pt"}
    torch.save({"model": dit_model.state_dict(), "ema": dit_ema.state_dict(), "opt": {},
                "args": {"model": "DiT-S/2", "image_size": IMAGE_SIZE}}, paths["dit"])
    torch.save({"model": dit_model.state_dict(), "args": {"model": "DiT-S/2"}}, paths["dit_model_only"])
    torch.save(dit_ema.state_dict(), paths["dit_ema_raw"])
    torch.save(tiny_model("SiT-S/2", 2).state_dict(), paths["sit"])
    return paths


def cli_args(model, ckpt, sample_dir, vae_dir, num=6, batch=4, steps=3, extra=()):
    return [*extra, "--model", model, "--ckpt", str(ckpt), "--sample-dir", str(sample_dir),
            "--model-kwargs", json.dumps(TINY), "--image-size", str(IMAGE_SIZE), "--num-classes", str(NUM_CLASSES),
            "--vae-path", str(vae_dir), "--device", "cpu", "--num-fid-samples", str(num),
            "--per-proc-batch-size", str(batch), "--num-sampling-steps", str(steps), "--no-progress"]


def load_npz(sample_dir):
    with np.load(npz_path_for(sample_dir)) as data:
        return data["arr_0"], data["arr_1"]


@pytest.mark.slow
def test_npz_layout_ema_preferred_and_resume(checkpoints, tiny_vae_dir, tmp_path):
    full = tmp_path / "full"
    sample_ddp.main(cli_args("DiT-S/2", checkpoints["dit"], full, tiny_vae_dir, num=6))
    images, labels = load_npz(full)
    assert images.dtype == np.uint8 and images.shape == (6, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert labels.shape == (6,) and labels.min() >= 0 and labels.max() < NUM_CLASSES
    assert images.std() > 1.0  # real, varied images rather than a constant fill
    assert sorted(p.name for p in full.glob("*.png")) == [f"{i:06d}.png" for i in range(6)]

    # The training checkpoint's `ema` weights are used: same images as the raw EMA state dict.
    raw = tmp_path / "raw"
    sample_ddp.main(cli_args("DiT-S/2", checkpoints["dit_ema_raw"], raw, tiny_vae_dir, num=6))
    assert np.array_equal(load_npz(raw)[0], images)

    # Stopped midway (only 3 of 6 written, one file lost) and rerun: the npz equals the uninterrupted one.
    resumed = tmp_path / "resumed"
    sample_ddp.main(cli_args("DiT-S/2", checkpoints["dit"], resumed, tiny_vae_dir, num=3))
    (resumed / "000001.png").unlink()
    sample_ddp.main(cli_args("DiT-S/2", checkpoints["dit"], resumed, tiny_vae_dir, num=6))
    resumed_images, resumed_labels = load_npz(resumed)
    assert np.array_equal(resumed_images, images) and np.array_equal(resumed_labels, labels)


@pytest.mark.slow
def test_model_only_checkpoint_warns(checkpoints, tiny_vae_dir, tmp_path):
    with pytest.warns(UserWarning, match="2 FID worse"):
        sample_ddp.main(cli_args("DiT-S/2", checkpoints["dit_model_only"], tmp_path / "m", tiny_vae_dir, num=2,
                                 batch=2, steps=2))
    # The model weights differ from the EMA weights, so the images must too.
    sample_ddp.main(cli_args("DiT-S/2", checkpoints["dit"], tmp_path / "e", tiny_vae_dir, num=2, batch=2, steps=2))
    assert not np.array_equal(load_npz(tmp_path / "m")[0], load_npz(tmp_path / "e")[0])


@pytest.mark.parametrize("extra", [
    ["--sampler", "ddim"],
    ["ODE", "--sampling-method", "dopri5"],
    ["--mode", "SDE", "--cfg-scale", "2.0", "--cfg-channels", "all", "--guidance-interval", "0.2", "1.0"],
], ids=["dit-ddim", "sit-ode", "sit-sde-cfg"])
@pytest.mark.slow
def test_sampler_paths_run(checkpoints, tiny_vae_dir, tmp_path, extra):
    model, ckpt = ("DiT-S/2", checkpoints["dit"]) if extra[0] == "--sampler" else ("SiT-S/2", checkpoints["sit"])
    sample_ddp.main(cli_args(model, ckpt, tmp_path / "s", tiny_vae_dir, num=3, batch=2, extra=extra))
    images, labels = load_npz(tmp_path / "s")
    assert images.shape == (3, IMAGE_SIZE, IMAGE_SIZE, 3) and images.dtype == np.uint8 and labels.shape == (3,)
    assert len({image.tobytes() for image in images}) == 3  # each index gets its own noise


@pytest.mark.slow
def test_user_errors_are_one_sentence(checkpoints, tiny_vae_dir, tmp_path, capsys):
    wrong_size = cli_args("DiT-S/2", checkpoints["dit"], tmp_path / "a", tiny_vae_dir) + ["--image-size", "64"]
    with pytest.raises(SystemExit) as exit_info:
        sample_ddp.main(wrong_size)
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip()
    assert "does not fit" in message and "pos_embed" in message and "--model DiT-S/2" in message
    assert len(message.splitlines()) == 1

    sample_ddp.main(cli_args("DiT-S/2", checkpoints["dit"], tmp_path / "b", tiny_vae_dir, num=2, batch=2, steps=2))
    with pytest.raises(SystemExit):  # resuming a folder with another seed would mix two runs
        sample_ddp.main(cli_args("DiT-S/2", checkpoints["dit"], tmp_path / "b", tiny_vae_dir, num=2, batch=2,
                                 steps=2) + ["--global-seed", "1"])
    assert "global_seed=0" in capsys.readouterr().err

    with pytest.raises(SystemExit):
        sample_ddp.main(cli_args("DiT-S/2", checkpoints["dit"], tmp_path / "c", tiny_vae_dir, extra=["SDE"]))
    assert "SiT sampler" in capsys.readouterr().err


def test_random_inputs_depend_only_on_seed_and_index():
    z_all, y_all = index_inputs(7, range(6), NUM_CLASSES, LATENT_SHAPE)
    z_some, y_some = index_inputs(7, [4, 1], NUM_CLASSES, LATENT_SHAPE)
    assert torch.equal(z_some, z_all[[4, 1]]) and torch.equal(y_some, y_all[[4, 1]])
    z_labelled, y_labelled = index_inputs(7, [4, 1], NUM_CLASSES, LATENT_SHAPE, labels=[3, 3])
    assert torch.equal(z_labelled, z_some) and y_labelled.tolist() == [3, 3]
    # Batches are global: the same batches exist for any world size, dealt round-robin to ranks.
    assert global_batches(10, 4, 0, 1) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert global_batches(10, 4, 0, 2) == [[0, 1, 2, 3], [8, 9, 10, 11]]
    assert global_batches(10, 4, 1, 2) == [[4, 5, 6, 7]]


@pytest.mark.slow
def test_rank_partition_matches_single_process_with_adaptive_ode(tiny_vae_dir, tmp_path):
    """dopri5 picks its steps from the whole batch, so this checks that batches do not depend on the ranks."""
    model = tiny_model("SiT-S/2", 3)
    codec = LatentCodec.load("d8", str(tiny_vae_dir))
    sample_fn = transport_sampler(create_transport(), "ODE", num_steps=3)
    generator = ImageGenerator(model, codec, sample_fn, num_classes=NUM_CLASSES, latent_shape=LATENT_SHAPE,
                               device=torch.device("cpu"), guidance=Guidance(scale=1.5), stochastic=False)
    sample_to_folder(generator, tmp_path / "one", 5, 2, global_seed=0)
    for rank in (1, 0, 2):
        sample_to_folder(generator, tmp_path / "three", 5, 2, global_seed=0, rank=rank, world_size=3)
    for index in range(5):
        assert (tmp_path / "one" / f"{index:06d}.png").read_bytes() == (tmp_path / "three" / f"{index:06d}.png").read_bytes()
    assert not (tmp_path / "one" / "000005.png").exists()  # the padding index of the last batch is dropped


@pytest.mark.slow
def test_ddpm_step_noise_is_per_sample(checkpoints, tiny_vae_dir):
    """DDPM draws fresh noise every step: image i's result must not depend on its batch neighbours' generators."""
    state = torch.load(checkpoints["dit_ema_raw"], weights_only=True)
    model = tiny_model("DiT-S/2", 0)
    model.load_state_dict(state)
    generator = ImageGenerator(model, LatentCodec.load("d8", str(tiny_vae_dir)), diffusion_sampler(3),
                               num_classes=NUM_CLASSES, latent_shape=LATENT_SHAPE, device=torch.device("cpu"))
    together, _ = generator.latents(0, [0, 1])
    swapped, _ = generator.latents(0, [1, 0])
    torch.testing.assert_close(together, swapped[[1, 0]], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_world_size_one_and_two_give_identical_npz(checkpoints, tiny_vae_dir, tmp_path):
    common = dict(num=5, batch=2, steps=3, extra=["--cfg-scale", "1.5"])
    single = ["generation/sample_ddp.py", *cli_args("DiT-S/2", checkpoints["dit"], tmp_path / "w1", tiny_vae_dir,
                                                    **common)]
    double = ["-m", "generation.sample_ddp", *cli_args("DiT-S/2", checkpoints["dit"], tmp_path / "w2", tiny_vae_dir,
                                                       **common)]
    # The two runs are independent; overlapping them hides most of the interpreters' start-up time.
    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = [pool.submit(run_python, single), pool.submit(run_torchrun, double, 2)]
        for run in runs:
            run.result()
    one, two = load_npz(tmp_path / "w1"), load_npz(tmp_path / "w2")
    assert one[0].shape == (5, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert np.array_equal(one[0], two[0]) and np.array_equal(one[1], two[1])


@pytest.mark.slow
@pytest.mark.parametrize("model", ["DiT-S/2", "SiT-S/2"])
def test_trainer_fid_hook_writes_npz(tiny_image_folder, tiny_vae_dir, tmp_path, model):
    """generation/train.py's --num-fid-samples hook: EMA samples on every rank -> fid-<step>.npz (PNGs removed)."""
    from generation import train

    train.main(["--model", model, "--data-path", str(tiny_image_folder / "train"), "--results-dir", str(tmp_path),
                "--image-size", str(IMAGE_SIZE), "--num-classes", str(NUM_CLASSES), "--global-batch-size", "8",
                "--vae-path", str(tiny_vae_dir), "--num-workers", "0", "--log-every", "1", "--ckpt-every", "1000",
                "--device", "cpu", "--precision", "fp32", "--model-kwargs", json.dumps(TINY), "--max-steps", "2",
                "--eval-every", "2", "--eval-images", "2", "--num-sampling-steps", "2", "--num-fid-samples", "3",
                "--per-proc-batch-size", "2", "--exp-name", "fid"])
    (experiment,) = tmp_path.iterdir()
    with np.load(experiment / "samples" / "fid-0000002.npz") as data:
        assert data["arr_0"].shape == (3, IMAGE_SIZE, IMAGE_SIZE, 3) and data["arr_1"].shape == (3,)
    assert not (experiment / "samples" / "fid-0000002").exists()
    logged = [json.loads(line) for line in (experiment / "log.txt").read_text().splitlines()]
    assert any("fid_sampling_images_per_s" in json.dumps(entry) for entry in logged)


def test_sample_to_folder_stops_after_the_current_batch_and_a_rerun_completes(tiny_vae_dir, tmp_path):
    """A stop requested during batch 1 of 3 leaves batches 2 and 3 (indices 2..4) for the next call."""
    generator = ImageGenerator(tiny_model("DiT-S/2", 0), LatentCodec.load("d8", str(tiny_vae_dir)),
                               diffusion_sampler(2), num_classes=NUM_CLASSES, latent_shape=LATENT_SHAPE,
                               device=torch.device("cpu"))
    asked = []
    stop_after_first = lambda: (asked.append(1), len(asked) > 1)[1]  # noqa: E731 - true from the second question
    first = sample_to_folder(generator, tmp_path, 5, 2, global_seed=0, stop_requested=stop_after_first)
    assert (first["images"], first["stopped"]) == (2, True)
    assert sorted(path.name for path in tmp_path.glob("*.png")) == ["000000.png", "000001.png"]
    second = sample_to_folder(generator, tmp_path, 5, 2, global_seed=0)
    assert (second["images"], second["stopped"]) == (3, False)
    assert len(list(tmp_path.glob("*.png"))) == 5
