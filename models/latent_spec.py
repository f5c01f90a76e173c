"""What a latent space looks like: channel count, spatial down-sampling factor, scale.

Every piece that maps images to latents (pretraining, DiT/SiT training, the latent cache,
sampling) sizes its networks from one of these, so the numbers live in one place.
"""
from dataclasses import dataclass

from util.errors import UserError


@dataclass(frozen=True)
class LatentSpec:
    """A VAE's latent space.

    channels: latent channels (4 for SD-VAE, 16 for KL-16).
    factor:   pixels per latent cell along each side (8 or 16).
    scale:    multiplier applied to the posterior so latents have roughly unit variance.
    """

    channels: int
    factor: int
    scale: float

    def latent_size(self, image_size: int) -> int:
        """Side of the latent grid for a square image of `image_size` pixels."""
        if image_size % self.factor != 0:
            raise UserError(
                f"image size {image_size} is not divisible by the VAE factor {self.factor}; "
                f"use a multiple of {self.factor} (e.g. {max(self.factor, image_size // self.factor * self.factor)})."
            )
        return image_size // self.factor


# USP's two codecs: "d8" = SD-VAE (sd-vae-ft-ema/-mse), "d16" = the KL-16 autoencoder of MAR; and
# "vavae_f16d32" = VA-VAE (LightningDiT), whose latents are standardised per channel with released
# statistics (models.latent_norm); its scale is LightningDiT's latent_multiplier, 1.0.
LATENT_SPECS = {
    "d8": LatentSpec(channels=4, factor=8, scale=0.18215),
    "d16": LatentSpec(channels=16, factor=16, scale=0.2325),
    "vavae_f16d32": LatentSpec(channels=32, factor=16, scale=1.0),
}


def get_latent_spec(vae_version: str) -> LatentSpec:
    if vae_version not in LATENT_SPECS:
        raise UserError(f"unknown --vae_version {vae_version!r}; choose one of {sorted(LATENT_SPECS)}.")
    return LATENT_SPECS[vae_version]
