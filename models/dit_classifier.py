"""DiT backbones as image classifiers, for linear probing generative models (USP's pretrain/models_dit.py).

USP probes a DiT trunk the way it probes a ViT: patch-embed the latents, run the blocks conditioned on
t = 0 and the null label, average the tokens and apply a linear head. `skip_depth` k builds only the
first depth - k blocks, so the features of an intermediate block are probed (loading the checkpoint
non-strictly drops the later blocks). Parameter names are DiT's (x_embedder, t_embedder, y_embedder,
pos_embed, blocks.i.*, final_layer.*) plus `head`, so DiT/SiT training checkpoints load directly.

Presets (USP's names): `dit_base_patch16_vae` (768 wide, 12 deep, 12 heads) and `dit_xlarge_patch16_vae`
(1152/28/16); 2x2 latent patches on SD-VAE latents (a 16-pixel footprint), affine block LayerNorms
(USP's default, the "-VAE-simple" blocks) unless `affine_norm=False`.
"""
import torch
import torch.nn as nn

from models.dit import DiT
from models.sizes import TRANSFORMER_SIZES


class DiTClassifier(DiT):
    """forward(x (N, C, H, W) latents) -> logits (N, num_classes).

    label_classes: the size of the DiT's own label table (1000 for ImageNet DiTs); its null index is
    what the trunk is conditioned on. num_classes: the classifier head's outputs.
    """

    def __init__(self, img_size: int = 32, patch_size: int = 2, in_chans: int = 4, hidden_size: int = 1152,
                 depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0, num_classes: int = 1000,
                 label_classes: int = 1000, class_dropout_prob: float = 0.1, learn_sigma: bool = True,
                 affine_norm: bool = True, skip_depth: int = 0, **_timm_kwargs):
        if not 0 <= skip_depth < depth:
            raise ValueError(f"--skip_depth must be in 0..{depth - 1} for a {depth}-block DiT, got {skip_depth}.")
        super().__init__(input_size=img_size, patch_size=patch_size, in_channels=in_chans, hidden_size=hidden_size,
                         depth=depth - skip_depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                         class_dropout_prob=class_dropout_prob, num_classes=label_classes, learn_sigma=learn_sigma,
                         affine_norm=affine_norm)
        self.head = nn.Linear(hidden_size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.x_embedder(x) + self.pos_embed  # (N, T, D)
        n = x.shape[0]
        t = torch.zeros(n, device=x.device, dtype=torch.long)
        null = torch.full((n,), self.y_embedder.num_classes, device=x.device, dtype=torch.long)
        c = self.t_embedder(t) + self.y_embedder(null, False)  # (N, D)
        for block in self.blocks:
            tokens = block(tokens, c)
        return self.head(tokens.mean(dim=1))  # (N, num_classes)

    def no_weight_decay(self):
        return set()


def _preset(size: str):
    hidden_size, depth, num_heads = TRANSFORMER_SIZES[size]

    def build(**kwargs):
        return DiTClassifier(**{"hidden_size": hidden_size, "depth": depth, "num_heads": num_heads, **kwargs})

    return build


DIT_CLASSIFIERS = {"dit_base_patch16_vae": _preset("B"), "dit_xlarge_patch16_vae": _preset("XL")}


def load_dit_backbone(model: DiTClassifier, checkpoint: dict) -> list:
    """Loads a DiT/SiT checkpoint's trunk into `model` (USP: checkpoint['model'], non-strict, head dropped).

    checkpoint: a training checkpoint ({'model', 'ema', ...}: 'model' is used, as USP) or a raw state
    dict. Blocks beyond the model's depth (skip_depth) are dropped; a trunk key the checkpoint lacks or
    holds in another shape raises ValueError. Returns the names left at their initialisation (head.*).
    """
    state = checkpoint["model"] if isinstance(checkpoint.get("model"), dict) else checkpoint
    expected = model.state_dict()
    kept = {key: value for key, value in state.items() if key in expected and not key.startswith("head.")}
    reshaped = [key for key, value in kept.items() if value.shape != expected[key].shape]
    missing = [key for key in expected if key not in kept and not key.startswith("head.")]
    if reshaped or missing:
        example = reshaped[0] if reshaped else missing[0]
        raise ValueError(f"the checkpoint does not fit this DiT ({len(missing)} missing, {len(reshaped)} of another "
                         f"shape, e.g. {example}); match the preset, --input_size and --model_kwargs to it.")
    model.load_state_dict(kept, strict=False)
    return [key for key in expected if key not in kept]
