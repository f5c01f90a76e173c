"""DiT backbones as classifiers for linear probing (USP's pretrain/models_dit.py), on tiny CPU models."""
import pytest
import torch

from models.dit import DiT_models
from models.dit_classifier import DIT_CLASSIFIERS, load_dit_backbone

TINY = dict(hidden_size=32, depth=3, num_heads=2)


def perturbed(model, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model.eval()


def test_forward_is_usps_trunk_at_t0_with_the_null_label():
    """USP models_dit.DiT.forward: x_embedder + pos_embed; t = 0, y = null; c = t_emb + y_emb; blocks; mean; head."""
    model = perturbed(DIT_CLASSIFIERS["dit_base_patch16_vae"](img_size=8, in_chans=4, num_classes=5,
                                                              label_classes=7, **TINY))
    x = torch.randn(3, 4, 8, 8)
    tokens = model.x_embedder(x) + model.pos_embed
    t_emb = model.t_embedder(torch.zeros(3, dtype=torch.long))
    c = t_emb + model.y_embedder.embedding_table.weight[7].expand(3, -1)  # row 7 = the null label of 7 classes
    for block in model.blocks:
        tokens = block(tokens, c)
    torch.testing.assert_close(model(x), model.head(tokens.mean(dim=1)))


def test_loads_the_model_weights_of_a_dit_checkpoint_and_skips_depth():
    dit = perturbed(DiT_models["DiT-B/2-VAE-simple"](input_size=8, num_classes=7, **TINY), seed=1)
    ema = perturbed(DiT_models["DiT-B/2-VAE-simple"](input_size=8, num_classes=7, **TINY), seed=2)
    probe = DIT_CLASSIFIERS["dit_base_patch16_vae"](img_size=8, in_chans=4, num_classes=5, label_classes=7,
                                                    skip_depth=1, **TINY)
    head = probe.head.weight.clone()
    fresh = load_dit_backbone(probe, {"model": dit.state_dict(), "ema": ema.state_dict()})
    assert len(probe.blocks) == 2 and fresh == ["head.weight", "head.bias"]
    for key, value in probe.state_dict().items():
        if not key.startswith("head."):
            assert torch.equal(value, dit.state_dict()[key]), key  # USP probes checkpoint['model'], not 'ema'
    assert torch.equal(probe.head.weight, head)
    wide = DIT_CLASSIFIERS["dit_base_patch16_vae"](img_size=8, in_chans=4, num_classes=5, label_classes=7,
                                                   hidden_size=48, depth=3, num_heads=2)
    with pytest.raises(ValueError, match="does not fit"):
        load_dit_backbone(wide, dit.state_dict())


@pytest.mark.slow
def test_linprobe_of_a_dit_checkpoint_runs_end_to_end(tiny_image_folder, tiny_vae_dir, tmp_path):
    import json

    from pretrain import main_linprobe
    from pretrain.engine_finetune import run_main

    dit = perturbed(DiT_models["DiT-B/2-VAE-simple"](input_size=4, num_classes=1000, **TINY))
    checkpoint = tmp_path / "dit.pt"
    torch.save({"model": dit.state_dict(), "ema": dit.state_dict()}, checkpoint)
    flags = ["--model", "dit_base_patch16_vae", "--model_kwargs", json.dumps(TINY), "--skip_depth", "1",
             "--finetune", checkpoint, "--device", "cpu", "--data_path", tiny_image_folder, "--vae_path", tiny_vae_dir,
             "--input_size", "32", "--nb_classes", "4", "--batch_size", "8", "--epochs", "1", "--warmup_epochs", "0",
             "--num_workers", "0", "--precision", "fp32", "--output_dir", tmp_path / "out", "--add_t_noise", "--t", "50"]
    args = main_linprobe.get_args_parser().parse_args([str(flag) for flag in flags])
    assert run_main(main_linprobe.main, args) == 0
    last = torch.load(tmp_path / "out" / "checkpoint-last.pth", weights_only=True)["model"]
    assert torch.equal(last["blocks.0.attn.qkv.weight"], dit.state_dict()["blocks.0.attn.qkv.weight"])  # frozen
    assert "blocks.2.attn.qkv.weight" not in last and "head.1.weight" in last
