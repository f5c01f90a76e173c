"""The classification loop (MAE's engine_finetune), shared by main_finetune and main_linprobe: one epoch of
training, exact top-k evaluation, and the run around them (epochs, checkpoints last + best + MAE's numbered
checkpoint-{epoch}.pth every --save_every epochs, resume, --eval).

Checkpoints use the one schema of util/train_state.py: MAE's keys (`model` = the ViT's state dict, loadable with
strict=True into the preset, `optimizer`, `epoch`, `scaler`, `args`) [+ `model_ema`, `vae_encoder` (--train_vae) or
USP's `vae` (--train_vae_flat)], `best_acc1`, and the `loop` resume record.
"""
import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from pretrain.latent_classifier import LatentClassifier, unwrap
from util.checkpoint import (args_to_dict, load_checkpoint, require_fitting_weights, require_same_args,
                              require_training_state, save_checkpoint)
from util.cli import advising_resume, continue_command
from util.distributed import cleanup, get_world_size, is_dist
from util.errors import UserError, run_cli
from util.loop import LossWindow, LoopPosition, backward_micro_batch, optimizer_step
from util.lr_sched import adjust_learning_rate
from util.precision import autocast, make_grad_scaler
from util.preemption import PreemptionHandler
from util.run_dir import release_output_dir
from util.run_log import RunLogger
from util.sampler import ResumableDistributedSampler
from util.train_state import load_parts, resume_position, saved_global_batch, training_state

def topk_correct(logits: torch.Tensor, target: torch.Tensor, topk=(1, 5)) -> torch.Tensor:
    """Number of samples whose label is among the k highest logits, for each k.

    logits (N, K), target (N,) int64 -> (len(topk),) int64 counts. k larger than K is clipped to K
    (top-5 on a 4-class problem is then 100%).
    """
    maxk = min(max(topk), logits.shape[1])
    predictions = logits.topk(maxk, dim=1).indices  # (N, maxk), best first
    hits = predictions.eq(target.view(-1, 1))  # (N, maxk)
    return torch.stack([hits[:, :min(k, maxk)].any(dim=1).sum() for k in topk])


class EvalShardSampler(torch.utils.data.Sampler):
    """Rank r takes indices r, r + W, r + 2W, ... of the dataset, without padding.

    torch's DistributedSampler pads the last round with repeated images so every rank gets the
    same count; summing correct predictions over ranks would then count those images twice.
    Here every image is evaluated exactly once; ranks may differ by one image, which is fine
    because evaluation has no per-step collectives.
    """

    def __init__(self, dataset_len: int, num_replicas: int = 1, rank: int = 0):
        self.indices = list(range(rank, dataset_len, num_replicas))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


@torch.no_grad()
def evaluate(model: nn.Module, data_loader, device: torch.device, precision: str, reduce: bool) -> dict:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy over the loader's images.

    `reduce`: the loader holds this rank's shard (EvalShardSampler), so correct counts, loss sums
    and image counts are summed over ranks - exact, since no image appears twice.
    """
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # correct@1, correct@5, loss sum, count
    for images, target, *_ in data_loader:
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        with autocast(device, precision):
            logits = model(images)
        logits = logits.float()
        loss_sum = nn.functional.cross_entropy(logits, target, reduction="sum")
        totals[:2] += topk_correct(logits, target, (1, 5)).double()
        totals[2] += loss_sum.double()
        totals[3] += target.numel()
    if reduce and is_dist():
        dist.all_reduce(totals, op=dist.ReduceOp.SUM)
    correct1, correct5, loss_sum, count = totals.tolist()
    count = max(count, 1.0)
    return {"acc1": 100.0 * correct1 / count, "acc5": 100.0 * correct5 / count, "loss": loss_sum / count,
            "images": int(totals[3].item())}



# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

@dataclass
class TrainData:
    """The training sampler (resumable, keyed by (epoch, index)), its loader, and optimizer steps per epoch."""

    sampler: ResumableDistributedSampler
    loader: torch.utils.data.DataLoader
    steps_per_epoch: int


@dataclass
class Run:
    """Everything the loop needs, built by `train` from what main_finetune / main_linprobe made."""

    args: argparse.Namespace
    device: torch.device
    dist: object  # util.distributed.DistEnv
    logger: object  # util.run_log.RunLogger
    preemption: object  # util.preemption.PreemptionHandler
    base_lr: float
    data: TrainData
    criterion: nn.Module
    mixup_fn: object = None  # timm.data.Mixup or None
    model_ema: object = None  # timm.utils.ModelEmaV3 or None
    clip_grad: float | None = None
    module: str = "pretrain.main_finetune"  # the command advice names (`util.cli.continue_command`)

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps in a full epoch."""
        return self.data.steps_per_epoch


