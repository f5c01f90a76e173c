"""Networks in models/: shapes, official parameter names and counts, sin-cos values, MAE masking
and loss, DiT/SiT zero-init, CFG and the SiT-vs-DiT equivalence. Big presets are built on the
`meta` device (no memory, no init cost); forward checks use tiny widths."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from models.dit import DiT, DiT_models
from models.layers import LabelEmbedder, TimestepEmbedder, get_2d_sincos_pos_embed
from models.mae import MAE_MODEL_NAMES, MaskedAutoencoderViT, create_mae, is_pixel_model
from models.sit import SiT, SiT_models
from models.vit import VIT_MODEL_NAMES, VisionTransformer, create_vit

TINY_DIT = dict(input_size=8, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=5)
TINY_MAE = dict(embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Overwrites every parameter with N(0, 0.1) noise so zero-init does not hide differences."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


# ----------------------------------------------------------------------------- layers

def test_sincos_values_follow_the_formula():
    dim, grid = 8, 3
    table = get_2d_sincos_pos_embed(dim, grid)
    assert table.shape == (grid * grid, dim)
    omega = [1.0 / 10000 ** (k / 2) for k in range(2)]  # 1-D dim = 4 -> 2 frequencies
    for h, w in [(0, 0), (1, 2), (2, 1)]:
        row = table[h * grid + w]  # row-major over patches
        # first half encodes the column index w, second half the row index h: [sin | cos] each
        expected = [math.sin(w * omega[0]), math.sin(w * omega[1]), math.cos(w * omega[0]), math.cos(w * omega[1]),
                    math.sin(h * omega[0]), math.sin(h * omega[1]), math.cos(h * omega[0]), math.cos(h * omega[1])]
        np.testing.assert_allclose(row, expected, rtol=0, atol=1e-6)
    with_cls = get_2d_sincos_pos_embed(dim, grid, cls_token=True)
    assert with_cls.shape == (grid * grid + 1, dim)
    assert np.all(with_cls[0] == 0) and np.array_equal(with_cls[1:], table)
    assert get_2d_sincos_pos_embed(dim, grid, extra_tokens=2).shape == (grid * grid + 2, dim)


def test_timestep_embedding_formula_and_label_dropout():
    t = torch.tensor([0.0, 3.0, 0.5])
    emb = TimestepEmbedder.timestep_embedding(t, 6)
    freqs = torch.tensor([10000 ** (-k / 3) for k in range(3)])
    expected = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], dim=1)
    torch.testing.assert_close(emb, expected)
    assert TimestepEmbedder.timestep_embedding(t, 7).shape == (3, 7)

    embedder = LabelEmbedder(num_classes=5, hidden_size=4, dropout_prob=0.1)
    assert embedder.embedding_table.weight.shape == (6, 4)  # + null class
    labels = torch.tensor([0, 1, 2, 3])
    dropped = embedder.token_drop(labels, force_drop_ids=torch.tensor([1, 0, 1, 0]))
    assert dropped.tolist() == [5, 1, 5, 3]
    assert LabelEmbedder(5, 4, 0.0).embedding_table.weight.shape == (5, 4)  # no CFG row without dropout


# ----------------------------------------------------------------------------- DiT / SiT

def official_dit_keys(depth: int, affine_norm: bool) -> set:
    keys = {"pos_embed", "x_embedder.proj.weight", "x_embedder.proj.bias", "y_embedder.embedding_table.weight",
            "final_layer.linear.weight", "final_layer.linear.bias",
            "final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias"}
    keys |= {f"t_embedder.mlp.{i}.{k}" for i in (0, 2) for k in ("weight", "bias")}
    block_parts = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1"]
    if affine_norm:
        block_parts += ["norm1", "norm2"]
    keys |= {f"blocks.{i}.{part}.{k}" for i in range(depth) for part in block_parts for k in ("weight", "bias")}
    return keys


def test_registries_have_every_official_name():
    for prefix, registry in (("DiT", DiT_models), ("SiT", SiT_models)):
        expected = {f"{prefix}-{s}/{p}{v}" for s in ("S", "B", "L", "XL") for p in (2, 4, 8) for v in ("", "-VAE-simple")}
        if prefix == "DiT":
            expected.add("DiT-B/2-VAE-simple-dnln")  # USP's generation/DiT/models.py
        assert set(registry) == expected


def test_dit_sit_presets_on_meta_match_official_sizes():
    official = {"DiT-XL/2": 675_129_632, "DiT-B/2": 130_512_416}
    sizes = {"S": (384, 12), "B": (768, 12), "L": (1024, 24), "XL": (1152, 28)}
    with torch.device("meta"):
        counts = {}
        for registry in (DiT_models, SiT_models):
            for name, build in registry.items():
                model = build()
                counts[name] = n_params(model)
                size = name.split("-")[1].split("/")[0]
                width, depth = sizes[size]
                assert model.pos_embed.shape[-1] == width and len(model.blocks) == depth, name
                assert not model.pos_embed.requires_grad
    print("\n".join(f"{k}: {v:,}" for k, v in counts.items() if k.endswith("/2")))
    for name, count in official.items():
        assert counts[name] == count
        assert counts["SiT" + name[3:]] == count  # SiT is the same network
    # -VAE-simple adds exactly 2 LayerNorms (weight + bias) per block.
    assert counts["DiT-XL/2-VAE-simple"] - counts["DiT-XL/2"] == 28 * 4 * 1152


def test_dit_xl2_state_dict_matches_official_names_and_shapes():
    with torch.device("meta"):
        model = DiT_models["DiT-XL/2"]()
        simple = DiT_models["DiT-XL/2-VAE-simple"]()
    state = model.state_dict()
    assert set(state) == official_dit_keys(28, affine_norm=False)
    assert set(simple.state_dict()) == official_dit_keys(28, affine_norm=True)
    assert state["pos_embed"].shape == (1, 256, 1152)
    assert state["x_embedder.proj.weight"].shape == (1152, 4, 2, 2)
    assert state["y_embedder.embedding_table.weight"].shape == (1001, 1152)
    assert state["blocks.0.attn.qkv.weight"].shape == (3456, 1152)
    assert state["blocks.0.mlp.fc1.weight"].shape == (4608, 1152)
    assert state["blocks.0.adaLN_modulation.1.weight"].shape == (6912, 1152)
    assert state["final_layer.linear.weight"].shape == (32, 1152)  # 2*2 patch * 8 channels (learn_sigma)


@pytest.mark.parametrize("model_class", [DiT, SiT])
@pytest.mark.parametrize("affine_norm", [False, True])
def test_fresh_models_output_exact_zeros_with_right_shapes(model_class, affine_norm):
    torch.manual_seed(0)
    model = model_class(**TINY_DIT, affine_norm=affine_norm)
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([1.0, 500.0, 999.0]), torch.tensor([0, 4, 2])
    out = model(x, t, y)
    expected_channels = 8 if model_class is DiT else 4
    assert out.shape == (3, expected_channels, 8, 8)
    assert torch.count_nonzero(out) == 0
    # the sin-cos table is installed and frozen
    table = torch.from_numpy(get_2d_sincos_pos_embed(32, 4)).float()
    torch.testing.assert_close(model.pos_embed[0], table)
    no_sigma = model_class(**TINY_DIT, learn_sigma=False, affine_norm=affine_norm)
    assert no_sigma(x, t, y).shape == (3, 4, 8, 8)


def test_vae_simple_starts_as_the_same_function_as_dit():
    dit = randomize_(DiT(**TINY_DIT)).eval()
    simple = DiT(**TINY_DIT, affine_norm=True).eval()
    missing, unexpected = simple.load_state_dict(dit.state_dict(), strict=False)
    assert unexpected == [] and set(missing) == {f"blocks.{i}.norm{j}.{k}" for i in range(2) for j in (1, 2) for k in ("weight", "bias")}
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 700.0]), torch.tensor([1, 2])
    torch.testing.assert_close(simple(x, t, y), dit(x, t, y))


def test_sit_equals_first_channels_of_dit_with_same_weights():
    dit = randomize_(DiT(**TINY_DIT)).eval()
    sit = SiT(**TINY_DIT).eval()
    sit.load_state_dict(dit.state_dict(), strict=True)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([0.25, 0.9]), torch.tensor([3, 0])
    torch.testing.assert_close(sit(x, t, y), dit(x, t, y)[:, :4], rtol=0, atol=0)


def cfg_inputs(t_values):
    torch.manual_seed(1)
    x_half = torch.randn(2, 4, 8, 8)
    x = torch.cat([x_half, torch.randn_like(x_half)])  # second half must be ignored
    t = torch.tensor(t_values * 2)
    y = torch.tensor([1, 3, 5, 5])  # 5 = null class of a 5-class model
    return x_half, x, t, y


@pytest.mark.parametrize("model_class", [DiT, SiT])
def test_cfg_scale_one_is_the_conditional_output(model_class):
    model = randomize_(model_class(**TINY_DIT)).eval()
    x_half, x, t, y = cfg_inputs([10.0, 600.0])
    with torch.no_grad():
        guided = model.forward_with_cfg(x, t, y, cfg_scale=1.0, guidance_channels=None)
        cond = model(x_half, t[:2], y[:2])
    c = model.in_channels
    torch.testing.assert_close(guided[:2, :c], cond[:, :c])
    torch.testing.assert_close(guided[2:, :c], cond[:, :c])


def test_cfg_guidance_channels_and_interval():
    model = randomize_(DiT(**TINY_DIT)).eval()
    x_half, x, t, y = cfg_inputs([10.0, 600.0])
    scale = 4.0
    with torch.no_grad():
        cond = model(x_half, t[:2], y[:2])
        uncond = model(x_half, t[2:], y[2:])
        legacy = model.forward_with_cfg(x, t, y, scale)
        all_channels = model.forward_with_cfg(x, t, y, scale, guidance_channels=None)
        interval = model.forward_with_cfg(x, t, y, scale, guidance_channels=None, guidance_interval=(0, 100))
    guided = uncond + scale * (cond - uncond)
    # legacy: first 3 channels guided (both halves), channel 3 and the sigma channels are each half's own output
    torch.testing.assert_close(legacy[:2, :3], guided[:, :3])
    torch.testing.assert_close(legacy[2:, :3], guided[:, :3])
    torch.testing.assert_close(legacy[:2, 3:], cond[:, 3:])
    torch.testing.assert_close(legacy[2:, 3:], uncond[:, 3:])
    # all channels: every prediction channel guided, sigma channels never
    torch.testing.assert_close(all_channels[:2, :4], guided[:, :4])
    torch.testing.assert_close(all_channels[:2, 4:], cond[:, 4:])
    assert not torch.allclose(all_channels[:2, 3], legacy[:2, 3])
    # interval [0, 100]: t=10 guided, t=600 conditional only
    torch.testing.assert_close(interval[0, :4], guided[0, :4])
    torch.testing.assert_close(interval[1, :4], cond[1, :4])
    with pytest.raises(ValueError, match="guidance_channels"):
        model.forward_with_cfg(x, t, y, scale, guidance_channels=5)


# ----------------------------------------------------------------------------- MAE

def official_mae_keys(depth: int, decoder_depth: int) -> set:
    block = ["norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"]
    wb = ("weight", "bias")
    keys = {"cls_token", "pos_embed", "mask_token", "decoder_pos_embed"}
    keys |= {f"{m}.{k}" for m in ("patch_embed.proj", "norm", "decoder_embed", "decoder_norm", "decoder_pred") for k in wb}
    keys |= {f"blocks.{i}.{part}.{k}" for i in range(depth) for part in block for k in wb}
    keys |= {f"decoder_blocks.{i}.{part}.{k}" for i in range(decoder_depth) for part in block for k in wb}
    return keys


def test_mae_presets_on_meta():
    official = {"mae_vit_base_patch16": 111_907_840}
    widths = {"base": (768, 12), "large": (1024, 24), "xlarge": (1152, 28), "huge": (1280, 32)}
    with torch.device("meta"):
        # The LightningDiT-block presets have LightningDiT's block names (tests/test_mae_lightningdit.py).
        models = {name: create_mae(name, 224) for name in MAE_MODEL_NAMES if not name.startswith("lightningdit_")}
    for name, model in models.items():
        width, depth = next(v for k, v in widths.items() if f"_{k}_" in name)
        assert model.pos_embed.shape == (1, model.patch_embed.num_patches + 1, width), name
        assert set(model.state_dict()) == official_mae_keys(depth, 8), name
        print(f"{name}: {n_params(model):,}")
    for name, count in official.items():
        assert n_params(models[name]) == count
    assert models["mae_vit_huge_patch14"].patch_embed.proj.weight.shape == (1280, 3, 14, 14)
    # latent presets at 224 px with SD-VAE: 28x28x4 latents, 2x2 patches (4x4 for `_2`)
    assert models["vit_base_patch_vae"].patch_embed.proj.weight.shape == (768, 4, 2, 2)
    assert models["vit_large_patch_vae_2"].patch_embed.proj.weight.shape == (1024, 4, 4, 4)
    assert models["vit_base_patch_vae"].decoder_pred.weight.shape == (2 * 2 * 4, 512)


def test_create_mae_derives_latent_geometry_and_rejects_bad_names():
    with torch.device("meta"):
        d16 = create_mae("vit_base_patch_vae", 256, vae_version="d16")
        d16_2 = create_mae("vit_base_patch_vae_2", 256, vae_version="d16")
        d8 = create_mae("vit_large_patch_vae", 256)
        pixel = create_mae("mae_vit_base_patch16", 64, vae_version="d8")
    assert (d16.patch_embed.proj.weight.shape, d16.pos_embed.shape[1]) == ((768, 16, 1, 1), 257)
    assert d16_2.patch_embed.proj.weight.shape == (768, 16, 2, 2)
    assert (d8.patch_embed.proj.weight.shape, d8.pos_embed.shape[1]) == ((1024, 4, 2, 2), 257)
    assert pixel.patch_embed.proj.weight.shape == (768, 3, 16, 16) and pixel.pos_embed.shape[1] == 17
    assert is_pixel_model("mae_vit_large_patch16") and not is_pixel_model("vit_huge_patch_vae")
    with pytest.raises(ValueError, match="vit_base_patch_vae"):
        create_mae("mae_vit_tiny", 224)
    with pytest.raises(ValueError, match="divisible"):
        create_mae("vit_base_patch_vae", 60)


def tiny_mae(**kwargs) -> MaskedAutoencoderViT:
    torch.manual_seed(0)
    return create_mae("vit_base_patch_vae", 64, **{**TINY_MAE, **kwargs})  # 8x8x4 latents, 2x2 patches, L=16


def manual_patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, L, p*p*C) with (row, col, channel) order inside a patch, via unfold."""
    n, c = imgs.shape[:2]
    patches = imgs.unfold(2, p, p).unfold(3, p, p)  # (N, C, h, w, p, p)
    return patches.permute(0, 2, 3, 4, 5, 1).reshape(n, -1, p * p * c)


