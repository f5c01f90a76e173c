"""Latent codecs: frozen VAEs that map images in [-1, 1] to scaled latents and back.

USP works in two latent spaces (see `models.latent_spec`):
  d8  - SD-VAE (stabilityai/sd-vae-ft-ema or -mse), a diffusers `AutoencoderKL` folder or hub id;
  d16 - the KL-16 autoencoder released with MAR (`kl16.ckpt`), stored in the LDM ("taming") key layout;
  vavae_f16d32 - VA-VAE (hustvl/LightningDiT), the same LDM layout with 32 latent channels, whose latents
        are normalised per channel with released statistics (`latents_stats.pt`, see models.latent_norm).
All end up in one diffusers `AutoencoderKL`: the LDM-layout weights are renamed into diffusers' layout by
`models.ldm_autoencoder`, so there is a single encode/decode path for every codec.

The posterior moments (mean, logvar) are returned UNscaled, because that is what the latent cache stores:
sampling and scaling happen later (per sample, per epoch) in `latents_from_moments`.
"""
import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Optional, Tuple

import torch
import torch.nn as nn
from safetensors import safe_open

from models.latent_norm import ChannelNorm
from models.latent_spec import LatentSpec, get_latent_spec
from models.ldm_autoencoder import LDM_CODECS, VAVAE_FILENAME, load_ldm_autoencoder
from util.errors import UserError
from util.latent_stats import LATENT_STATS_FILENAME

DEFAULT_D8_HUB_ID = "stabilityai/sd-vae-ft-ema"
# Codecs whose latents are standardised per channel (LightningDiT's latent_norm), not by one scale.
PER_CHANNEL_CODECS = ("vavae_f16d32",)

# A hub id is "owner/name" with no path separators beyond the one slash and no leading dot or slash.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

_MISSING_WEIGHTS = {
    "d8": ("the d8 VAE {path!r} was not found: it must be a diffusers AutoencoderKL folder (config.json + "
           "weights) or a hub id, usually stabilityai/sd-vae-ft-ema (download that huggingface.co repo for "
           "offline use); pass it with --vae_path / --vae-path."),
    "d16": ("--vae_version d16 needs the KL-16 weights file kl16.ckpt (released with MAR, "
            "github.com/LTH14/mar, as pretrained_models/vae/kl16.ckpt); {path!r} was not found, "
            "so download it and pass its path with --vae_path / --vae-path."),
    "vavae_f16d32": ("--vae_version vavae_f16d32 needs the VA-VAE weights " + VAVAE_FILENAME + " (from "
                     "huggingface.co/hustvl/vavae-imagenet256-f16d32-dinov2, with latents_stats.pt beside it); "
                     "{path!r} was not found, so download that folder and pass it with --vae_path / --vae-path."),
}




# ----------------------------------------------------------------------------------------------
# The codec
# ----------------------------------------------------------------------------------------------

def _looks_like_hub_id(path: str) -> bool:
    return bool(_HUB_ID.match(path)) and not os.path.exists(path)


def _resolve_ldm_path(vae_version: str, vae_path) -> Path:
    """The weights file of an LDM-layout codec for `vae_path` (a file, or a folder holding the released file
    name: kl16.ckpt, vavae-imagenet256-f16d32-dinov2.pt); raises if missing."""
    filename = LDM_CODECS[vae_version]["filename"]
    if vae_path is None:
        raise UserError(_MISSING_WEIGHTS[vae_version].format(path=filename))
    path = Path(vae_path).expanduser()
    if path.is_dir():
        path = path / filename
    if not path.is_file():
        raise UserError(_MISSING_WEIGHTS[vae_version].format(path=str(path)))
    return path


def load_latent_norm(vae_version: str, vae_path=None, latent_stats=None, require_stats: bool = True,
                     spec: Optional[LatentSpec] = None) -> ChannelNorm:
    """The codec's normalisation: one scale factor, or VA-VAE's per-channel statistics.

    latent_stats: a latents_stats.pt path or a ChannelNorm; None looks for latents_stats.pt beside the
    weights (`vae_path`, a file or its folder). Without statistics and with require_stats=False the latents
    stay unnormalised (times the multiplier), which is what computing the statistics needs. Needs no VAE
    weights loaded, so training from a latent cache normalises without the autoencoder.
    """
    spec = spec or get_latent_spec(vae_version)
    if isinstance(latent_stats, ChannelNorm):
        return latent_stats
    path = None
    if vae_version in PER_CHANNEL_CODECS:
        weights = _resolve_ldm_path(vae_version, vae_path) if latent_stats is None else None
        path = Path(latent_stats) if latent_stats is not None else weights.parent / LATENT_STATS_FILENAME
    if path is None or (not path.is_file() and not require_stats):
        return ChannelNorm.scalar(spec.scale, spec.channels)
    norm = ChannelNorm.load(path, multiplier=spec.scale)
    if norm.channels != spec.channels:
        raise UserError(f"{str(path)!r} holds statistics for {norm.channels} channels but {vae_version} latents "
                              f"have {spec.channels}; pass the latents_stats.pt of this VAE.")
    return norm



