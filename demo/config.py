"""The demo's budget: data size, model sizes and steps of every stage, for the full and the --fast run.

The full run is sized to finish in about 10 minutes on 2 CPU cores (scripts/demo.sh runs two
single-threaded stages at a time); --fast keeps every stage but takes a few steps each, so the
test suite can run the whole pipeline in a couple of minutes.

All networks share one tiny transformer shape (`ENCODER`): the USP encoder (MAE), the probed ViT
and the DiT/SiT must have the same width, depth and heads for the weights to transfer. The 32 px
images give 4x4 SD-VAE-style latents (factor 8, 4 channels), so every model uses patch size 1
(16 tokens); the preset names are the official ones, their size overridden with --model_kwargs.
"""
from dataclasses import asdict, dataclass

IMAGE_SIZE = 32
NUM_CLASSES = 10
VAE_VERSION = "d8"
ENCODER = dict(embed_dim=128, depth=4, num_heads=4, patch_size=1)
MAE_DECODER = dict(decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4)
MAE_MODEL = "vit_base_patch_vae"          # USP's latent MAE preset (d8), resized by ENCODER
VIT_MODEL = "vit_base_patch16_vae"        # the classifier preset the probe uses
GENERATORS = {"dit": "DiT-B/2-VAE-simple", "sit": "SiT-B/2-VAE-simple"}  # affine norms: MAE norms load


def mae_kwargs() -> dict:
    return {**ENCODER, **MAE_DECODER}


def vit_kwargs() -> dict:
    return dict(ENCODER)


def generator_kwargs() -> dict:
    """DiT/SiT constructor overrides matching the encoder (hidden_size = embed_dim)."""
    return dict(hidden_size=ENCODER["embed_dim"], depth=ENCODER["depth"], num_heads=ENCODER["num_heads"],
                patch_size=ENCODER["patch_size"])


@dataclass(frozen=True)
class DemoConfig:
    """Step counts and sizes of one demo run (see the module docstring)."""

    name: str
    train_per_class: int
    val_per_class: int
    vae_steps: int
    vae_batch: int
    vae_width: int
    classifier_epochs: int
    pretrain_steps: int
    pretrain_batch: int
    probe_epochs: int
    probe_batch: int
    probe_blr: float              # LARS changes the head by ~lr x 0.001 of its norm per step: MAE's 0.1 needs
                                  # its ~100K steps; a probe of ~100 steps needs a proportionally larger lr
    gen_steps: int
    gen_batch: int
    gen_checkpoints: int          # held-out loss is measured at this many evenly spaced checkpoints
    gen_lr: float
    ema_decay: float
    num_samples: int              # generated images per model for the toy metrics (and FID)
    sampling_steps: int
    heldout_repeats: int          # (t, noise) draws per held-out latent
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


FULL = DemoConfig(
    name="full", train_per_class=300, val_per_class=50,
    vae_steps=400, vae_batch=8, vae_width=16, classifier_epochs=2,
    pretrain_steps=600, pretrain_batch=64, probe_epochs=3, probe_batch=256, probe_blr=20.0,
    gen_steps=600, gen_batch=32, gen_checkpoints=6, gen_lr=5e-4, ema_decay=0.99,
    num_samples=200, sampling_steps=50, heldout_repeats=2,
)

FAST = DemoConfig(
    name="fast", train_per_class=24, val_per_class=8,
    vae_steps=6, vae_batch=16, vae_width=8, classifier_epochs=1,
    pretrain_steps=6, pretrain_batch=32, probe_epochs=1, probe_batch=64, probe_blr=20.0,
    gen_steps=6, gen_batch=32, gen_checkpoints=2, gen_lr=5e-4, ema_decay=0.9,
    num_samples=20, sampling_steps=5, heldout_repeats=1,
)
