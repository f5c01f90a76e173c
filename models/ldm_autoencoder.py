"""LDM-layout KL autoencoders (taming / MAR's kl16.ckpt, VA-VAE's .pt) read into one diffusers `AutoencoderKL`.

MAR's KL-16 and LightningDiT's VA-VAE release their weights in the LDM ("taming") key layout; this module reads the
architecture off such a state dict (`ldm_autoencoder_config`), renames its keys into diffusers' layout
(`ldm_to_diffusers_state_dict`) and builds the autoencoder (`load_ldm_autoencoder`), so `models.vae.LatentCodec` has a
single encode/decode path for every codec.
"""
import dataclasses
import pickle
import re
from pathlib import Path
from typing import Optional, Tuple, Union

import torch

from util.errors import UserError

KL16_FILENAME = "kl16.ckpt"
VAVAE_FILENAME = "vavae-imagenet256-f16d32-dinov2.pt"
# LDM-layout codecs: weights file name (inside a --vae_path folder), latent channels and ch_mult they must have.
LDM_CODECS = {
    "d16": dict(filename=KL16_FILENAME, channels=16, ch_mult=(1, 1, 2, 2, 4),
                release="the KL-16 weights kl16.ckpt released with MAR"),
    "vavae_f16d32": dict(filename=VAVAE_FILENAME, channels=32, ch_mult=(1, 1, 2, 2, 4),
                         release=f"the VA-VAE weights {VAVAE_FILENAME} (huggingface.co/hustvl/"
                                 f"vavae-imagenet256-f16d32-dinov2)"),
}

# Leaf renames inside one residual or attention block (LDM name -> diffusers name).
_RESNET_LEAVES = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
                  "nin_shortcut": "conv_shortcut"}
_ATTENTION_LEAVES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
# LDM attention projections are 1x1 convolutions; diffusers uses Linear layers of the same matrix.
_CONV1x1_ATTENTION_LEAVES = {"q", "k", "v", "proj_out"}
# Top-level modules of the autoencoder; anything else in the file (MAR's `loss.*`) is training-only.
_AUTOENCODER_ROOTS = {"encoder", "decoder", "quant_conv", "post_quant_conv"}


@dataclasses.dataclass(frozen=True)
class LDMAutoencoderConfig:
    """The architecture of an LDM-layout KL autoencoder, read off its state dict.

    ch_mult is expressed as absolute channels (`block_out_channels = ch * ch_mult`); attention flags are
    per resolution level, level 0 being the full-resolution one (LDM's indexing).
    """

    block_out_channels: Tuple[int, ...]
    layers_per_block: int
    latent_channels: int
    in_channels: int
    out_channels: int
    encoder_attention_levels: Tuple[bool, ...]
    decoder_attention_levels: Tuple[bool, ...]
    mid_attention: bool

    def build_autoencoder(self, norm_num_groups: int = 32):
        """An untrained diffusers `AutoencoderKL` with this architecture (LDM GroupNorms use 32 groups)."""
        from diffusers import AutoencoderKL

        down = tuple("AttnDownEncoderBlock2D" if attn else "DownEncoderBlock2D"
                     for attn in self.encoder_attention_levels)
        # diffusers lists decoder blocks from the lowest resolution up; LDM indexes them by level.
        up = tuple("AttnUpDecoderBlock2D" if attn else "UpDecoderBlock2D"
                   for attn in reversed(self.decoder_attention_levels))
        return AutoencoderKL(
            in_channels=self.in_channels, out_channels=self.out_channels,
            down_block_types=down, up_block_types=up, block_out_channels=self.block_out_channels,
            layers_per_block=self.layers_per_block, latent_channels=self.latent_channels,
            norm_num_groups=norm_num_groups, mid_block_add_attention=self.mid_attention,
        )


def _indices(keys, pattern: str) -> set:
    """Integer captures of `pattern` (one group) over `keys`."""
    regex = re.compile(pattern)
    return {int(m.group(1)) for k in keys for m in [regex.match(k)] if m}