def _load_d8_autoencoder(vae_path):
    from diffusers import AutoencoderKL

    source = str(Path(vae_path).expanduser()) if vae_path is not None else DEFAULT_D8_HUB_ID
    if Path(source).is_file():
        raise UserError(f"the d8 VAE {source!r} is a file, but d8 needs a diffusers AutoencoderKL folder "
                              "(config.json + diffusion_pytorch_model.safetensors); pass that folder with "
                              "--vae_path / --vae-path (a kl16.ckpt file goes with --vae_version d16).")
    if not (Path(source).is_dir() or _looks_like_hub_id(source)):
        raise UserError(_MISSING_WEIGHTS["d8"].format(path=source))
    if Path(source).is_dir():
        _check_diffusers_folder(Path(source))
    try:
        # low_cpu_mem_usage=False: the default (True) needs `accelerate` and, without it, diffusers prints a
        # six-line warning at every load before falling back to this very path; a VAE is small either way.
        return AutoencoderKL.from_pretrained(source, low_cpu_mem_usage=False)
    except (OSError, ValueError) as error:
        # Offline machine without the hub cache, or weights that do not decode.
        detail = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise UserError(f"could not load the d8 VAE from {source!r} ({detail[:160]}); pass a local "
                              f"diffusers AutoencoderKL folder (e.g. a download of the huggingface.co/"
                              f"stabilityai/sd-vae-ft-ema repo) with --vae_path / --vae-path.") from None


def channels_last_vae() -> bool:
    """Whether the VAE runs in channels_last on CUDA (default yes; USP_VAE_CHANNELS_LAST=0 for NCHW)."""
    return os.environ.get("USP_VAE_CHANNELS_LAST", "1") != "0"


def _check_diffusers_folder(folder: Path) -> None:
    """Names the broken piece of a local diffusers folder (no config.json, bad JSON, no or garbage weights)
    before diffusers reports all of them as the same OSError."""
    config = folder / "config.json"
    if not config.is_file():
        raise UserError(f"the d8 VAE folder {str(folder)!r} has no config.json, so it is not a diffusers "
                              "AutoencoderKL folder; pass the folder that holds config.json and the weights.")
    try:
        json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{config} is not valid JSON ({error}); re-download the VAE folder.") from None
    weights = sorted(folder.glob("diffusion_pytorch_model*.safetensors")) + sorted(folder.glob("diffusion_pytorch_model*.bin"))
    if not weights:
        raise UserError(f"the d8 VAE folder {str(folder)!r} has config.json but no diffusion_pytorch_model "
                              ".safetensors/.bin weights; re-download the VAE folder.")
    for path in weights:
        if path.suffix == ".safetensors":
            try:
                with safe_open(str(path), framework="pt"):
                    pass
            except Exception as error:  # safetensors raises its own SafetensorError for any malformed header
                raise UserError(f"the VAE weights {path} are not a readable safetensors file ({error}); "
                                      "re-download the VAE folder.") from None


