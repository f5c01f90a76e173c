"""The loop runtime every trainer shares: where the run is, the loss window, one micro-batch backward, one
optimizer step.

- `LoopPosition(epoch, batch, global_step)`: the position a checkpoint stores to resume mid-epoch.
- `LossWindow`: micro-batch losses summed on the device, read (one all-reduce) only at log time, NaN-checked.
- `backward_micro_batch(...)`: forward + backward of loss / accum, DDP all-reduce only at the accumulation boundary.
- `optimizer_step(...)`: [unscale + clip], grad-scaler step, zero_grad, count the step.

Used by every trainer: pretrain/engine_pretrain.py, pretrain/engine_finetune.py and generation/engine.py (whose
`TrainStep` does its own optimizer step, with the EMA update). What a checkpoint stores of a `LoopPosition`, and
how a checkpoint's position is read back, is util/train_state.py.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from util.distributed import all_reduce_mean
from util.preemption import check_finite


@dataclass
class LoopPosition:
    """Where the run is: the epoch being trained, batches of it already consumed on every rank, and
    optimizer steps taken since the start of the run. This is what a checkpoint stores to resume."""

    epoch: int
    batch: int = 0
    global_step: int = 0


class LossWindow:
    """Micro-batch losses summed on the device: since the last log line, and over the epoch.

    Nothing is read to the host until `read_window` / `read_epoch` (one all-reduce + .item()
    each), which is what keeps the training loops free of per-step host syncs. A NaN anywhere
    in a window survives the sum, so checking at read time never lets a bad step be saved.
    """

    def __init__(self, device: torch.device):
        self.window = torch.zeros((), device=device)
        self.window_batches = 0
        self.epoch = torch.zeros((), device=device)
        self.epoch_batches = 0

    def add(self, loss: torch.Tensor) -> None:
        """loss: detached scalar of one micro-batch."""
        self.window += loss
        self.epoch += loss
        self.window_batches += 1
        self.epoch_batches += 1

    def read_window(self, step: int) -> float:
        """Mean over ranks of the window's losses (raises NonFiniteLossError), then starts a new window."""
        value = all_reduce_mean(self.window / self.window_batches).item()
        check_finite(value, step)
        self.window.zero_()
        self.window_batches = 0
        return value

    def check(self, step: int) -> None:
        """Raises NonFiniteLossError if a step of the window was not finite, keeping the window (before a save)."""
        check_finite(all_reduce_mean(self.window), step)

    def read_epoch(self, step: int) -> float | None:
        """Mean over ranks of the epoch's losses, None when no batch ran. A collective: every rank calls it."""
        value = all_reduce_mean(self.epoch / max(self.epoch_batches, 1)).item()
        if not self.epoch_batches:
            return None
        check_finite(value, step)
        return value


def backward_micro_batch(model, scaler, compute_loss, accum: int, boundary: bool) -> torch.Tensor:
    """Runs `compute_loss()` (forward + loss, a scalar) and backward of loss / accum; returns the loss detached.

    Gradients of the first accum-1 micro-batches stay local; DDP all-reduces on the last one
    (`boundary`), so gradient accumulation costs one all-reduce per optimizer step.
    """
    sync = contextlib.nullcontext() if boundary or not hasattr(model, "no_sync") else model.no_sync()
    with sync:
        loss = compute_loss()
        scaler.scale(loss / accum).backward()
    return loss.detach()


def optimizer_step(optimizer, scaler, position: LoopPosition, clip_grad: float | None = None) -> None:
    """[unscale + clip the gradient norm], step through the grad scaler, clear the gradients, count the step."""
    if clip_grad is not None:
        scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, clip_grad)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    position.global_step += 1
