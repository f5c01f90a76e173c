"""Timestep respacing: sample (or train) with a subset of the original diffusion steps.

A respaced chain keeps alphas_cumprod at the kept steps exactly and recomputes each beta as
1 - abar_kept_i / abar_kept_{i-1}, so it is the same forward process observed at fewer times. The
network still sees the original step indices (DiT's models are trained on 0..999).
"""
import numpy as np

from .gaussian_diffusion import GaussianDiffusion


def space_timesteps(num_timesteps, section_counts):
    """The set of original steps to keep.

    section_counts: "ddimN" (an integer stride giving exactly N steps, as DDIM uses), a
    comma-separated string such as "250" or "10,15,20" (the chain is cut into equal sections and
    each section i keeps section_counts[i] evenly spaced steps, ends included), or a list of ints.
    """
    if isinstance(section_counts, str):
        text = section_counts.strip()
        if text.startswith("ddim"):
            desired_count = _parse_count(text[len("ddim"):], section_counts)
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired_count:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(
                f"cannot take exactly {desired_count} DDIM steps with an integer stride from {num_timesteps} "
                "steps; pick a count such as 10, 25, 50, 100 or 250."
            )
        section_counts = [_parse_count(part, section_counts) for part in text.split(",")]
    section_counts = [int(count) for count in section_counts]
    if not section_counts or min(section_counts) < 1:
        raise ValueError(f"timestep respacing {section_counts!r} must list positive step counts.")

    size_per_section, extra = divmod(num_timesteps, len(section_counts))
    start_index, kept = 0, []
    for i, section_count in enumerate(section_counts):
        size = size_per_section + (1 if i < extra else 0)
        if size < section_count:
            raise ValueError(
                f"cannot keep {section_count} steps from a section of {size} of the {num_timesteps}-step "
                "diffusion; ask for fewer sampling steps."
            )
        stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        # Accumulate the float position step by step (as DiT/ADM do) rather than computing
        # stride * k: the rounding errors differ, and for 278 of the 1000 possible counts the
        # kept steps would move by one (e.g. 21 steps keeps 499, not 500).
        position = 0.0
        for _ in range(section_count):
            kept.append(start_index + round(position))
            position += stride
        start_index += size
    return set(kept)


def _parse_count(part, whole):
    try:
        return int(part)
    except ValueError:
        raise ValueError(
            f"timestep respacing {whole!r} is not understood; use e.g. \"250\", \"ddim50\" or \"10,20,30\"."
        ) from None


class SpacedDiffusion(GaussianDiffusion):
    """A GaussianDiffusion over the kept steps of a base chain.

    use_timesteps: original step indices to keep; the remaining kwargs build the base chain
    (betas, model_mean_type, model_var_type, loss_type). t given to this object's methods indexes
    the kept steps; `timestep_map[t]` is what the model receives.
    """

    def __init__(self, use_timesteps, **kwargs):
        base = GaussianDiffusion(**kwargs)
        self.use_timesteps = set(use_timesteps)
        self.original_num_steps = base.num_timesteps
        if not self.use_timesteps or not self.use_timesteps <= set(range(base.num_timesteps)):
            raise ValueError(f"use_timesteps must be a non-empty subset of 0..{base.num_timesteps - 1}.")
        self.timestep_map = sorted(self.use_timesteps)
        kept_alphas_cumprod = base.alphas_cumprod[self.timestep_map]
        previous = np.append(1.0, kept_alphas_cumprod[:-1])
        kwargs["betas"] = 1.0 - kept_alphas_cumprod / previous
        super().__init__(**kwargs)
        self._timestep_map_array = np.asarray(self.timestep_map, dtype=np.int64)

    def _model_timesteps(self, t):
        return self._table("_timestep_map_array", t.device)[t]
