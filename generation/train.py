"""Trains a DiT, SiT or LightningDiT on VAE latents, from scratch or from a USP checkpoint (`--finetune`).

    torchrun --nproc_per_node=8 -m generation.train --model DiT-XL/2-VAE-simple --data-path /data/imagenet/train \
        --finetune usp_pretrain.pth --image-size 256 --global-batch-size 256 --max-steps 400000

The model name's prefix picks the objective (DiT -> Gaussian diffusion, SiT -> transport); the loop in
`generation/engine.py` is shared. `--repa` adds REPA's representation alignment (generation/repa.py): projector
heads after block --encoder-depth pulled towards a frozen encoder's patch tokens (online, or from a feature cache).
Experiments live in `<results-dir>/NNN-<model>[-<exp-name>]/` with
`checkpoints/0000100.pt` (model, ema, opt, scaler, args + the `loop` resume record of util/train_state.py),
`log.txt` (JSON lines), TensorBoard events and `samples/` (EMA preview grids). The checks and builders `setup`
calls are in generation/train_setup.py.
"""
import argparse
import json
import sys
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from generation.engine import TrainStep, train_loop
from generation.objectives import build_objective
from generation.repa import (Alignment, add_repa_flags, build_targets, check_repa_args, check_token_grid,
                             repa_model_kwargs)
from generation.train_setup import (broadcast_object, build_dataset, build_eval_hooks, check_args, check_resume,
                                    experiment_dir_for)
from generation.train_utils import (ALL_MODELS, CHECKPOINT_PATTERN, LIGHTNINGDIT_MODEL_FLAGS, TRANSPORT_FLAGS, add_flags,
                                    build_model, build_vae, none_or_str)
from models.latent_spec import get_latent_spec
from models.transfer import transfer_pretrained
from util.checkpoint import CheckpointManager, args_to_dict, resolve_resume
from util.cli import finish_parser
from util.data import build_loader
from util.distributed import add_dist_timeout_arg, cleanup, init_distributed, rank_seed, seed_everything
from util.ema import requires_grad
from util.errors import UserError, run_cli
from util.loop import LoopPosition
from util.precision import add_determinism_arg, add_precision_arg, autocast, configure_backend, make_grad_scaler
from util.preemption import PreemptionHandler
from util.run_dir import discard_on_failure, release_output_dir
from util.run_log import RunLogger
from util.sampler import ResumableDistributedSampler
from util.train_state import load_parts, resume_position, training_state

