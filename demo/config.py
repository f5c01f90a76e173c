"""The demo's budget: data size, model sizes and steps of every stage, for the full and the --fast run.

The full run is sized for about 10 minutes on 2 quiet CPU cores with `seeds` = 3 paired seeds. Per seed:
600 pretraining steps, 5-epoch linear probes evaluated once, four 300-step generators at batch 16 and lr
2e-3 (4x DiT's 5e-4, so that Adam opens the zero-initialised adaLN gates, through which the USP weights act,
sooner), and one held-out draw per val latent. These settings were chosen on a data split the
report never measures (`--set data_seed=10 --first-seed 100`).
--fast keeps every stage but takes a few steps each, so the test suite can run the whole pipeline.

Seeds: the dataset, the tiny VAE and the toy classifier are made once (`data_seed`); USP pretraining,
the linear probes and the four generator runs are repeated for the seeds `first_seed`,
`first_seed + 1`, ... Within a seed the USP and the scratch run share every random draw but the
initial weights (same batches, timesteps and noise), so their difference is a paired measurement.

All networks share one tiny transformer shape (`embed_dim`, `depth`, `num_heads`, patch size 1): the
USP encoder (MAE), the probed ViT and the DiT/SiT must have the same width, depth and heads for the
weights to transfer. `image_size` 32 gives 4x4 SD-VAE-style latents (factor 8, 4 channels), i.e. 16
tokens; 64 gives 8x8 = 64 tokens. The preset names are the official ones, their size overridden
with --model_kwargs.
"""
from dataclasses import asdict, dataclass, fields, replace

NUM_CLASSES = 10
VAE_VERSION = "d8"
PATCH_SIZE = 1
MAE_DECODER = dict(decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4)
MAE_MODEL = "vit_base_patch_vae"          # USP's latent MAE preset (d8), resized by the config
VIT_MODEL = "vit_base_patch16_vae"        # the classifier preset the probe uses
GENERATORS = {"dit": "DiT-B/2-VAE-simple", "sit": "SiT-B/2-VAE-simple"}  # affine norms: MAE norms load


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
    num_samples: int              # generated images per model for the toy metrics (first seed only)
    sampling_steps: int
    heldout_repeats: int          # (t, noise) draws per held-out latent
    image_size: int = 32
    embed_dim: int = 128
    depth: int = 4
    num_heads: int = 4
    pretrain_lr: float = 1e-3     # MAE's blr 1.5e-4 is scaled for batch 4096 (lr 2.4e-3); a 64-batch toy run takes 1e-3
    seeds: int = 3                # paired seeds (pretraining, probes, generators)
    first_seed: int = 0
    data_seed: int = 0            # dataset, VAE, toy classifier (val split drawn from data_seed + 1)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def seed_list(self) -> list:
        return list(range(self.first_seed, self.first_seed + self.seeds))

    def with_overrides(self, assignments: list) -> "DemoConfig":
        """A copy with `KEY=VALUE` strings applied (values parsed as the field's type)."""
        types = {field.name: field.type for field in fields(self)}
        changes = {}
        for assignment in assignments:
            key, _, value = assignment.partition("=")
            if key not in types or key == "name" or not value:
                raise ValueError(f"--set {assignment}: expected KEY=VALUE with KEY one of "
                                 f"{', '.join(k for k in types if k != 'name')}.")
            kind = types[key]  # int or float (the dataclass's annotations are the classes themselves)
            try:
                changes[key] = kind(value)
            except ValueError:
                raise ValueError(f"--set {assignment}: {value!r} is not a valid {kind.__name__}.") from None
        if changes.get("seeds", self.seeds) < 1:
            raise ValueError(f"--seeds {changes['seeds']}: need at least 1 (2 or more for an interval).")
        return replace(self, **changes)


def encoder_kwargs(cfg: DemoConfig) -> dict:
    return dict(embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads, patch_size=PATCH_SIZE)


def mae_kwargs(cfg: DemoConfig) -> dict:
    return {**encoder_kwargs(cfg), **MAE_DECODER}


def vit_kwargs(cfg: DemoConfig) -> dict:
    return encoder_kwargs(cfg)


def generator_kwargs(cfg: DemoConfig) -> dict:
    """DiT/SiT constructor overrides matching the encoder (hidden_size = embed_dim)."""
    return dict(hidden_size=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads, patch_size=PATCH_SIZE)


FULL = DemoConfig(
    name="full", train_per_class=300, val_per_class=50,
    vae_steps=400, vae_batch=8, vae_width=16, classifier_epochs=1,
    pretrain_steps=600, pretrain_batch=64, probe_epochs=5, probe_batch=256, probe_blr=20.0,
    gen_steps=300, gen_batch=16, gen_checkpoints=6, gen_lr=2e-3, ema_decay=0.99,
    num_samples=100, sampling_steps=25, heldout_repeats=1,
)

FAST = DemoConfig(
    name="fast", train_per_class=24, val_per_class=8,
    vae_steps=6, vae_batch=16, vae_width=8, classifier_epochs=1,
    pretrain_steps=6, pretrain_batch=32, probe_epochs=1, probe_batch=64, probe_blr=20.0,
    gen_steps=6, gen_batch=32, gen_checkpoints=2, gen_lr=5e-4, ema_decay=0.9,
    num_samples=20, sampling_steps=5, heldout_repeats=1, seeds=2,
)
