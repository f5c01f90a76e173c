"""SiT: scalable interpolant transformer (Ma et al., 2024) on the DiT backbone.

SiT's network is DiT's network; the official willisma/SiT `models.py` differs only in what the
forward returns, so this module subclasses `DiT` instead of copying the transformer:

- t is continuous in [0, 1] (the transport's time), fed to the same sinusoidal timestep embedder;
- with `learn_sigma=True` the final layer still predicts 2 * in_channels channels (the released
  SiT-XL-2-256x256.pt has that shape), but `forward` returns only the first `in_channels`
  (the velocity / noise / score prediction) because the transport objective has no variance term;
- `forward_with_cfg` is the official SiT one, which is DiT's applied to that forward (guidance on the
  first 3 channels by default, see `DiT.forward_with_cfg` for the all-channels and interval options).

Parameter names, shapes and the "-VAE-simple" variants are therefore exactly DiT's.
"""
import torch

from models.dit import DiT, build_registry


class SiT(DiT):
    """forward(x (N, C, H, W), t (N,) in [0, 1], y (N,)) -> (N, C, H, W).

    REPA's SiT is this class with `learn_sigma=False` and `z_dims` set (see `models.dit`); its forward
    returns (prediction, projections) with `return_projections=True`.
    """

    def select_prediction(self, out: torch.Tensor) -> torch.Tensor:
        if self.learn_sigma:
            out, _ = out.chunk(2, dim=1)  # the sigma half is unused by the transport objective
        return out


SiT_models = build_registry(SiT, "SiT")