def train_one_epoch(model, data_loader, optimizer, scaler, position: LoopPosition, run: Run) -> tuple:
    """Trains from `position` to the end of `position.epoch`, or until --max_steps / preemption.

    Per micro-batch: lr schedule (per optimizer step), Mixup/CutMix on the pixels, forward under
    autocast, backward (no DDP all-reduce until the last micro-batch of an accumulation group).
    Per optimizer step: unscale + clip, step, EMA. Losses stay on the device and are read only
    every --log_every steps. Returns (stats {"lr", "loss"}, stop_reason: None at the end of the
    epoch, else "max_steps" or "preempted").
    """
    args, device = run.args, run.device
    model.train(True)
    accum = args.accum_iter
    batches_per_epoch = run.steps_per_epoch * accum
    losses = LossWindow(device)
    window_steps = 0
    window_start = time.perf_counter()
    stop_reason = None
    lr = optimizer.param_groups[0]["lr"]

    for samples, targets, _ in data_loader:
        if position.batch >= batches_per_epoch:
            break
        if position.batch % accum == 0:
            lr = adjust_learning_rate(optimizer, position.epoch + position.batch / batches_per_epoch,
                                      run.base_lr, args.min_lr, args.warmup_epochs, args.epochs)
        samples = samples.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        mix_latents = run.mixup_fn is not None and not getattr(args, "image_mix", False)
        if run.mixup_fn is not None and not mix_latents:
            samples, targets = run.mixup_fn(samples, targets)  # --image_mix: pixel-space mixing, soft targets

        def compute_loss():
            with autocast(device, args.precision):
                # USP's default mixes the latents inside the classifier, after the VAE encoder.
                logits, soft_targets = model(samples, targets) if mix_latents else (model(samples), targets)
            return run.criterion(logits.float(), soft_targets)

        boundary = (position.batch + 1) % accum == 0
        losses.add(backward_micro_batch(model, scaler, compute_loss, accum, boundary))
        position.batch += 1
        if not boundary:
            continue

        optimizer_step(optimizer, scaler, position, run.clip_grad)
        window_steps += 1
        if run.model_ema is not None:
            run.model_ema.update(unwrap(model).vit, step=position.global_step)

        if run.preemption.should_stop(position.global_step):
            stop_reason = "preempted"
        elif args.max_steps is not None and position.global_step >= args.max_steps:
            stop_reason = "max_steps"
        # Also read the loss before any stop: a checkpoint is only written after a finite check.
        if position.global_step % args.log_every == 0 or stop_reason or position.batch >= batches_per_epoch:
            loss_value = losses.read_window(position.global_step)
            elapsed = time.perf_counter() - window_start
            images = window_steps * accum * args.batch_size * run.dist.world_size
            run.logger.log(position.global_step, {
                "loss": loss_value, "lr": lr, "epoch": position.epoch + position.batch / batches_per_epoch,
                "images_per_s": images / max(elapsed, 1e-9),
            })
            window_steps = 0
            window_start = time.perf_counter()
        if stop_reason is not None:
            break

    epoch_mean = losses.read_epoch(position.global_step)
    return {"lr": lr, "loss": math.nan if epoch_mean is None else epoch_mean}, stop_reason



# ----------------------------------------------------------------------------------------------
# The run: epochs, checkpoints, resume, and the two endings (`evaluate_only` for --eval, `train`)
# ----------------------------------------------------------------------------------------------

LAST_NAME = "checkpoint-last.pth"  # full training state, overwritten (atomically) every epoch
BEST_NAME = "checkpoint-best.pth"  # weights of the best top-1 epoch so far


