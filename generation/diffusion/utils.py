"""Small tensor helpers shared by the diffusion and transport objectives."""
import torch


def mean_flat(tensor):
    """Mean over every dimension but the batch: (N, ...) -> (N,)."""
    return tensor.mean(dim=list(range(1, tensor.ndim)))


def randn_like(x, generator=None):
    """Standard normal noise shaped like x (N, ...).

    generator: None (global RNG), one torch.Generator for the whole batch, or a list of N generators,
    one per sample, so that sample i's noise depends only on its own generator (samplers use this to
    make image i independent of the batch size and the number of ranks). Generators must live on
    x's device.
    """
    if generator is None:
        return torch.randn_like(x)
    if isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    if len(generator) != x.shape[0]:
        raise ValueError(
            f"got {len(generator)} generators for a batch of {x.shape[0]}; pass one generator per sample."
        )
    return torch.stack(
        [torch.randn(x.shape[1:], generator=g, device=x.device, dtype=x.dtype) for g in generator]
    )
