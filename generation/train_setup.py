"""The checks and builders behind generation/train.py's `setup`: the command line, the --resume checkpoint,
the experiment folder, the training set and the evaluation hooks (everything a user can get wrong is checked
here before any file is written)."""
import json
from glob import glob
from pathlib import Path

import torch.distributed as dist

from generation.eval_hooks import SampleGridHook, fid_eval_hook
from generation.repa import RESUME_MUST_MATCH as REPA_RESUME_MUST_MATCH, feature_cache_expectation
from generation.train_data import GenerationTrainSet
from generation.train_utils import build_latent_norm, check_model_args, check_vae_args, vae_source
from models.vae import vae_identity
from util.checkpoint import args_to_dict, require_training_state
from util.data import SeededDataset, build_image_folder, generation_transform
from util.disk import ensure_writable_dir
from util.errors import UserError
from util.feature_cache import FeatureCache
from util.latent_cache import LatentCacheDataset
from util.run_log import require_wandb
from util.run_dir import claim_output_dir
from util.train_state import read_record

# Arguments that must agree between a checkpoint and the command that resumes it: they fix the network's
# shapes and the order/content of the batches, without which "continue the exact run" is impossible.
RESUME_MUST_MATCH = ("model", "model_kwargs", "image_size", "num_classes", "vae_version", "global_batch_size",
                     "global_seed", "path_type", "prediction", "loss_weight", "train_eps", "sample_eps",
                     "use_qknorm", "use_swiglu", "use_rope", "use_rmsnorm", "wo_shift", "use_lognorm",
                     "use_cosine_loss", "latent_stats", "fixed_posterior_sample",
                     "random_flip", *REPA_RESUME_MUST_MATCH)


def check_args(args) -> dict:
    """Validates the command line; returns the parsed --model-kwargs."""
    model_kwargs = check_model_args(args)
    if args.cached_path is None and args.data_path is None:
        raise UserError("give --data-path (an ImageFolder root) or --cached-path (a latent cache).")
    if args.cached_path is not None and not Path(args.cached_path).is_dir():
        raise UserError(f"--cached-path {args.cached_path} does not exist; build it with `python -m pretrain.cache_latents` first.")
    if args.finetune is not None and args.resume is None and not Path(args.finetune).is_file():
        raise UserError(f"--finetune {args.finetune} does not exist; pass the USP pretraining checkpoint file.")
    for flag in ("global_batch_size", "log_every", "epochs", "eval_images", "num_sampling_steps"):
        if getattr(args, flag) <= 0:
            raise UserError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}.")
    if not 0 < args.beta2 < 1:
        raise UserError(f"--beta2 must be in (0, 1), got {args.beta2}.")
    if args.max_grad_norm is not None and args.max_grad_norm <= 0:
        raise UserError(f"--max-grad-norm must be positive, got {args.max_grad_norm}.")
    if args.max_steps is not None and args.max_steps <= 0:
        raise UserError(f"--max-steps must be positive, got {args.max_steps}.")
    for flag in ("fid_ref_batch", "inception_weights"):
        if getattr(args, flag) is not None and not Path(getattr(args, flag)).is_file():
            raise UserError(f"--{flag.replace('_', '-')} {getattr(args, flag)} does not exist; pass an existing file.")
    if args.wandb:
        require_wandb()
    if args.evaluate and (args.resume is None or args.eval_every <= 0):
        raise UserError("--evaluate scores the checkpoint given with --resume through the evaluation hooks; pass "
                        "--resume CKPT and keep --eval-every > 0 (add --num-fid-samples N for FID).")
    check_vae_args(args)
    return model_kwargs


def check_resume(args, checkpoint: dict, path: Path) -> None:
    saved = dict(checkpoint.get("args") or {})
    current = args_to_dict(args)
    for values in (saved, current):  # compare the overrides, not their JSON spelling
        if isinstance(values.get("model_kwargs"), str):
            values["model_kwargs"] = json.loads(values["model_kwargs"])
    for key in RESUME_MUST_MATCH:
        if key in saved and saved[key] != current[key]:
            raise UserError(f"--resume {path} was trained with --{key.replace('_', '-')} {saved[key]!r} but this "
                            f"command says {current[key]!r}; use the original value to continue that run.")
    require_training_state(checkpoint, path, keys=("model", "ema", "opt"),
                           hint="to start from these weights use --finetune.")
    if read_record(checkpoint) is None:
        raise UserError(f"--resume {path} records no training position (a released DiT/SiT checkpoint?); "
                              "to start from these weights use --finetune.")


