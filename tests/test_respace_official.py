"""Timestep respacing against DiT's `space_timesteps` (diffusion/respace.py), written out here.

DiT (and ADM/IDDPM before it) walks a float position `cur_idx += frac_stride` and rounds it each
step; rounding the accumulated sum differs from rounding `k * frac_stride` for 278 of the 1000
possible counts, so the kept steps must come from the accumulating walk.
"""
import pytest

from generation.diffusion import space_timesteps


def dit_space_timesteps(num_timesteps, section_counts):
    """facebookresearch/DiT diffusion/respace.py::space_timesteps, algorithm restated."""
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[4:])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise ValueError
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per, extra = num_timesteps // len(section_counts), num_timesteps % len(section_counts)
    start_idx, all_steps = 0, []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        cur_idx = 0.0
        for _ in range(section_count):
            all_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        start_idx += size
    return set(all_steps)


def test_every_single_section_count_matches_dit():
    mismatches = [n for n in range(1, 1001) if space_timesteps(1000, str(n)) != dit_space_timesteps(1000, str(n))]
    assert mismatches == []


def test_hand_worked_21_steps_keeps_499():
    # stride 999/20 = 49.95; DiT's running sum reaches 499.49999999999994 after 10 additions
    # (rounds to 499) while 10 * 49.95 is exactly 499.5 (rounds half-to-even to 500).
    kept = sorted(space_timesteps(1000, "21"))
    assert kept[10] == 499 and kept[0] == 0 and kept[-1] == 999


@pytest.mark.parametrize(
    "total, sections",
    [(1000, "10,15,20"), (300, "10,15,20"), (100, "10,5"), (1000, "1,1,1"), (1000, "250,250"),
     (1000, "7,30,3,100"), (1000, "ddim25"), (1000, "ddim50"), (1000, [5, 9]), (101, "33,17,2")],
)
def test_section_strings_match_dit(total, sections):
    assert space_timesteps(total, sections) == dit_space_timesteps(total, sections)


def test_counts_per_section_for_many_splits_match_dit():
    for first in range(1, 60, 7):
        for second in range(1, 60, 11):
            text = f"{first},{second},{first + second}"
            assert space_timesteps(999, text) == dit_space_timesteps(999, text), text
