"""Graceful stops (SIGTERM/SIGUSR1 from SLURM or Kubernetes, Ctrl-C from a user) and divergence detection.

Ctrl-C (SIGINT) is handled like SIGTERM: the current step finishes, a checkpoint is saved and the run
exits without a KeyboardInterrupt traceback; a second Ctrl-C stops at once (KeyboardInterrupt).

Usage in a training loop (all ranks):
    preemption = PreemptionHandler()
    for step ...:
        ...optimizer step...
        if preemption.should_stop(step):
            save checkpoint; raise SystemExit(0)
"""
import math
import signal
import threading

import torch
import torch.distributed as dist

from util.distributed import is_dist
from util.errors import NonFiniteLossError


def check_finite(loss_value, step: int) -> float:
    """Raises NonFiniteLossError if `loss_value` (float or 0-d tensor) is NaN or infinite.

    Call it with the loss summed since the last log step (a single NaN/inf step makes the sum
    non-finite), at every log interval and before every save, so one host sync covers all steps
    and a diverged model can never overwrite the last good checkpoint.
    """
    value = float(loss_value.item() if torch.is_tensor(loss_value) else loss_value)
    if not math.isfinite(value):
        raise NonFiniteLossError(
            f"loss is {value} at step {step}: training diverged, so it stopped without writing a checkpoint; "
            "resume from the last checkpoint with a lower learning rate or bf16/fp32 precision."
        )
    return value


class PreemptionHandler:
    """Turns SIGTERM/SIGUSR1 into a flag that all ranks agree on at a cheap, fixed interval.

    The handler only sets `requested`; the loop finishes its current step, then `should_stop`
    decides. Ranks may receive the signal at different steps (or only some of them), so the flag
    is max-reduced every `sync_every` steps, at the same step numbers on every rank. On NCCL the
    reduction runs on a separate gloo group over a CPU tensor, so it never waits on the GPU stream.
    Construct it on every rank (creating the gloo group is a collective).
    """

    def __init__(self, sync_every: int = 10, signals=(signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)):
        self.sync_every = max(1, int(sync_every))
        self.requested = False
        self.signal_name = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for signum in signals:
                self._previous[signum] = signal.signal(signum, self._on_signal)
        self._group = None
        if is_dist() and dist.get_backend() != "gloo":
            self._group = dist.new_group(backend="gloo")

    def _on_signal(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.requested:
            raise KeyboardInterrupt  # the user pressed Ctrl-C again: do not wait for the save
        if signum == signal.SIGINT:
            print("Ctrl-C: finishing this step, saving a checkpoint and stopping (press Ctrl-C again to stop "
                  "at once, without saving).", flush=True)
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def should_stop(self, step: int) -> bool:
        """True when any rank was signalled (checked on steps divisible by `sync_every` when distributed)."""
        if not is_dist():
            return self.requested
        if step % self.sync_every != 0:
            return False
        return self.agree()

    def agree(self) -> bool:
        """True when any rank was signalled; a collective that every rank calls at the same point (e.g. after an
        evaluation, so that a signal during it stops the run)."""
        if not is_dist():
            return self.requested
        flag = torch.tensor([int(self.requested)], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        if flag.item() and not self.requested:
            self.requested, self.signal_name = True, "a signal on another rank"
        return self.requested

    def restore(self) -> None:
        """Puts the previous signal handlers back."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
