"""USP/MAE checkpoint -> DiT / SiT / ViT initialisation (USP's --finetune)."""
import argparse

import pytest
import torch
import torch.nn.functional as F

from models.dit import DiT_models
from models.mae import create_mae
from models.sit import SiT_models
from models.transfer import transfer_pretrained
from models.vit import create_vit
from util.errors import UserError

WIDTH, HEADS = 32, 2


def _mae(input_size=48, width=WIDTH, depth=2, **kwargs):
    """Tiny latent MAE: 48 px -> 6x6 latents, 2x2 patches -> a 3x3 grid (+ cls)."""
    torch.manual_seed(0)
    return create_mae("vit_base_patch_vae", input_size, embed_dim=width, depth=depth, num_heads=HEADS,
                      decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=HEADS, **kwargs)


def _dit(family=DiT_models, name="DiT-B/2-VAE-simple", latent_size=8, width=WIDTH, depth=3):
    """Tiny DiT on 8x8 latents: a 4x4 grid, so the MAE's 3x3 positions must be resized."""
    torch.manual_seed(1)
    return family[name](input_size=latent_size, hidden_size=width, depth=depth, num_heads=HEADS, num_classes=4)


def _resized_grid(pos_embed, side):
    """Reference resize written out in the test: drop cls, (1, g*g, D) -> bicubic (side, side)."""
    grid = pos_embed[:, 1:]
    g = int(grid.shape[1] ** 0.5)
    grid = grid.reshape(1, g, g, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(side, side), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, side * side, -1)


def test_mae_to_dit_vae_simple_loads_blocks_and_resizes_positions():
    mae, dit = _mae(), _dit()
    source = mae.state_dict()
    report = transfer_pretrained(dit, {"model": source, "epoch": 3})
    target = dit.state_dict()

    for i in range(2):
        for leaf in ("norm1.weight", "attn.qkv.weight", "attn.proj.bias", "norm2.bias", "mlp.fc2.weight"):
            assert torch.equal(target[f"blocks.{i}.{leaf}"], source[f"blocks.{i}.{leaf}"])
    assert torch.equal(target["x_embedder.proj.weight"], source["patch_embed.proj.weight"])
    assert report.renamed == {"patch_embed.proj.weight": "x_embedder.proj.weight",
                              "patch_embed.proj.bias": "x_embedder.proj.bias"}
    assert report.resized == {"pos_embed": ((1, 10, WIDTH), (1, 16, WIDTH))}
    torch.testing.assert_close(target["pos_embed"], _resized_grid(source["pos_embed"], 4))

    # DiT's own parts (and the third block, absent from the 2-deep MAE) keep their initialisation.
    assert {"t_embedder.mlp.0.weight", "y_embedder.embedding_table.weight", "final_layer.linear.weight",
            "blocks.0.adaLN_modulation.1.weight", "blocks.2.attn.qkv.weight"} <= set(report.initialised)
    assert set(report.loaded).isdisjoint(report.initialised)
    assert set(report.loaded) | set(report.initialised) == set(target)
    assert {"cls_token", "mask_token", "norm.weight", "decoder_pred.weight"} <= set(report.ignored)
    assert "x_embedder.proj.weight" in report.loaded and "patch_embed.proj.weight" not in report.ignored
    # adaLN-Zero survives the transfer: the initialised DiT still predicts zeros.
    dit.eval()
    out = dit(torch.randn(2, 4, 8, 8), torch.tensor([3, 500]), torch.tensor([0, 1]))
    assert torch.equal(out, torch.zeros_like(out))

    text = str(report)
    assert "blocks[0-1]: norm1, attn, norm2, mlp - 24 tensors" in text
    assert "blocks[0-2]: adaLN_modulation - 6 tensors" in text
    assert "grid 3x3 -> 4x4 bicubic" in text and "from patch_embed.proj" in text


