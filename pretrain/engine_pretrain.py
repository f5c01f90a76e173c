"""The pretraining loop: one epoch of masked (latent) modeling (MAE's engine_pretrain, USP's variant).

Everything random about a batch (crop, flip, which patches are masked, the --add_noise level and
noise) arrives from the data loader (`MaskedModelingDataset`), drawn on CPU workers from per-sample
generators keyed by (seed, epoch, index). The loop itself draws nothing, so 1 process and N processes
with the same global batch take the same steps, and a resumed run continues the exact curve.
"""
from dataclasses import dataclass

import torch

from util.run_log import Throughput, peak_memory_mb, progress
from util.loop import LossWindow, LoopPosition, backward_micro_batch, optimizer_step
from util.lr_sched import adjust_learning_rate
from util.precision import autocast
from util.rng import sample_generator, sample_seed


class MaskedModelingDataset(torch.utils.data.Dataset):
    """Adds the per-sample randomness of a masked-modeling step to a keyed dataset.

    `base[(epoch, index)]` -> (input (C, H, W), label, index): images (SeededDataset) or
    scaled latents (LatentCacheDataset). This returns a dict with
      images     (C, H, W)  the base item,
      mask_noise (L,)       uniform values, the smallest (1 - mask_ratio) * L patches stay visible,
      t          ()         --add_noise level in [0.5, 1),
      eps        (C, h, w)  --add_noise Gaussian noise, shaped like the model input,
    all drawn in the loader's CPU workers from a generator keyed by (epoch, index) on a stream of
    its own, so they depend neither on the rank nor on where the run was resumed.
    """

    def __init__(self, base, num_patches: int, model_input_shape: tuple, add_noise: bool, seed: int):
        self.base = base
        self.num_patches = num_patches
        self.model_input_shape = tuple(model_input_shape)
        self.add_noise = add_noise
        # A hashed stream seed: the crop/flip stream uses `seed` itself, so the two never coincide.
        self.stream_seed = sample_seed(seed, -1, 0x4D41534B)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key) -> dict:
        epoch, index = key
        images, _, _ = self.base[key]
        generator = sample_generator(self.stream_seed, epoch, index)
        item = {"images": images, "mask_noise": torch.rand(self.num_patches, generator=generator)}
        if self.add_noise:
            item["t"] = 0.5 + 0.5 * torch.rand((), generator=generator)
            item["eps"] = torch.randn(self.model_input_shape, generator=generator)
        return item


@dataclass
class EpochResult:
    """What one call of `train_one_epoch` did: MAE's per-epoch stats and why it returned."""

    stats: dict              # MAE's train_lr / train_loss of the epoch (loss None if no batch was run)
    epoch_finished: bool     # every optimizer step of the epoch has been taken
    stop_reason: str | None  # "max_steps" or "preempted": stop the run now (the epoch may be finished too)


def prepare_batch(batch: dict, codec, args, device: torch.device):
    """Moves a collated batch to `device` and builds the model's input and target.

    batch["images"]: (N, 3, H, W) images ([-1, 1] for latent models, ImageNet-normalised for pixel
                     models) or, with --use_cached, (N, C, h, w) scaled latents;
    batch["mask_noise"]: (N, L) uniform values that decide which patches are masked;
    batch["t"] (N,), batch["eps"] like the model input: the --add_noise level and noise.
    Returns inputs (N, C, h, w), target (N, C, h, w) clean latents / images, mask_noise (N, L).
    """
    images = batch["images"].to(device, non_blocking=True)
    mask_noise = batch["mask_noise"].to(device, non_blocking=True)
    with torch.no_grad():
        if codec is None:
            clean = images
        else:
            # USP encodes to the posterior MEAN (no sampling), times the VAE's scale factor.
            with autocast(device, args.vae_precision):
                clean = codec.encode(images, sample=False).float()
        inputs = clean
        if args.add_noise:
            t = batch["t"].to(device, non_blocking=True).view(-1, 1, 1, 1)
            eps = batch["eps"].to(device, non_blocking=True)
            inputs = t.sqrt() * clean + (1.0 - t).sqrt() * eps  # x = sqrt(t) z + sqrt(1 - t) eps
    return inputs, clean, mask_noise


def masked_loss(model, inputs: torch.Tensor, target: torch.Tensor, mask_noise: torch.Tensor, args,
                device: torch.device) -> torch.Tensor:
    """The pretraining forward: the masked (latent) modeling loss (a scalar) under --precision autocast.

    inputs, target: (N, C, h, w) from `prepare_batch`; mask_noise: (N, L). scripts/benchmark.py times this step too.
    """
    with autocast(device, args.precision):
        loss, _, _ = model(inputs, mask_ratio=args.mask_ratio, target=target, noise=mask_noise)
    return loss


def train_one_epoch(model, codec, data_loader, optimizer, scaler, position: LoopPosition, run) -> EpochResult:
    """Trains from `position` to the end of `position.epoch` (or until a stop condition).

    `run` carries the setup made by main_pretrain: args, device, dist env, logger, preemption
    handler, `base_lr` and `steps_per_epoch` (optimizer steps in a full epoch). `position` is
    advanced in place. Losses stay on the device; they are read (`.item()`) only every
    --log_every optimizer steps, the only host synchronisation in the loop.
    """
    args, device = run.args, run.device
    model.train(True)
    accum = args.accum_iter
    batches_per_epoch = run.steps_per_epoch * accum
    losses = LossWindow(device)
    throughput = Throughput()
    stop_reason = None
    lr = optimizer.param_groups[0]["lr"]

    bar = progress(data_loader, run.dist.is_main, total=batches_per_epoch - position.batch,
                   desc=f"epoch {position.epoch}", leave=False)
    for batch in bar:
        if position.batch >= batches_per_epoch:
            break  # the trailing batches that do not fill an accumulation group are skipped
        if position.batch % accum == 0:
            lr = adjust_learning_rate(optimizer, position.epoch + position.batch / batches_per_epoch,
                                      run.base_lr, args.min_lr, args.warmup_epochs, args.epochs)
        inputs, target, mask_noise = prepare_batch(batch, codec, args, device)
        boundary = (position.batch + 1) % accum == 0
        losses.add(backward_micro_batch(model, scaler, lambda: masked_loss(model, inputs, target, mask_noise, args,
                                                                           device), accum, boundary))
        position.batch += 1
        if not boundary:
            continue

        optimizer_step(optimizer, scaler, position)
        throughput.update(accum * args.batch_size * run.dist.world_size)

        reached_max = args.max_steps is not None and position.global_step >= args.max_steps
        if position.global_step % args.log_every == 0 or reached_max or position.batch >= batches_per_epoch:
            # The only host sync: one all-reduce + .item() per log interval.
            run.logger.log(position.global_step, {
                "loss": losses.read_window(position.global_step), "lr": lr,
                "epoch": position.epoch + position.batch / batches_per_epoch,
                "images_per_s": throughput.rate(), "peak_mem_mb": peak_memory_mb(device),
            })
        # Cheap on most steps: the handler all-reduces its flag only every `sync_every` steps.
        if run.preemption.should_stop(position.global_step):
            stop_reason = "preempted"
        elif reached_max:
            stop_reason = "max_steps"
        if stop_reason is not None:
            break
    bar.close()

    # Every rank ran the same number of batches, so this collective is matched across ranks.
    stats = {"lr": lr, "loss": losses.read_epoch(position.global_step)}  # None: nothing left to train
    return EpochResult(stats=stats, epoch_finished=position.batch >= batches_per_epoch, stop_reason=stop_reason)
