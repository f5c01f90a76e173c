"""Understanding-side data behaviours against the official MAE / USP code, restated in the tests."""
import math

import pytest
import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from util.data import eval_crop
from util.tf_crop import RandomResizedCrop


def mae_tf_crop_params(width, height, scale, ratio):
    """mae/util/crop.py RandomResizedCrop.get_params, one draw, box clipped to the image."""
    area = height * width
    target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
    log_ratio = torch.log(torch.tensor(ratio))
    aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
    w = min(int(round(math.sqrt(target_area * aspect))), width)
    h = min(int(round(math.sqrt(target_area / aspect))), height)
    i = torch.randint(0, height - h + 1, size=(1,)).item()
    j = torch.randint(0, width - w + 1, size=(1,)).item()
    return i, j, h, w


@pytest.mark.parametrize("size", [(97, 41), (40, 120), (64, 64)])
def test_probe_crop_is_maes_tf_style_crop(size):
    image = Image.new("RGB", size)
    crop = RandomResizedCrop(16)
    for seed in range(50):
        torch.manual_seed(seed)
        ours = crop.get_params(image, crop.scale, crop.ratio)
        torch.manual_seed(seed)
        assert ours == mae_tf_crop_params(*size, (0.08, 1.0), (3 / 4, 4 / 3))


@pytest.mark.parametrize("input_size, resize", [(224, 256), (112, 128), (256, 256), (384, 384)])
def test_eval_resize_uses_maes_crop_pct(input_size, resize):
    """MAE's build_transform: crop_pct = 224/256 for input_size <= 224, else 1.0; Resize(int(size / crop_pct))."""
    resize_step = eval_crop(input_size).transforms[0]
    assert isinstance(resize_step, transforms.Resize) and resize_step.size == resize
    out = eval_crop(input_size)(Image.new("RGB", (500, 400)))
    assert out.size == (input_size, input_size)


def test_imagenet_c_gaussian_noise_matches_usp():
    """USP util/datasets.py GaussianNoise: x/255 + N(0, c), clip [0, 1], *255, astype(uint8); c[2] = 0.12."""
    import numpy as np

    from pretrain.robustness import GaussianNoise

    image = Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3) * 5)
    np.random.seed(3)
    ours = np.asarray(GaussianNoise(2)(image))
    np.random.seed(3)
    x = np.asarray(image) / 255.0
    expected = (np.clip(x + np.random.normal(size=x.shape, scale=0.12), 0, 1) * 255).astype(np.uint8)
    assert np.array_equal(ours, expected)
    with pytest.raises(ValueError, match="1..5"):
        GaussianNoise(6)


