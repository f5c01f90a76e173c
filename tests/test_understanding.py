"""Classification fine-tuning and linear probing (pretrain/main_finetune.py, main_linprobe.py) on CPU.

Tiny ViTs on the tiny VAE's latents: the torchrun paths with exact distributed top-k, resume,
user errors, and a linear probe on a USP-pretrained encoder against a randomly initialised one.
"""
import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import run_torchrun

TINY_VIT = {"embed_dim": 32, "depth": 2, "num_heads": 2}
TINY_MAE = {**TINY_VIT, "decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 2}


def common_flags(data, vae, out, **extra):
    flags = {"device": "cpu", "data_path": data, "vae_path": vae, "input_size": 32, "nb_classes": 4,
             "batch_size": 8, "epochs": 1, "warmup_epochs": 1, "num_workers": 0, "precision": "fp32",
             "model": "vit_base_patch16_vae", "model_kwargs": json.dumps(TINY_VIT), "output_dir": out,
             "log_every": 1, **extra}
    args = []
    for name, value in flags.items():
        if value is True:
            args.append(f"--{name}")
        elif value is not None and value is not False:
            args += [f"--{name}", str(value)]
    return args


def parse(module, args):
    return module.get_args_parser().parse_args([str(a) for a in args])


def parse_finetune(extra):
    from pretrain import main_finetune

    return main_finetune.get_args_parser().parse_args(extra)


def read_log(out):
    return [json.loads(line) for line in (Path(out) / "log.txt").read_text().splitlines()]


@pytest.fixture(scope="module")
def odd_val_folder(tiny_image_folder, tmp_path_factory):
    """tiny_image_folder with 15 val images: 2 ranks cannot split them evenly, so padding would show."""
    root = tmp_path_factory.mktemp("odd_val") / "data"
    shutil.copytree(tiny_image_folder, root)
    sorted((root / "val").rglob("*.png"))[-1].unlink()
    return root


@pytest.fixture(scope="module")
def tiny_usp_checkpoint(tmp_path_factory):
    """A pretraining-layout checkpoint ({"model": MAE state dict}) of the tiny latent MAE."""
    from models.mae import create_mae

    torch.manual_seed(1)
    mae = create_mae("vit_base_patch_vae", 32, vae_version="d8", **TINY_MAE)
    path = tmp_path_factory.mktemp("usp") / "checkpoint-0.pth"
    torch.save({"model": mae.state_dict(), "epoch": 0}, path)
    return path


# ---------------------------------------------------------------------------------------------
# Accuracy bookkeeping
# ---------------------------------------------------------------------------------------------

def test_topk_correct_hand_checked():
    from pretrain.engine_finetune import topk_correct

    logits = torch.tensor([
        [0.1, 0.9, 0.0, 0.0, 0.0, 0.0],  # label 1: top-1 hit
        [0.5, 0.4, 0.3, 0.2, 0.1, 0.0],  # label 3: 4th best -> top-5 only
        [0.5, 0.4, 0.3, 0.2, 0.1, 0.0],  # label 5: last -> miss
        [0.0, 0.0, 3.0, 2.0, 0.0, 1.0],  # label 5: 3rd best -> top-5 only
    ])
    target = torch.tensor([1, 3, 5, 5])
    assert topk_correct(logits, target, (1, 5)).tolist() == [1, 3]
    # k beyond the class count is clipped: every label is among all 6 classes.
    assert topk_correct(logits, target, (1, 10)).tolist() == [1, 4]


def test_sharded_evaluation_counts_every_image_once():
    """Shards of EvalShardSampler cover the set exactly; summing their counts equals one full pass."""
    from pretrain.engine_finetune import evaluate
    from pretrain.engine_finetune import EvalShardSampler

    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 0.0, 2.0], [2.0, 1.0, 0.0], [0.0, 1.0, 2.0]])
    target = torch.tensor([0, 2, 2, 1, 0])  # top-1 hits: items 0, 2 -> 2 of 5; top-2 hits: 0, 1, 2, 3 -> 4 of 5

    class Lookup(torch.nn.Module):
        def forward(self, index):
            return logits[index]

    dataset = torch.utils.data.TensorDataset(torch.arange(5), target)
    shards = [list(EvalShardSampler(5, 2, rank)) for rank in range(2)]
    assert sorted(shards[0] + shards[1]) == list(range(5))  # no padding, no duplicates

    def counts(sampler):
        loader = torch.utils.data.DataLoader(dataset, batch_size=2, sampler=sampler)
        metrics = evaluate(Lookup(), loader, torch.device("cpu"), "fp32", reduce=False)
        return metrics["acc1"] * metrics["images"] / 100, metrics["images"]

    full = counts(EvalShardSampler(5))
    assert full == (2.0, 5)
    per_rank = [counts(EvalShardSampler(5, 2, rank)) for rank in range(2)]
    assert sum(c for c, _ in per_rank) == pytest.approx(2.0) and sum(n for _, n in per_rank) == 5


