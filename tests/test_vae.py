"""Latent codecs: round trip through a tiny AutoencoderKL, error messages, LDM -> diffusers conversion."""
import re
import shutil

import pytest
import torch

from models.latent_spec import LATENT_SPECS
from models.ldm_autoencoder import ldm_autoencoder_config, ldm_to_diffusers_state_dict, load_ldm_autoencoder
from models.vae import LatentCodec, vae_identity
from conftest import build_tiny_autoencoder_kl
from util.errors import UserError


def _images(n=2, size=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=generator) * 2 - 1


@pytest.fixture(scope="module")
def codec(tiny_vae_dir):
    return LatentCodec.load("d8", tiny_vae_dir)


def test_round_trip_shapes_scale_and_frozen(codec, tiny_vae_dir):
    from diffusers import AutoencoderKL

    reference = AutoencoderKL.from_pretrained(tiny_vae_dir).eval()
    images = _images()
    mean, logvar = codec.encode_moments(images)
    assert mean.shape == logvar.shape == (2, 4, 4, 4) and mean.dtype == torch.float32
    with torch.no_grad():
        posterior = reference.encode(images).latent_dist
    # Moments come back unscaled; encode() applies the 0.18215 scale and decode() undoes it.
    torch.testing.assert_close(mean, posterior.mean)
    torch.testing.assert_close(logvar, posterior.logvar)
    latents = codec.encode(images)
    torch.testing.assert_close(latents, posterior.mean * 0.18215)
    decoded = codec.decode(latents)
    with torch.no_grad():
        expected = reference.decode(posterior.mean).sample.clamp(-1, 1)
    assert decoded.shape == images.shape
    torch.testing.assert_close(decoded, expected)
    assert decoded.abs().max() <= 1.0

    assert not any(p.requires_grad for p in codec.parameters())
    codec.train()
    assert not codec.training and not codec.autoencoder.training
    assert not codec.encode(images.requires_grad_()).requires_grad