def train(args, dist_env, classifier: LatentClassifier, train_data: TrainData, eval_model: LatentClassifier,
          eval_loader, optimizer, base_lr: float, criterion: nn.Module, *, mixup_fn=None, model_ema=None,
          clip_grad: float | None = None, module: str = "pretrain.main_finetune") -> dict:
    """Grad scaler, DDP, --resume, logging and preemption around `fit`; leaves the process group at the end.

    `classifier` is what trains (its codec may be None when training reads cached latents);
    `eval_model` is what evaluates (see `fit`). Returns the last evaluation's metrics.
    """
    device = dist_env.device
    scaler = make_grad_scaler(device, args.precision)
    model = classifier
    if dist_env.distributed:
        model = wrap_ddp(classifier, args, device)

    position, best_acc1 = LoopPosition(epoch=args.start_epoch), 0.0
    if args.resume:
        position, best_acc1 = resume_from(args, classifier, optimizer, scaler, model_ema,
                                          train_data.steps_per_epoch * args.accum_iter)
    effective_batch = args.batch_size * args.accum_iter * dist_env.world_size
    # MAE's two lines: the base lr (--blr, per 256 images) and the absolute lr it gives for this batch.
    print(f"base lr: {base_lr * 256 / effective_batch:.3e}  actual lr: {base_lr:.3e}  effective batch: "
          f"{effective_batch}  steps/epoch: {train_data.steps_per_epoch}")

    wandb_run = {"project": "usp-understanding", "name": Path(args.output_dir).name, "config": vars(args)}
    # A resumed run redoes the steps after its checkpoint: their old log lines go (log.txt never repeats a step).
    logger = RunLogger(args.output_dir, dist_env.is_main, log_dir=args.log_dir,
                       wandb_run=wandb_run if args.wandb else None,
                       resume_step=position.global_step if position.global_step > 0 else None)
    run = Run(args=args, device=device, dist=dist_env, logger=logger, preemption=PreemptionHandler(),
              base_lr=base_lr, data=train_data, criterion=criterion, mixup_fn=mixup_fn, model_ema=model_ema,
              clip_grad=clip_grad, module=module)
    try:
        metrics = fit(classifier, model, eval_model, eval_loader, optimizer, scaler, position, best_acc1, run)
    finally:
        logger.close()
        run.preemption.restore()
        release_output_dir(args.output_dir)
    cleanup()
    return metrics


def wrap_ddp(classifier: LatentClassifier, args, device) -> nn.Module:
    """DDP over the classifier; with --train_vae_flat the VAE is left out of it, as USP wraps only the ViT, so
    each rank's VAE encoder follows its own gradients."""
    if getattr(args, "train_vae_flat", False) and getattr(args, "train_vae", False):
        torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            classifier, [name for name, _ in [*classifier.named_parameters(), *classifier.named_buffers()]
                         if name.startswith("codec.")])
    return torch.nn.parallel.DistributedDataParallel(classifier,
                                                     device_ids=[device.index] if device.type == "cuda" else None)