# ---------------------------------------------------------------------------------------------
# Optimisers: MAE's layer decay and LARS
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("global_pool", [True, False])
def test_layer_decay_groups_match_mae(global_pool):
    """lr_scale = decay ** (depth + 1 - layer_id) with stem = 0, blocks.i = i + 1, head/norms = depth + 1;
    no weight decay on 1-D tensors, pos_embed and cls_token (MAE's param_groups_lrd). In cls-token mode
    the final `norm` is a head-side layer with scale 1 (timm's grouping would give it `decay`)."""
    from models.vit import create_vit
    from pretrain.main_finetune import build_optimizer

    vit = create_vit("vit_base_patch16_vae", 32, num_classes=4, global_pool=global_pool, **TINY_VIT)
    args = parse_finetune(["--layer_decay", "0.5", "--weight_decay", "0.05"])
    optimizer = build_optimizer(vit, None, args, base_lr=1.0)
    names = {id(p): n for n, p in vit.named_parameters()}
    seen = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            seen[names[id(param)]] = (group["lr_scale"], group["weight_decay"])
    assert len(seen) == len(names)
    assert seen["cls_token"] == (0.125, 0.0) and seen["pos_embed"] == (0.125, 0.0)
    assert seen["patch_embed.proj.weight"] == (0.125, 0.05)
    assert seen["blocks.0.attn.qkv.weight"] == (0.25, 0.05) and seen["blocks.0.norm1.weight"] == (0.25, 0.0)
    assert seen["blocks.1.mlp.fc1.weight"] == (0.5, 0.05) and seen["blocks.1.mlp.fc1.bias"] == (0.5, 0.0)
    norm = "fc_norm" if global_pool else "norm"
    assert seen["head.weight"] == (1.0, 0.05) and seen[f"{norm}.weight"] == (1.0, 0.0) and seen[f"{norm}.bias"] == (1.0, 0.0)


def test_lars_probe_step_matches_mae_rule():
    """One LARS step without momentum history: W -= lr * 0.001 * ||W|| / ||g_W|| * g_W, b -= lr * g_b."""
    from pretrain.main_linprobe import build_lars

    head = torch.nn.Linear(3, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 2.0, 2.0], [0.0, 0.0, 0.0]]))  # ||W|| = 3
        head.bias.copy_(torch.tensor([0.5, -0.5]))
    head.weight.grad = torch.tensor([[0.0, 3.0, 4.0], [0.0, 0.0, 0.0]])  # ||g|| = 5
    head.bias.grad = torch.tensor([1.0, 2.0])
    weight, bias = head.weight.detach().clone(), head.bias.detach().clone()
    optimizer = build_lars(head, argparse.Namespace(weight_decay=0.0), base_lr=10.0)
    optimizer.step()
    trust = 0.001 * 3.0 / 5.0
    assert torch.allclose(head.weight, weight - 10.0 * trust * head.weight.grad, atol=1e-7)
    assert torch.allclose(head.bias, bias - 10.0 * head.bias.grad)