def test_mae_patchify_round_trip():
    model = tiny_mae()
    imgs = torch.randn(2, 4, 8, 8)
    patches = model.patchify(imgs)
    torch.testing.assert_close(patches, manual_patchify(imgs, 2))
    torch.testing.assert_close(model.unpatchify(patches), imgs)


def test_mae_masking_keeps_the_right_tokens_and_uses_given_noise():
    model = tiny_mae()
    x = torch.randn(3, 16, 32)
    noise = torch.rand(3, 16)
    kept, mask, ids_restore = model.random_masking(x, 0.75, noise)
    assert kept.shape == (3, 4, 32)  # int(16 * 0.25)
    assert mask.sum(dim=1).tolist() == [12.0, 12.0, 12.0]
    for i in range(3):
        visible = torch.argsort(noise[i])[:4]  # smallest noise is kept
        assert set(torch.nonzero(mask[i] == 0).flatten().tolist()) == set(visible.tolist())
        torch.testing.assert_close(kept[i], x[i, visible])
    again = model.random_masking(x, 0.75, noise.clone())[1]
    assert torch.equal(again, mask)
    assert model.random_masking(x, 0.6)[0].shape[1] == int(16 * 0.4)
    with pytest.raises(ValueError, match="noise"):
        model.random_masking(x, 0.75, torch.rand(3, 15))


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_mae_loss_is_mse_over_masked_patches_only(norm_pix_loss):
    model = tiny_mae(norm_pix_loss=norm_pix_loss)
    imgs = torch.randn(2, 4, 8, 8)
    target_imgs = torch.randn(2, 4, 8, 8)
    noise = torch.rand(2, 16)
    loss, pred, mask = model(imgs, mask_ratio=0.75, target=target_imgs, noise=noise)
    assert pred.shape == (2, 16, 16) and mask.shape == (2, 16) and mask.sum() == 24
    target = manual_patchify(target_imgs, 2)
    if norm_pix_loss:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    per_patch = ((pred - target) ** 2).mean(-1)
    expected = per_patch[mask.bool()].mean()
    torch.testing.assert_close(loss, expected)
    assert not torch.isclose(loss, per_patch.mean())  # visible patches really are excluded
    default_target_loss = model(imgs, mask_ratio=0.75, noise=noise)[0]
    target = manual_patchify(imgs, 2)
    if norm_pix_loss:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    torch.testing.assert_close(default_target_loss, ((pred - target) ** 2).mean(-1)[mask.bool()].mean())


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_mae_norm_image_follows_usp(norm_pix_loss):
    """USP's models_mae.forward_loss: with norm_pix_loss, norm_image normalises the target per image
    (mean, unbiased var over all patches and channels); alone it changes nothing; the input is never normalised."""
    imgs = torch.randn(2, 4, 8, 8) * torch.tensor([3.0, 0.5]).view(2, 1, 1, 1) + 2.0
    model = tiny_mae(norm_image=True, norm_pix_loss=norm_pix_loss)
    noise = torch.rand(2, 16)
    loss, pred, mask = model(imgs, noise=noise)
    plain_pred = tiny_mae(norm_pix_loss=norm_pix_loss)(imgs, noise=noise)[1]  # same weights, no norm_image
    torch.testing.assert_close(pred, plain_pred)  # the encoder saw the raw input
    target = manual_patchify(imgs, 2)  # (N, L, D)
    if norm_pix_loss:
        flat = target.reshape(2, -1)
        count = flat.shape[1]
        mean = flat.sum(1) / count
        var = ((flat - mean[:, None]) ** 2).sum(1) / (count - 1)
        target = (target - mean.view(2, 1, 1)) / (var.view(2, 1, 1) + 1e-6).sqrt()
    expected = ((pred - target) ** 2).mean(-1)[mask.bool()].mean()
    torch.testing.assert_close(loss, expected)