def fit(classifier: LatentClassifier, model, eval_model, eval_loader, optimizer, scaler, position: LoopPosition,
        best_acc1: float, run: Run) -> dict:
    """Epoch loop: train, evaluate, save last (+ best); stops early on --max_steps or preemption.

    `model` is what trains (DDP-wrapped `classifier` or the classifier itself); `eval_model`
    evaluates (the classifier, or one that sees images when training reads cached latents).
    Returns the last evaluation's metrics.
    """
    args, logger = run.args, run.logger
    output_dir = Path(args.output_dir)
    metrics = {}
    reduce = args.dist_eval and run.dist.world_size > 1
    start_time = time.time()
    while position.epoch < args.epochs:
        if args.max_steps is not None and position.global_step >= args.max_steps:
            break
        run.data.sampler.set_epoch(position.epoch, start_batch=position.batch, batch_size=args.batch_size)
        stats, stop_reason = train_one_epoch(model, run.data.loader, optimizer, scaler, position, run)
        images = getattr(run.data.loader.dataset, "base", None)  # the SafeImageFolder (None for a latent cache)
        if hasattr(images, "skip_report"):  # every rank: the report merges their records
            logger.report_skips(images.skip_report(), position.global_step)
        if stop_reason == "preempted":
            save(output_dir / LAST_NAME, classifier, optimizer, scaler, position, args, best_acc1, run)
            logger.info(f"Stopped on {run.preemption.signal_name or 'a preemption signal'} at step "
                        f"{position.global_step}; {continue_command(output_dir, run.module)}.")
            return metrics
        last_epoch = position.epoch + 1 >= args.epochs or stop_reason == "max_steps"
        is_best = False
        if last_epoch or (position.epoch + 1) % args.eval_freq == 0:
            metrics = evaluate_all(eval_model, eval_loader, run, reduce)
            is_best = metrics["acc1"] > best_acc1
            best_acc1 = max(best_acc1, metrics["acc1"])
            logger.log(position.global_step, {"epoch": position.epoch, "train_loss": stats["loss"],
                                              **{k: v for k, v in metrics.items() if k != "images"},
                                              "best_acc1": best_acc1}, prefix="eval")
            logger.info(f"Accuracy of the network on the {metrics['images']} test images: {metrics['acc1']:.1f}% "
                        f"(top-5 {metrics['acc5']:.1f}%, best top-1 {best_acc1:.2f}%)")
        if args.output_dir:
            # MAE/USP's numbered checkpoints: after epochs 0, N, 2N, ... and the last one (with the full state).
            numbered = stop_reason is None and (position.epoch % args.save_every == 0
                                                or position.epoch + 1 == args.epochs)
            save(output_dir / LAST_NAME, classifier, optimizer, scaler, position, args, best_acc1, run,
                 also=[output_dir / f"checkpoint-{position.epoch}.pth"] if numbered else [])
            if is_best and run.dist.is_main:
                save_checkpoint({"model": classifier.vit.state_dict(), "epoch": position.epoch,
                                 "acc1": metrics["acc1"], "args": args_to_dict(args)}, output_dir / BEST_NAME)
        if stop_reason == "max_steps":
            break
        position.epoch, position.batch = position.epoch + 1, 0
    logger.info(f"Training time {time.time() - start_time:.1f}s; best top-1 {best_acc1:.2f}%")
    metrics["best_acc1"] = best_acc1
    return metrics


def evaluate_all(eval_model, eval_loader, run: Run, reduce: bool) -> dict:
    """`evaluate` for the model and, with --model_ema, for its EMA weights (as ema_acc1, ...)."""
    metrics = evaluate(eval_model, eval_loader, run.device, run.args.precision, reduce)
    if run.model_ema is not None:
        ema_model = LatentClassifier(run.model_ema.module, eval_model.codec, eval_model.vae_precision,
                                     eval_model.t_noise_alpha_bar)
        ema_metrics = evaluate(ema_model, eval_loader, run.device, run.args.precision, reduce)
        metrics.update({f"ema_{k}": v for k, v in ema_metrics.items() if k != "images"})
    return metrics


def save(path: Path, classifier, optimizer, scaler, position, args, best_acc1, run: Run, also=()) -> None:
    """Saves the full training state atomically on rank 0 to `path` and the paths in `also` (every rank
    joins the RNG gather)."""
    state = checkpoint_state(classifier, optimizer, scaler, position, args, best_acc1,
                             run.steps_per_epoch * args.accum_iter, run.model_ema)
    if run.dist.is_main:
        for target in (path, *also):
            save_checkpoint(state, target)


def checkpoint_state(classifier: LatentClassifier, optimizer, scaler, position: LoopPosition, args, best_acc1: float,
                     batches_per_epoch: int, model_ema=None) -> dict:
    """Everything needed to continue the run exactly (a collective: gathers every rank's RNG)."""
    extra = {}
    if getattr(args, "train_vae", False) and getattr(args, "train_vae_flat", False):
        extra["vae"] = classifier.codec.autoencoder.state_dict()  # USP's key: the whole VAE
    elif getattr(args, "train_vae", False):
        extra["vae_encoder"] = {k: v for k, v in classifier.codec.autoencoder.state_dict().items()
                                if k.startswith(("encoder.", "quant_conv."))}
    return training_state({"model": classifier.vit, "optimizer": optimizer, "scaler": scaler,
                           "model_ema": None if model_ema is None else model_ema.module}, args, position,
                          epoch=position.epoch, best_acc1=best_acc1, batch_size=args.batch_size,
                          batches_per_epoch=batches_per_epoch, **extra)