# ---------------------------------------------------------------------------------------------
# torchrun runs
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_finetune_torchrun_then_eval(odd_val_folder, tiny_vae_dir, tiny_usp_checkpoint, tmp_path):
    """2-process fine-tuning from a USP checkpoint with the full augmentation stack; --dist_eval counts
    each of the 15 val images once, and --eval of the saved checkpoint reproduces the accuracy."""
    from models.vit import create_vit
    from pretrain import main_finetune

    out = tmp_path / "ft"
    flags = common_flags(odd_val_folder, tiny_vae_dir, out, finetune=tiny_usp_checkpoint, dist_eval=True,
                         mixup=0.8, cutmix=1.0, smoothing=0.1, reprob=0.25, aa="rand-m9-mstd0.5-inc1",
                         color_jitter=0.4, clip_grad=1.0, drop_path=0.1, model_ema=True, layer_decay=0.75)
    result = run_torchrun(["-m", "pretrain.main_finetune", *flags], nproc=2)
    assert "Initialised from" in result.stdout and "loaded" in result.stdout
    assert "on the 15 test images" in result.stdout  # not 16: no padded duplicate was counted
    evals = [row for row in read_log(out) if "acc1" in row]
    assert len(evals) == 1 and {"acc5", "ema_acc1", "best_acc1"} <= set(evals[0])
    steps = [row for row in read_log(out) if "loss" in row and "acc1" not in row]
    assert len(steps) == 4  # 64 train images / (8 per rank x 2 ranks)

    last = torch.load(out / "checkpoint-last.pth", weights_only=True)
    vit = create_vit("vit_base_patch16_vae", 32, num_classes=4, **TINY_VIT)
    vit.load_state_dict(last["model"], strict=True)
    assert (out / "checkpoint-best.pth").is_file() and len(last["loop"]["rng"]) == 2

    metrics = main_finetune.main(parse(main_finetune, common_flags(
        odd_val_folder, tiny_vae_dir, tmp_path / "eval", eval=True, resume=out)))
    assert metrics["images"] == 15
    assert metrics["acc1"] == pytest.approx(evals[0]["acc1"]) and metrics["acc5"] == pytest.approx(evals[0]["acc5"])


@pytest.mark.slow
def test_linprobe_torchrun_from_latent_cache(odd_val_folder, tiny_vae_dir, tiny_usp_checkpoint, tmp_path):
    """2-process linear probe reading training latents from the cache; only the BN + linear head moves."""
    from models.vae import LatentCodec, vae_identity
    from pretrain.cache_latents import extract_latent_cache

    cache = tmp_path / "cache"
    codec = LatentCodec.load("d8", tiny_vae_dir)
    extract_latent_cache(Path(odd_val_folder) / "train", cache, codec, 32, crop="eval", batch_size=16,
                         vae_identity=vae_identity("d8", tiny_vae_dir), vae_version="d8", show_progress=False)
    out = tmp_path / "lp"
    flags = common_flags(odd_val_folder, tiny_vae_dir, out, finetune=tiny_usp_checkpoint, dist_eval=True,
                         use_cached=True, cached_path=cache, epochs=2, lr=1.0)
    result = run_torchrun(["-m", "pretrain.main_linprobe", *flags], nproc=2)
    assert "on the 15 test images" in result.stdout
    last = torch.load(out / "checkpoint-last.pth", weights_only=True)
    assert last["model"]["head.0.running_mean"].shape == (TINY_VIT["embed_dim"],)
    pretrained = torch.load(tiny_usp_checkpoint, weights_only=True)["model"]
    for name in ("blocks.0.attn.qkv.weight", "patch_embed.proj.weight", "cls_token"):
        assert torch.equal(last["model"][name], pretrained[name]), f"frozen encoder weight {name} changed"
    assert not torch.equal(last["model"]["head.1.weight"], torch.zeros_like(last["model"]["head.1.weight"]))


