"""Trains a DiT, SiT or LightningDiT on VAE latents, from scratch or from a USP checkpoint (`--finetune`).

    torchrun --nproc_per_node=8 -m generation.train --model DiT-XL/2-VAE-simple --data-path /data/imagenet/train \
        --finetune usp_pretrain.pth --image-size 256 --global-batch-size 256 --max-steps 400000

Reads top to bottom as DiT's train.py: flags, checks, data, the training step, setup, the loop. The model
name's prefix picks the objective (generation/objectives.py: DiT -> Gaussian diffusion, SiT -> transport),
which also draws the timesteps. `--repa` adds REPA's representation alignment (generation/repa.py).
Experiments live in `<results-dir>/NNN-<model>[-<exp-name>]/` with `checkpoints/0000100.pt` (model, ema, opt,
scaler, args + the `loop` resume record of util/train_state.py), `log.txt` (JSON lines), TensorBoard events
and `samples/` (EMA preview grids, generation/eval_hooks.py).
"""
import argparse
import json
import os
import sys
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from generation.eval_hooks import build_eval_hooks
from generation.objectives import SCHEDULE_SAMPLERS, build_objective
from generation.repa import (RESUME_MUST_MATCH as REPA_RESUME_MUST_MATCH, Alignment, add_repa_flags, build_targets,
                             check_repa_args, check_token_grid, repa_model_kwargs)
from generation.train_data import build_dataset
from generation.train_utils import add_model_flags, build_model, build_vae, check_model_args, check_vae_args
from models.latent_spec import get_latent_spec
from models.transfer import transfer_pretrained
from util.checkpoint import CheckpointManager, args_to_dict, require_same_args, require_training_state, resolve_resume
from util.cli import (advising_resume, continue_command, decay, finish_parser, finite_float, non_negative_int, number,
                      positive_float, positive_int)
from util.data import build_loader
from util.distributed import (DEFAULT_TIMEOUT_MINUTES, all_reduce_mean, cleanup, init_distributed, rank_seed,
                              seed_everything)
from util.ema import requires_grad, update_ema
from util.errors import UserError, run_cli
from util.loop import LoopPosition, LossWindow
from util.precision import PRECISIONS, autocast, configure_backend, make_grad_scaler
from util.preemption import PreemptionHandler
from util.run_dir import claim_numbered_dir, claim_output_dir, discard_on_failure, release_output_dir
from util.run_log import RunLogger, Throughput, peak_memory_mb, require_wandb
from util.sampler import ResumableDistributedSampler
from util.train_state import load_parts, read_record, resume_position, training_state