def test_mae_rejects_wrong_input_and_mask_ratio():
    model = tiny_mae()
    with pytest.raises(ValueError, match="input_size"):
        model(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="mask_ratio"):
        model(torch.randn(2, 4, 8, 8), mask_ratio=1.0)


# ----------------------------------------------------------------------------- ViT

def test_vit_presets_on_meta_match_official_sizes():
    official = {"vit_base_patch16": 86_567_656, "vit_large_patch16": 304_326_632, "vit_huge_patch14": 632_045_800}
    with torch.device("meta"):
        models = {name: create_vit(name, 224) for name in VIT_MODEL_NAMES}
        token = create_vit("vit_base_patch16_vae", 224, global_pool=False)
    for name, model in models.items():
        print(f"{name}: {n_params(model):,}")
    for name, count in official.items():
        assert n_params(models[name]) == count
    xl = models["vit_xlarge_patch16_vae"]
    assert (xl.embed_dim, len(xl.blocks), xl.blocks[0].attn.num_heads) == (1152, 28, 16)
    assert xl.patch_embed.proj.weight.shape == (1152, 4, 2, 2) and xl.pos_embed.shape == (1, 197, 1152)
    keys = set(models["vit_base_patch16_vae"].state_dict())
    assert {"fc_norm.weight", "fc_norm.bias", "head.weight"} <= keys and "norm.weight" not in keys
    token_keys = set(token.state_dict())
    assert {"norm.weight", "norm.bias"} <= token_keys and "fc_norm.weight" not in token_keys