# ---------------------------------------------------------------------------------------------
# Resume
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_finetune_resume_is_exact(tiny_image_folder, tiny_vae_dir, tmp_path):
    """Stopping mid-epoch (--max_steps) and resuming gives the same losses and weights as one run."""
    from pretrain import main_finetune

    extra = dict(epochs=2, mixup=0.8, cutmix=1.0, reprob=0.25, drop_path=0.2, model_ema=True)
    straight, split = tmp_path / "straight", tmp_path / "split"
    main_finetune.main(parse(main_finetune, common_flags(tiny_image_folder, tiny_vae_dir, straight, **extra)))
    main_finetune.main(parse(main_finetune, common_flags(tiny_image_folder, tiny_vae_dir, split, max_steps=3, **extra)))
    stopped = torch.load(split / "checkpoint-last.pth", weights_only=True)
    assert (stopped["epoch"], stopped["loop"]["epoch"], stopped["loop"]["batch"], stopped["loop"]["global_step"]) == (0, 0, 3, 3)
    main_finetune.main(parse(main_finetune, common_flags(tiny_image_folder, tiny_vae_dir, split, resume=split, **extra)))

    def losses(out):
        return {row["step"]: row["loss"] for row in read_log(out) if "loss" in row and "acc1" not in row}

    assert len(losses(straight)) == 16 and losses(split) == losses(straight)
    final_a = torch.load(straight / "checkpoint-last.pth", weights_only=True)
    final_b = torch.load(split / "checkpoint-last.pth", weights_only=True)
    for key in ("model", "model_ema"):
        for name, tensor in final_a[key].items():
            assert torch.equal(tensor, final_b[key][name]), f"{key}.{name} differs after resume"


@pytest.mark.slow
def test_train_vae_updates_the_encoder_only(tiny_image_folder, tiny_vae_dir, tmp_path):
    """--train_vae: the VAE encoder joins the optimizer (saved as vae_encoder); the decoder is untouched."""
    from models.vae import LatentCodec
    from pretrain import main_finetune

    out = tmp_path / "vae"
    main_finetune.main(parse(main_finetune, common_flags(tiny_image_folder, tiny_vae_dir, out, train_vae=True,
                                                         max_steps=2, lr=1e-2)))
    state = torch.load(out / "checkpoint-last.pth", weights_only=True)
    original = LatentCodec.load("d8", tiny_vae_dir).autoencoder.state_dict()
    assert state["vae_encoder"] and all(k.startswith(("encoder.", "quant_conv.")) for k in state["vae_encoder"])
    assert not torch.equal(state["vae_encoder"]["encoder.conv_in.weight"], original["encoder.conv_in.weight"])


@pytest.mark.slow
def test_numbered_checkpoints_follow_maes_rule(tiny_image_folder, tiny_vae_dir, tmp_path):
    """MAE/USP main_linprobe.py and main_finetune.py: `if args.output_dir and (epoch % 20 == 0 or epoch ==
    args.epochs - 1): misc.save_model(...)` -> checkpoint-{epoch}.pth. Worked out for 3 epochs and N = 5:
    epoch 0 (0 % 5 == 0) and epoch 2 (the last); plus this project's checkpoint-last / -best."""
    from pretrain import main_linprobe

    out = tmp_path / "lp"
    main_linprobe.main(parse(main_linprobe, common_flags(tiny_image_folder, tiny_vae_dir, out, epochs=3, save_every=5,
                                                         batch_size=32)))
    assert sorted(p.name for p in out.glob("checkpoint-[0-9]*.pth")) == ["checkpoint-0.pth", "checkpoint-2.pth"]
    assert (out / "checkpoint-last.pth").is_file()
    assert torch.load(out / "checkpoint-2.pth", weights_only=True)["epoch"] == 2


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_bad_input_is_one_sentence(tiny_image_folder, tiny_vae_dir, tmp_path, capsys):
    from models.mae import create_mae
    from pretrain import main_finetune, main_linprobe
    from pretrain.engine_finetune import run_main

    wide = tmp_path / "wide.pth"
    torch.save({"model": create_mae("vit_base_patch_vae", 32, **{**TINY_MAE, "embed_dim": 64}).state_dict()}, wide)
    cases = [
        (main_finetune, dict(nb_classes=10), "--nb_classes 10 does not match the 4 class folders"),
        (main_linprobe, dict(model="vit_base_patch16", vae_version="d8"), "pixel-space preset and has no VAE variant"),
        (main_finetune, dict(finetune=wide), "width 64 but the model has width 32"),
        (main_linprobe, dict(input_size=36), "not divisible by the VAE factor 8"),
    ]
    for module, extra, expected in cases:
        code = run_main(module.main, parse(module, common_flags(tiny_image_folder, tiny_vae_dir, tmp_path / "x", **extra)))
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(errors) == 1 and expected in errors[0], errors


