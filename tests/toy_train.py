"""A tiny classifier trained with the shared runtime exactly the way the real entry points use it.

Used by tests/test_runtime_resume.py (under torchrun on gloo) to check exact resume after SIGKILL,
graceful SIGTERM/SIGUSR1 stops and the non-finite-loss guard. Per-step losses go to log.txt.
"""
import argparse
import copy
import os
import signal
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from util.checkpoint import CheckpointManager, args_to_dict, resolve_resume
from util.data import SeededDataset, build_image_folder, build_loader, pretrain_transform
from util.distributed import all_reduce_mean, cleanup, init_distributed, rank_seed, seed_everything
from util.ema import requires_grad, update_ema
from util.run_log import RunLogger, Throughput
from util.lr_sched import adjust_learning_rate
from util.precision import PRECISIONS, autocast, make_grad_scaler
from util.errors import NonFiniteLossError
from util.preemption import PreemptionHandler, check_finite
from util.rng import gather_rng_states, restore_rank_rng
from util.sampler import ResumableDistributedSampler
from util.errors import UserError


class ToyNet(nn.Module):
    """(N, 3, H, W) -> (N, num_classes); dropout makes the run depend on the global RNG too."""

    def __init__(self, num_classes: int, width: int = 8):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1), nn.GELU(), nn.Dropout(0.2))
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


def get_args_parser():
    parser = argparse.ArgumentParser("toy training on the shared runtime")
    parser.add_argument("--data_path", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--input_size", type=int, default=16)
    parser.add_argument("--batch_size", type=int, default=4, help="per rank")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max_steps", type=int, default=None)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ckpt_every", type=int, default=3)
    parser.add_argument("--keep_last", type=int, default=2)
    parser.add_argument("--num_workers", type=int, default=0)
    parser.add_argument("--resume", default="")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sync_every", type=int, default=2, help="steps between preemption-flag all-reduces")
    parser.add_argument("--precision", default="fp32", choices=sorted(PRECISIONS))
    # Test hooks: fail the way real runs fail.
    parser.add_argument("--die_at_step", type=int, default=None, help="SIGKILL rank 0 right after this step")
    parser.add_argument("--nan_at_step", type=int, default=None, help="make the loss NaN at this step")
    parser.add_argument("--step_sleep", type=float, default=0.0, help="seconds per step (for signal tests)")
    return parser


def save(manager, model, ema, optimizer, scaler, args, epoch, step_in_epoch, train_steps):
    rng = gather_rng_states()  # collective: every rank takes part, rank 0 writes
    manager.save({
        "model": getattr(model, "module", model).state_dict(), "ema": ema.state_dict(), "opt": optimizer.state_dict(),
        "scaler": scaler.state_dict(), "args": args_to_dict(args), "epoch": epoch,
        "step_in_epoch": step_in_epoch, "train_steps": train_steps, "rng": rng,
    }, train_steps)


def main(args):
    folder = build_image_folder(args.data_path)  # before any model: a bad path costs nothing
    env = init_distributed(args.device)
    seed_everything(rank_seed(args.seed, env.rank))
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.output_dir) / f"pid-rank{env.rank}.txt").write_text(str(os.getpid()))

    dataset = SeededDataset(folder, pretrain_transform(args.input_size), seed=args.seed)
    sampler = ResumableDistributedSampler(len(dataset), env.world_size, env.rank, shuffle=True, seed=args.seed)
    loader = build_loader(dataset, sampler, args.batch_size, num_workers=args.num_workers)
    steps_per_epoch = sampler.num_samples // args.batch_size

    model = ToyNet(len(folder.classes)).to(env.device)
    ema = copy.deepcopy(model)
    requires_grad(ema, False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    scaler = make_grad_scaler(env.device, args.precision)
    manager = CheckpointManager(Path(args.output_dir) / "checkpoints", lambda step: f"{step:07d}.pt",
                                keep_last=args.keep_last, is_main=env.is_main)
    epoch, step_in_epoch, train_steps = 0, 0, 0
    if args.resume:
        _, state = resolve_resume(args.resume, pattern=manager.pattern)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["opt"])
        scaler.load_state_dict(state["scaler"])
        epoch, step_in_epoch, train_steps = state["epoch"], state["step_in_epoch"], state["train_steps"]
        restore_rank_rng(state["rng"])
    model = DistributedDataParallel(model) if env.distributed else model
    logger = RunLogger(args.output_dir, env.is_main, tensorboard=True)
    preemption = PreemptionHandler(sync_every=args.sync_every)
    throughput = Throughput()
    criterion = nn.CrossEntropyLoss()
    running_loss, running_steps = torch.zeros((), device=env.device), 0
    try:
        while epoch < args.epochs:
            sampler.set_epoch(epoch, start_batch=step_in_epoch, batch_size=args.batch_size)
            for images, labels, _ in loader:
                adjust_learning_rate(optimizer, epoch + step_in_epoch / steps_per_epoch, args.lr, 0.0, 0.5, args.epochs)
                with autocast(env.device, args.precision):
                    loss = criterion(model(images.to(env.device)), labels.to(env.device))
                if args.nan_at_step == train_steps + 1:
                    loss = loss * float("nan")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                update_ema(ema, model, 0.99)
                running_loss += loss.detach()
                running_steps += 1
                train_steps += 1
                step_in_epoch += 1
                throughput.update(images.shape[0] * env.world_size)
                time.sleep(args.step_sleep)
                # One host sync per log interval (here every step, so the test sees each loss).
                mean_loss = check_finite(all_reduce_mean(running_loss / running_steps), train_steps)
                logger.log(train_steps, {"loss": mean_loss, "lr": optimizer.param_groups[0]["lr"],
                                         "images_per_s": throughput.rate()})
                running_loss.zero_()
                running_steps = 0
                stop = preemption.should_stop(train_steps) or train_steps == args.max_steps
                if train_steps % args.ckpt_every == 0 or stop:
                    save(manager, model, ema, optimizer, scaler, args, epoch, step_in_epoch, train_steps)
                if args.die_at_step == train_steps and env.is_main:
                    os.kill(os.getpid(), signal.SIGKILL)
                if stop:
                    logger.info(f"stopping at step {train_steps} ({preemption.signal_name or 'max_steps'})")
                    return
            epoch += 1
            step_in_epoch = 0
        save(manager, model, ema, optimizer, scaler, args, epoch, step_in_epoch, train_steps)
    finally:
        logger.close()
        preemption.restore()
        cleanup()


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except (UserError, NonFiniteLossError) as error:
        sys.exit(f"error: {error}")
