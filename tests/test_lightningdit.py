"""LightningDiT: strict-load parity with a reference written from the official definition
(hustvl/LightningDiT models/lightningdit.py, swiglu_ffn.py, rmsnorm.py, pos_embed.py), official key
names, preset sizes and parameter counts (meta device), RoPE on a non-square grid refused."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.lightningdit import LightningDiT, LightningDiT_models
from models.lightningdit_layers import rope_tables

TINY = dict(input_size=4, in_channels=8, hidden_size=32, depth=2, num_heads=2, num_classes=5, patch_size=1)


# ---------------------------------------------------------------------------------------------
# Reference: the official network, written out here (EVA's RoPE as the per-token angle formula).
# ---------------------------------------------------------------------------------------------

class RefRMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def ref_rope_angles(head_dim, side):
    """angle[token, channel]: channels [0, hd/2) rotate with the row, [hd/2, hd) with the column; the
    frequency of channel c in a half is 10000^(-(2 * (c // 2)) / (hd / 2)) (pairs interleaved)."""
    half = head_dim // 2
    angles = torch.zeros(side * side, head_dim)
    for token in range(side * side):
        row, col = divmod(token, side)
        for c in range(head_dim):
            position = row if c < half else col
            k = (c % half) // 2
            angles[token, c] = position * (1.0 / 10000 ** (2 * k / half))
    return angles


def ref_rotate(x, angles):
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).reshape(x.shape)
    return x * angles.cos() + rotated * angles.sin()


class RefAttention(nn.Module):
    def __init__(self, dim, heads, qk_norm, rms):
        super().__init__()
        self.heads, self.hd = heads, dim // heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        norm = RefRMSNorm if rms else nn.LayerNorm
        self.q_norm = norm(self.hd) if qk_norm else nn.Identity()
        self.k_norm = norm(self.hd) if qk_norm else nn.Identity()

    def forward(self, x, angles):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, self.hd).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        if angles is not None:
            q, k = ref_rotate(q, angles), ref_rotate(k, angles)
        weights = (q @ k.transpose(-2, -1) / math.sqrt(self.hd)).softmax(-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(b, n, c))


class RefSwiGLU(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.w12, self.w3 = nn.Linear(dim, 2 * hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class RefMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def ref_norm(dim, rms):
    return RefRMSNorm(dim) if rms else nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


def ref_modulate(x, shift, scale):
    x = x * (1 + scale.unsqueeze(1))
    return x if shift is None else x + shift.unsqueeze(1)


class RefBlock(nn.Module):
    def __init__(self, dim, heads, qk_norm, swiglu, rms, wo_shift):
        super().__init__()
        self.norm1, self.norm2 = ref_norm(dim, rms), ref_norm(dim, rms)
        self.attn = RefAttention(dim, heads, qk_norm, rms)
        self.mlp = RefSwiGLU(dim, int(2 / 3 * (4 * dim))) if swiglu else RefMlp(dim, 4 * dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, (4 if wo_shift else 6) * dim))
        self.wo_shift = wo_shift

    def forward(self, x, c, angles):
        mods = self.adaLN_modulation(c).chunk(4 if self.wo_shift else 6, dim=1)
        if self.wo_shift:
            (s1, g1, s2, g2), b1, b2 = mods, None, None
        else:
            b1, s1, g1, b2, s2, g2 = mods
        x = x + g1.unsqueeze(1) * self.attn(ref_modulate(self.norm1(x), b1, s1), angles)
        return x + g2.unsqueeze(1) * self.mlp(ref_modulate(self.norm2(x), b2, s2))


class RefTimestep(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(256, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
        args = t[:, None].float() * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class RefLabel(nn.Module):
    def __init__(self, num_classes, dim):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, y):
        return self.embedding_table(y)


class RefPatch(nn.Module):
    def __init__(self, channels, dim, p):
        super().__init__()
        self.proj = nn.Conv2d(channels, dim, p, stride=p)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class RefFinal(nn.Module):
    def __init__(self, dim, p, out, rms):
        super().__init__()
        self.norm_final = ref_norm(dim, rms)
        self.linear = nn.Linear(dim, p * p * out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(ref_modulate(self.norm_final(x), shift, scale))


class RefRope(nn.Module):
    """Holds the official buffers' names; the angles come from `ref_rope_angles`."""

    def __init__(self, head_dim, side):
        super().__init__()
        angles = ref_rope_angles(head_dim, side)
        self.register_buffer("freqs_cos", angles.cos())
        self.register_buffer("freqs_sin", angles.sin())


class RefLightningDiT(nn.Module):
    def __init__(self, input_size, in_channels, hidden_size, depth, num_heads, num_classes, patch_size,
                 learn_sigma=False, use_qknorm=False, use_swiglu=False, use_rope=False, use_rmsnorm=False,
                 wo_shift=False):
        super().__init__()
        self.p, self.c_in, self.learn_sigma = patch_size, in_channels, learn_sigma
        self.out = 2 * in_channels if learn_sigma else in_channels
        side = input_size // patch_size
        self.x_embedder = RefPatch(in_channels, hidden_size, patch_size)
        self.t_embedder, self.y_embedder = RefTimestep(hidden_size), RefLabel(num_classes, hidden_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, side * side, hidden_size), requires_grad=False)
        self.feat_rope = RefRope(hidden_size // num_heads, side) if use_rope else None
        self.blocks = nn.ModuleList([RefBlock(hidden_size, num_heads, use_qknorm, use_swiglu, use_rmsnorm, wo_shift)
                                     for _ in range(depth)])
        self.final_layer = RefFinal(hidden_size, patch_size, self.out, use_rmsnorm)

    def forward(self, x, t, y):
        n, _, h, w = x.shape
        side = h // self.p
        tokens = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        angles = ref_rope_angles(tokens.shape[-1] // self.blocks[0].attn.heads, side) if self.feat_rope else None
        for block in self.blocks:
            tokens = block(tokens, c, angles)
        out = self.final_layer(tokens, c).reshape(n, side, side, self.p, self.p, self.out)
        out = out.permute(0, 5, 1, 3, 2, 4).reshape(n, self.out, h, w)
        return out[:, : self.c_in] if self.learn_sigma else out


def _randomized_state(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {k: (v if k.startswith("feat_rope") else torch.randn(v.shape, generator=gen) * 0.2)
            for k, v in model.state_dict().items()}


FLAGS = [
    dict(),
    dict(use_swiglu=True, use_rope=True, use_rmsnorm=True),  # the released 64ep / 800ep configuration
    dict(use_qknorm=True, use_swiglu=True, use_rope=True, use_rmsnorm=True, wo_shift=True, learn_sigma=True),
    dict(use_qknorm=True, use_rope=True),
]


@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: "+".join(sorted(f)) or "plain")
def test_reference_checkpoint_loads_strict_and_gives_identical_outputs(flags):
    reference = RefLightningDiT(**TINY, **flags).eval()
    reference.load_state_dict(_randomized_state(reference))
    model = LightningDiT(**TINY, **flags).eval()
    model.load_state_dict(reference.state_dict(), strict=True)  # official names and shapes
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 8, 4, 4, generator=gen)
    t, y = torch.tensor([0.1, 0.5, 0.9]), torch.tensor([0, 4, 5])
    with torch.no_grad():
        expected, got = reference(x, t, y), model(x, t, y)
    assert got.shape == (3, 8, 4, 4)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_rope_tables_match_the_per_token_formula():
    cos, sin = rope_tables(8, 3)
    angles = ref_rope_angles(8, 3)
    torch.testing.assert_close(cos, angles.cos())
    torch.testing.assert_close(sin, angles.sin())
    with pytest.raises(ValueError, match="divisible by 4"):
        rope_tables(6, 3)


def test_non_square_grid_is_refused_in_one_sentence():
    model = LightningDiT(**TINY, use_rope=True)
    with pytest.raises(ValueError, match=r"built for latents \(N, 8, 4, 4\).*square"):
        model(torch.zeros(1, 8, 4, 2), torch.zeros(1), torch.zeros(1, dtype=torch.long))


def test_official_key_names_and_fresh_model_outputs_zero():
    model = LightningDiT(**TINY, use_swiglu=True, use_rope=True, use_rmsnorm=True, use_qknorm=True)
    keys = set(model.state_dict())
    for name in ("feat_rope.freqs_cos", "feat_rope.freqs_sin", "blocks.0.norm1.weight", "blocks.1.mlp.w12.weight",
                 "blocks.1.mlp.w3.bias", "blocks.0.attn.q_norm.weight", "final_layer.norm_final.weight",
                 "y_embedder.embedding_table.weight", "pos_embed"):
        assert name in keys, name
    assert model.state_dict()["feat_rope.freqs_cos"].shape == (16, 16)
    x = torch.randn(2, 8, 4, 4)
    assert torch.equal(model(x, torch.rand(2), torch.tensor([1, 2])), torch.zeros(2, 8, 4, 4))  # adaLN-Zero


def test_cfg_official_keywords_equal_guidance_interval():
    model = LightningDiT(**TINY, use_rope=True).eval()
    model.load_state_dict(_randomized_state(model, seed=3))
    x = torch.randn(4, 8, 4, 4)
    y = torch.tensor([1, 2, 5, 5])
    for t_value, guided in ((0.05, False), (0.5, True)):
        t = torch.full((4,), t_value)
        with torch.no_grad():
            official = model.forward_with_cfg(x, t, y, 4.0, cfg_interval=True, cfg_interval_start=0.10)
            ours = model.forward_with_cfg(x, t, y, 4.0, guidance_interval=(0.10, 1.0))
            out = model(torch.cat([x[:2], x[:2]]), t, y)
        assert torch.equal(official, ours)
        cond, uncond = out[:2, :3], out[2:, :3]
        expected = uncond + 4.0 * (cond - uncond) if guided else cond
        torch.testing.assert_close(official[:2, :3], expected)
        assert torch.equal(official[:, 3:], out[:, 3:])  # channels past the first 3 are never guided


# Official counts: the LightningDiT paper's Table (XL 675M) and the released configuration.
def _count(name, **kwargs):
    with torch.device("meta"):
        model = LightningDiT_models[name](input_size=16, **kwargs)
    return sum(p.numel() for p in model.parameters())


def test_preset_sizes_and_parameter_counts():
    released = dict(use_swiglu=True, use_rope=True, use_rmsnorm=True)
    counts = {name: _count(name, **released) for name in ("LightningDiT-B/1", "LightningDiT-L/1", "LightningDiT-XL/1")}
    # Hand count for XL/1 (D=1152, 28 blocks, SwiGLU width 3072, 32 channels, 256 tokens):
    d, hidden = 1152, 3072
    block = (3 * d * d + 3 * d) + (d * d + d) + (2 * hidden * d + 2 * hidden) + (hidden * d + d) + 2 * d + (6 * d * d + 6 * d)
    embed = (32 * d + d) + (256 * d + d + d * d + d) + 1001 * d + 256 * d
    final = d + (d * 32 + 32) + (2 * d * d + 2 * d)
    assert counts["LightningDiT-XL/1"] == 28 * block + embed + final
    assert {n for n in LightningDiT_models} >= {"LightningDiT-B/1", "LightningDiT-B/2", "LightningDiT-L/1",
                                                 "LightningDiT-L/2", "LightningDiT-XL/1", "LightningDiT-XL/2"}