# Names other modules and users' scripts import from here (defined in generation/train_utils.py).
__all__ = ["ALL_MODELS", "CHECKPOINT_PATTERN", "UserError", "build_model", "build_vae", "get_args_parser", "main",
           "none_or_str", "setup", "train"]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("DiT / SiT training (USP finetuning)", add_help=True)
    # The official DiT/SiT train.py flags.
    add_flags(parser, "--model")
    parser.add_argument("--data-path", type=str, default=None, help="ImageFolder root (e.g. imagenet/train)")
    parser.add_argument("--results-dir", type=str, default="results")
    add_flags(parser, "--image-size", "--num-classes")
    parser.add_argument("--epochs", type=int, default=1400)
    parser.add_argument("--global-batch-size", type=int, default=256)
    add_flags(parser, "--global-seed", "--vae")
    parser.add_argument("--num-workers", type=int, default=4)
    parser.add_argument("--strict-data", action="store_true",
                        help="stop on an unreadable image instead of skipping it")
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--ckpt-every", type=int, default=50_000)
    # USP's additions.
    parser.add_argument("--finetune", type=str, default=None, help="USP/MAE pretraining checkpoint to initialise from")
    parser.add_argument("--use-pretrain-layer", type=int, default=None, help="load only the first N pretrained blocks")
    parser.add_argument("--resume", type=str, default=None, help="checkpoint file or experiment directory")
    parser.add_argument("--exp-name", type=str, default=None, help="suffix of the experiment folder name")
    parser.add_argument("--eval-every", type=int, default=10_000, help="EMA preview (and metrics) every N steps; 0 = off")
    parser.add_argument("--cfg-scale", type=float, default=4.0)
    add_flags(parser, "--num-sampling-steps")
    parser.add_argument("--per-proc-batch-size", type=int, default=32, help="per-rank batch of the FID evaluation hook")
    parser.add_argument("--num-fid-samples", type=int, default=0,
                        help="samples for FID at each evaluation (0 = preview grid only)")
    parser.add_argument("--sample-dir", type=str, default="samples", help="evaluation outputs, inside the experiment")
    parser.add_argument("--fid-ref-batch", type=str, default=None,
                        help="ADM reference batch .npz; with --inception-weights the FID hook logs FID/IS/sFID")
    parser.add_argument("--inception-weights", type=str, default=None, help="torch-fidelity Inception weights file")
    parser.add_argument("--fid-cfg-scale", type=float, default=1.0, help="guidance of the FID samples (1 = none)")
    parser.add_argument("--wandb", action="store_true",
                        help="also log to Weights & Biases (SiT's flag; needs `pip install wandb`)")
    parser.add_argument("--evaluate", action="store_true",
                        help="USP's evaluation-only mode: run the evaluation hooks once on the --resume checkpoint "
                             "(its EMA weights; FID with --num-fid-samples) and exit without training")
    parser.add_argument("--fid-mode", type=str, choices=["ODE", "SDE"], default="SDE",
                        help="SiT sampler of the FID hook (USP's train.py: SDE; always fp32)")
    # SiT's transport flags (ignored for DiT).
    add_flags(parser, *TRANSPORT_FLAGS)
    # This re-implementation's additions.
    add_flags(parser, "--vae-version", "--vae-path", "--latent-stats")
    # LightningDiT (hustvl/LightningDiT config keys): block switches, transport options, optimizer.
    add_flags(parser, *LIGHTNINGDIT_MODEL_FLAGS)
    parser.add_argument("--use-lognorm", action="store_true", help="LightningDiT: logit-normal training times")
    parser.add_argument("--use-cosine-loss", action="store_true",
                        help="LightningDiT: add 1 - cos(v_pred, v) to the velocity MSE")
    add_flags(parser, "--timestep-shift")
    parser.add_argument("--beta2", type=float, default=0.999, help="AdamW beta2 (DiT/SiT: 0.999; LightningDiT: 0.95)")
    parser.add_argument("--max-grad-norm", type=float, default=None,
                        help="clip the gradient norm to this value (REPA: 1.0; default: no clipping, as DiT/SiT and "
                             "LightningDiT's 64-epoch config)")
    parser.add_argument("--cached-path", type=str, default=None, help="latent cache from util/latent_cache.py")
    parser.add_argument("--fixed-posterior-sample", action="store_true",
                        help="with --cached-path: one posterior sample per image and flip for the whole run, as "
                             "LightningDiT's extracted latents (default: a fresh sample every epoch)")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after N optimizer steps (checkpointing)")
    parser.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (constant, as DiT/SiT)")
    parser.add_argument("--ema-decay", type=float, default=0.9999)
    parser.add_argument("--eval-images", type=int, default=16, help="images in the EMA preview grid")
    parser.add_argument("--keep-last", type=int, default=0, help="keep only the newest K checkpoints (0 = all)")
    parser.add_argument("--milestone-every", type=int, default=100_000,
                        help="checkpoints at multiples of this step survive --keep-last rotation")
    add_flags(parser, "--device")
    add_precision_arg(parser, "--precision", default="bf16")
    parser.add_argument("--compile", action="store_true", help="torch.compile the network")
    add_determinism_arg(parser)
    add_dist_timeout_arg(parser)
    add_flags(parser, "--model-kwargs")
    parser.add_argument("--random-flip", action=argparse.BooleanOptionalAction, default=True,
                        help="random horizontal flips (DiT/SiT/USP); --no-random-flip as REPA trains")
    add_repa_flags(parser)
    return finish_parser(parser)


@dataclass
class Run:
    """Everything `train` needs, built and validated by `setup`."""

    args: argparse.Namespace
    dist_env: object
    experiment_dir: Path
    loader: object
    sampler: object
    step_fn: TrainStep
    position: LoopPosition
    eval_hooks: list
    logger: object
    manager: CheckpointManager
    local_batch: int
    batches_per_epoch: int  # per-rank batches of a full epoch


