"""The one checkpoint schema of every trainer: official weight keys at the top, one resume record under "loop".

A training checkpoint of this project is a dict with
- the weight keys its family's official code uses, so their tools and users' scripts read it unchanged:
  generation (DiT/SiT) `model`, `ema`, `opt`, `scaler`; pretraining and understanding (MAE/USP) `model`,
  `optimizer`, `epoch` (the epoch just trained), `scaler` [, `model_ema`, `vae_encoder`, `best_acc1`];
- `args`: the command line as a plain dict;
- `loop`: where to continue, written by `loop_record` and read by `resume_position`:
      {"epoch": E, "batch": B, "global_step": S, "batch_size": b, "world_size": W, "rng": [per-rank states]}
  continue at batch B (per-rank batches of b images already consumed on each of the W ranks) of epoch E,
  after S optimizer steps; an epoch that was trained to its end is recorded as (E + 1, 0).

`resume_position` also reads official MAE/USP checkpoints, whose only position is `epoch` (a finished epoch).
Everything here loads with `torch.load(weights_only=True)`.
"""
from __future__ import annotations

from util.checkpoint import args_to_dict
from util.distributed import get_world_size
from util.errors import UserError
from util.loop import LoopPosition
from util.rng import gather_rng_states, restore_rank_rng

LOOP_KEY = "loop"


def loop_record(position: LoopPosition, *, batch_size: int, batches_per_epoch: int) -> dict:
    """The resume record of `position` (a collective: every rank's RNG state is gathered).

    batch_size: images per rank per batch; batches_per_epoch: per-rank batches a full epoch trains (a
    finished epoch is stored as the next epoch's start, so a resumed run never re-enters it).
    """
    epoch, batch = position.epoch, position.batch
    if batch >= batches_per_epoch:
        epoch, batch = epoch + 1, 0
    return {"epoch": epoch, "batch": batch, "global_step": position.global_step, "batch_size": int(batch_size),
            "world_size": get_world_size(), "rng": gather_rng_states()}


def training_state(parts: dict, args, position: LoopPosition, *, batch_size: int, batches_per_epoch: int,
                   **extra) -> dict:
    """{key: part.state_dict()} for the weight `parts` (modules, optimizer, grad scaler; None skipped), `extra`
    plain values, `args` and the `loop` record: the whole checkpoint (a collective, see `loop_record`)."""
    state = {key: part.state_dict() for key, part in parts.items() if part is not None}
    state.update(extra)
    state["args"] = args_to_dict(args)
    state[LOOP_KEY] = loop_record(position, batch_size=batch_size, batches_per_epoch=batches_per_epoch)
    return state


def load_parts(checkpoint: dict, parts: dict) -> None:
    """Loads checkpoint[key] into each part (None parts and absent or empty entries are skipped)."""
    for key, part in parts.items():
        if part is not None and checkpoint.get(key):
            part.load_state_dict(checkpoint[key])


def read_record(checkpoint: dict) -> dict | None:
    """The resume position of a checkpoint as {"epoch", "samples" (images of that epoch consumed over all ranks;
    None = the epoch was finished), "global_step", "rng" (None when absent)}; None if it holds none."""
    if LOOP_KEY in checkpoint:
        loop = checkpoint[LOOP_KEY]
        return {"epoch": int(loop["epoch"]), "samples": int(loop["batch"]) * loop["batch_size"] * loop["world_size"],
                "global_step": int(loop["global_step"]), "rng": loop["rng"]}
    if "epoch" in checkpoint:  # an official MAE/USP checkpoint: the epoch it trained to its end
        return {"epoch": int(checkpoint["epoch"]), "samples": None, "global_step": 0, "rng": None}
    return None


def saved_global_batch(checkpoint: dict) -> int | None:
    """Images per optimizer step of the run that wrote `checkpoint` (None when it does not say)."""
    loop, args = checkpoint.get(LOOP_KEY), checkpoint.get("args") or {}
    if not loop or "accum_iter" not in args:
        return None
    return int(loop["batch_size"]) * int(loop["world_size"]) * int(args["accum_iter"])


def resume_position(checkpoint: dict, path, *, batch_size: int, accum: int, batches_per_epoch: int,
                    restore_rng: bool = True) -> LoopPosition | None:
    """Where a run resumed from `checkpoint` continues (None: it records no position, e.g. released weights),
    restoring this rank's RNG state when the world size matches (`util.rng.restore_rank_rng`).

    The record is converted to this run's batches (batch_size images per rank, `accum` batches per optimizer
    step), so a run may continue on another number of processes with the same global batch; a position that
    falls inside an optimizer step of this run stops with one sentence.
    """
    record = read_record(checkpoint)
    if record is None:
        return None
    if restore_rng and record["rng"] is not None:
        restore_rank_rng(record["rng"])
    epoch, samples, global_step = record["epoch"], record["samples"], record["global_step"]
    if samples is None:
        return LoopPosition(epoch=epoch + 1, global_step=global_step)
    batch_images = batch_size * get_world_size()
    if samples % (batch_images * accum):
        raise UserError(f"checkpoint {path} stopped after {samples} samples of epoch {epoch}, which is not a whole "
                        f"number of global batches of {batch_images * accum}; resume with the original batch size, "
                        "gradient accumulation and number of processes.")
    batch = samples // batch_images
    if batch >= batches_per_epoch:
        return LoopPosition(epoch=epoch + 1, global_step=global_step)
    return LoopPosition(epoch=epoch, batch=batch, global_step=global_step)
