"""Latent codecs: frozen VAEs that map images in [-1, 1] to scaled latents and back.

USP works in two latent spaces (see `models.latent_spec`):
  d8  - SD-VAE (stabilityai/sd-vae-ft-ema or -mse), a diffusers `AutoencoderKL` folder or hub id;
  d16 - the KL-16 autoencoder released with MAR (`kl16.ckpt`), stored in the LDM ("taming") key layout.
Both end up in one diffusers `AutoencoderKL`: the KL-16 weights are renamed into diffusers' layout by
`ldm_to_diffusers_state_dict`, so there is a single encode/decode path for every codec.

The posterior moments (mean, logvar) are returned UNscaled, because that is what the latent cache stores:
sampling and scaling happen later (per sample, per epoch) in `latents_from_moments`.
"""
import dataclasses
import hashlib
import json
import os
import pickle
import re
from pathlib import Path
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
from safetensors import safe_open

from models.latent_spec import LatentSpec, get_latent_spec
from util.errors import UserError

DEFAULT_D8_HUB_ID = "stabilityai/sd-vae-ft-ema"
KL16_FILENAME = "kl16.ckpt"

# A hub id is "owner/name" with no path separators beyond the one slash and no leading dot or slash.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

_MISSING_WEIGHTS = {
    "d8": ("the d8 VAE {path!r} was not found: it must be a diffusers AutoencoderKL folder (config.json + "
           "weights) or a hub id, usually stabilityai/sd-vae-ft-ema (download that huggingface.co repo for "
           "offline use); pass it with --vae_path / --vae-path."),
    "d16": ("--vae_version d16 needs the KL-16 weights file kl16.ckpt (released with MAR, "
            "github.com/LTH14/mar, as pretrained_models/vae/kl16.ckpt); {path!r} was not found, "
            "so download it and pass its path with --vae_path / --vae-path."),
}


VAEWeightsError = UserError  # VAE weights that are missing or do not fit the requested latent space; one type for every user error (util/errors.py)


# ----------------------------------------------------------------------------------------------
# LDM (taming / MAR) -> diffusers key conversion
# ----------------------------------------------------------------------------------------------

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


