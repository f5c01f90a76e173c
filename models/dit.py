"""DiT: diffusion transformer with adaLN-Zero conditioning (Peebles & Xie, 2023), plus USP's
"-VAE-simple" variants.

Parameter names and shapes are those of facebookresearch/DiT `models.py`, so the released
DiT-XL-2-256x256.pt loads with `strict=True`:

    x_embedder.proj.{weight,bias}            patch embedding (timm PatchEmbed)
    pos_embed                                 (1, T, D) fixed 2-D sin-cos, requires_grad=False
    t_embedder.mlp.{0,2}.{weight,bias}        timestep MLP
    y_embedder.embedding_table.weight         (num_classes + 1, D) with the null class for CFG
    blocks.i.attn.{qkv,proj}.*, blocks.i.mlp.{fc1,fc2}.*, blocks.i.adaLN_modulation.1.*
    final_layer.{linear,adaLN_modulation.1}.*

REPA layout (Yu et al., 2025, sihyun-yu/REPA `models/sit.py`): `z_dims` non-empty adds one projector MLP
per alignment target (`projectors.{i}.{0,2,4}.*`, see `models/repa.py`) applied to the hidden tokens after
block `encoder_depth`; `qk_norm=True` adds REPA's per-head LayerNorm on queries and keys
(`blocks.i.attn.{q,k}_norm.{weight,bias}`). With `learn_sigma=False` these are exactly the keys and shapes of
REPA's SiT, so its checkpoints load with `strict=True`. `forward(..., return_projections=True)` also returns
the projected tokens; the default forward (sampling, EMA) never touches the projectors.

"-VAE-simple" (USP): the same network whose block LayerNorms carry an affine weight and bias
(`blocks.i.norm1.{weight,bias}`, `blocks.i.norm2.{weight,bias}`), exactly the tensors an MAE/USP
encoder block has, so a pretrained encoder transfers block-for-block. The LayerNorms are
initialised to the identity (weight 1, bias 0), so a fresh -VAE-simple model computes the same
function as a fresh DiT. The final layer's norm stays non-affine in both families: the MAE encoder
has no counterpart for it (its `norm` sits after the last block, not under an adaLN modulation).
"""
import torch
import torch.nn as nn
from timm.layers import Mlp, PatchEmbed
from timm.models.vision_transformer import Attention

from models.layers import LabelEmbedder, TimestepEmbedder, get_2d_sincos_pos_embed, modulate
from models.repa import build_mlp
from models.sizes import TRANSFORMER_SIZES
from util.errors import UserError


def _tanh_gelu():
    # DiT's MLP uses the tanh approximation of GELU (official `approx_gelu`); kept for checkpoint parity.
    return nn.GELU(approximate="tanh")


def check_sizes(input_size: int, patch_size: int, hidden_size: int, num_heads: int) -> None:
    """Refuses, in one sentence, a latent side the patches do not tile or a width the heads do not split."""
    if input_size % patch_size != 0:
        raise UserError(
            f"latent size {input_size} is not divisible by the patch size {patch_size}; "
            f"pick an image size whose latent side is a multiple of {patch_size}."
        )
    if hidden_size % num_heads != 0:
        raise UserError(f"hidden size {hidden_size} is not divisible by {num_heads} heads; change one of them.")