def ldm_autoencoder_config(state_dict: dict, expected: str = "the KL-16 kl16.ckpt released with MAR") -> LDMAutoencoderConfig:
    """Reads the architecture (levels, channels, blocks per level, attention placement) from LDM keys."""
    keys = list(state_dict)
    if any(key.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for key in keys):
        raise UserError("the file holds a diffusers AutoencoderKL (the d8 SD-VAE layout), not the LDM KL-16 "
                              "checkpoint --vae_version d16 needs; pass its folder with --vae_version d8, or pass "
                              "kl16.ckpt (released with MAR) for d16.")
    if "encoder.conv_in.weight" not in state_dict or "post_quant_conv.weight" not in state_dict:
        raise UserError(f"the file is not an LDM KL autoencoder checkpoint: it has no encoder.conv_in / "
                              f"post_quant_conv weights (expected {expected}).")
    levels = sorted(_indices(keys, r"^encoder\.down\.(\d+)\."))
    block_out_channels = tuple(state_dict[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in levels)
    layers_per_block = len(_indices(keys, r"^encoder\.down\.0\.block\.(\d+)\."))
    decoder_layers = len(_indices(keys, r"^decoder\.up\.0\.block\.(\d+)\."))
    if decoder_layers != layers_per_block + 1:
        raise UserError(f"the LDM checkpoint has {layers_per_block} encoder and {decoder_layers} decoder "
                              f"res blocks per level; a KL autoencoder needs decoder = encoder + 1.")
    return LDMAutoencoderConfig(
        block_out_channels=block_out_channels,
        layers_per_block=layers_per_block,
        latent_channels=state_dict["post_quant_conv.weight"].shape[0],
        in_channels=state_dict["encoder.conv_in.weight"].shape[1],
        out_channels=state_dict["decoder.conv_out.weight"].shape[0],
        encoder_attention_levels=tuple(f"encoder.down.{i}.attn.0.q.weight" in state_dict for i in levels),
        decoder_attention_levels=tuple(f"decoder.up.{i}.attn.0.q.weight" in state_dict for i in levels),
        mid_attention="encoder.mid.attn_1.q.weight" in state_dict,
    )


def _ldm_module_map(config: LDMAutoencoderConfig):
    """Yields (ldm_prefix, diffusers_prefix, kind) for every module of the autoencoder.

    kind is "resnet", "attention" or "plain" (a conv/norm whose leaf names are the same in both layouts).
    """
    num_levels = len(config.block_out_channels)
    for side in ("encoder", "decoder"):
        yield f"{side}.conv_in", f"{side}.conv_in", "plain"
        yield f"{side}.norm_out", f"{side}.conv_norm_out", "plain"
        yield f"{side}.conv_out", f"{side}.conv_out", "plain"
        yield f"{side}.mid.block_1", f"{side}.mid_block.resnets.0", "resnet"
        yield f"{side}.mid.attn_1", f"{side}.mid_block.attentions.0", "attention"
        yield f"{side}.mid.block_2", f"{side}.mid_block.resnets.1", "resnet"
    for level in range(num_levels):
        for j in range(config.layers_per_block):
            yield f"encoder.down.{level}.block.{j}", f"encoder.down_blocks.{level}.resnets.{j}", "resnet"
            yield f"encoder.down.{level}.attn.{j}", f"encoder.down_blocks.{level}.attentions.{j}", "attention"
        yield f"encoder.down.{level}.downsample.conv", f"encoder.down_blocks.{level}.downsamplers.0.conv", "plain"
        up_block = num_levels - 1 - level
        for j in range(config.layers_per_block + 1):
            yield f"decoder.up.{level}.block.{j}", f"decoder.up_blocks.{up_block}.resnets.{j}", "resnet"
            yield f"decoder.up.{level}.attn.{j}", f"decoder.up_blocks.{up_block}.attentions.{j}", "attention"
        yield f"decoder.up.{level}.upsample.conv", f"decoder.up_blocks.{up_block}.upsamplers.0.conv", "plain"
    yield "quant_conv", "quant_conv", "plain"
    yield "post_quant_conv", "post_quant_conv", "plain"


def ldm_to_diffusers_state_dict(state_dict: dict, config: Optional[LDMAutoencoderConfig] = None) -> dict:
    """Renames an LDM-layout KL autoencoder state dict into diffusers' `AutoencoderKL` layout.

    Keys outside the autoencoder (e.g. MAR's `loss.*` discriminator weights) are dropped; attention
    q/k/v/proj_out 1x1 conv weights (C, C, 1, 1) become Linear weights (C, C).
    """
    config = config or ldm_autoencoder_config(state_dict)
    converted, consumed = {}, set()
    for ldm_prefix, diffusers_prefix, kind in _ldm_module_map(config):
        for key in [k for k in state_dict if k.startswith(ldm_prefix + ".")]:
            consumed.add(key)
            rest = key[len(ldm_prefix) + 1:]
            if kind == "plain":
                converted[f"{diffusers_prefix}.{rest}"] = state_dict[key]
                continue
            leaf, param = rest.split(".", 1)
            leaves = _RESNET_LEAVES if kind == "resnet" else _ATTENTION_LEAVES
            if leaf not in leaves:
                raise UserError(f"unexpected LDM autoencoder key {key!r}; the checkpoint is not a KL "
                                      f"autoencoder of the LDM/MAR layout.")
            tensor = state_dict[key]
            if kind == "attention" and leaf in _CONV1x1_ATTENTION_LEAVES and tensor.ndim == 4:
                tensor = tensor[:, :, 0, 0]
            converted[f"{diffusers_prefix}.{leaves[leaf]}.{param}"] = tensor
    leftover = [k for k in state_dict if k not in consumed and k.split(".")[0] in _AUTOENCODER_ROOTS]
    if leftover:
        raise UserError(f"the LDM autoencoder checkpoint has {len(leftover)} weights this converter does not "
                              f"know (first: {leftover[0]!r}); it is not the KL layout used by LDM/MAR.")
    return converted


def _check_ldm_layout(config: LDMAutoencoderConfig, vae_version: str) -> None:
    """Refuses, in one sentence, an LDM autoencoder whose channels or ch_mult differ from the codec's."""
    codec = LDM_CODECS[vae_version]
    base = config.block_out_channels[0]
    ch_mult = tuple(c // base for c in config.block_out_channels)
    if config.latent_channels != codec["channels"] or ch_mult != codec["ch_mult"]:
        raise UserError(
            f"the checkpoint is an LDM autoencoder with {config.latent_channels} latent channels and ch_mult "
            f"{ch_mult}, but --vae_version {vae_version} needs {codec['channels']} channels and ch_mult "
            f"{codec['ch_mult']}; pass {codec['release']}.")


def load_ldm_autoencoder(path: Union[str, Path], norm_num_groups: int = 32, vae_version: Optional[str] = None):
    """Builds a diffusers `AutoencoderKL` from an LDM-layout checkpoint file (MAR's kl16.ckpt, VA-VAE's .pt).

    The file holds the weights under `model` (MAR) or `state_dict` (LDM / Lightning), or is a raw
    state dict; entries outside the autoencoder (GAN loss, VA-VAE's foundation-model alignment head)
    are dropped. Every autoencoder weight must be present (strict load) so a truncated file cannot
    silently give a half-random decoder. With `vae_version` ("d16", "vavae_f16d32") the layout is
    checked against that codec's channels and ch_mult before anything is built.
    """
    release = LDM_CODECS[vae_version or "d16"]["release"]
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise UserError(f"could not read {str(path)!r} as a weights-only torch checkpoint "
                              f"({type(error).__name__}); re-download {release}.") from None
    for wrapper in ("model", "state_dict"):
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(wrapper), dict):
            checkpoint = checkpoint[wrapper]
            break
    config = ldm_autoencoder_config(checkpoint, expected=release)
    if vae_version is not None:
        _check_ldm_layout(config, vae_version)
    autoencoder = config.build_autoencoder(norm_num_groups=norm_num_groups)
    autoencoder.load_state_dict(ldm_to_diffusers_state_dict(checkpoint, config), strict=True)
    return autoencoder
