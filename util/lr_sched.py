"""Learning-rate rules shared by pretraining and finetuning (MAE's schedule)."""
import math


def effective_lr(blr: float, lr: float | None, batch_size: int, accum_iter: int, world_size: int) -> float:
    """Absolute lr: `lr` when given, else blr * (batch_size * accum_iter * world_size) / 256."""
    if lr is not None:
        return lr
    return blr * batch_size * accum_iter * world_size / 256


def adjust_learning_rate(optimizer, epoch_float: float, lr: float, min_lr: float, warmup_epochs: float,
                         epochs: float) -> float:
    """Per-iteration linear warmup to `lr`, then half-cosine down to `min_lr` at `epochs`.

    `epoch_float` is epoch + fraction of the epoch done. Groups carrying `lr_scale` (layer-wise
    decay from timm's param_groups_layer_decay) get lr * lr_scale. Returns the unscaled lr.
    """
    if epoch_float < warmup_epochs:
        current = lr * epoch_float / warmup_epochs
    else:
        progress = (epoch_float - warmup_epochs) / max(epochs - warmup_epochs, 1e-12)
        current = min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    for group in optimizer.param_groups:
        group["lr"] = current * group.get("lr_scale", 1.0)
    return current
