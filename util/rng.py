"""Randomness that survives resumes and changes of world size.

Two kinds of randomness appear in training:
- per-sample randomness (crop, flip, posterior noise, masking, diffusion t): drawn from
  `sample_generator(seed, epoch, index)`, so it depends only on which sample is being
  processed, never on the rank, the worker or how many batches came before;
- process-global randomness (dropout, anything a library draws from the default generators):
  captured with `capture_rng_state()` per rank into the checkpoint and restored on resume.
Every value in a captured state is a tensor, int, float, bool, None, list or dict, so the
checkpoint loads with `torch.load(weights_only=True)`.
"""
import hashlib
import random
import struct
import warnings

import numpy as np
import torch
import torch.distributed as dist

from util.distributed import get_rank, get_world_size, is_dist


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed mixing (seed, epoch, index); a hash so neighbouring keys give unrelated streams."""
    digest = hashlib.blake2b(struct.pack("<qqq", int(seed), int(epoch), int(index)), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """CPU generator for the randomness of sample `index` in `epoch` of a run seeded with `seed`."""
    return torch.Generator().manual_seed(sample_seed(seed, epoch, index))


def capture_rng_state() -> dict:
    """This process's Python, NumPy, torch CPU and CUDA generator states (weights_only-safe types)."""
    py_version, py_internal, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "python": {"version": py_version, "state": list(py_internal), "gauss": py_gauss},
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict) -> None:
    """Inverse of `capture_rng_state` (CUDA states are restored only when the device count matches)."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["gauss"]))
    torch.set_rng_state(state["torch"])
    cuda_states = state.get("cuda") or []
    if torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)


def gather_rng_states() -> list[dict]:
    """Every rank's `capture_rng_state()`, in rank order (a collective: call it on all ranks)."""
    state = capture_rng_state()
    if not is_dist():
        return [state]
    gathered = [None] * get_world_size()
    dist.all_gather_object(gathered, state)
    return gathered


def restore_rank_rng(states: list[dict]) -> bool:
    """Restores this rank's entry of a `gather_rng_states()` list; returns whether it could.

    With a different world size there is no matching state: the run keeps its fresh per-rank seed
    (batch contents are still exact because they come from `sample_generator`).
    """
    if len(states) != get_world_size():
        warnings.warn(f"checkpoint holds RNG states for {len(states)} ranks but this run has {get_world_size()}; "
                      "keeping fresh per-rank seeds (data order and per-sample randomness are unaffected).")
        return False
    restore_rng_state(states[get_rank()])
    return True