# ---------------------------------------------------------------------------------------------
# USP pretraining helps the probe
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_linear_probe_usp_beats_random_init(tiny_vae_dir, tmp_path_factory):
    """Pretrain a tiny encoder with pretrain/main_pretrain.py, then probe it and a random-init twin.

    Both stages read one latent cache of the 64 px toy set (4 classes, 256 train / 192 val images):
    the probe's features are frozen, so only the encoder's initialisation differs between the runs.
    """
    from models.vae import LatentCodec, vae_identity
    from pretrain import main_linprobe, main_pretrain
    from pretrain.cache_latents import extract_latent_cache
    from demo.toy_dataset import write_toy_dataset

    work = tmp_path_factory.mktemp("probe")
    data = write_toy_dataset(work / "data", num_classes=4, train_per_class=64, val_per_class=48, image_size=64, seed=0)
    cache = work / "cache"
    extract_latent_cache(data / "train", cache, LatentCodec.load("d8", tiny_vae_dir), 64, crop="eval", batch_size=64,
                         vae_identity=vae_identity("d8", tiny_vae_dir), vae_version="d8", show_progress=False)
    encoder = {"embed_dim": 64, "depth": 2, "num_heads": 4}
    main_pretrain.main(main_pretrain.get_args_parser().parse_args([
        "--device", "cpu", "--data_path", str(data), "--vae_path", str(tiny_vae_dir), "--input_size", "64",
        "--use_cached", "--cached_path", str(cache), "--model", "vit_base_patch_vae", "--norm_pix_loss",
        "--batch_size", "32", "--epochs", "30", "--warmup_epochs", "1", "--lr", "1e-3", "--num_workers", "0",
        "--precision", "fp32", "--save_every", "100", "--log_every", "100",
        "--model_kwargs", json.dumps({**encoder, "decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 2}),
        "--output_dir", str(work / "pretrain"), "--log_dir", str(work / "pretrain"),
    ]))
    accuracy = {}
    for name, init in (("usp", work / "pretrain" / "checkpoint-29.pth"), ("random", None)):
        # LARS moves the head by ~lr * 1e-3 of its norm per step: a short toy probe needs a large lr.
        args = parse(main_linprobe, common_flags(
            data, tiny_vae_dir, work / name, input_size=64, finetune=init, model_kwargs=json.dumps(encoder),
            use_cached=True, cached_path=cache, batch_size=16, epochs=20, lr=10.0, eval_freq=100, log_every=100))
        accuracy[name] = main_linprobe.main(args)["acc1"]
    # Which run scores higher is noise at this scale (README); print it, and check what must hold: the USP probe
    # kept the pretrained encoder frozen, bit for bit, the random twin did not start from it, and both trained a head.
    print(f"linear probe top-1 on the toy set: USP-pretrained {accuracy['usp']:.1f}%, random init {accuracy['random']:.1f}%")
    pretrained = torch.load(work / "pretrain" / "checkpoint-29.pth", weights_only=True)["model"]
    encoder_keys = [key for key in pretrained if key.startswith(("blocks.", "patch_embed."))]
    probed = {name: torch.load(work / name / "checkpoint-last.pth", weights_only=True)["model"] for name in accuracy}
    assert encoder_keys and all(torch.equal(probed["usp"][key], pretrained[key]) for key in encoder_keys)
    assert not all(torch.equal(probed["random"][key], pretrained[key]) for key in encoder_keys)
    assert all(0.0 <= value <= 100.0 for value in accuracy.values()), accuracy
