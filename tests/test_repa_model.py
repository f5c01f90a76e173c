"""REPA's SiT layout on our DiT/SiT backbone: REPA state dicts load strict and compute the same function.

The reference below restates sihyun-yu/REPA `models/sit.py` from its description (parameter names,
adaLN-Zero block, optional per-head QK LayerNorm, projector MLP after block `encoder_depth`) with plain
torch ops; it shares no code with models/dit.py.
"""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.repa import convert_time_convention, layout_from_state_dict, without_projectors
from models.sit import SiT_models

TINY = dict(input_size=8, in_channels=4, hidden_size=32, depth=3, num_heads=2, num_classes=5)


class RefAttention(nn.Module):
    def __init__(self, dim, heads, qk_norm):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        if qk_norm:
            self.q_norm = nn.LayerNorm(dim // heads)
            self.k_norm = nn.LayerNorm(dim // heads)
        self.qk_norm = qk_norm

    def forward(self, x):
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.heads), dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(n, t, d))


class RefMlp(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class RefBlock(nn.Module):
    def __init__(self, dim, heads, qk_norm):
        super().__init__()
        self.attn = RefAttention(dim, heads, qk_norm)
        self.mlp = RefMlp(dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c):
        s1, sc1, g1, s2, sc2, g2 = self.adaLN_modulation(c)[:, None].chunk(6, dim=-1)
        x = x + g1 * self.attn(F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + sc1) + s1)
        return x + g2 * self.mlp(F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + sc2) + s2)


class RefREPASiT(nn.Module):
    """REPA's SiT: predicts in_channels (no sigma), forward -> (prediction, [projections])."""

    def __init__(self, input_size, in_channels, hidden_size, depth, num_heads, num_classes, patch_size=2,
                 encoder_depth=2, z_dims=(12, 20), projector_dim=24, qk_norm=False):
        super().__init__()
        self.p, self.c, self.encoder_depth = patch_size, in_channels, encoder_depth
        tokens = (input_size // patch_size) ** 2
        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.randn(1, tokens, hidden_size), requires_grad=False)
        self.t_embedder = nn.Module()
        self.t_embedder.mlp = nn.Sequential(nn.Linear(256, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        self.y_embedder = nn.Module()
        self.y_embedder.embedding_table = nn.Embedding(num_classes + 1, hidden_size)
        self.blocks = nn.ModuleList([RefBlock(hidden_size, num_heads, qk_norm) for _ in range(depth)])
        self.projectors = nn.ModuleList([
            nn.Sequential(nn.Linear(hidden_size, projector_dim), nn.SiLU(), nn.Linear(projector_dim, projector_dim),
                          nn.SiLU(), nn.Linear(projector_dim, z)) for z in z_dims])
        self.final_layer = nn.Module()
        self.final_layer.linear = nn.Linear(hidden_size, patch_size * patch_size * in_channels)
        self.final_layer.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        for parameter in self.parameters():  # no zero init: every path must carry signal
            nn.init.normal_(parameter, std=0.2)

    def forward(self, x, t, y):
        n, _, h, w = x.shape
        x = self.x_embedder.proj(x).flatten(2).transpose(1, 2) + self.pos_embed
        freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
        args = t[:, None].float() * freqs[None]
        c = self.t_embedder.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))
        c = c + self.y_embedder.embedding_table(y)
        zs = None
        for i, block in enumerate(self.blocks):
            x = block(x, c)
            if i + 1 == self.encoder_depth:
                zs = [projector(x) for projector in self.projectors]
        shift, scale = self.final_layer.adaLN_modulation(c)[:, None].chunk(2, dim=-1)
        x = self.final_layer.linear(F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale) + shift)
        gh, gw = h // self.p, w // self.p
        x = x.reshape(n, gh, gw, self.p, self.p, self.c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(n, self.c, h, w), zs


@pytest.mark.parametrize("qk_norm", [False, True])
def test_repa_state_dict_loads_strict_and_matches(qk_norm):
    torch.manual_seed(0)
    reference = RefREPASiT(**TINY, qk_norm=qk_norm).eval()
    state = reference.state_dict()
    layout = layout_from_state_dict(state)
    assert layout == {"z_dims": [12, 20], "projector_dim": 24, "qk_norm": qk_norm}

    ours = SiT_models["SiT-S/2"](**TINY, learn_sigma=False, encoder_depth=2, **layout).eval()
    ours.load_state_dict(state, strict=True)
    x, t, y = torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([0, 4, 2])
    with torch.no_grad():
        expected, expected_zs = reference(x, t, y)
        prediction, zs = ours(x, t, y, return_projections=True)
        plain = ours(x, t, y)
    torch.testing.assert_close(prediction, expected, rtol=1e-5, atol=1e-5)
    assert len(zs) == 2
    for z, z_ref in zip(zs, expected_zs):
        torch.testing.assert_close(z, z_ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(plain, prediction)  # the projectors never change the prediction


def test_plain_model_has_no_repa_keys_and_sampling_weights_drop_projectors():
    plain = SiT_models["SiT-S/2"](**TINY)
    assert layout_from_state_dict(plain.state_dict()) == {"z_dims": [], "projector_dim": 2048, "qk_norm": False}
    with pytest.raises(ValueError, match="z_dims"):
        plain(torch.randn(1, 4, 8, 8), torch.rand(1), torch.tensor([0]), return_projections=True)

    repa = SiT_models["SiT-S/2"](**TINY, z_dims=[12], projector_dim=24, encoder_depth=1)
    stripped = without_projectors(repa.state_dict())
    assert set(stripped) == set(plain.state_dict())
    SiT_models["SiT-S/2"](**TINY).load_state_dict(stripped, strict=True)


def test_encoder_depth_outside_the_model_is_refused():
    with pytest.raises(ValueError, match="encoder_depth 4 is outside 1..3"):
        SiT_models["SiT-S/2"](**TINY, z_dims=[12], encoder_depth=4)


def test_projectors_do_not_change_the_initial_weights_of_the_rest():
    torch.manual_seed(7)
    plain = SiT_models["SiT-S/2"](**TINY, qk_norm=True)
    torch.manual_seed(7)
    repa = SiT_models["SiT-S/2"](**TINY, qk_norm=True, z_dims=[12], projector_dim=24, encoder_depth=2)
    repa_state = repa.state_dict()
    for name, value in plain.state_dict().items():
        assert torch.equal(value, repa_state[name]), name


def test_time_convention_conversion_maps_repa_onto_sit_transport():
    # REPA: x_t = (1 - t) x + t eps, predicts eps - x; SiT (ours): t = 1 is data, predicts x - eps.
    torch.manual_seed(1)
    reference = RefREPASiT(**TINY).eval()
    converted = convert_time_convention(reference.state_dict())
    ours = SiT_models["SiT-S/2"](**TINY, learn_sigma=False, encoder_depth=2, z_dims=[12, 20], projector_dim=24).eval()
    ours.load_state_dict(converted, strict=True)
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([0.0, 0.3, 0.95]), torch.tensor([1, 2, 3])
    with torch.no_grad():
        expected, _ = reference(x, 1 - t, y)
        torch.testing.assert_close(ours(x, t, y), -expected, rtol=1e-4, atol=1e-4)
    twice = convert_time_convention(converted)  # its own inverse
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(twice[name], value, rtol=1e-5, atol=1e-6)