def test_t_noise_uses_the_linear_ddpm_alpha_bar():
    from pretrain.robustness import ddpm_alpha_bar, diffuse_latents

    # Hand-worked: beta_1 = 1e-4, beta_2 = 1e-4 + 0.0199 / 999.
    beta_2 = 1e-4 + (0.02 - 1e-4) / 999
    assert ddpm_alpha_bar(1) == pytest.approx(1 - 1e-4, rel=1e-6)
    assert ddpm_alpha_bar(2) == pytest.approx((1 - 1e-4) * (1 - beta_2), rel=1e-6)
    assert ddpm_alpha_bar(1000) == pytest.approx(4.04e-5, rel=0.01)  # the DDPM schedule's known end value
    latents = torch.ones(2, 4, 3, 3)
    noisy = diffuse_latents(latents, 0.25, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(noisy, 0.5 * latents + 0.75 ** 0.5 * eps)


def test_finetune_mixes_latents_after_encoding_and_t_noise():
    """USP engine_finetune: x = vae.encode(x).mean * scale; [t-noise]; then mixup_fn(latents, targets)."""
    from pretrain.latent_classifier import LatentClassifier

    class Codec:
        def encode(self, images, sample=False):
            return images[:, :2, ::2, ::2] * 3.0  # a stand-in encoder: (N, 3, 8, 8) -> (N, 2, 4, 4)

    seen = {}

    def mixup(latents, targets):
        seen["latents"] = latents.clone()
        return latents.flip(0), targets.flip(0) * 0.5

    images, targets = torch.randn(2, 3, 8, 8), torch.eye(2)
    classifier = LatentClassifier(torch.nn.Flatten(), Codec(), "fp32", t_noise_alpha_bar=0.25, latent_mixup=mixup)
    torch.manual_seed(0)
    logits, mixed = classifier(images, targets)
    torch.manual_seed(0)
    expected_latents = 0.5 * images[:, :2, ::2, ::2] * 3.0 + 0.75 ** 0.5 * torch.randn(2, 2, 4, 4)
    torch.testing.assert_close(seen["latents"], expected_latents)
    torch.testing.assert_close(logits, expected_latents.flip(0).flatten(1))
    torch.testing.assert_close(mixed, torch.eye(2).flip(0) * 0.5)
    assert classifier(images).shape == (2, 32)  # evaluation: no targets, no mixing


def test_add_noise_corrupts_the_evaluation_images_after_the_crop():
    from pretrain.robustness import GaussianNoise
    from util.data import eval_transform

    steps = eval_transform(224, corruption=GaussianNoise(3)).transforms
    assert isinstance(steps[0], transforms.Compose) and isinstance(steps[1], GaussianNoise)
    assert isinstance(steps[2], transforms.ToTensor)


def test_randaugment_fills_with_the_imagenet_mean_for_vae_input(tiny_image_folder):
    """AMAP-ML/USP pretrain/util/datasets.py, transforms_vae_imagenet_train: the VAE input is normalised with 0.5,
    but RandAugment gets img_mean = round(255 * IMAGENET_DEFAULT_MEAN) = (124, 116, 104) (0.485, 0.456, 0.406)."""
    from timm.data.auto_augment import AugmentOp

    from pretrain.main_finetune import build_train_dataset, get_args_parser

    args = get_args_parser().parse_args(["--data_path", str(tiny_image_folder), "--nb_classes", "4",
                                         "--input_size", "32"])
    ops = [op for step in build_train_dataset(args, pixel=False).transform.transforms
           for op in getattr(step, "ops", []) if isinstance(op, AugmentOp)]
    rotate = next(op for op in ops if op.name == "Rotate")
    rotate.prob, rotate.magnitude_std = 1.0, 0.0  # always rotate, by 9/10 of 30 degrees
    out = rotate(Image.new("RGB", (32, 32), (255, 255, 255)))
    assert out.getpixel((0, 0)) == (124, 116, 104)  # the corner the rotation uncovers


def test_head_is_reinitialised_only_with_finetune():
    """USP main_finetune.py / main_linprobe.py: `if args.finetune and not args.eval: ... trunc_normal_(
    model.head.weight, std=2e-5)` (probe: 0.01); without --finetune the head keeps timm's ViT init,
    trunc_normal(std=0.02) with zero bias (timm init_weights_vit_timm)."""
    from argparse import Namespace

    from models.mae import create_mae
    from pretrain.latent_classifier import build_vit

    args = Namespace(model="vit_base_patch16_vae", input_size=32, vae_version="d8", nb_classes=1000, drop_path=0.0,
                     global_pool=True, eval=False, finetune="", skip_depth=0,
                     model_kwargs_dict={"embed_dim": 256, "depth": 1, "num_heads": 4})
    torch.manual_seed(0)
    scratch = build_vit(args, head_init_std=2e-5).head
    assert 0.018 < scratch.weight.std().item() < 0.022 and not scratch.bias.any()

    mae = create_mae("vit_base_patch_vae", 32, vae_version="d8", embed_dim=256, depth=1, num_heads=4,
                     decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    args.finetune = {"model": mae.state_dict()}
    head = build_vit(args, head_init_std=2e-5).head
    assert 1.5e-5 < head.weight.std().item() < 2.5e-5


def test_probe_skip_depth_builds_a_shallower_vit():
    """USP models_vit.py vit_*_patch16_vae: `depth = 12 - skip_depth` (24, 28 for L, XL), then strict=False
    loading of the pretrained checkpoint: its first depth - skip_depth blocks."""
    from argparse import Namespace

    from models.mae import create_mae
    from pretrain.latent_classifier import build_vit

    tiny = {"embed_dim": 32, "num_heads": 2}
    mae = create_mae("vit_base_patch_vae", 32, vae_version="d8", depth=3, decoder_embed_dim=32, decoder_depth=1,
                     decoder_num_heads=2, **tiny)
    args = Namespace(model="vit_base_patch16_vae", input_size=32, vae_version="d8", nb_classes=4, drop_path=0.0,
                     global_pool=False, eval=False, finetune={"model": mae.state_dict()}, skip_depth=1,
                     model_kwargs_dict={**tiny, "depth": 3})
    vit = build_vit(args, head_init_std=0.01)
    assert len(vit.blocks) == 2
    assert torch.equal(vit.blocks[1].attn.qkv.weight, mae.blocks[1].attn.qkv.weight)
    assert len(build_vit(Namespace(**{**vars(args), "model_kwargs_dict": {**tiny}}), 0.01).blocks) == 12 - 1


def test_use_pretrain_layer_zero_keeps_no_pretrained_block():
    """USP generation/DiT/train.py: `if args.use_pretrain_layer >= 0:` delete every `blocks.i` with
    i >= use_pretrain_layer, so 0 keeps the patch embedding and position embedding only."""
    from models.mae import create_mae
    from models.sit import SiT_models
    from models.transfer import transfer_pretrained

    mae = create_mae("vit_base_patch_vae", 32, vae_version="d8", embed_dim=32, depth=2, num_heads=2,
                     decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    sit = SiT_models["SiT-B/2-VAE-simple"](input_size=4, num_classes=4, hidden_size=32, depth=2, num_heads=2)
    report = transfer_pretrained(sit, mae.state_dict(), use_pretrain_layer=0)
    assert "x_embedder.proj.weight" in report.loaded
    assert not any(name.startswith("blocks.") for name in report.loaded)
    assert report.reasons["blocks.0.attn.qkv.weight"] == "beyond --use-pretrain-layer 0"


def test_train_vae_flat_is_usps_train_vae(tiny_vae_dir, tmp_path):
    """AMAP-ML/USP pretrain/main_finetune.py with --train_vae: `model = DistributedDataParallel(model)` wraps the
    ViT alone (the VAE is a separate module, its gradients never averaged), and util/misc.py save_model writes
    `to_save['vae'] = vae.state_dict()`: the whole VAE, decoder included."""
    import torch.distributed as dist
    from argparse import Namespace

    from models.vae import LatentCodec
    from models.vit import create_vit
    from pretrain.engine_finetune import checkpoint_state, wrap_ddp
    from pretrain.latent_classifier import LatentClassifier
    from util.loop import LoopPosition

    vit = create_vit("vit_base_patch16_vae", 32, num_classes=4, embed_dim=32, depth=1, num_heads=2)
    codec = LatentCodec.load("d8", tiny_vae_dir).train_encoder(True)
    classifier = LatentClassifier(vit, codec)
    args = Namespace(train_vae=True, train_vae_flat=True, batch_size=2)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = wrap_ddp(classifier, args, torch.device("cpu"))
        assert {n for n, _ in codec.named_parameters(prefix="codec")} <= set(ddp.parameters_to_ignore)
        assert not any(n.startswith("vit.") for n in ddp.parameters_to_ignore)
        optimizer = torch.optim.AdamW(vit.parameters())
        state = checkpoint_state(classifier, optimizer, None, LoopPosition(epoch=0), args, 0.0, batches_per_epoch=1)
    finally:
        dist.destroy_process_group()
    assert "vae_encoder" not in state and set(state["vae"]) == set(codec.autoencoder.state_dict())
    assert any(k.startswith("decoder.") for k in state["vae"])


def test_probe_eval_resize_256_is_usps_probe_crop(tiny_image_folder):
    """AMAP-ML/USP pretrain/main_linprobe.py: transform_val = Resize(256, bicubic) + CenterCrop(input_size) at
    every input size (at 240 px MAE's fine-tuning rule would resize to 240)."""
    from pretrain.main_finetune import build_eval_loader
    from pretrain.main_linprobe import get_args_parser
    from util.distributed import DistEnv

    args = get_args_parser().parse_args(["--data_path", str(tiny_image_folder), "--nb_classes", "4", "--input_size",
                                         "240", "--eval_resize", "256", "--num_workers", "0", "--device", "cpu"])
    loader = build_eval_loader(args, DistEnv(0, 1, 0, torch.device("cpu"), None), pixel=False)
    crop = loader.dataset.transform.transforms[0]
    assert [type(t).__name__ for t in crop.transforms] == ["Resize", "CenterCrop"]
    assert crop.transforms[0].size == 256 and crop.transforms[0].interpolation == InterpolationMode.BICUBIC
    assert crop.transforms[1].size == (240, 240)