def ldm_autoencoder_config(state_dict: dict) -> LDMAutoencoderConfig:
    """Reads the architecture (levels, channels, blocks per level, attention placement) from LDM keys."""
    keys = list(state_dict)
    if any(key.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for key in keys):
        raise VAEWeightsError("the file holds a diffusers AutoencoderKL (the d8 SD-VAE layout), not the LDM KL-16 "
                              "checkpoint --vae_version d16 needs; pass its folder with --vae_version d8, or pass "
                              "kl16.ckpt (released with MAR) for d16.")
    if "encoder.conv_in.weight" not in state_dict or "post_quant_conv.weight" not in state_dict:
        raise VAEWeightsError("the file is not an LDM KL autoencoder checkpoint: it has no encoder.conv_in / "
                              "post_quant_conv weights (expected the KL-16 kl16.ckpt released with MAR).")
    levels = sorted(_indices(keys, r"^encoder\.down\.(\d+)\."))
    block_out_channels = tuple(state_dict[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in levels)
    layers_per_block = len(_indices(keys, r"^encoder\.down\.0\.block\.(\d+)\."))
    decoder_layers = len(_indices(keys, r"^decoder\.up\.0\.block\.(\d+)\."))
    if decoder_layers != layers_per_block + 1:
        raise VAEWeightsError(f"the LDM checkpoint has {layers_per_block} encoder and {decoder_layers} decoder "
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
                raise VAEWeightsError(f"unexpected LDM autoencoder key {key!r}; the checkpoint is not a KL "
                                      f"autoencoder of the LDM/MAR layout.")
            tensor = state_dict[key]
            if kind == "attention" and leaf in _CONV1x1_ATTENTION_LEAVES and tensor.ndim == 4:
                tensor = tensor[:, :, 0, 0]
            converted[f"{diffusers_prefix}.{leaves[leaf]}.{param}"] = tensor
    leftover = [k for k in state_dict if k not in consumed and k.split(".")[0] in _AUTOENCODER_ROOTS]
    if leftover:
        raise VAEWeightsError(f"the LDM autoencoder checkpoint has {len(leftover)} weights this converter does not "
                              f"know (first: {leftover[0]!r}); it is not the KL layout used by LDM/MAR.")
    return converted


def load_ldm_autoencoder(path: Union[str, Path], norm_num_groups: int = 32):
    """Builds a diffusers `AutoencoderKL` from an LDM-layout checkpoint file (e.g. MAR's kl16.ckpt).

    The file holds the weights under `model` (MAR) or `state_dict` (LDM / Lightning), or is a raw
    state dict. Every autoencoder weight must be present (strict load) so a truncated file cannot
    silently give a half-random decoder.
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise VAEWeightsError(f"could not read {str(path)!r} as a weights-only torch checkpoint "
                              f"({type(error).__name__}); re-download kl16.ckpt (MAR's release).") from None
    for wrapper in ("model", "state_dict"):
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(wrapper), dict):
            checkpoint = checkpoint[wrapper]
            break
    config = ldm_autoencoder_config(checkpoint)
    autoencoder = config.build_autoencoder(norm_num_groups=norm_num_groups)
    autoencoder.load_state_dict(ldm_to_diffusers_state_dict(checkpoint, config), strict=True)
    return autoencoder


# ----------------------------------------------------------------------------------------------
# The codec
# ----------------------------------------------------------------------------------------------

def _looks_like_hub_id(path: str) -> bool:
    return bool(_HUB_ID.match(path)) and not os.path.exists(path)


def _resolve_kl16_path(vae_path) -> Path:
    """The kl16.ckpt file for `vae_path` (a file, or a folder holding kl16.ckpt); raises if missing."""
    if vae_path is None:
        raise VAEWeightsError(_MISSING_WEIGHTS["d16"].format(path=KL16_FILENAME))
    path = Path(vae_path).expanduser()
    if path.is_dir():
        path = path / KL16_FILENAME
    if not path.is_file():
        raise VAEWeightsError(_MISSING_WEIGHTS["d16"].format(path=str(path)))
    return path


def _load_d8_autoencoder(vae_path):
    from diffusers import AutoencoderKL

    source = str(Path(vae_path).expanduser()) if vae_path is not None else DEFAULT_D8_HUB_ID
    if Path(source).is_file():
        raise VAEWeightsError(f"the d8 VAE {source!r} is a file, but d8 needs a diffusers AutoencoderKL folder "
                              "(config.json + diffusion_pytorch_model.safetensors); pass that folder with "
                              "--vae_path / --vae-path (a kl16.ckpt file goes with --vae_version d16).")
    if not (Path(source).is_dir() or _looks_like_hub_id(source)):
        raise VAEWeightsError(_MISSING_WEIGHTS["d8"].format(path=source))
    if Path(source).is_dir():
        _check_diffusers_folder(Path(source))
    try:
        # low_cpu_mem_usage=False: the default (True) needs `accelerate` and, without it, diffusers prints a
        # six-line warning at every load before falling back to this very path; a VAE is small either way.
        return AutoencoderKL.from_pretrained(source, low_cpu_mem_usage=False)
    except (OSError, ValueError) as error:
        # Offline machine without the hub cache, or weights that do not decode.
        detail = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise VAEWeightsError(f"could not load the d8 VAE from {source!r} ({detail[:160]}); pass a local "
                              f"diffusers AutoencoderKL folder (e.g. a download of the huggingface.co/"
                              f"stabilityai/sd-vae-ft-ema repo) with --vae_path / --vae-path.") from None


def _check_diffusers_folder(folder: Path) -> None:
    """Names the broken piece of a local diffusers folder (no config.json, bad JSON, no or garbage weights)
    before diffusers reports all of them as the same OSError."""
    config = folder / "config.json"
    if not config.is_file():
        raise VAEWeightsError(f"the d8 VAE folder {str(folder)!r} has no config.json, so it is not a diffusers "
                              "AutoencoderKL folder; pass the folder that holds config.json and the weights.")
    try:
        json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise VAEWeightsError(f"{config} is not valid JSON ({error}); re-download the VAE folder.") from None
    weights = sorted(folder.glob("diffusion_pytorch_model*.safetensors")) + sorted(folder.glob("diffusion_pytorch_model*.bin"))
    if not weights:
        raise VAEWeightsError(f"the d8 VAE folder {str(folder)!r} has config.json but no diffusion_pytorch_model "
                              ".safetensors/.bin weights; re-download the VAE folder.")
    for path in weights:
        if path.suffix == ".safetensors":
            try:
                with safe_open(str(path), framework="pt"):
                    pass
            except Exception as error:  # safetensors raises its own SafetensorError for any malformed header
                raise VAEWeightsError(f"the VAE weights {path} are not a readable safetensors file ({error}); "
                                      "re-download the VAE folder.") from None


class LatentCodec(nn.Module):
    """A frozen VAE seen as a codec between images in [-1, 1] and scaled latents.

    images (N, 3, H, W) in [-1, 1]  <->  latents (N, spec.channels, H / spec.factor, W / spec.factor),
    latents = posterior sample (or mean) * spec.scale.
    """

    def __init__(self, autoencoder: nn.Module, spec: LatentSpec):
        super().__init__()
        factor = 2 ** (len(autoencoder.config.block_out_channels) - 1)
        if autoencoder.config.latent_channels != spec.channels or factor != spec.factor:
            raise VAEWeightsError(
                f"the VAE has {autoencoder.config.latent_channels} latent channels and factor {factor}, but the "
                f"latent space expects {spec.channels} channels and factor {spec.factor}; pass the VAE that "
                f"matches --vae_version (d8: SD-VAE, d16: kl16.ckpt).")
        self.autoencoder = autoencoder
        self.spec = spec
        self._train_encoder = False
        self.autoencoder.requires_grad_(False)
        self.eval()

    @classmethod
    def from_autoencoder(cls, autoencoder: nn.Module, spec: LatentSpec) -> "LatentCodec":
        return cls(autoencoder, spec)

    @classmethod
    def load(cls, vae_version: str, vae_path=None, device=None, scale: Optional[float] = None) -> "LatentCodec":
        """Loads the codec for `vae_version` ("d8" or "d16").

        vae_path: d8 - a diffusers AutoencoderKL folder or a hub id (default stabilityai/sd-vae-ft-ema);
                  d16 - the kl16.ckpt file (or a folder holding it).
        scale:    overrides the spec's latent scale (e.g. one measured on the data as 1 / std); d8 defaults
                  to the folder's config.json `scaling_factor` (0.18215 for SD-VAE and untouched configs).
        """
        spec = get_latent_spec(vae_version)
        if vae_version == "d16":
            autoencoder = load_ldm_autoencoder(_resolve_kl16_path(vae_path))
        else:
            autoencoder = _load_d8_autoencoder(vae_path)
            # A diffusers folder carries its latent scale in config.json (SD-VAE: 0.18215, also the
            # diffusers default); a VAE trained elsewhere (the demo's) records its own 1 / std there.
            scale = scale if scale is not None else autoencoder.config.get("scaling_factor")
        if scale is not None:
            spec = dataclasses.replace(spec, scale=float(scale))
        codec = cls(autoencoder, spec)
        return codec.to(device) if device is not None else codec

    def to(self, *args, **kwargs):
        module = super().to(*args, **kwargs)
        # cuDNN convolutions are fastest in NHWC; on CPU the default layout is the faster one.
        if next(self.autoencoder.parameters()).is_cuda:
            self.autoencoder.to(memory_format=torch.channels_last)
        return module

    def train(self, mode: bool = True):
        """The autoencoder always stays in eval mode: the codec is a fixed preprocessing step."""
        super().train(False)
        return self

    def train_encoder(self, enabled: bool = True) -> "LatentCodec":
        """Unfreezes the encoder (+ quant_conv) for finetuning with --train_vae; the decoder stays frozen."""
        self._train_encoder = enabled
        for module in (self.autoencoder.encoder, self.autoencoder.quant_conv):
            module.requires_grad_(enabled)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.autoencoder.parameters()).device

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if x.is_cuda else x

    def encode_moments(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """images (N, 3, H, W) in [-1, 1] -> (mean, logvar), each (N, C, H/f, W/f) float32, UNscaled.

        logvar is clamped to [-30, 20] as in the diffusers/LDM posterior.
        """
        with torch.set_grad_enabled(self._train_encoder and torch.is_grad_enabled()):
            posterior = self.autoencoder.encode(self._prepare(images)).latent_dist
            return posterior.mean.float(), posterior.logvar.float()

    def latents_from_moments(self, mean: torch.Tensor, logvar: torch.Tensor, sample: bool = True,
                             generator: Optional[torch.Generator] = None,
                             noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(mean, logvar) (N, C, h, w) -> scaled latents (N, C, h, w).

        sample=True draws mean + exp(logvar / 2) * noise; the noise is `noise` if given, otherwise drawn
        from `generator` on the generator's device (so a CPU generator keyed by sample index gives the
        same latents on any device); sample=False returns the scaled mean.
        """
        if not sample:
            return mean * self.spec.scale
        if noise is None:
            noise_device = generator.device if generator is not None else mean.device
            noise = torch.randn(mean.shape, generator=generator, device=noise_device, dtype=mean.dtype)
        latents = mean + torch.exp(0.5 * logvar) * noise.to(mean.device, mean.dtype)
        return latents * self.spec.scale

    def encode(self, images: torch.Tensor, sample: bool = False,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """images (N, 3, H, W) in [-1, 1] -> scaled latents (N, C, H/f, W/f) (posterior mean or a sample)."""
        mean, logvar = self.encode_moments(images)
        return self.latents_from_moments(mean, logvar, sample=sample, generator=generator)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (N, C, h, w) -> images (N, 3, h*f, w*f) float32, clamped to [-1, 1]."""
        images = self.autoencoder.decode(self._prepare(latents / self.spec.scale)).sample
        return images.float().clamp(-1.0, 1.0).contiguous()


# ----------------------------------------------------------------------------------------------
# Identity for the latent cache manifest
# ----------------------------------------------------------------------------------------------

def _file_digest(paths) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def vae_identity(vae_version: str, vae_path=None) -> str:
    """A string that changes when the VAE weights change, stored in the latent cache manifest.

    Local weights are identified by a content hash (so moving the folder keeps the cache valid),
    hub ids by their name, e.g. "d16:kl16.ckpt:sha256=1a2b..." or "d8:hub:stabilityai/sd-vae-ft-ema".
    """
    get_latent_spec(vae_version)
    if vae_version == "d16":
        path = _resolve_kl16_path(vae_path)
        return f"d16:{path.name}:sha256={_file_digest([path])}"
    source = str(Path(vae_path).expanduser()) if vae_path is not None else DEFAULT_D8_HUB_ID
    if Path(source).is_dir():
        files = sorted(p for p in Path(source).iterdir() if p.is_file())
        return f"d8:folder:sha256={_file_digest(files)}"
    if _looks_like_hub_id(source):
        return f"d8:hub:{source}"
    raise VAEWeightsError(_MISSING_WEIGHTS["d8"].format(path=source))
