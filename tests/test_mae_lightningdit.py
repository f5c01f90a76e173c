"""USP encoder of LightningDiT blocks: pretraining step on 32-channel f16 latents, RoPE by grid position
under masking, and the USP -> LightningDiT transfer loading every encoder tensor."""
import pytest
import torch

from models.lightningdit import LightningDiT
from models.mae import MaskedAutoencoderViT
from models.mae import LATENT_MODELS, MaskedAutoencoderLightningDiT
from models.transfer import transfer_pretrained
from util.errors import UserError

TINY_ENC = dict(img_size=4, patch_size=1, in_chans=32, embed_dim=32, depth=2, num_heads=2,
                decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
TINY_DIT = dict(input_size=4, patch_size=1, in_channels=32, hidden_size=32, depth=2, num_heads=2, num_classes=5,
                use_swiglu=True, use_rope=True, use_rmsnorm=True)


def _randomized(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def test_pretraining_step_on_vavae_latents():
    model = MaskedAutoencoderLightningDiT(**TINY_ENC)
    latents = torch.randn(2, 32, 4, 4)
    loss, pred, mask = model(latents, mask_ratio=0.75)
    assert pred.shape == (2, 16, 32) and mask.sum() == 2 * 12
    loss.backward()
    assert model.blocks[0].mlp.w12.weight.grad is not None and torch.isfinite(loss)
    assert "rope_cos" not in model.state_dict()  # rebuilt from the grid, never saved


def test_each_kept_token_is_rotated_by_its_own_grid_position():
    model = _randomized(MaskedAutoencoderLightningDiT(**TINY_ENC)).eval()
    latents = torch.randn(1, 32, 4, 4)
    kept = [5, 2, 11, 14]
    # Noise ranks the kept tokens first; two orders of the same kept set give the same per-token features.
    forward_order = torch.ones(1, 16)
    reverse_order = torch.ones(1, 16)
    for rank, token in enumerate(kept):
        forward_order[0, token] = 0.1 * rank
        reverse_order[0, token] = 0.1 * (len(kept) - rank)
    with torch.no_grad():
        out_a, _, restore_a = model.forward_encoder(latents, 0.75, forward_order)
        out_b, _, restore_b = model.forward_encoder(latents, 0.75, reverse_order)
    by_token_a = dict(zip(torch.argsort(restore_a[0])[:4].tolist(), out_a[0, 1:]))
    by_token_b = dict(zip(torch.argsort(restore_b[0])[:4].tolist(), out_b[0, 1:]))
    assert set(by_token_a) == set(kept)
    for token in kept:
        torch.testing.assert_close(by_token_a[token], by_token_b[token], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_a[0, 0], out_b[0, 0], rtol=1e-5, atol=1e-5)  # cls sees the same set


def test_usp_checkpoint_transfers_every_encoder_tensor_into_lightningdit():
    encoder = _randomized(MaskedAutoencoderLightningDiT(**TINY_ENC))
    state = encoder.state_dict()
    model = LightningDiT(**TINY_DIT)
    report = transfer_pretrained(model, {"model": state})
    encoder_tensors = [k for k in state if k.startswith(("blocks.", "patch_embed.", "pos_embed"))]
    target = model.state_dict()
    for name in encoder_tensors:
        model_name = name.replace("patch_embed.", "x_embedder.")
        assert model_name in report.loaded, name
        if name != "pos_embed":
            assert torch.equal(target[model_name], state[name]), name
    assert torch.equal(target["pos_embed"], state["pos_embed"][:, 1:])  # cls position dropped, same grid
    assert set(report.ignored) == {k for k in state if k not in encoder_tensors}  # cls, norm, decoder, mask token
    assert not any(n.startswith("feat_rope") for n in report.initialised)
    assert any("feat_rope" in note for note in report.notes)
    assert all(n.startswith(("t_embedder", "y_embedder", "final_layer")) or "adaLN_modulation" in n
               for n in report.initialised)
    assert "blocks[0-1]: norm1, norm2, attn, mlp - 20 tensors" in str(report)


def test_vit_encoder_is_refused_for_lightningdit():
    vit = MaskedAutoencoderViT(img_size=4, patch_size=1, in_chans=32, embed_dim=32, depth=2, num_heads=2,
                               decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    with pytest.raises(UserError, match=r"not LightningDiT blocks.*lightningdit_\*_patch_vae"):
        transfer_pretrained(LightningDiT(**TINY_DIT), {"model": vit.state_dict()})


def test_presets_match_lightningdit_sizes():
    with torch.device("meta"):
        encoder = LATENT_MODELS["lightningdit_xlarge_patch_vae"][0]()
        model = LightningDiT(input_size=16, patch_size=1, in_channels=32, use_swiglu=True, use_rope=True,
                             use_rmsnorm=True)
    target = model.state_dict()
    for name, tensor in encoder.state_dict().items():
        if name.startswith("blocks."):
            assert target[name].shape == tensor.shape, name
    assert len(encoder.blocks) == len(model.blocks) == 28


def test_usp_encoder_transfers_into_the_classifier_for_linear_probing():
    from models.vit_lightningdit import LightningViT

    encoder = _randomized(MaskedAutoencoderLightningDiT(**TINY_ENC))
    classifier = LightningViT(img_size=4, patch_size=1, in_chans=32, num_classes=3, embed_dim=32, depth=2,
                              num_heads=2, global_pool=False)
    report = transfer_pretrained(classifier, {"model": encoder.state_dict()})
    assert {"cls_token", "pos_embed", "norm.weight", "patch_embed.proj.weight"} <= set(report.loaded)
    assert set(report.initialised) == {"head.weight", "head.bias"}
    # With no token masked, the encoder's blocks compute what the classifier's do on the full grid.
    latents = torch.randn(2, 32, 4, 4)
    with torch.no_grad():
        features = classifier.forward_features(latents)
        tokens = classifier.patch_embed(latents) + encoder.pos_embed[:, 1:]
        x = torch.cat([(encoder.cls_token + encoder.pos_embed[:, :1]).expand(2, -1, -1), tokens], dim=1)
        rope = encoder._masked_rope(torch.arange(16).expand(2, 16))
        for block in encoder.blocks:
            x = block(x, rope=rope)
    torch.testing.assert_close(features, encoder.norm(x)[:, 0])
    assert classifier(latents).shape == (2, 3)