@pytest.mark.parametrize("global_pool", [True, False])
def test_vit_forward_pools_like_mae(global_pool):
    torch.manual_seed(0)
    model = create_vit("vit_base_patch16_vae", 32, num_classes=7, global_pool=global_pool,
                       embed_dim=32, depth=1, num_heads=2).eval()
    assert isinstance(model, VisionTransformer)
    x = torch.randn(2, 4, 4, 4)
    with torch.no_grad():
        logits = model(x)
        tokens = torch.cat([model.cls_token.expand(2, -1, -1), model.patch_embed(x)], dim=1) + model.pos_embed
        for blk in model.blocks:
            tokens = blk(tokens)
        pooled = model.fc_norm(tokens[:, 1:].mean(1)) if global_pool else model.norm(tokens)[:, 0]
    assert logits.shape == (2, 7)
    torch.testing.assert_close(logits, model.head(pooled))


def test_mae_encoder_weights_fit_vit_and_vae_simple_dit_blocks():
    with torch.device("meta"):
        mae = create_mae("vit_base_patch_vae", 224)
        vit = create_vit("vit_base_patch16_vae", 224)
        dit = DiT_models["DiT-B/2-VAE-simple"]()
    mae_state, vit_state, dit_state = mae.state_dict(), vit.state_dict(), dit.state_dict()
    encoder = {k: v for k, v in mae_state.items() if not k.startswith(("decoder", "mask_token")) and k != "norm.weight" and k != "norm.bias"}
    for key, value in encoder.items():
        assert vit_state[key].shape == value.shape, key
    for key, value in encoder.items():
        if key.startswith("blocks."):
            assert dit_state[key].shape == value.shape, key
    assert dit_state["x_embedder.proj.weight"].shape == mae_state["patch_embed.proj.weight"].shape


