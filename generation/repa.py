"""REPA's training signal (sihyun-yu/REPA loss.py `SILoss`, train.py): the alignment loss.

For every target encoder, every image and every token: -cos(projector output, encoder patch token),
averaged over tokens, images and encoders, and added to the diffusion/flow loss times `proj_coeff` (0.5).
The targets come from `models.repa` (frozen encoders, computed without gradients under the run's
autocast) or from the feature cache (`util.feature_cache`).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from models.dinov2 import DINOV2_MODELS, weights_source
from models.repa import DEFAULT_ENC_TYPE, USP_ENC_TYPE, build_target, encoder_identity, encoder_resolution, parse_encoder_list
from util.cli import non_negative_float, parse_json_object, positive_int
from util.errors import UserError
from util.feature_cache import FeatureCache, read_manifest as read_feature_manifest

DEFAULT_PROJ_COEFF = 0.5


# Flags that fix the network's shapes or the training signal: a resumed REPA run must keep them.
RESUME_MUST_MATCH = ("repa", "enc_type", "encoder_depth", "projector_dim", "qk_norm", "proj_coeff")


def add_repa_flags(parser: argparse.ArgumentParser) -> None:
    """REPA's train.py flags (same names and defaults) plus the local-weights and feature-cache additions."""
    group = parser.add_argument_group("REPA (representation alignment, sihyun-yu/REPA)")
    group.add_argument("--repa", action="store_true", help="add REPA's alignment loss and projector heads")
    group.add_argument("--enc-type", "--repa-encoder", dest="enc_type", type=str, default=DEFAULT_ENC_TYPE,
                       help="target encoder(s), REPA's names, comma-separated (dinov2-vit-{s,b,l,g}, dinov2reg-vit-*), "
                            "or usp: the USP pretraining checkpoint's own encoder on the clean latents")
    group.add_argument("--repa-encoder-path", type=str, default=None,
                       help="local weights of each --enc-type (comma-separated; official .pth or timm .safetensors), "
                            "or the timm hub tag (e.g. vit_base_patch14_dinov2.lvd142m) when online")
    group.add_argument("--encoder-depth", type=positive_int, default=8,
                       help="block whose output tokens are aligned (REPA: 8)")
    group.add_argument("--proj-coeff", type=non_negative_float, default=DEFAULT_PROJ_COEFF,
                       help="weight of the alignment loss")
    group.add_argument("--projector-dim", type=positive_int, default=2048, help="hidden width of the projector MLP")
    group.add_argument("--qk-norm", action=argparse.BooleanOptionalAction, default=False,
                       help="REPA's optional per-head LayerNorm of queries and keys")
    group.add_argument("--repa-feature-cache", type=str, default=None,
                       help="cached target features (generation/cache_features.py) to use with --cached-path "
                            "instead of running the encoder every step")
    group.add_argument("--repa-encoder-kwargs", type=str, default="{}",
                       help="JSON overrides of the encoder's timm constructor (tests build tiny encoders)")


def projection_loss(targets: list[torch.Tensor], projections: list[torch.Tensor]) -> torch.Tensor:
    """Per-sample REPA loss (N,): -cos(projection, target) averaged over tokens and encoders.

    targets[i], projections[i]: (N, T, z_dim_i). REPA's batch value is the mean of this over the batch.
    """
    if len(targets) != len(projections):
        raise ValueError(f"{len(projections)} projectors but {len(targets)} target encoders; build the model with "
                         "one z_dim per encoder.")
    per_encoder = []
    for target, projection in zip(targets, projections):
        if target.shape != projection.shape:
            raise ValueError(f"target tokens {tuple(target.shape)} do not match the projected tokens "
                             f"{tuple(projection.shape)}; the encoder grid must equal the DiT/SiT token grid.")
        cosine = (F.normalize(target.float(), dim=-1) * F.normalize(projection.float(), dim=-1)).sum(dim=-1)
        per_encoder.append(-cosine.mean(dim=1))  # (N,)
    return torch.stack(per_encoder).mean(dim=0)


class ProjectionCapture:
    """Stands in for the network inside an objective: calls it with `return_projections=True`, hands the
    objective the prediction and keeps the projected tokens for the alignment loss.

    Both objectives call the network once per training batch (diffusion's VB term reuses that output), so
    the projections belong to the same forward as the prediction.
    """

    def __init__(self, model_fn):
        self.model_fn = model_fn
        self.projections = None

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        prediction, self.projections = self.model_fn(*args, return_projections=True, **kwargs)
        return prediction