def setup(args) -> Run:
    """Validates, builds and (on --resume) restores everything, so user errors surface before training."""
    model_kwargs = check_args(args)
    encoder_kwargs = check_repa_args(args)
    spec = get_latent_spec(args.vae_version)
    latent_size = spec.latent_size(args.image_size)
    latent_shape = (spec.channels, latent_size, latent_size)

    resume_path, checkpoint = None, None
    if args.resume is not None:
        resume_path, checkpoint = resolve_resume(args.resume, pattern=CHECKPOINT_PATTERN)
        check_resume(args, checkpoint, resume_path)

    dist_env = init_distributed(args.device, args.dist_timeout_minutes)
    if args.global_batch_size % dist_env.world_size != 0:
        raise UserError(f"--global-batch-size {args.global_batch_size} is not divisible by the {dist_env.world_size} "
                        f"processes; use a multiple of {dist_env.world_size}.")
    local_batch = args.global_batch_size // dist_env.world_size
    # Before any data or weights: an unwritable --results-dir, or a resumed folder in use, stops here.
    experiment_dir = broadcast_object(experiment_dir_for(args, resume_path) if dist_env.is_main else None,
                                      dist_env.is_main)
    # A fresh experiment folder that is still empty when a later check refuses the run is removed again.
    with discard_on_failure(experiment_dir, enabled=dist_env.is_main and resume_path is None):
        seed_everything(rank_seed(args.global_seed, dist_env.rank))
        device = dist_env.device
        quiet = lambda _: None  # noqa: E731 - the other ranks would repeat rank 0's note
        configure_backend(device, args.precision, args.deterministic, say=print if dist_env.is_main else quiet)

        targets = build_targets(args, encoder_kwargs, device)  # REPA's frozen encoders (none without --repa / with a cache)
        model = build_model(args, {**repa_model_kwargs(args, targets), **model_kwargs}, latent_size, spec.channels)
        dataset = build_dataset(args, latent_shape, model.y_embedder.dropout_prob)
        check_token_grid(model, targets, dataset.features)
        sampler = ResumableDistributedSampler(len(dataset), num_replicas=dist_env.world_size, rank=dist_env.rank,
                                              shuffle=True, seed=args.global_seed, drop_last=True)
        if len(sampler) < local_batch:
            raise UserError(f"each of the {dist_env.world_size} processes gets {len(sampler)} samples per epoch, fewer "
                            f"than its batch of {local_batch}; lower --global-batch-size or add data.")

        report = None
        if checkpoint is None and args.finetune is not None:
            report = transfer_pretrained(model, args.finetune, use_pretrain_layer=args.use_pretrain_layer)
        model = model.to(device)
        objective = build_objective(args.model, args.num_classes, args.path_type, args.prediction, args.loss_weight,
                                    args.train_eps, args.sample_eps, use_lognorm=args.use_lognorm,
                                    use_cosine_loss=args.use_cosine_loss, timestep_shift=args.timestep_shift)
        needs_vae = args.cached_path is None or args.eval_every > 0
        codec = build_vae(args, device) if needs_vae else None

        # DDP broadcasts rank 0's weights (fresh init + --finetune) when it is built, so the EMA copy is taken
        # afterwards: every rank's EMA then starts from the same weights, as DiT's update_ema(decay=0).
        network = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if dist_env.distributed else model
        ema = deepcopy(model)
        requires_grad(ema, False)
        ema.eval()
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0, betas=(0.9, args.beta2),
                                      fused=device.type == "cuda")
        scaler = make_grad_scaler(device, args.precision)
        position = LoopPosition(epoch=0)
        batches_per_epoch = len(sampler) // local_batch
        if checkpoint is not None:
            load_parts(checkpoint, {"model": model, "ema": ema, "opt": optimizer, "scaler": scaler})
            position = resume_position(checkpoint, resume_path, batch_size=local_batch, accum=1,
                                       batches_per_epoch=batches_per_epoch)
            del checkpoint
        model.train()
        if args.compile:
            network = torch.compile(network)
        alignment = None
        if args.repa:
            alignment = Alignment(targets or None, args.proj_coeff, lambda: autocast(device, args.precision))
        step_fn = TrainStep(network, model, ema, objective, optimizer, scaler, device, args.precision,
                            ema_decay=args.ema_decay, codec=codec if args.cached_path is None else None,
                            alignment=alignment, max_grad_norm=args.max_grad_norm)
        loader = build_loader(dataset, sampler, local_batch, num_workers=args.num_workers,
                              pin_memory=device.type == "cuda", persistent_workers=True, drop_last=True)
        eval_hooks = build_eval_hooks(args, objective, codec, experiment_dir, latent_shape, dist_env)

        # Everything a user can get wrong has been checked: only now does the run leave files behind.
        wandb_run = {"project": "usp-generation", "name": experiment_dir.name, "config": args_to_dict(args)}
        # A resumed run redoes the steps after its checkpoint: their old log lines go (log.txt never repeats a step).
        logger = RunLogger(experiment_dir, dist_env.is_main, tensorboard=True, jsonl_name="log.txt",
                           wandb_run=wandb_run if args.wandb else None,
                           resume_step=position.global_step if resume_path is not None else None)
        say = logger.info
        if report is not None:
            say(f"Initialised {args.model} from {args.finetune}:\n{report}")
        if resume_path is not None:
            say(f"Resumed from {resume_path} at step {position.global_step} (epoch {position.epoch}, batch "
                f"{position.batch}).")
        keep_last = args.keep_last if args.keep_last > 0 else None
        manager = CheckpointManager(experiment_dir / "checkpoints", filename_fn=lambda step: f"{step:07d}.pt",
                                    keep_last=keep_last, is_main=dist_env.is_main,
                                    is_milestone=lambda step: args.milestone_every > 0 and step % args.milestone_every == 0)
        if dist_env.is_main:
            say(f"Experiment directory: {experiment_dir}")
            say(f"{args.model} ({objective.name}) parameters: {sum(p.numel() for p in model.parameters()):,}; "
                f"dataset {len(dataset):,} samples; {dist_env.world_size} process(es) x batch {local_batch}")
            (experiment_dir / "args.json").write_text(json.dumps(args_to_dict(args), indent=2))
        return Run(args, dist_env, experiment_dir, loader, sampler, step_fn, position, eval_hooks, logger, manager,
                   local_batch, batches_per_epoch)


