"""REPA's network pieces (Yu et al., 2025, "Representation Alignment for Generation", sihyun-yu/REPA).

REPA trains a DiT/SiT whose hidden tokens after block `encoder_depth` pass through one projector MLP per
target encoder and are pulled (cosine) towards that frozen encoder's patch tokens. The transformer is
ours (`models.dit.DiT` with `z_dims`, `projector_dim`, `encoder_depth`, `qk_norm`); this module holds
the projector, named as REPA names it (`build_mlp`), and reads a REPA layout back from a state dict so a
checkpoint can be rebuilt without its training arguments.
"""
import torch.nn as nn

PROJECTOR_PREFIX = "projectors."


def build_mlp(hidden_size: int, projector_dim: int, z_dim: int) -> nn.Sequential:
    """REPA's projector: (..., hidden_size) -> (..., z_dim) through two SiLU hidden layers of projector_dim.

    Keys `0.*`, `2.*`, `4.*` (Linear, SiLU, Linear, SiLU, Linear), as in REPA's checkpoints.
    """
    return nn.Sequential(
        nn.Linear(hidden_size, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, z_dim),
    )


def layout_from_state_dict(state_dict: dict) -> dict:
    """Constructor kwargs of the REPA parts a DiT/SiT state dict holds (keys as saved, no `module.` prefix).

    Returns {"z_dims": [...], "projector_dim": int, "qk_norm": bool}; `z_dims` is empty (and projector_dim
    the default) for a plain DiT/SiT. `encoder_depth` is not in the weights (it only says where the
    projectors read, which sampling never does), so it is not returned.
    """
    z_dims, projector_dim = [], 2048
    index = 0
    while f"{PROJECTOR_PREFIX}{index}.4.weight" in state_dict:
        z_dims.append(int(state_dict[f"{PROJECTOR_PREFIX}{index}.4.weight"].shape[0]))
        projector_dim = int(state_dict[f"{PROJECTOR_PREFIX}{index}.0.weight"].shape[0])
        index += 1
    qk_norm = "blocks.0.attn.q_norm.weight" in state_dict
    return {"z_dims": z_dims, "projector_dim": projector_dim, "qk_norm": qk_norm}


def without_projectors(state_dict: dict) -> dict:
    """The state dict minus the training-only `projectors.*` entries (what sampling needs)."""
    return {key: value for key, value in state_dict.items() if not key.startswith(PROJECTOR_PREFIX)}
