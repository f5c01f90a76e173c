"""The DiT/SiT training loop: one optimizer step and the step/epoch loop (the hooks: generation/eval_hooks.py).

`generation/train.py` builds everything (data, model, objective, optimizer, checkpoints) and hands it
to `train_loop`; the loop is the same for both families because the objective hides behind
`generation.objectives.Objective`. No per-step host synchronisation: losses accumulate on the device
and are read (`.item()`) only at log intervals.
"""
from __future__ import annotations

from typing import Callable, Optional, Protocol, Sequence

import torch
import torch.nn as nn

from generation.objectives import NoiseBundle, Objective
from util.distributed import all_reduce_mean
from util.ema import update_ema
from util.loop import LoopPosition, LossWindow
from util.run_log import Throughput, peak_memory_mb
from util.precision import autocast


class EvalHook(Protocol):
    """Called on every rank with the EMA model at evaluation steps; returns metrics to log (rank 0's count).

    A hook that only writes files does its work on rank 0 and returns {} elsewhere; a distributed hook
    (e.g. FID over samples drawn on all ranks) may use collectives, since every rank calls it.
    """

    def __call__(self, ema: nn.Module, step: int) -> dict: ...


class TrainStep:
    """One optimizer step: [online VAE encode] -> objective loss [+ REPA alignment] -> backward [-> clip] -> AdamW
    -> EMA update.

    network: what runs forward (DDP- and/or torch.compile-wrapped `model`); model: the bare module whose
    weights the EMA tracks. Returns the batch's mean loss as a detached device scalar.
    """

    def __init__(self, network: nn.Module, model: nn.Module, ema: nn.Module, objective: Objective,
                 optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, device: torch.device,
                 precision: str, ema_decay: float = 0.9999, codec: Optional[nn.Module] = None,
                 alignment=None, max_grad_norm: Optional[float] = None):
        self.network = network
        self.model = model
        self.ema = ema
        self.objective = objective
        self.optimizer = optimizer
        self.scaler = scaler
        self.device = device
        self.precision = precision
        self.ema_decay = ema_decay
        self.codec = codec
        # REPA (generation.repa.Alignment): adds proj_coeff * alignment loss; None = plain DiT/SiT training.
        self.alignment = alignment
        # LightningDiT's optional `max_grad_norm` and REPA's 1.0 (None: no clipping, as DiT/SiT)
        self.max_grad_norm = max_grad_norm
        # Per-step values besides the loss, summed on the device and read by the loop at log steps.
        self.window_metrics = {"proj_loss": torch.zeros((), device=device)} if alignment is not None else {}

    def model_fn(self, *args, **kwargs):
        """The network under autocast, returned in fp32 so the objective's loss math stays fp32.

        With `return_projections=True` the network returns (prediction, [projections]); both come back fp32.
        """
        with autocast(self.device, self.precision):
            out = self.network(*args, **kwargs)
        if isinstance(out, tuple):
            prediction, projections = out
            return prediction.float(), [projection.float() for projection in projections]
        return out.float()

    @torch.no_grad()
    def latents(self, batch: dict) -> torch.Tensor:
        """Scaled latents (N, C, h, w): from the cache as they are, or a VAE posterior sample.

        The encoder runs in fp32 (TF32 allowed) whatever --precision says, as DiT/SiT encode and as the
        latent cache does: under bf16 autocast an SD-VAE encoder moves latents by about 1% relative.
        """
        if self.codec is None:
            return batch["x"]
        mean, logvar = self.codec.encode_moments(batch["x"].float())
        return self.codec.latents_from_moments(mean.float(), logvar.float(), sample=True,
                                               noise=batch["posterior_noise"])

    def __call__(self, batch: dict) -> torch.Tensor:
        batch = {key: value.to(self.device, non_blocking=True) for key, value in batch.items()}
        latents = self.latents(batch)
        bundle = NoiseBundle(u=batch["u"], noise=batch["noise"], drop=batch["drop"])

        def objective_loss(model_fn):
            return self.objective.loss(model_fn, latents, batch["y"], bundle)

        if self.alignment is None:
            loss = total = objective_loss(self.model_fn).mean()
        else:
            loss, proj_loss = self.alignment.loss(objective_loss, self.model_fn, batch, latents)
            total = loss + self.alignment.proj_coeff * proj_loss  # REPA: loss_mean + proj_loss_mean * proj_coeff
            self.window_metrics["proj_loss"] += proj_loss.detach()
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if self.max_grad_norm is not None:
            clip_gradients(self.optimizer, self.scaler, self.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        update_ema(self.ema, self.model, self.ema_decay)
        return loss.detach()


def clip_gradients(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, max_norm: float) -> None:
    """Clips the global gradient norm of the optimizer's parameters (unscaled first under fp16's grad scaler)."""
    scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    torch.nn.utils.clip_grad_norm_(params, max_norm)


def train_loop(step_fn: Callable[[dict], torch.Tensor], loader, sampler, position: LoopPosition, *, epochs: int,
               max_steps: Optional[int], local_batch: int, global_batch: int, log_every: int, ckpt_every: int,
               eval_every: int, save_fn: Callable[[LoopPosition], None], eval_hooks: Sequence[EvalHook],
               ema: nn.Module, logger, lr: float, device: torch.device,
               should_stop: Callable[[int], bool] = lambda step: False,
               log_fn: Callable[[str], None] = print,
               on_epoch_end: Callable[[LoopPosition], None] = lambda position: None) -> LoopPosition:
    """Runs optimizer steps until `epochs` or `max_steps`; checkpoints every `ckpt_every` steps and at the end.

    position.batch lets a resumed run skip the batches its epoch already consumed (the sampler skips
    them without loading). `should_stop(step)` is the preemption check (a collective every rank calls).
    A non-finite loss raises before the next log line or checkpoint, so a diverged model is never saved.
    The first step is always logged, so a run shorter than `log_every` still shows its loss.
    `on_epoch_end(position)` runs on every rank after each full epoch (e.g. the skipped-image report).
    """
    losses = LossWindow(device)  # summed on the device since the last log step, never read in between
    throughput = Throughput()
    last_saved = position.global_step
    logged_once = False
    stop = max_steps is not None and position.global_step >= max_steps
    while not stop and position.epoch < epochs:
        sampler.set_epoch(position.epoch, start_batch=position.batch, batch_size=local_batch)
        log_fn(f"Beginning epoch {position.epoch} (from batch {position.batch})...")
        for batch in loader:
            losses.add(step_fn(batch))
            throughput.update(global_batch)
            position.global_step += 1
            position.batch += 1
            if position.global_step % log_every == 0 or not logged_once:
                logged_once = True
                interval_steps = losses.window_batches
                # The only host sync of the interval: mean loss over its steps and over ranks.
                mean_loss = losses.read_window(position.global_step)
                images_per_sec = throughput.rate()
                metrics = {
                    "loss": mean_loss, "lr": lr, "epoch": position.epoch,
                    "steps_per_sec": images_per_sec / global_batch, "images_per_sec": images_per_sec,
                    "peak_mem_mb": peak_memory_mb(device),
                }
                for name, total in getattr(step_fn, "window_metrics", {}).items():
                    metrics[name] = all_reduce_mean(total / interval_steps).item()
                    total.zero_()
                logger.log(position.global_step, metrics)
            if eval_every > 0 and position.global_step % eval_every == 0:
                metrics = {}
                for hook in eval_hooks:
                    metrics.update(hook(ema, position.global_step))
                if metrics:
                    logger.log(position.global_step, metrics, prefix="eval")
                throughput.reset()  # keep evaluation time out of the throughput numbers
            stop = (max_steps is not None and position.global_step >= max_steps) or should_stop(position.global_step)
            if (ckpt_every > 0 and position.global_step % ckpt_every == 0) or stop:
                losses.check(position.global_step)  # the steps since the last log line
                save_fn(position)
                last_saved = position.global_step
            if stop:
                break
        else:
            on_epoch_end(position)
            position.epoch += 1
            position.batch = 0
    if position.global_step != last_saved:
        losses.check(position.global_step)
        save_fn(position)
    return position