CHECKPOINT_PATTERN = r"^(\d+)\.pt$"
MODULE = "generation.train"  # how advice to the user names this command


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("DiT / SiT training (USP finetuning)", add_help=True)
    # The official DiT/SiT train.py flags (+ --model, --image-size, --num-classes, --vae, SiT's transport flags).
    add_model_flags(parser)
    parser.add_argument("--data-path", type=str, default=None, help="ImageFolder root (e.g. imagenet/train)")
    parser.add_argument("--results-dir", type=str, default="results")
    parser.add_argument("--epochs", type=positive_int, default=1400)
    parser.add_argument("--global-batch-size", type=positive_int, default=256)
    parser.add_argument("--global-seed", type=non_negative_int, default=0)
    parser.add_argument("--num-workers", type=non_negative_int, default=4)
    parser.add_argument("--log-every", type=positive_int, default=100)
    parser.add_argument("--ckpt-every", type=positive_int, default=50_000)
    parser.add_argument("--wandb", action="store_true",
                        help="also log to Weights & Biases (SiT's flag; needs `pip install wandb`)")
    # USP's additions.
    parser.add_argument("--finetune", type=str, default=None, help="USP/MAE pretraining checkpoint to initialise from")
    parser.add_argument("--use-pretrain-layer", type=non_negative_int, default=None,
                        help="load only the first N pretrained blocks (0: none, as USP)")
    parser.add_argument("--resume", type=str, default=None, help="checkpoint file or experiment directory")
    parser.add_argument("--exp-name", type=str, default=None, help="suffix of the experiment folder name")
    parser.add_argument("--evaluate", action="store_true",
                        help="USP's evaluation-only mode: run the evaluation hooks once on the --resume checkpoint "
                             "(its EMA weights; FID with --num-fid-samples) and exit without training")
    # Evaluation hooks (generation/eval_hooks.py), every --eval-every steps with the EMA weights.
    parser.add_argument("--eval-every", type=non_negative_int, default=100_000,
                        help="EMA preview (and metrics) every N steps; 0 = off (USP's default 100000)")
    parser.add_argument("--eval-images", type=positive_int, default=16, help="images in the EMA preview grid")
    parser.add_argument("--cfg-scale", type=finite_float, default=1.0,
                        help="guidance of the FID samples and the preview grid (USP: 1.0 = none)")
    parser.add_argument("--per-proc-batch-size", type=positive_int, default=128,
                        help="per-rank batch of the FID evaluation hook (USP's default)")
    parser.add_argument("--num-fid-samples", type=non_negative_int, default=0,
                        help="samples for FID at each evaluation (0 = preview grid only)")
    parser.add_argument("--sample-dir", type=str, default="samples", help="evaluation outputs, inside the experiment")
    parser.add_argument("--fid-ref-batch", type=str, default=None,
                        help="ADM reference batch .npz; with --inception-weights the FID hook logs FID/IS/sFID")
    parser.add_argument("--inception-weights", type=str, default=None, help="torch-fidelity Inception weights file")
    parser.add_argument("--fid-mode", type=str, choices=["ODE", "SDE"], default="SDE",
                        help="SiT sampler of the FID hook (USP's train.py: SDE; always fp32)")
    # LightningDiT's transport and optimizer options (hustvl/LightningDiT config keys).
    parser.add_argument("--use-lognorm", action="store_true", help="LightningDiT: logit-normal training times")
    parser.add_argument("--use-cosine-loss", action="store_true",
                        help="LightningDiT: add 1 - cos(v_pred, v) to the velocity MSE")
    parser.add_argument("--beta2", type=number(float, low=0, high=1, low_open=True, high_open=True, what="a beta"),
                        default=0.999, help="AdamW beta2 (DiT/SiT: 0.999; LightningDiT: 0.95)")
    parser.add_argument("--max-grad-norm", type=positive_float, default=None,
                        help="clip the gradient norm to this value (REPA: 1.0; default: no clipping, as DiT/SiT and "
                             "LightningDiT's 64-epoch config)")
    # This re-implementation's additions.
    parser.add_argument("--schedule-sampler", type=str, default="uniform", choices=sorted(SCHEDULE_SAMPLERS),
                        help="how training draws timesteps (ADM's flag; generation/objectives.py)")
    parser.add_argument("--strict-data", action="store_true",
                        help="stop on an unreadable image instead of skipping it")
    parser.add_argument("--cached-path", type=str, default=None, help="latent cache from pretrain/cache_latents.py")
    parser.add_argument("--fixed-posterior-sample", action="store_true",
                        help="with --cached-path: one posterior sample per image and flip for the whole run, as "
                             "LightningDiT's extracted latents (default: a fresh sample every epoch)")
    parser.add_argument("--random-flip", action=argparse.BooleanOptionalAction, default=True,
                        help="random horizontal flips (DiT/SiT/USP); --no-random-flip as REPA trains")
    parser.add_argument("--max-steps", type=positive_int, default=None,
                        help="stop after N optimizer steps (checkpointing)")
    parser.add_argument("--lr", type=positive_float, default=1e-4, help="AdamW learning rate (constant, as DiT/SiT)")
    parser.add_argument("--ema-decay", type=decay, default=0.9999)
    parser.add_argument("--keep-last", type=non_negative_int, default=0,
                        help="keep only the newest K checkpoints (0 = all)")
    parser.add_argument("--milestone-every", type=non_negative_int, default=100_000,
                        help="checkpoints at multiples of this step survive --keep-last rotation")
    parser.add_argument("--precision", default="bf16", choices=sorted(PRECISIONS),
                        help="autocast dtype: bf16, fp16 (with a dynamic grad scaler) or fp32 (no autocast)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the network")
    parser.add_argument("--deterministic", action="store_true",
                        help="deterministic CUDA kernels (bit-exact GPU resume, slower); CPU runs are deterministic")
    parser.add_argument("--dist-timeout-minutes", type=positive_float, default=DEFAULT_TIMEOUT_MINUTES,
                        help="minutes a collective may wait before the process group aborts (a long FID hook)")
    parser.add_argument("--allow-changed-args", action="store_true",
                        help="--resume with a changed run-defining flag (RESUME_MUST_MATCH), logging what changed")
    add_repa_flags(parser)
    return finish_parser(parser)