def test_mean_versus_sample(codec):
    images = _images(seed=1)
    mean, logvar = codec.encode_moments(images)
    noise = torch.randn_like(mean)
    sampled = codec.latents_from_moments(mean, logvar, sample=True, noise=noise)
    torch.testing.assert_close(sampled, (mean + torch.exp(0.5 * logvar) * noise) * 0.18215)
    torch.testing.assert_close(codec.latents_from_moments(mean, logvar, sample=False), mean * 0.18215)
    # A seeded generator makes the posterior sample reproducible, and it differs from the mean.
    first = codec.encode(images, sample=True, generator=torch.Generator().manual_seed(5))
    second = codec.encode(images, sample=True, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(first, second)
    assert not torch.allclose(first, mean * 0.18215)


def test_scale_override_and_spec_check(tiny_vae_dir):
    codec = LatentCodec.load("d8", tiny_vae_dir, scale=0.5)
    assert codec.spec.scale == 0.5 and codec.spec.channels == 4
    images = _images()
    torch.testing.assert_close(codec.encode(images), codec.encode_moments(images)[0] * 0.5)
    with pytest.raises(UserError, match="16 channels and factor 16"):
        LatentCodec.from_autoencoder(build_tiny_autoencoder_kl(), LATENT_SPECS["d16"])


def test_train_encoder_lets_gradients_reach_the_encoder_only(tiny_vae_dir):
    codec = LatentCodec.load("d8", tiny_vae_dir).train_encoder()
    codec.encode(_images()).square().mean().backward()
    assert codec.autoencoder.encoder.conv_in.weight.grad is not None
    assert not any(p.requires_grad for p in codec.autoencoder.decoder.parameters())


def test_missing_weights_messages(tmp_path):
    with pytest.raises(UserError, match=r"kl16\.ckpt.*MAR.*--vae_path"):
        LatentCodec.load("d16", None)
    with pytest.raises(UserError, match=r"kl16\.ckpt.*--vae_path"):
        LatentCodec.load("d16", tmp_path / "missing.ckpt")
    with pytest.raises(UserError, match=r"sd-vae-ft-ema.*--vae_path"):
        LatentCodec.load("d8", tmp_path / "no_such_folder")
    (tmp_path / "empty_vae").mkdir()
    with pytest.raises(UserError, match=r"empty_vae' has no config.json, so it is not a diffusers"):
        LatentCodec.load("d8", tmp_path / "empty_vae")
    with pytest.raises(ValueError, match="unknown --vae_version"):
        LatentCodec.load("d4", None)


def test_vae_identity_follows_content(tiny_vae_dir, tmp_path):
    copy = tmp_path / "moved_vae"
    shutil.copytree(tiny_vae_dir, copy)
    assert vae_identity("d8", tiny_vae_dir) == vae_identity("d8", copy)
    build_tiny_autoencoder_kl(seed=1).save_pretrained(copy)
    assert vae_identity("d8", tiny_vae_dir) != vae_identity("d8", copy)
    assert vae_identity("d8", None) == "d8:hub:stabilityai/sd-vae-ft-ema"


# ---------------------------------------------------------------------------------------------
# LDM layout: the test writes its own diffusers -> LDM renaming (independent of models.vae), so the
# converter is checked against LDM's naming, not against its own inverse.
# ---------------------------------------------------------------------------------------------

def _tiny_kl16_like():
    """KL-16's topology at width 32: ch_mult (1,1,2,2,4), 2 res blocks, attention in the encoder's lowest
    level and in both mid blocks, none in the decoder's up path, 16 latent channels, factor 16."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4 + ("AttnDownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",) * 5,
        block_out_channels=(32, 32, 64, 64, 128), layers_per_block=2, latent_channels=16,
        norm_num_groups=32,
    ).eval()


def _to_ldm_layout(state_dict, num_levels):
    level = lambda k: str(num_levels - 1 - int(k))  # noqa: E731  diffusers up_blocks run low-res first
    rules = [
        (r"down_blocks\.(\d+)\.resnets\.", lambda m: f"down.{m[1]}.block."),
        (r"down_blocks\.(\d+)\.attentions\.", lambda m: f"down.{m[1]}.attn."),
        (r"down_blocks\.(\d+)\.downsamplers\.0\.", lambda m: f"down.{m[1]}.downsample."),
        (r"up_blocks\.(\d+)\.resnets\.", lambda m: f"up.{level(m[1])}.block."),
        (r"up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"up.{level(m[1])}.upsample."),
        (r"mid_block\.resnets\.(\d)\.", lambda m: f"mid.block_{int(m[1]) + 1}."),
        (r"mid_block\.attentions\.0\.", lambda m: "mid.attn_1."),
        (r"conv_norm_out\.", lambda m: "norm_out."),
        (r"conv_shortcut\.", lambda m: "nin_shortcut."),
        (r"group_norm\.", lambda m: "norm."),
        (r"to_([qkv])\.", lambda m: f"{m[1]}."),
        (r"to_out\.0\.", lambda m: "proj_out."),
    ]
    converted = {}
    for key, tensor in state_dict.items():
        for pattern, replacement in rules:
            key = re.sub(pattern, replacement, key)
        if re.search(r"attn(_1|\.\d+)\.(q|k|v|proj_out)\.weight$", key):
            tensor = tensor[:, :, None, None]  # LDM attention projections are 1x1 convolutions
        converted[key] = tensor.clone()
    return converted


def test_ldm_checkpoint_converts_to_identical_autoencoder(tmp_path):
    original = _tiny_kl16_like()
    ldm = _to_ldm_layout(original.state_dict(), num_levels=5)
    # Spot-check the LDM naming the test produced (these keys exist in MAR's kl16.ckpt).
    assert ldm["encoder.down.4.attn.1.q.weight"].shape == (128, 128, 1, 1)
    assert ldm["decoder.up.3.block.0.nin_shortcut.weight"].shape == (64, 128, 1, 1)
    assert "decoder.up.4.upsample.conv.weight" in ldm and "decoder.up.0.upsample.conv.weight" not in ldm
    assert "encoder.mid.attn_1.proj_out.weight" in ldm and not any(".up.4.attn" in k for k in ldm)
    ldm["loss.discriminator.main.0.weight"] = torch.zeros(1)  # MAR's file also carries the GAN loss
    path = tmp_path / "kl16.ckpt"
    torch.save({"model": ldm}, path)  # MAR's wrapper; LDM/Lightning files use "state_dict"
    torch.save({"state_dict": ldm}, tmp_path / "lightning.ckpt")

    config = ldm_autoencoder_config(ldm)
    assert config.block_out_channels == (32, 32, 64, 64, 128) and config.layers_per_block == 2
    assert config.encoder_attention_levels == (False,) * 4 + (True,)
    assert config.decoder_attention_levels == (False,) * 5 and config.mid_attention
    assert set(ldm_to_diffusers_state_dict(ldm)) == set(original.state_dict())

    codec = LatentCodec.load("d16", tmp_path)  # a folder holding kl16.ckpt works too
    assert codec.spec.scale == 0.2325
    images = _images(n=1, size=32)
    mean, logvar = codec.encode_moments(images)
    with torch.no_grad():
        posterior = original.encode(images).latent_dist
        expected = original.decode(posterior.mean).sample.clamp(-1, 1)
    assert mean.shape == (1, 16, 2, 2)
    assert torch.equal(mean, posterior.mean) and torch.equal(logvar, posterior.logvar)
    with torch.no_grad():
        assert torch.equal(codec.autoencoder.decode(mean).sample.clamp(-1, 1), expected)
    torch.testing.assert_close(codec.decode(mean * 0.2325), expected)  # scale round trip costs an ulp
    lightning = load_ldm_autoencoder(tmp_path / "lightning.ckpt").state_dict()
    assert all(torch.equal(lightning[k], v) for k, v in original.state_dict().items())
    assert vae_identity("d16", path).startswith("d16:kl16.ckpt:sha256=")


def test_non_ldm_file_is_refused(tmp_path):
    path = tmp_path / "kl16.ckpt"
    torch.save({"model": {"blocks.0.weight": torch.zeros(1)}}, path)
    with pytest.raises(UserError, match="not an LDM KL autoencoder"):
        LatentCodec.load("d16", path)