def test_bf16_autocast_forward_runs_for_dit_and_mae():
    dit = randomize_(DiT(**TINY_DIT))
    mae = tiny_mae()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dit(torch.randn(2, 4, 8, 8), torch.tensor([1.0, 2.0]), torch.tensor([0, 1]))
        loss = mae(torch.randn(2, 4, 8, 8))[0]
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_usp_model_names_build_the_official_shapes(monkeypatch):
    """USP's models_mae: mae_vit_xlarge_patch16 = patch 16, 1152 wide, 28 deep, 16 heads; vit_base_patch2_vae =
    patch 2, 768/12/12; both with the 512-d, 8-block, 16-head decoder. USP's DiT-B/2-VAE-simple-dnln is DiT-B/2
    with non-affine block norms, i.e. DiT-B/2's parameters."""
    import models.mae as mae_module
    from models.dit import DiT_models

    captured = {}
    monkeypatch.setattr(mae_module, "MaskedAutoencoderViT", lambda **kwargs: captured.update(kwargs) or kwargs)
    official = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4)
    create_mae("mae_vit_xlarge_patch16", 256)
    assert {k: captured[k] for k in ("patch_size", "embed_dim", "depth", "num_heads", "in_chans", "img_size",
                                     *official)} == dict(patch_size=16, embed_dim=1152, depth=28, num_heads=16,
                                                         in_chans=3, img_size=256, **official)
    create_mae("vit_base_patch2_vae", 256)
    assert {k: captured[k] for k in ("patch_size", "embed_dim", "depth", "num_heads", "in_chans", "img_size")} == \
        dict(patch_size=2, embed_dim=768, depth=12, num_heads=12, in_chans=4, img_size=32)
    small = dict(input_size=4, depth=1, hidden_size=24, num_heads=2)
    dnln = DiT_models["DiT-B/2-VAE-simple-dnln"](**small).state_dict()
    plain = DiT_models["DiT-B/2"](**small).state_dict()
    assert {k: v.shape for k, v in dnln.items()} == {k: v.shape for k, v in plain.items()}
    assert "blocks.0.norm1.weight" not in dnln