# Arguments that must agree between a checkpoint and the command that resumes it: they fix the network's
# shapes and the order/content of the batches, without which "continue the exact run" is impossible.
RESUME_MUST_MATCH = ("model", "model_kwargs", "image_size", "num_classes", "vae_version", "global_batch_size",
                     "global_seed", "path_type", "prediction", "loss_weight", "train_eps", "sample_eps",
                     "use_qknorm", "use_swiglu", "use_rope", "use_rmsnorm", "wo_shift", "use_lognorm",
                     "use_cosine_loss", "schedule_sampler", "latent_stats", "fixed_posterior_sample",
                     "random_flip", *REPA_RESUME_MUST_MATCH)


def check_args(args) -> dict:
    """Validates the command line before anything is loaded; returns the parsed --model-kwargs."""
    model_kwargs = check_model_args(args)
    if args.cached_path is None and args.data_path is None:
        raise UserError("give --data-path (an ImageFolder root) or --cached-path (a latent cache).")
    if args.cached_path is not None and not Path(args.cached_path).is_dir():
        raise UserError(f"--cached-path {args.cached_path} does not exist; build it with `python -m pretrain.cache_latents` "
                        "first.")
    if args.finetune is not None and args.resume is None and not Path(args.finetune).is_file():
        raise UserError(f"--finetune {args.finetune} does not exist; pass the USP pretraining checkpoint file.")
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
    require_same_args(checkpoint, args, RESUME_MUST_MATCH, path, allow=args.allow_changed_args,
                      log=print if os.environ.get("RANK", "0") == "0" else lambda _: None)  # before the process group
    require_training_state(checkpoint, path, keys=("model", "ema", "opt"),
                           hint="to start from these weights use --finetune.")
    if read_record(checkpoint) is None:
        raise UserError(f"--resume {path} records no training position (a released DiT/SiT checkpoint?); "
                        "to start from these weights use --finetune.")


def experiment_dir_for(args, resume_path) -> Path:
    """The resumed run's folder, or a fresh `<results-dir>/NNN-<model>[-<exp-name>]` (as DiT numbers them),
    claimed for this run (`util.run_dir`: locked while it runs). Main rank only."""
    if resume_path is not None:
        parent = Path(resume_path).resolve().parent
        folder = parent.parent if parent.name == "checkpoints" else parent
        claim_output_dir(folder, resume=str(resume_path), flag="--resume")
        return folder
    name = args.model.replace("/", "-") + (f"-{args.exp_name}" if args.exp_name else "")
    return claim_numbered_dir(args.results_dir, name, flag="--results-dir")