def _xavier_linear(module: nn.Module) -> None:
    """DiT's `_basic_init`: xavier-uniform Linear weights, zero biases; affine LayerNorms start as the identity."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.constant_(module.bias, 0)
    elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
        nn.init.ones_(module.weight)  # -VAE-simple: identity until pretrained weights arrive
        nn.init.zeros_(module.bias)


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero: x (N, T, D), c (N, D) -> (N, T, D).

    The conditioning vector c predicts shift/scale/gate for the attention and MLP branches; the
    gates start at zero so each block starts as the identity.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, affine_norm: bool = False,
                 qk_norm: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=affine_norm, eps=1e-6)
        # REPA's qk_norm: timm's per-head LayerNorm (its default norm_layer when REPA was written).
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True, qk_norm=qk_norm, norm_layer=nn.LayerNorm)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=affine_norm, eps=1e-6)
        self.mlp = Mlp(in_features=hidden_size, hidden_features=int(hidden_size * mlp_ratio), act_layer=_tanh_gelu, drop=0)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm + linear: (N, T, D), c (N, D) -> (N, T, patch_size**2 * out_channels)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Diffusion transformer on latents.

    forward(x (N, C, H, W), t (N,), y (N,)) -> (N, out_channels, H, W), out_channels = 2C with
    learn_sigma (noise prediction + variance interpolation), else C.
    `affine_norm=True` builds the "-VAE-simple" family; `encoder_depth`, `z_dims`, `projector_dim`, `qk_norm`
    are REPA's (see the module docstring; `z_dims=()` = no projectors, the plain DiT/SiT state dict).
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        affine_norm: bool = False,
        encoder_depth: int = 8,
        z_dims=(),
        projector_dim: int = 2048,
        qk_norm: bool = False,
    ):
        super().__init__()
        check_sizes(input_size, patch_size, hidden_size, num_heads)
        z_dims = [int(z_dim) for z_dim in z_dims]
        if z_dims and not 1 <= encoder_depth <= depth:
            raise UserError(f"encoder_depth {encoder_depth} is outside 1..{depth} (the model's depth); the REPA "
                            f"projectors read the tokens after one of its blocks.")
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.affine_norm = affine_norm
        self.encoder_depth = encoder_depth
        self.z_dims = z_dims

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        # Fixed sin-cos table; a Parameter (not a buffer) because it is in the official state dict.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(
            [DiTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio, affine_norm=affine_norm, qk_norm=qk_norm)
             for _ in range(depth)]
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()
        # Training-only REPA heads (empty without z_dims, so plain checkpoints keep their keys). Built after
        # everything else so the rest of the network draws the same initial weights with or without them:
        # REPA with --proj-coeff 0 then trains bit-identically to plain training.
        self.projectors = nn.ModuleList([build_mlp(hidden_size, projector_dim, z_dim) for z_dim in z_dims])
        self.projectors.apply(_xavier_linear)

    def initialize_weights(self):
        """Official DiT init: xavier linears, sin-cos positions, N(0, 0.02) embedders, adaLN-Zero."""

        self.apply(_xavier_linear)

        grid_size = int(self.x_embedder.num_patches ** 0.5)
        pos_embed = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid_size)
        self.pos_embed.data.copy_(torch.from_numpy(pos_embed).float().unsqueeze(0))

        # Patch embedding like nn.Linear (xavier over the flattened kernel) instead of the conv default.
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)

        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        # adaLN-Zero: every block starts as the identity and the output layer predicts zeros.
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*C_out) -> (N, C_out, H, W) for a square grid of T patches."""
        c = self.out_channels
        p = self.x_embedder.patch_size[0]
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(shape=(x.shape[0], h, w, p, p, c))
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(shape=(x.shape[0], c, h * p, w * p))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, force_drop_ids: torch.Tensor = None,
                return_projections: bool = False):
        """x (N, C, H, W) latents, t (N,) timesteps, y (N,) labels -> (N, out_channels, H, W).

        force_drop_ids (N,) with 1 where the label must be replaced by the null class (CFG training
        or explicit unconditional evaluation); otherwise labels drop at random only in train mode.
        return_projections: also return REPA's projected tokens, a list with one (N, T, z_dim) per
        projector, taken after block `encoder_depth` -> (prediction, projections).
        """
        if return_projections and not self.projectors:
            raise ValueError("return_projections=True needs REPA projectors; build the model with z_dims=[...].")
        x = self.x_embedder(x) + self.pos_embed  # (N, T, D)
        t = self.t_embedder(t)  # (N, D)
        y = self.y_embedder(y, self.training, force_drop_ids)  # (N, D)
        c = t + y
        projections = None
        for depth, block in enumerate(self.blocks, start=1):
            x = block(x, c)
            if return_projections and depth == self.encoder_depth:
                projections = [projector(x) for projector in self.projectors]  # each (N, T, z_dim)
        x = self.final_layer(x, c)  # (N, T, p*p*out_channels)
        prediction = self.select_prediction(self.unpatchify(x))
        return (prediction, projections) if return_projections else prediction

    def select_prediction(self, out: torch.Tensor) -> torch.Tensor:
        """What forward returns of the final layer's (N, out_channels, H, W): DiT keeps everything."""
        return out

    def forward_with_cfg(self, x, t, y, cfg_scale, guidance_channels=3, guidance_interval=None):
        """Classifier-free guidance over a batch whose second half carries the null label.

        x (2N, C, H, W): only the first half is used (the official code duplicates it, so the
        caller's second half is ignored); y (2N,) = [labels, null class]; t (2N,).
        Returns (2N, out, H, W) with both halves holding the guided prediction on the guided
        channels; the other channels are the model's own output for each half.

        guidance_channels: 3 = the official DiT/SiT behaviour (guidance on the first 3 channels
        only, which the DiT authors kept for reproducibility); None = every prediction channel
        (the first `in_channels`; learned-sigma channels are never guided); an int k = the first k.
        guidance_interval: (lo, hi) in this model's timestep units (DiT: 0..999, SiT: 0..1); rows
        whose t lies outside [lo, hi] get the conditional prediction (guidance scale 1).
        """
        if x.shape[0] % 2 != 0:
            raise ValueError(f"forward_with_cfg needs an even batch (conditional + null halves), got {x.shape[0]} rows.")
        n_guided = self._num_guided_channels(guidance_channels)
        half = x[: len(x) // 2]
        combined = torch.cat([half, half], dim=0)
        # fp32 before mixing: under bf16/fp16 autocast the network's output is half precision, and
        # uncond + s * (cond - uncond) amplifies its rounding by the guidance scale.
        model_out = self.forward(combined, t, y).float()
        eps, rest = model_out[:, :n_guided], model_out[:, n_guided:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        if guidance_interval is not None:
            lo, hi = guidance_interval
            t_half = t[: len(t) // 2]
            inside = ((t_half >= lo) & (t_half <= hi)).view(-1, 1, 1, 1)
            half_eps = torch.where(inside, half_eps, cond_eps)
        eps = torch.cat([half_eps, half_eps], dim=0)
        return torch.cat([eps, rest], dim=1)

    def _num_guided_channels(self, guidance_channels) -> int:
        if guidance_channels is None:
            return self.in_channels
        if not 1 <= guidance_channels <= self.in_channels:
            raise ValueError(
                f"guidance_channels={guidance_channels} is outside 1..{self.in_channels} (the model predicts "
                f"{self.in_channels} channels); use None to guide all of them."
            )
        return guidance_channels


# --------------------------------------------------------------------------------------
# Presets: the official names; "-VAE-simple" = affine block LayerNorms (USP)
# --------------------------------------------------------------------------------------

# name -> (hidden_size, depth, num_heads), as in the DiT paper (Table 1): the shared table of models/sizes.py.
MODEL_SIZES = {size: tuple(TRANSFORMER_SIZES[size]) for size in ("S", "B", "L", "XL")}
PATCH_SIZES = (2, 4, 8)


def _preset(model_class, size: str, patch_size: int, affine_norm: bool):
    """Constructor for one preset; every DiT kwarg (also the size ones) can be overridden, for tiny test models."""
    hidden_size, depth, num_heads = MODEL_SIZES[size]
    defaults = dict(hidden_size=hidden_size, depth=depth, num_heads=num_heads, patch_size=patch_size, affine_norm=affine_norm)

    def build(**kwargs):
        return model_class(**{**defaults, **kwargs})

    build.__name__ = f"{model_class.__name__}_{size}_{patch_size}{'_VAE_simple' if affine_norm else ''}"
    build.__doc__ = f"{model_class.__name__}-{size}/{patch_size}: width {hidden_size}, depth {depth}, {num_heads} heads."
    return build


def build_registry(model_class, prefix: str) -> dict:
    """{"<prefix>-{S,B,L,XL}/{2,4,8}[-VAE-simple]": constructor} for DiT or a subclass (SiT)."""
    registry = {}
    for affine_norm in (False, True):
        for size in ("XL", "L", "B", "S"):
            for patch_size in PATCH_SIZES:
                name = f"{prefix}-{size}/{patch_size}" + ("-VAE-simple" if affine_norm else "")
                registry[name] = _preset(model_class, size, patch_size, affine_norm)
    return registry


DiT_models = build_registry(DiT, "DiT")
# USP's generation/DiT/models.py name for a DiT-B/2 whose block LayerNorms have no affine weights
# ("dnln"): the same parameters and function as DiT-B/2, so checkpoints of either load into both.
DiT_models["DiT-B/2-VAE-simple-dnln"] = DiT_models["DiT-B/2"]
