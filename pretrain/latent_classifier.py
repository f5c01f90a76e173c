"""The understanding model: images -> (frozen or trainable VAE encoder) -> ViT (or a DiT trunk) -> logits.

`LatentClassifier` wraps the network; `build_models` builds it seeded, from --finetune weights (USP/MAE via
models/transfer.py, or a DiT/SiT checkpoint for the dit_* probes).
"""
import torch
import torch.nn as nn

from models.dit_classifier import DIT_CLASSIFIERS, load_dit_backbone
from models.latent_spec import get_latent_spec
from models.transfer import transfer_pretrained
from models.vae import LatentCodec
from models.vit import create_vit
from pretrain.robustness import ddpm_alpha_bar, diffuse_latents
from util.checkpoint import load_checkpoint
from util.distributed import rank_seed, seed_everything
from util.errors import UserError
from util.precision import autocast


class LatentClassifier(nn.Module):
    """images (N, 3, H, W) -> logits (N, num_classes).

    With a codec the images ([-1, 1]) first go through the VAE encoder: latents = posterior mean
    * scale, (N, C, H/f, W/f), as in USP. Without one the input goes straight to the ViT (pixel
    presets, or latents read from the cache). The codec's weights only receive gradients after
    `codec.train_encoder()` (--train_vae); otherwise the encoder runs without autograd.
    `vae_precision` is the encoder's own autocast dtype (fp32 by default, so the latents equal
    the ones pretraining and the latent cache saw), independent of the ViT's --precision.
    """

    def __init__(self, vit: nn.Module, codec=None, vae_precision: str = "fp32", t_noise_alpha_bar=None,
                 latent_mixup=None):
        super().__init__()
        self.vit = vit
        self.codec = codec
        self.vae_precision = vae_precision
        self.t_noise_alpha_bar = t_noise_alpha_bar  # --add_t_noise: latents diffused to abar_t (USP)
        self.latent_mixup = latent_mixup  # Mixup/CutMix on the latents (USP's default, i.e. without --image_mix)

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor = None):
        """inputs (N, 3, H, W) -> logits (N, K); with `targets` (training with latent mixing) ->
        (logits, mixed soft targets (N, K)): USP encodes, adds t-noise, then mixes the latents."""
        if self.codec is not None:
            if self.vae_precision == "fp32":
                vae_autocast = torch.autocast(inputs.device.type, enabled=False)  # overrides an outer autocast
            else:
                vae_autocast = autocast(inputs.device, self.vae_precision)
            with vae_autocast:
                inputs = self.codec.encode(inputs.float() if self.vae_precision == "fp32" else inputs,
                                           sample=False).float()  # (N, C, h, w) scaled posterior mean
        if self.t_noise_alpha_bar is not None:
            inputs = diffuse_latents(inputs, self.t_noise_alpha_bar)
        if targets is None:
            return self.vit(inputs)
        inputs, targets = self.latent_mixup(inputs, targets)
        return self.vit(inputs), targets


def t_noise_alpha_bar(args, pixel: bool):
    """abar_t for --add_t_noise (USP: linear DDPM schedule, step --t), or None when off."""
    if not getattr(args, "add_t_noise", False):
        return None
    if pixel:
        raise UserError(f"--add_t_noise diffuses VAE latents but --model {args.model} reads pixels; use a *_vae preset.")
    return ddpm_alpha_bar(args.t)


def build_vit(args, head_init_std: float) -> nn.Module:
    """The ViT preset for the flags, initialised from --finetune (USP/MAE weights) when given.

    With --finetune the classifier head starts as trunc_normal(std=head_init_std) with zero bias (MAE/USP: 2e-5
    for fine-tuning, 0.01 for the linear probe); without it the head keeps timm's own initialisation, as USP's.
    --skip_depth k (USP's probe) builds the ViT without its last k blocks.
    """
    if args.model in DIT_CLASSIFIERS:
        return build_dit_probe(args, head_init_std)
    skip_depth = getattr(args, "skip_depth", 0)
    try:
        vit = create_vit(args.model, args.input_size, vae_version=args.vae_version, num_classes=args.nb_classes,
                         drop_path_rate=getattr(args, "drop_path", 0.0), global_pool=args.global_pool,
                         **({"skip_depth": skip_depth} if skip_depth else {}), **args.model_kwargs_dict)
    except TypeError:
        raise UserError(f"--model {args.model} has no --skip_depth (USP's ViT and DiT probes do); drop it.") from None
    if args.finetune and not args.eval:
        nn.init.trunc_normal_(vit.head.weight, std=head_init_std)
        nn.init.zeros_(vit.head.bias)
        try:
            report = transfer_pretrained(vit, args.finetune, head_init_std=head_init_std)
        except UserError as error:
            raise UserError(f"--finetune {args.finetune} cannot initialise --model {args.model}: {error}") from None
        print(f"Initialised from {args.finetune}:\n{report}")
    return vit


def build_dit_probe(args, head_init_std: float) -> nn.Module:
    """A DiT backbone classifier (USP's models_dit) from a DiT/SiT checkpoint's 'model' weights (--finetune)."""
    spec = get_latent_spec(args.vae_version)
    try:
        model = DIT_CLASSIFIERS[args.model](img_size=spec.latent_size(args.input_size), in_chans=spec.channels,
                                            patch_size=max(1, 16 // spec.factor), num_classes=args.nb_classes,
                                            skip_depth=getattr(args, "skip_depth", 0), **args.model_kwargs_dict)
    except (TypeError, ValueError) as error:
        raise UserError(f"--model {args.model} cannot be built from these flags: {error}") from None
    if args.finetune and not args.eval:
        nn.init.trunc_normal_(model.head.weight, std=head_init_std)
        nn.init.zeros_(model.head.bias)
        try:
            fresh = load_dit_backbone(model, load_checkpoint(args.finetune))
        except ValueError as error:
            raise UserError(f"--finetune {args.finetune} cannot initialise --model {args.model}: {error}") from None
        print(f"Initialised the DiT trunk from {args.finetune}; left at initialisation: {', '.join(fresh)}")
    return model


def build_models(args, dist_env, pixel: bool, head_init_std: float, adapt_vit=None) -> tuple:
    """(vit on the device, LatentCodec or None for pixel presets), seeded so runs are reproducible.

    The ViT is built under the global seed, so every rank starts from the same weights whatever the
    world size; afterwards each rank gets its own seed (dropout, drop path, mixup differ per rank).
    `adapt_vit(vit) -> vit` changes the network before it moves (the linear probe's head). The ViT
    comes before the VAE so a wrong --finetune checkpoint fails before the VAE weights are read.
    """
    seed_everything(args.seed)
    vit = build_vit(args, head_init_std)
    if adapt_vit is not None:
        vit = adapt_vit(vit)
    vit = vit.to(dist_env.device)
    seed_everything(rank_seed(args.seed, dist_env.rank))
    codec = None
    if not pixel:
        codec = LatentCodec.load(args.vae_version, args.vae_path, device=dist_env.device,
                                 latent_stats=args.latent_stats)
    return vit, codec


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel (or the model itself)."""
    return getattr(model, "module", model)