class TrainStep:
    """One optimizer step: [online VAE encode] -> objective loss [+ REPA alignment] -> backward [-> clip] -> AdamW
    -> EMA update. Returns the batch's mean loss as a detached device scalar (no host sync).

    network: what runs forward (DDP- and/or torch.compile-wrapped `model`); model: the bare module whose
    weights the EMA tracks; alignment: REPA's `generation.repa.Alignment` or None; seed: keys the timesteps.
    """

    def __init__(self, network: nn.Module, model: nn.Module, ema: nn.Module, objective, optimizer, scaler,
                 device: torch.device, precision: str, ema_decay: float = 0.9999, codec: Optional[nn.Module] = None,
                 alignment=None, max_grad_norm: Optional[float] = None, seed: int = 0):
        self.network, self.model, self.ema, self.objective = network, model, ema, objective
        self.optimizer, self.scaler, self.device, self.precision = optimizer, scaler, device, precision
        self.ema_decay, self.codec, self.alignment, self.max_grad_norm = ema_decay, codec, alignment, max_grad_norm
        self.seed = seed
        # Per-step values besides the loss, summed on the device and read by the loop at log steps.
        self.window_metrics = {"proj_loss": torch.zeros((), device=device)} if alignment is not None else {}

    def model_fn(self, *args, **kwargs):
        """The network under autocast, returned in fp32 so the objective's loss math stays fp32 (with
        `return_projections=True`: (prediction, [projections]), all fp32)."""
        with autocast(self.device, self.precision):
            out = self.network(*args, **kwargs)
        if isinstance(out, tuple):
            prediction, projections = out
            return prediction.float(), [projection.float() for projection in projections]
        return out.float()

    @torch.no_grad()
    def latents(self, batch: dict) -> torch.Tensor:
        """Scaled latents (N, C, h, w): from the cache as they are, or a VAE posterior sample, encoded in fp32
        whatever --precision says, as DiT/SiT (under bf16 an SD-VAE encoder moves latents by about 1%)."""
        if self.codec is None:
            return batch["x"]
        mean, logvar = self.codec.encode_moments(batch["x"].float())
        return self.codec.latents_from_moments(mean.float(), logvar.float(), sample=True,
                                               noise=batch["posterior_noise"])

    def __call__(self, batch: dict, step: int) -> torch.Tensor:
        sample_ids = batch["index"]  # stays on the host: it keys the timestep generators
        batch = {key: value.to(self.device, non_blocking=True) for key, value in batch.items() if key != "index"}
        latents = self.latents(batch)

        def objective_loss(model_fn):
            return self.objective.training_loss(model_fn, latents, batch["y"], batch["noise"], batch["drop"],
                                                seed=self.seed, step=step, sample_ids=sample_ids)

        if self.alignment is None:
            loss = total = objective_loss(self.model_fn).mean()
        else:
            loss, proj_loss = self.alignment.loss(objective_loss, self.model_fn, batch, latents)
            total = loss + self.alignment.proj_coeff * proj_loss  # REPA: loss_mean + proj_loss_mean * proj_coeff
            self.window_metrics["proj_loss"] += proj_loss.detach()
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if self.max_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not fp16's scaled ones
            params = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        update_ema(self.ema, self.model, self.ema_decay)
        return loss.detach()


@dataclass
class Run:
    """Everything `train` needs, built and validated by `setup`."""

    args: argparse.Namespace
    dist_env: object
    experiment_dir: Path
    loader: object
    sampler: ResumableDistributedSampler
    step_fn: TrainStep
    position: LoopPosition
    eval_hooks: list
    local_batch: int
    batches_per_epoch: int  # per-rank batches of a full epoch
    preemption: PreemptionHandler
    logger: Optional[RunLogger] = None
    manager: Optional[CheckpointManager] = None


