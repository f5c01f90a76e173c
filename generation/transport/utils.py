"""Helpers of the transport objective."""


def expand_t_like_x(t, x):
    """View per-sample times t (N,) as (N, 1, ..., 1) to broadcast against x (N, ...)."""
    return t.view(t.size(0), *([1] * (x.ndim - 1)))