class LatentCodec(nn.Module):
    """A frozen VAE seen as a codec between images in [-1, 1] and normalised latents.

    images (N, 3, H, W) in [-1, 1]  <->  latents (N, spec.channels, H / spec.factor, W / spec.factor),
    latents = latent_norm.normalize(posterior sample or mean): z * spec.scale for SD-VAE / KL-16,
    (z - mean) / std * multiplier per channel for VA-VAE (`models.latent_norm.ChannelNorm`).
    """

    def __init__(self, autoencoder: nn.Module, spec: LatentSpec, latent_norm: Optional[ChannelNorm] = None):
        super().__init__()
        factor = 2 ** (len(autoencoder.config.block_out_channels) - 1)
        if autoencoder.config.latent_channels != spec.channels or factor != spec.factor:
            raise UserError(
                f"the VAE has {autoencoder.config.latent_channels} latent channels and factor {factor}, but the "
                f"latent space expects {spec.channels} channels and factor {spec.factor}; pass the VAE that "
                f"matches --vae_version (d8: SD-VAE, d16: kl16.ckpt, vavae_f16d32: VA-VAE).")
        self.autoencoder = autoencoder
        self.spec = spec
        self.latent_norm = latent_norm if latent_norm is not None else ChannelNorm.scalar(spec.scale, spec.channels)
        self._train_encoder = False
        self.autoencoder.requires_grad_(False)
        self.eval()

    @classmethod
    def from_autoencoder(cls, autoencoder: nn.Module, spec: LatentSpec,
                         latent_norm: Optional[ChannelNorm] = None) -> "LatentCodec":
        return cls(autoencoder, spec, latent_norm)

    @classmethod
    def load(cls, vae_version: str, vae_path=None, device=None, scale: Optional[float] = None,
             latent_stats=None, require_stats: bool = True) -> "LatentCodec":
        """Loads the codec for `vae_version` ("d8", "d16" or "vavae_f16d32").

        vae_path: d8 - a diffusers AutoencoderKL folder or a hub id (default stabilityai/sd-vae-ft-ema);
                  d16 - the kl16.ckpt file (or a folder holding it);
                  vavae_f16d32 - vavae-imagenet256-f16d32-dinov2.pt (or the folder holding it and
                  latents_stats.pt, i.e. a download of the huggingface.co repo).
        scale:    overrides the spec's latent scale (e.g. one measured on the data as 1 / std); d8 defaults
                  to the folder's config.json `scaling_factor` (0.18215 for SD-VAE and untouched configs);
                  for VA-VAE it is LightningDiT's `latent_multiplier` (1.0).
        latent_stats, require_stats: VA-VAE's per-channel statistics (see `load_latent_norm`).
        """
        spec = get_latent_spec(vae_version)
        weights = None
        if vae_version in LDM_CODECS:
            weights = _resolve_ldm_path(vae_version, vae_path)
            autoencoder = load_ldm_autoencoder(weights, vae_version=vae_version)
        else:
            autoencoder = _load_d8_autoencoder(vae_path)
            # A diffusers folder carries its latent scale in config.json (SD-VAE: 0.18215, also the
            # diffusers default); a VAE trained elsewhere (the demo's) records its own 1 / std there.
            scale = scale if scale is not None else autoencoder.config.get("scaling_factor")
        if scale is not None:
            spec = dataclasses.replace(spec, scale=float(scale))
        codec = cls(autoencoder, spec, load_latent_norm(vae_version, weights, latent_stats, require_stats, spec))
        return codec.to(device) if device is not None else codec

    def to(self, *args, **kwargs):
        module = super().to(*args, **kwargs)
        # cuDNN convolutions are fastest in NHWC, but GroupNorm needs NCHW and may copy twice per layer:
        # USP_VAE_CHANNELS_LAST=0 keeps NCHW (benchmark.py's vae-encode rows measure both). CPU keeps NCHW.
        if next(self.autoencoder.parameters()).is_cuda and channels_last_vae():
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
        return x.contiguous(memory_format=torch.channels_last) if x.is_cuda and channels_last_vae() else x

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
        """(mean, logvar) (N, C, h, w) -> normalised latents (N, C, h, w).

        sample=True draws mean + exp(logvar / 2) * noise; the noise is `noise` if given, otherwise drawn
        from `generator` on the generator's device (so a CPU generator keyed by sample index gives the
        same latents on any device); sample=False returns the scaled mean.
        """
        if not sample:
            return self.latent_norm.normalize(mean)
        if noise is None:
            noise_device = generator.device if generator is not None else mean.device
            noise = torch.randn(mean.shape, generator=generator, device=noise_device, dtype=mean.dtype)
        latents = mean + torch.exp(0.5 * logvar) * noise.to(mean.device, mean.dtype)
        return self.latent_norm.normalize(latents)

    def encode(self, images: torch.Tensor, sample: bool = False,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """images (N, 3, H, W) in [-1, 1] -> scaled latents (N, C, H/f, W/f) (posterior mean or a sample)."""
        mean, logvar = self.encode_moments(images)
        return self.latents_from_moments(mean, logvar, sample=sample, generator=generator)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (N, C, h, w) -> images (N, 3, h*f, w*f) float32, clamped to [-1, 1]."""
        raw = self.latent_norm.denormalize(latents.to(self.device))
        images = self.autoencoder.decode(self._prepare(raw)).sample
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
    if vae_version in LDM_CODECS:
        path = _resolve_ldm_path(vae_version, vae_path)
        return f"{vae_version}:{path.name}:sha256={_file_digest([path])}"
    source = str(Path(vae_path).expanduser()) if vae_path is not None else DEFAULT_D8_HUB_ID
    if Path(source).is_dir():
        files = sorted(p for p in Path(source).iterdir() if p.is_file())
        return f"d8:folder:sha256={_file_digest(files)}"
    if _looks_like_hub_id(source):
        return f"d8:hub:{source}"
    raise UserError(_MISSING_WEIGHTS["d8"].format(path=source))