def setup(args) -> Run:
    """Validates, builds and (on --resume) restores everything, so user errors surface before training."""
    model_kwargs, encoder_kwargs = check_args(args), check_repa_args(args)
    resume_path, checkpoint = None, None
    if args.resume is not None:
        resume_path, checkpoint = resolve_resume(args.resume, pattern=CHECKPOINT_PATTERN)
        check_resume(args, checkpoint, resume_path)
    dist_env = init_distributed(args.device, args.dist_timeout_minutes)
    if args.global_batch_size % dist_env.world_size != 0:
        raise UserError(f"--global-batch-size {args.global_batch_size} is not divisible by the {dist_env.world_size} "
                        f"processes; use a multiple of {dist_env.world_size}.")
    # Before any data or weights: an unwritable --results-dir, or a resumed folder in use, stops here. Only
    # rank 0 numbers the folder; the others receive its name.
    holder = [experiment_dir_for(args, resume_path) if dist_env.is_main else None]
    if dist.is_initialized():
        dist.broadcast_object_list(holder, src=0)
    experiment_dir = holder[0]
    # A fresh experiment folder that is still empty when a later check refuses the run is removed again.
    with discard_on_failure(experiment_dir, enabled=dist_env.is_main and resume_path is None):
        seed_everything(rank_seed(args.global_seed, dist_env.rank))
        quiet = lambda _: None  # noqa: E731 - the other ranks would repeat rank 0's note
        configure_backend(dist_env.device, args.precision, args.deterministic, say=print if dist_env.is_main else quiet)
        run, model, report = build_run(args, dist_env, experiment_dir, model_kwargs, encoder_kwargs, resume_path,
                                       checkpoint)
        del checkpoint
        # Everything a user can get wrong has been checked: only now does the run leave files behind.
        wandb_run = {"project": "usp-generation", "name": experiment_dir.name, "config": args_to_dict(args)}
        # A resumed run redoes the steps after its checkpoint: their old log lines go (log.txt never repeats a step).
        run.logger = RunLogger(experiment_dir, dist_env.is_main, tensorboard=True, jsonl_name="log.txt",
                               wandb_run=wandb_run if args.wandb else None,
                               resume_step=run.position.global_step if resume_path is not None else None)
        if report is not None:
            run.logger.info(f"Initialised {args.model} from {args.finetune}:\n{report}")
        if resume_path is not None:
            run.logger.info(f"Resumed from {resume_path} at step {run.position.global_step} (epoch "
                            f"{run.position.epoch}, batch {run.position.batch}).")
        run.manager = CheckpointManager(
            experiment_dir / "checkpoints", filename_fn=lambda step: f"{step:07d}.pt", is_main=dist_env.is_main,
            keep_last=args.keep_last if args.keep_last > 0 else None,
            is_milestone=lambda step: args.milestone_every > 0 and step % args.milestone_every == 0)
        if dist_env.is_main:
            run.logger.info(f"Experiment directory: {experiment_dir}")
            run.logger.info(f"{args.model} ({run.step_fn.objective.name}) parameters: "
                            f"{sum(p.numel() for p in model.parameters()):,}; dataset {len(run.loader.dataset):,} "
                            f"samples; {dist_env.world_size} process(es) x batch {run.local_batch}")
            (experiment_dir / "args.json").write_text(json.dumps(args_to_dict(args), indent=2))
        return run


