"""An independent restatement of the official DINOv2 ViT (torch.hub layout) for tests, on tiny random weights.

Layout: cls + patch tokens plus the position table, register tokens inserted after cls, pre-norm blocks
with layer scale (ls1/ls2), final LayerNorm (eps 1e-6); plain torch ops, no timm.
"""
import math

import torch
import torch.nn.functional as F

DIM, DEPTH, HEADS = 32, 2, 2
TINY_VIT = dict(embed_dim=DIM, depth=DEPTH, num_heads=HEADS)  # timm constructor overrides of the same network


def hub_state_dict(registers: int = 0, seed: int = 0, hub_grid: int = 5) -> dict:
    """A random DINOv2 state dict in the official torch.hub layout (position table for a hub_grid^2 grid)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape, std=0.2: torch.randn(*shape, generator=g) * std  # noqa: E731
    state = {"cls_token": r(1, 1, DIM), "pos_embed": r(1, 1 + hub_grid ** 2, DIM), "mask_token": r(1, DIM),
             "patch_embed.proj.weight": r(DIM, 3, 14, 14, std=0.05), "patch_embed.proj.bias": r(DIM),
             "norm.weight": 1 + r(DIM), "norm.bias": r(DIM)}
    if registers:
        state["register_tokens"] = r(1, registers, DIM)
    for i in range(DEPTH):
        b = f"blocks.{i}."
        state.update({b + "norm1.weight": 1 + r(DIM), b + "norm1.bias": r(DIM),
                      b + "attn.qkv.weight": r(3 * DIM, DIM), b + "attn.qkv.bias": r(3 * DIM),
                      b + "attn.proj.weight": r(DIM, DIM), b + "attn.proj.bias": r(DIM), b + "ls1.gamma": r(DIM),
                      b + "norm2.weight": 1 + r(DIM), b + "norm2.bias": r(DIM),
                      b + "mlp.fc1.weight": r(4 * DIM, DIM), b + "mlp.fc1.bias": r(4 * DIM),
                      b + "mlp.fc2.weight": r(DIM, 4 * DIM), b + "mlp.fc2.bias": r(DIM), b + "ls2.gamma": r(DIM)})
    return state


def reference_tokens(state: dict, images: torch.Tensor, pos_embed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The hub DINOv2's forward_features with a given (1, 1 + T, D) table -> (x_norm_clstoken, x_norm_patchtokens)."""
    ln = lambda x, name: F.layer_norm(x, (DIM,), state[name + ".weight"], state[name + ".bias"], eps=1e-6)  # noqa: E731
    x = F.conv2d(images, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=14)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([state["cls_token"].expand(len(x), -1, -1), x], dim=1) + pos_embed
    registers = state.get("register_tokens")
    prefix = 1
    if registers is not None:
        x = torch.cat([x[:, :1], registers.expand(len(x), -1, -1), x[:, 1:]], dim=1)
        prefix += registers.shape[1]
    for i in range(DEPTH):
        b = f"blocks.{i}."
        h = ln(x, b + "norm1")
        n, t, _ = h.shape
        q, k, v = F.linear(h, state[b + "attn.qkv.weight"], state[b + "attn.qkv.bias"]).reshape(
            n, t, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
        attention = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(DIM // HEADS), dim=-1)
        h = F.linear((attention @ v).transpose(1, 2).reshape(n, t, DIM), state[b + "attn.proj.weight"],
                     state[b + "attn.proj.bias"])
        x = x + state[b + "ls1.gamma"] * h
        h = F.gelu(F.linear(ln(x, b + "norm2"), state[b + "mlp.fc1.weight"], state[b + "mlp.fc1.bias"]))
        x = x + state[b + "ls2.gamma"] * F.linear(h, state[b + "mlp.fc2.weight"], state[b + "mlp.fc2.bias"])
    x = ln(x, "norm")
    return x[:, 0], x[:, prefix:]