def make_save_fn(run: Run):
    args, step_fn = run.args, run.step_fn

    def save(position: LoopPosition) -> None:
        # DiT/SiT's keys (model, ema, opt, args) + scaler + the resume record (a collective: gathers every rank's RNG).
        checkpoint = training_state({"model": step_fn.model, "ema": step_fn.ema, "opt": step_fn.optimizer,
                                     "scaler": step_fn.scaler}, args, position, batch_size=run.local_batch,
                                    batches_per_epoch=run.batches_per_epoch)
        path = run.manager.save(checkpoint, position.global_step)
        if path is not None:
            run.logger.info(f"Saved checkpoint to {path}")

    return save


def report_skipped_images(run: Run, step: int) -> None:
    """The epoch's skipped-image line and log entry (every rank calls it: the report merges their records)."""
    images = getattr(run.loader.dataset.base, "base", None)  # SafeImageFolder; None for a latent cache
    if hasattr(images, "skip_report"):
        run.logger.report_skips(images.skip_report(), step)


def train(run: Run) -> LoopPosition:
    args = run.args
    preemption = PreemptionHandler()
    position = train_loop(
        run.step_fn, run.loader, run.sampler, run.position, epochs=args.epochs, max_steps=args.max_steps,
        local_batch=run.local_batch, global_batch=args.global_batch_size, log_every=args.log_every,
        ckpt_every=args.ckpt_every, eval_every=args.eval_every, save_fn=make_save_fn(run),
        eval_hooks=run.eval_hooks, ema=run.step_fn.ema, logger=run.logger, lr=args.lr,
        device=run.dist_env.device, should_stop=preemption.should_stop, log_fn=run.logger.info,
        on_epoch_end=lambda position: report_skipped_images(run, position.global_step))
    if preemption.requested:
        run.logger.info(f"Stopped at step {position.global_step} on {preemption.signal_name}; resume with --resume "
                        f"{run.experiment_dir}")
    run.logger.close()
    release_output_dir(run.experiment_dir)
    return position


def evaluate_only(run: Run) -> dict:
    """USP's `train.py --evaluate`: the evaluation hooks once with the resumed EMA weights, no training step."""
    metrics = {}
    for hook in run.eval_hooks:
        metrics.update(hook(run.step_fn.ema, run.position.global_step))
    run.logger.log(run.position.global_step, metrics, prefix="eval")
    run.logger.info(f"Evaluated step {run.position.global_step}: "
                    + ", ".join(f"{key} {value:.4g}" for key, value in metrics.items()))
    run.logger.close()
    return metrics


def main(argv=None):
    """Exit codes (util.errors): 2 = a user error (one sentence on stderr), 1 = the loss diverged."""
    args = get_args_parser().parse_args(argv)
    run = run_cli(setup, args, prog="generation.train", cleanup=cleanup)
    try:
        if args.evaluate:
            return evaluate_only(run)
        run_cli(train, run, prog="generation.train")
    finally:
        cleanup()


if __name__ == "__main__":
    main()