def build_run(args, dist_env, experiment_dir: Path, model_kwargs: dict, encoder_kwargs: dict, resume_path,
              checkpoint):
    """Data, model (+ --finetune or the --resume weights), objective, EMA, optimizer, step and hooks.
    Returns (run without logger and checkpoint manager, the bare model, the --finetune report or None)."""
    device, local_batch = dist_env.device, args.global_batch_size // dist_env.world_size
    spec = get_latent_spec(args.vae_version)
    latent_size = spec.latent_size(args.image_size)
    latent_shape = (spec.channels, latent_size, latent_size)
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
                                use_cosine_loss=args.use_cosine_loss, timestep_shift=args.timestep_shift,
                                schedule_sampler=args.schedule_sampler)
    codec = build_vae(args, device) if args.cached_path is None or args.eval_every > 0 else None
    # DDP broadcasts rank 0's weights (fresh init + --finetune) when it is built, so the EMA copy is taken
    # afterwards: every rank's EMA then starts from the same weights, as DiT's update_ema(decay=0).
    network = model
    if dist_env.distributed:
        network = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    ema = deepcopy(model)
    requires_grad(ema, False)
    ema.eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0, betas=(0.9, args.beta2),
                                  fused=device.type == "cuda")
    scaler = make_grad_scaler(device, args.precision)
    position, batches_per_epoch = LoopPosition(epoch=0), len(sampler) // local_batch
    if checkpoint is not None:
        load_parts(checkpoint, {"model": model, "ema": ema, "opt": optimizer, "scaler": scaler,
                                "schedule_sampler": objective.timestep_sampler})
        position = resume_position(checkpoint, resume_path, batch_size=local_batch, accum=1,
                                   batches_per_epoch=batches_per_epoch)
    model.train()
    if args.compile:
        network = torch.compile(network)
    alignment = None
    if args.repa:
        alignment = Alignment(targets or None, args.proj_coeff, lambda: autocast(device, args.precision))
    step_fn = TrainStep(network, model, ema, objective, optimizer, scaler, device, args.precision,
                        ema_decay=args.ema_decay, codec=codec if args.cached_path is None else None,
                        alignment=alignment, max_grad_norm=args.max_grad_norm, seed=args.global_seed)
    loader = build_loader(dataset, sampler, local_batch, num_workers=args.num_workers,
                          pin_memory=device.type == "cuda", persistent_workers=True, drop_last=True)
    # SIGTERM/SIGUSR1/Ctrl-C from here on finish the step (or the FID hook's batch of samples), save and stop.
    preemption = PreemptionHandler()
    eval_hooks = build_eval_hooks(args, objective, codec, experiment_dir, latent_shape, dist_env,
                                  stop_requested=lambda: preemption.requested)
    return (Run(args, dist_env, experiment_dir, loader, sampler, step_fn, position, eval_hooks, local_batch,
                batches_per_epoch, preemption), model, report)


def save_checkpoint(run: Run) -> None:
    """DiT/SiT's keys (model, ema, opt, args) + scaler, the timestep sampler's state and the resume record
    (a collective: gathers every rank's RNG)."""
    step_fn, position = run.step_fn, run.position
    parts = {"model": step_fn.model, "ema": step_fn.ema, "opt": step_fn.optimizer, "scaler": step_fn.scaler,
             "schedule_sampler": step_fn.objective.timestep_sampler}
    checkpoint = training_state(parts, run.args, position, batch_size=run.local_batch,
                                batches_per_epoch=run.batches_per_epoch)
    path = run.manager.save(checkpoint, position.global_step)
    if path is not None:
        run.logger.info(f"Saved checkpoint to {path}")


def evaluate(run: Run) -> dict:
    """Every evaluation hook once with the EMA weights; their metrics go to the log and are returned."""
    metrics = {}
    for hook in run.eval_hooks:
        metrics.update(hook(run.step_fn.ema, run.position.global_step))
    if metrics:
        run.logger.log(run.position.global_step, metrics, prefix="eval")
    return metrics


def finish_interrupted_evaluation(run: Run) -> None:
    """A run stopped during the evaluation of its checkpoint's step (its outputs are missing) redoes it first; the
    FID hook continues from the PNGs it had written. Rank 0's view of the files decides for every rank."""
    step, hooks = run.position.global_step, run.eval_hooks
    pending = [step > 0 and run.args.eval_every > 0 and step % run.args.eval_every == 0
               and not all(hook.finished(step) for hook in hooks)]
    if dist.is_initialized():
        dist.broadcast_object_list(pending, src=0)
    if pending[0]:
        run.logger.info(f"Finishing the evaluation of step {step} that the previous run's stop cut short.")
        evaluate(run)