# Flags a --resume must keep (fine-tuning's and the probe's; a flag one of them lacks is not compared): they fix the
# network, the objective and the order and content of the batches. The global batch is compared too.
RESUME_MUST_MATCH = ("model", "model_kwargs", "input_size", "vae_version", "latent_stats", "nb_classes", "global_pool",
                     "seed", "drop_path", "layer_decay", "train_vae", "train_vae_flat", "image_mix", "no_aug", "aa",
                     "smoothing", "reprob", "mixup", "cutmix", "model_ema", "add_t_noise", "t", "use_cached",
                     "skip_depth")


def resume_from(args, classifier: LatentClassifier, optimizer=None, scaler=None, model_ema=None,
                batches_per_epoch: int = 0) -> tuple:
    """Loads --resume (file or run dir) into the model (and optimizer, scaler, EMA, RNG when given).

    Returns (LoopPosition to continue from, best_acc1). A checkpoint whose epoch was finished
    continues at the next epoch's first batch. Official MAE/USP fine-tuned checkpoints (no
    resume position) count as finished epochs.
    """
    path = Path(args.resume)
    if path.is_dir():
        path = path / LAST_NAME
    state = require_training_state(load_checkpoint(path), path,
                                   hint="to start from these weights use --finetune instead of --resume.")
    require_fitting_weights(classifier.vit, state["model"], path,
                            f"--model {args.model} with --model_kwargs {args.model_kwargs} and these flags")
    classifier.vit.load_state_dict(state["model"], strict=True)
    if "vae_encoder" in state:
        classifier.codec.autoencoder.load_state_dict(state["vae_encoder"], strict=False)
    if "vae" in state:  # --train_vae_flat (USP's checkpoints carry it too; USP's own resume ignores it)
        classifier.codec.autoencoder.load_state_dict(state["vae"])
    print(f"Resumed weights from {path}")
    position = LoopPosition(epoch=args.start_epoch)
    best_acc1 = float(state.get("best_acc1", 0.0))
    if optimizer is None or "optimizer" not in state or "epoch" not in state:
        return position, best_acc1
    global_batch = args.batch_size * args.accum_iter * get_world_size()
    require_same_args(state, args, RESUME_MUST_MATCH, path, allow=args.allow_changed_args, dashes=False,
                      also=[("the global batch", saved_global_batch(state), global_batch)])
    load_parts(state, {"optimizer": optimizer, "scaler": scaler,
                       "model_ema": None if model_ema is None else model_ema.module})
    position = resume_position(state, path, batch_size=args.batch_size, accum=args.accum_iter,
                               batches_per_epoch=batches_per_epoch)
    return position, best_acc1


def evaluate_only(args, eval_model: LatentClassifier, eval_loader, dist_env) -> dict:
    """--eval: loads the --resume weights, prints MAE's accuracy line and leaves the process group."""
    resume_from(args, eval_model)
    metrics = evaluate(eval_model, eval_loader, dist_env.device, args.precision,
                       args.dist_eval and dist_env.world_size > 1)
    print(f"Accuracy of the network on the {metrics['images']} test images: {metrics['acc1']:.2f}% "
          f"(top-5 {metrics['acc5']:.2f}%)")
    cleanup()
    return metrics


def run_main(main_fn, args, module: str | None = None) -> int:
    """Runs `main_fn(args)` under `util.errors.run_cli` and returns the exit code (0; 2 after a user error,
    1 after a diverged loss, each reported as one line on stderr) for `sys.exit`; a full disk names the command
    (`module`'s) that continues the run."""
    try:
        run_cli(advising_resume(main_fn, args.output_dir, module), args, prog="")
    except SystemExit as stopped:
        if args.output_dir:  # a later run in this process (tests, the demo) may use the folder again
            release_output_dir(args.output_dir)
        return stopped.code
    return 0
