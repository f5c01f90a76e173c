"""Understanding-side data behaviours against the official MAE / USP code, restated in the tests."""
import math

import pytest
import torch
from PIL import Image
from torchvision import transforms

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