def train(run: Run) -> LoopPosition:
    """Optimizer steps until --epochs or --max-steps; a checkpoint every --ckpt-every steps and at the end.

    A resumed run skips the batches its epoch already consumed (the sampler skips them without loading).
    A non-finite loss raises before the next log line or checkpoint, so a diverged model is never saved;
    SIGTERM/SIGUSR1 (preemption) finishes the step, saves and stops. The checkpoint of a step is written before
    its evaluation, and a signal during a long evaluation (the FID hook) stops it after the current batch of
    samples, then saves and stops; the resumed run finishes that evaluation. The first step is always logged.
    """
    args, position, logger, preemption = run.args, run.position, run.logger, run.preemption
    finish_interrupted_evaluation(run)
    losses = LossWindow(run.dist_env.device)  # summed on the device since the last log step, never read in between
    throughput = Throughput()
    last_saved, logged_once = position.global_step, False
    stop = args.max_steps is not None and position.global_step >= args.max_steps
    while not stop and position.epoch < args.epochs:
        run.sampler.set_epoch(position.epoch, start_batch=position.batch, batch_size=run.local_batch)
        logger.info(f"Beginning epoch {position.epoch} (from batch {position.batch})...")
        for batch in run.loader:
            losses.add(run.step_fn(batch, position.global_step))
            throughput.update(args.global_batch_size)
            position.global_step += 1
            position.batch += 1
            if position.global_step % args.log_every == 0 or not logged_once:
                logged_once = True
                interval_steps = losses.window_batches
                # The interval's only host sync (before the clock is read): mean loss over its steps and ranks.
                mean_loss = losses.read_window(position.global_step)
                images_per_sec = throughput.rate()
                metrics = {"loss": mean_loss, "lr": args.lr, "epoch": position.epoch,
                           "steps_per_sec": images_per_sec / args.global_batch_size,
                           "images_per_sec": images_per_sec, "peak_mem_mb": peak_memory_mb(run.dist_env.device)}
                for name, total in run.step_fn.window_metrics.items():  # REPA's proj_loss
                    metrics[name] = all_reduce_mean(total / interval_steps).item()
                    total.zero_()
                logger.log(position.global_step, metrics)
            preempted = preemption.should_stop(position.global_step)  # the same answer on every rank
            stop = preempted or (args.max_steps is not None and position.global_step >= args.max_steps)
            # Saved before the evaluation of the same step: a stop during a long FID evaluation loses no steps.
            if (args.ckpt_every > 0 and position.global_step % args.ckpt_every == 0) or stop:
                losses.check(position.global_step)  # the steps since the last log line
                save_checkpoint(run)
                last_saved = position.global_step
            if args.eval_every > 0 and position.global_step % args.eval_every == 0 and not preempted:
                evaluate(run)
                throughput.reset()  # keep evaluation time out of the throughput numbers
                stop = preemption.agree() or stop  # a signal during the evaluation: save (below) and stop
            if stop:
                break
        else:
            images = getattr(run.loader.dataset.base, "base", None)  # SafeImageFolder; None for a latent cache
            if hasattr(images, "skip_report"):  # every rank: the report merges their records
                logger.report_skips(images.skip_report(), position.global_step)
            position.epoch += 1
            position.batch = 0
    if position.global_step != last_saved:
        losses.check(position.global_step)
        save_checkpoint(run)
    if preemption.requested:
        logger.info(f"Stopped at step {position.global_step} on {preemption.signal_name}; "
                    f"{continue_command(run.experiment_dir, MODULE)}")
    logger.close()
    release_output_dir(run.experiment_dir)
    return position


def evaluate_only(run: Run) -> dict:
    """USP's `train.py --evaluate`: the evaluation hooks once with the resumed EMA weights, no training step."""
    metrics = evaluate(run)
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
        # A diverged loss: one sentence, exit 1; a full disk: one sentence with the command that continues the run.
        run_cli(advising_resume(train, run.experiment_dir, MODULE), run, prog="generation.train")
    finally:
        cleanup()


if __name__ == "__main__":
    main()
