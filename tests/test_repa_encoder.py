"""REPA's target encoder (DINOv2 via timm, local weights) and its alignment loss, on tiny random weights.

The encoder is checked against tests/dinov2_reference.py, a plain-torch restatement of the official
DINOv2 forward, so loading through timm's definitions is compared with an independent statement.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

from generation.repa import projection_loss
from models.repa import DinoV2Target, encoder_resolution, parse_encoder_list, preprocess_raw_image
from dinov2_reference import DIM, TINY_VIT, hub_state_dict, reference_tokens
from models.dinov2 import build_dinov2
from util.errors import UserError


def test_projection_loss_is_the_negative_mean_cosine():
    # Encoder 1, one image, two tokens: cos([1,0],[1,1]) = 1/sqrt(2), cos([0,1],[0,-2]) = -1.
    # Encoder 2 (z_dim 1): both tokens point the same way, cos = 1 each.
    target_1 = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    projection_1 = torch.tensor([[[1.0, 1.0], [0.0, -2.0]]])
    target_2 = torch.tensor([[[3.0], [-1.0]]])
    projection_2 = torch.tensor([[[0.5], [-4.0]]])
    encoder_1 = -(1 / math.sqrt(2) + -1) / 2
    encoder_2 = -(1 + 1) / 2
    loss = projection_loss([target_1, target_2], [projection_1, projection_2])
    assert loss.shape == (1,)
    assert loss.item() == pytest.approx((encoder_1 + encoder_2) / 2, abs=1e-7)
    with pytest.raises(ValueError, match="token grid"):
        projection_loss([target_1], [projection_1[:, :1]])


def test_encoder_resolution_is_224_per_256_pixels():
    assert encoder_resolution(256) == 224 and encoder_resolution(512) == 448 and encoder_resolution(32) == 28
    with pytest.raises(ValueError, match="divisible by 16"):
        encoder_resolution(40)


@pytest.mark.parametrize("registers", [0, 4])
def test_dinov2_target_loads_hub_weights_and_returns_normed_patch_tokens(tmp_path, registers):
    state = hub_state_dict(registers)
    path = tmp_path / "dinov2_hub.pth"
    torch.save(state, path)
    enc_type = "dinov2reg-vit-b" if registers else "dinov2-vit-b"
    target = DinoV2Target(enc_type, str(path), image_size=32, model_kwargs=TINY_VIT)
    assert target.z_dim == DIM

    images = torch.rand(2, 3, 32, 32) * 2 - 1  # training images in [-1, 1]
    tokens = target(images)
    assert tokens.shape == (2, 4, DIM)  # 28 px -> a 2 x 2 grid, cls (and registers) excluded

    # REPA: x/255 in [0, 1], ImageNet mean/std, bicubic resize to 224/256 of the side; pos table resampled
    # once with timm's resample_abs_pos_embed (its defaults: bicubic, antialias, cls kept in front).
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    inputs = F.interpolate(((images + 1) / 2 - mean) / std, size=28, mode="bicubic")
    torch.testing.assert_close(preprocess_raw_image((images + 1) / 2, 32), inputs)
    pos_embed = resample_abs_pos_embed(state["pos_embed"], [2, 2])
    _, expected = reference_tokens(state, inputs, pos_embed)
    torch.testing.assert_close(tokens, expected, rtol=1e-4, atol=1e-4)
    assert not any(parameter.requires_grad for parameter in target.parameters())


def test_bad_encoder_arguments_are_refused(tmp_path):
    with pytest.raises(UserError, match="do not exist"):
        build_dinov2("vit_base_patch14_dinov2", tmp_path / "missing.pth", 28)
    torch.save({"something": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="does not hold"):
        build_dinov2("vit_base_patch14_dinov2", tmp_path / "other.pth", 28, model_kwargs=TINY_VIT)
    with pytest.raises(ValueError, match="not supported"):
        DinoV2Target("clip-vit-L", "x", 32)
    with pytest.raises(ValueError, match="one local weights file"):
        parse_encoder_list("dinov2-vit-b,dinov2-vit-l", "a.pth")
    assert parse_encoder_list("dinov2-vit-b", "a.pth") == [("dinov2-vit-b", "a.pth")]


def test_usp_target_is_the_pretrained_encoder_on_clean_latents_in_patch_order(tmp_path):
    import json

    from models.layers import get_2d_sincos_pos_embed
    from models.mae import create_mae
    from models.repa import build_target

    tiny = {"embed_dim": 32, "depth": 2, "num_heads": 2, "decoder_embed_dim": 16, "decoder_depth": 1,
            "decoder_num_heads": 2}
    torch.manual_seed(0)
    pretrained = create_mae("vit_base_patch_vae", input_size=32, **tiny)  # pretrained on a 2 x 2 grid
    with torch.no_grad():
        pretrained.cls_token.normal_()
    path = tmp_path / "usp.pth"
    torch.save({"model": pretrained.state_dict(), "epoch": 0,
                "args": {"model": "vit_base_patch_vae", "model_kwargs": json.dumps(tiny), "vae_version": "d8"}}, path)

    target = build_target("usp", path, image_size=64)  # this run: 8 x 8 latents, a 4 x 4 grid
    assert target.z_dim == 32 and target.input_kind == "latents"
    latents = torch.randn(2, 4, 8, 8)
    tokens = target(latents)
    assert tokens.shape == (2, 16, 32)

    # Independently: every patch in order, the 4 x 4 sin-cos table, cls in front, blocks, final norm, cls dropped.
    pos = torch.from_numpy(get_2d_sincos_pos_embed(32, 4, cls_token=True)).float()[None]
    proj = pretrained.patch_embed.proj
    x = F.conv2d(latents, proj.weight, proj.bias, stride=2).flatten(2).transpose(1, 2) + pos[:, 1:]
    x = torch.cat([(pretrained.cls_token + pos[:, :1]).expand(2, -1, -1), x], dim=1)
    for block in pretrained.blocks:
        x = block(x)
    torch.testing.assert_close(tokens, pretrained.norm(x)[:, 1:], rtol=1e-5, atol=1e-5)