def experiment_dir_for(args, resume_path) -> Path:
    """The resumed run's folder, or a fresh `<results-dir>/NNN-<model>[-<exp-name>]` (as DiT numbers them),
    claimed for this run (`util.run_dir`: locked while it runs). Main rank only.

    A fresh folder is created with mkdir(exist_ok=False), taking the next number if another run started at
    the same moment took this one: two runs never share (and interleave) one experiment folder.
    """
    if resume_path is not None:
        parent = Path(resume_path).resolve().parent
        folder = parent.parent if parent.name == "checkpoints" else parent
        claim_output_dir(folder, resume=str(resume_path), flag="--resume")
        return folder
    results = ensure_writable_dir(args.results_dir, flag="--results-dir")
    index = len(glob(f"{results}/*"))
    name = args.model.replace("/", "-") + (f"-{args.exp_name}" if args.exp_name else "")
    while True:
        folder = results / f"{index:03d}-{name}"
        try:
            folder.mkdir(exist_ok=False)
            break
        except FileExistsError:
            index += 1
    claim_output_dir(folder, flag="--results-dir")
    return folder


def broadcast_object(value, is_main: bool):
    """Rank 0's `value` on every rank (e.g. the experiment folder, which only rank 0 can number)."""
    if not dist.is_initialized():
        return value
    holder = [value if is_main else None]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]



def build_dataset(args, latent_shape, class_dropout_prob: float) -> GenerationTrainSet:
    """Cached latents or images (ADM center crop [+ flip]) wrapped with the objective's per-sample noise
    [and the REPA feature cache's features of the same image and orientation]."""
    if args.cached_path is not None:
        # The cache must hold ADM-center-cropped latents of this VAE at this size, else training silently
        # learns another distribution than the one the EMA previews decode.
        expect = dict(image_size=args.image_size, vae_version=args.vae_version, crop="center",
                      vae_identity=vae_identity(args.vae_version, vae_source(args)))
        latent_norm = build_latent_norm(args)
        base = LatentCacheDataset(args.cached_path, expect=expect, use_mean=False, seed=args.global_seed,
                                  normalize=latent_norm.normalize if latent_norm is not None else None,
                                  fixed_posterior=args.fixed_posterior_sample,
                                  random_flip=args.random_flip)
        classes, source = base.manifest["classes"], args.cached_path
    else:
        folder = build_image_folder(args.data_path, strict=args.strict_data)
        base = SeededDataset(folder, generation_transform(args.image_size, args.random_flip), seed=args.global_seed)
        classes, source = folder.classes, args.data_path
    if len(classes) != args.num_classes:
        raise UserError(f"{source} has {len(classes)} classes but --num-classes is {args.num_classes}; "
                        f"pass --num-classes {len(classes)}.")
    features = None
    if args.repa_feature_cache is not None:
        features = FeatureCache(args.repa_feature_cache, expect=feature_cache_expectation(args, base.manifest))
        if not features.manifest["encoder"].startswith(f"{args.enc_type}:"):
            raise UserError(f"--repa-feature-cache {args.repa_feature_cache} holds {features.manifest['encoder']} "
                            f"features, not {args.enc_type}; pass the matching --enc-type or cache.")
    return GenerationTrainSet(base, latent_shape, seed=args.global_seed, class_dropout_prob=class_dropout_prob,
                              online_vae=args.cached_path is None, features=features)


def build_eval_hooks(args, objective, codec, experiment_dir: Path, latent_shape, dist_env) -> list:
    """Hooks run every --eval-every steps with the EMA model; each returns a dict of metrics to log.

    The FID/IS hook of generation/eval_hooks.py plugs in here (it draws --num-fid-samples images with
    --per-proc-batch-size per rank, writes them under --sample-dir and returns the metrics).
    """
    if args.eval_every <= 0:
        return []
    hooks = [SampleGridHook(objective, codec, experiment_dir / args.sample_dir, latent_shape, args.eval_images,
                            args.num_classes, args.cfg_scale, args.num_sampling_steps, args.global_seed,
                            dist_env.device, args.precision, dist_env.is_main)]
    if args.num_fid_samples > 0:
        hooks.append(fid_eval_hook(args, objective, codec, experiment_dir / args.sample_dir, dist_env))
    return hooks