class Alignment:
    """REPA's term of one training step: targets of the clean batch, and the weighted alignment loss.

    targets: frozen encoders (`models.repa.build_target`): DINOv2 runs on batch["x"] (images in [-1, 1]), the USP
    encoder on the clean latents; or None when the batch carries cached features (batch["repa_features"],
    (N, T, D), from `util.feature_cache`).
    """

    def __init__(self, targets, proj_coeff: float, autocast_fn):
        self.targets = list(targets) if targets is not None else None
        self.proj_coeff = float(proj_coeff)
        self.autocast_fn = autocast_fn  # () -> the run's autocast context (REPA encodes under it too)

    @torch.no_grad()
    def target_tokens(self, batch: dict, latents: torch.Tensor) -> list[torch.Tensor]:
        """Each target's tokens (N, T, D): DINOv2 on the batch's images, the USP encoder on its clean latents."""
        if self.targets is None:
            return [batch["repa_features"].float()]
        with self.autocast_fn():
            return [target(latents if target.input_kind == "latents" else batch["x"]).float()
                    for target in self.targets]

    def loss(self, objective_loss_fn, model_fn, batch: dict,
             latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(diffusion/flow loss mean, alignment loss mean) of one batch; the step minimises
        first + proj_coeff * second. `objective_loss_fn(model_fn) -> (N,)` runs the objective on `latents`."""
        targets = self.target_tokens(batch, latents)
        capture = ProjectionCapture(model_fn)
        objective_loss = objective_loss_fn(capture).mean()
        return objective_loss, projection_loss(targets, capture.projections).mean()


def check_repa_args(args) -> dict:
    """Validates the REPA flags before anything is loaded; returns the parsed --repa-encoder-kwargs."""
    if not args.repa:
        if args.repa_feature_cache is not None:
            raise UserError("--repa-feature-cache only applies to REPA training; add --repa or drop it.")
        return {}
    try:
        encoder_kwargs = parse_json_object(args.repa_encoder_kwargs, "--repa-encoder-kwargs")
        if args.enc_type != USP_ENC_TYPE:
            encoder_resolution(args.image_size)  # DINOv2 sees 224 px per 256
    except ValueError as error:
        raise UserError(str(error)) from None
    if args.repa_feature_cache is None:
        encoders = parse_encoder_list(args.enc_type, args.repa_encoder_path)
        for enc_type, weights in encoders:
            if enc_type == USP_ENC_TYPE:
                if not Path(weights).is_file():
                    raise UserError(f"--repa-encoder-path {weights} does not exist; --enc-type usp aligns with the "
                                    "USP pretraining checkpoint, pass that file.")
                continue
            if enc_type not in DINOV2_MODELS:
                raise UserError(f"--enc-type {enc_type!r} is not supported; choose from "
                                f"{', '.join([*DINOV2_MODELS, USP_ENC_TYPE])}.")
            try:
                weights_source(DINOV2_MODELS[enc_type], weights)
            except UserError as error:
                raise UserError(f"--repa-encoder-path: {error}") from None
            if args.cached_path is not None:
                raise UserError(f"REPA aligns with {enc_type}'s features of each image, which a latent cache does "
                                "not hold: add --repa-feature-cache (made by `python -m generation.cache_features`) or "
                                "train from --data-path.")
    else:
        if args.cached_path is None:
            raise UserError("--repa-feature-cache pairs with a latent cache: add --cached-path (the features of a "
                            "flipped latent are the flipped image's).")
        if "," in args.enc_type:
            raise UserError("a feature cache holds one encoder's features; use one --enc-type with "
                            "--repa-feature-cache.")
        if not Path(args.repa_feature_cache).is_dir():
            raise UserError(f"--repa-feature-cache {args.repa_feature_cache} does not exist; build it with "
                            "`python -m generation.cache_features` first.")
    return encoder_kwargs


def build_targets(args, encoder_kwargs: dict, device: torch.device) -> list:
    """The frozen target encoders of --enc-type (none with a feature cache), on `device`.

    Built inside `fork_rng`: timm initialises each network randomly before its weights load, and those draws
    must not move the run's generator (so --proj-coeff 0 trains exactly as plain training does).
    """
    if not args.repa or args.repa_feature_cache is not None:
        return []
    with torch.random.fork_rng(devices=[]):
        return [build_target(enc_type, weights, args.image_size, args.vae_version, encoder_kwargs).to(device)
                for enc_type, weights in parse_encoder_list(args.enc_type, args.repa_encoder_path)]


def open_feature_cache(args, latent_cache):
    """The --repa-feature-cache (a `util.feature_cache.FeatureCache`) or None; it must match the run, its
    `latent_cache` (a `LatentCacheDataset`: size, crop, files) and --enc-type."""
    if args.repa_feature_cache is None:
        return None
    dataset_manifest = latent_cache.manifest
    expect = {"image_size": args.image_size, "crop": dataset_manifest.get("crop", "center")}
    if "files_sha256" in dataset_manifest:
        expect["files_sha256"] = dataset_manifest["files_sha256"]
    if args.repa_encoder_path:
        expect["encoder"] = encoder_identity(args.enc_type, args.repa_encoder_path)
    features = FeatureCache(args.repa_feature_cache, expect=expect)
    if not features.manifest["encoder"].startswith(f"{args.enc_type}:"):
        raise UserError(f"--repa-feature-cache {args.repa_feature_cache} holds {features.manifest['encoder']} "
                        f"features, not {args.enc_type}; pass the matching --enc-type or cache.")
    return features


def repa_model_kwargs(args, targets: list) -> dict:
    """Constructor kwargs the REPA flags add to the DiT/SiT (none without --repa, except --qk-norm): one projector
    per target encoder, sized by its token width (read from the feature cache's manifest when there is one)."""
    kwargs = {"qk_norm": True} if args.qk_norm else {}
    if args.repa:
        z_dims = ([target.z_dim for target in targets] if targets
                  else [read_feature_manifest(args.repa_feature_cache)["dim"]])
        kwargs.update(encoder_depth=args.encoder_depth, z_dims=z_dims, projector_dim=args.projector_dim)
    return kwargs


def check_token_grid(model, targets: list, features) -> None:
    """The projected tokens and the targets' tokens must pair one to one (REPA: 16 x 16 each at 256 px)."""
    tokens = model.x_embedder.num_patches
    for target in targets:
        if target.num_tokens != tokens:
            raise UserError(f"{target.name} gives {target.num_tokens} tokens per image but the model has {tokens}; "
                            "REPA needs the same grid (e.g. a /2 model at 256 px with DINOv2's 16 x 16).")
    if features is not None and features.manifest["tokens"] != tokens:
        raise UserError(f"the feature cache holds {features.manifest['tokens']} tokens per image but the model has "
                        f"{tokens}; REPA needs the same grid.")
