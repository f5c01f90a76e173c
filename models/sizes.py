"""The one table of transformer sizes (S/B/L/XL/H) that every model family and the benchmark read.

    size -> TransformerSize(width, depth, num_heads)

S/B/L/XL are the DiT paper's Table 1 (B/L/H are also ViT's; XL = 1152 wide, 28 deep, 16 heads is DiT's, which
USP's `vit_xlarge_patch_vae` copies so every encoder block transfers into DiT-XL/SiT-XL). The families spell
the width differently (`hidden_size` in DiT/SiT, `embed_dim` in MAE/ViT): ask `size_kwargs` for either.
"""
from typing import NamedTuple


class TransformerSize(NamedTuple):
    width: int
    depth: int
    num_heads: int


TRANSFORMER_SIZES = {
    "S": TransformerSize(384, 12, 6),
    "B": TransformerSize(768, 12, 12),
    "L": TransformerSize(1024, 24, 16),
    "XL": TransformerSize(1152, 28, 16),
    "H": TransformerSize(1280, 32, 16),
    # LightningDiT's larger sizes (hustvl/LightningDiT presets LightningDiT-1p0B/1p6B).
    "1p0B": TransformerSize(1536, 24, 24),
    "1p6B": TransformerSize(1792, 28, 28),
}


def size_kwargs(size: str, width_name: str = "embed_dim") -> dict:
    """{width_name: width, "depth": depth, "num_heads": heads} of `size`, e.g. size_kwargs("B", "hidden_size")."""
    width, depth, num_heads = TRANSFORMER_SIZES[size]
    return {width_name: width, "depth": depth, "num_heads": num_heads}
