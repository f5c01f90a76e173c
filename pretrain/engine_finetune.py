"""The classification loop (MAE's engine_finetune): one epoch of training, and exact top-k evaluation.

Shared by fine-tuning and linear probing; the setup around it is pretrain/finetune_setup.py (flags),
pretrain/latent_classifier.py (the model), pretrain/finetune_data.py (loaders) and pretrain/finetune_loop.py
(the epoch loop, checkpoints, resume and the two endings).
"""
import argparse
import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from pretrain.latent_classifier import unwrap
from util.distributed import is_dist
from util.loop import LossWindow, LoopPosition, backward_micro_batch, optimizer_step
from util.lr_sched import adjust_learning_rate
from util.precision import autocast


def topk_correct(logits: torch.Tensor, target: torch.Tensor, topk=(1, 5)) -> torch.Tensor:
    """Number of samples whose label is among the k highest logits, for each k.

    logits (N, K), target (N,) int64 -> (len(topk),) int64 counts. k larger than K is clipped to K
    (top-5 on a 4-class problem is then 100%).
    """
    maxk = min(max(topk), logits.shape[1])
    predictions = logits.topk(maxk, dim=1).indices  # (N, maxk), best first
    hits = predictions.eq(target.view(-1, 1))  # (N, maxk)
    return torch.stack([hits[:, :min(k, maxk)].any(dim=1).sum() for k in topk])


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
class Run:
    """Everything the loop needs, built by finetune_loop.train from what main_finetune / main_linprobe made
    (the fine-tuning counterpart of generation/train.py's `Run` and main_pretrain's `setup`)."""

    args: argparse.Namespace
    device: torch.device
    dist: object  # util.distributed.DistEnv
    logger: object  # util.run_log.RunLogger
    preemption: object  # util.preemption.PreemptionHandler
    base_lr: float
    data: "TrainData"  # pretrain/finetune_data.py: resumable sampler, loader, optimizer steps per epoch
    criterion: nn.Module
    mixup_fn: object = None  # timm.data.Mixup or None
    model_ema: object = None  # timm.utils.ModelEmaV3 or None
    clip_grad: float | None = None

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