def test_sit_from_file_with_layer_cut(tmp_path):
    mae, sit = _mae(), _dit(SiT_models, "SiT-B/2", depth=2)
    path = tmp_path / "checkpoint-799.pth"
    # Official MAE/USP checkpoints pickle argparse.Namespace args; weights_only loading must allow it.
    torch.save({"model": mae.state_dict(), "args": argparse.Namespace(model="vit_base_patch_vae")}, path)
    report = transfer_pretrained(sit, path, use_pretrain_layer=1)

    assert report.source == str(path)
    assert torch.equal(sit.blocks[0].attn.qkv.weight, mae.blocks[0].attn.qkv.weight)
    assert not torch.equal(sit.blocks[1].attn.qkv.weight, mae.blocks[1].attn.qkv.weight)
    assert "blocks.1.attn.qkv.weight" in report.initialised
    assert report.reasons["blocks.1.mlp.fc1.weight"] == "beyond --use-pretrain-layer 1"
    # Plain SiT has non-affine LayerNorms, so MAE's norm1/norm2 have nowhere to go.
    assert report.reasons["blocks.0.norm1.weight"] == "not in the model"
    assert "beyond --use-pretrain-layer 1" in str(report)
    with pytest.raises(UserError, match=r"--use-pretrain-layer 5 is outside 0\.\.2"):
        transfer_pretrained(sit, path, use_pretrain_layer=5)


@pytest.mark.parametrize("global_pool", [True, False])
def test_mae_to_vit_keeps_cls_and_reinitialises_head(global_pool):
    mae = _mae()
    torch.manual_seed(2)
    vit = create_vit("vit_base_patch16_vae", 64, embed_dim=WIDTH, depth=2, num_heads=HEADS, num_classes=4,
                     global_pool=global_pool)
    source = mae.state_dict()
    report = transfer_pretrained(vit, source)  # a raw state dict works as well as {"model": ...}

    assert torch.equal(vit.cls_token, mae.cls_token)
    assert vit.pos_embed.shape == (1, 17, WIDTH)
    assert torch.equal(vit.pos_embed[:, :1], mae.pos_embed[:, :1])  # cls position kept
    torch.testing.assert_close(vit.pos_embed[:, 1:], _resized_grid(source["pos_embed"], 4))
    assert torch.equal(vit.patch_embed.proj.weight, mae.patch_embed.proj.weight)
    assert {"head.weight", "head.bias"} <= set(report.initialised)
    assert vit.head.weight.std() < 1e-4 and torch.equal(vit.head.bias, torch.zeros(4))
    assert any("trunc_normal(std=2e-05)" in note for note in report.notes)
    if global_pool:  # MAE fine-tuning: fc_norm is new, the encoder's final norm is not used
        assert {"fc_norm.weight", "fc_norm.bias"} <= set(report.initialised)
        assert "norm.weight" in report.ignored
    else:
        assert torch.equal(vit.norm.weight, mae.norm.weight) and "norm.weight" in report.loaded


def test_patch_embedding_with_other_channels_is_skipped_whole():
    pixel_mae = _mae(img_size=8, in_chans=3, patch_size=2)  # 3-channel input, 4x4 grid like the DiT
    dit = _dit()
    report = transfer_pretrained(dit, pixel_mae.state_dict())
    assert {"x_embedder.proj.weight", "x_embedder.proj.bias"} <= set(report.initialised)
    assert "(32, 3, 2, 2) but the model has (32, 4, 2, 2)" in report.reasons["patch_embed.proj.weight"]
    assert "skipped too" in report.reasons["patch_embed.proj.bias"]
    # Same grid: only the cls position goes, the rest is copied as is.
    assert report.resized["pos_embed"] == ((1, 17, WIDTH), (1, 16, WIDTH))
    assert torch.equal(dit.pos_embed, pixel_mae.pos_embed[:, 1:])
    assert torch.equal(dit.blocks[1].mlp.fc1.weight, pixel_mae.blocks[1].mlp.fc1.weight)


def test_checkpoint_of_another_width_names_both_shapes():
    mae, dit = _mae(width=32), _dit(width=48)
    with pytest.raises(UserError) as error:
        transfer_pretrained(dit, mae.state_dict())
    message = str(error.value)
    assert "checkpoint blocks.0.attn.qkv.weight is (96, 32) but the model expects (144, 48)" in message
    assert "width 32 but the model has width 48" in message


def test_unrelated_checkpoints_are_refused(tmp_path):
    with pytest.raises(UserError, match="no tensor of the pretrained checkpoint matches"):
        transfer_pretrained(_dit(), {"model": {"encoder.conv_in.weight": torch.zeros(8, 3, 3, 3)}})
    with pytest.raises(UserError, match="does not exist; check the --finetune path"):
        transfer_pretrained(_dit(), tmp_path / "missing.pth")
    with pytest.raises(UserError, match="holds no tensors"):
        transfer_pretrained(_dit(), {"epoch": 3})
