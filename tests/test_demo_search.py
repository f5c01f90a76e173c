"""demo/search.py without running a pipeline: which upstream stages a variant reuses, and the margin and
ranking computed from held-out results whose intervals are worked out by hand."""
import json
import math
from pathlib import Path

import pytest

from demo import run_demo
from demo import search as S
from demo.stages import RUNS, Stage, build_stages
from util.errors import UserError

T_975_2 = 4.303  # Student t, 2 degrees of freedom (3 seeds), from a printed table


def search_args(*argv):
    return S.get_args_parser().parse_args(["--fast", "--seeds", "3", *argv])


def finished_folder(folder: Path, cfg) -> None:
    """A folder that looks like a finished run of `cfg`'s upstream stages: a marker and an output for each."""
    for stage in build_stages(folder, cfg):
        if S.shareable(stage.name):
            for relative in stage.outputs:
                (folder / relative).mkdir(parents=True, exist_ok=True)
                (folder / relative / "made_by.txt").write_text(str(folder))
            run_demo.write_marker(folder, stage, 1.0, None, 2.0)


def test_variant_reuses_exactly_the_upstream_stages_its_settings_leave_unchanged(tmp_path):
    args = search_args()
    base_cfg = S.variant_config(args, [])
    base = tmp_path / "baseline"
    finished_folder(base, base_cfg)
    seeds = base_cfg.seed_list
    cases = {
        # only the generators' lr changes: dataset, VAE, caches and every seed's pretraining are the same
        "lr": (["gen_lr=1e-3"], ["data", "vae", "cache_train", "cache_val", *(f"pretrain_s{s}" for s in seeds)]),
        # a longer pretraining: the same data, VAE and caches, pretraining reruns
        "pretrain": (["pretrain_steps=12"], ["data", "vae", "cache_train", "cache_val"]),
        # another VAE: only the dataset is shared (the caches' command lines are equal, but they read the new VAE)
        "vae": (["vae_steps=7"], ["data"]),
        # another dataset: nothing is shared
        "data": (["train_per_class=25"], []),
    }
    for name, (assignments, expected) in cases.items():
        folder = tmp_path / name
        copied = S.copy_shared_stages(folder, S.variant_config(args, assignments), [(base, base_cfg)])
        assert copied == expected, name
        for stage in expected:
            assert run_demo.marker_path(folder, stage).is_file()
        if expected:
            assert (folder / "data" / "made_by.txt").read_text() == str(base)


def write_heldout(folder: Path, seed: int, usp: float, scratch: float, usp_ema: float, scratch_ema: float):
    heldout = folder / f"seed{seed}" / "heldout"
    heldout.mkdir(parents=True, exist_ok=True)
    for family in ("dit", "sit"):
        for init, (loss, ema) in (("usp", (usp, usp_ema)), ("scratch", (scratch, scratch_ema))):
            (heldout / f"{family}_{init}.json").write_text(json.dumps({"steps": [3, 6], "loss": [1.0, loss],
                                                                       "ema_loss": [1.0, ema]}))


def test_margin_and_score_follow_the_hand_worked_intervals(tmp_path):
    args = search_args()
    cfg = S.variant_config(args, [])
    folder = tmp_path / "v"
    # Advantages 100 (scratch - USP) / scratch: raw 1, 2, 3 % (mean 2, sd 1), EMA 2, 2, 2 % (sd 0).
    for seed, raw in zip(cfg.seed_list, (1.0, 2.0, 3.0)):
        write_heldout(folder, seed, usp=1.0 - raw / 100, scratch=1.0, usp_ema=0.98, scratch_ema=1.0)
        for stage in ("pretrain", *RUNS, "heldout"):
            run_demo.write_marker(folder, Stage(f"{stage}_s{seed}", (), ()), 5.0, None, 10.0)
    result = S.summarise(folder, cfg)
    low = 2.0 - T_975_2 * 1.0 / math.sqrt(3)  # -0.484: the raw intervals contain zero
    assert result["margin"] == pytest.approx(low, abs=1e-3)
    assert result["intervals"]["dit_ema_loss"]["low"] == pytest.approx(2.0, abs=1e-9)
    assert result["cpu_seconds_per_seed"] == pytest.approx(6 * 10.0)  # pretraining, 4 generators, held-out
    assert result["margin_per_cpu_second"] == pytest.approx(low / 60.0, abs=1e-5)

    # Ranking: any positive margin beats every negative one; among positives, margin per CPU second.
    results = {"neg": {"margin": -0.1, "margin_per_cpu_second": -0.1 / 10},
               "pos_cheap": {"margin": 0.5, "margin_per_cpu_second": 0.5 / 50},
               "pos_big": {"margin": 1.0, "margin_per_cpu_second": 1.0 / 400}}
    assert max(results, key=lambda name: S.ranking_key(results[name])) == "pos_cheap"


def test_bad_variants_are_one_sentence():
    with pytest.raises(UserError, match="--variants nonsense is not a known variant"):
        S.chosen_variants(search_args("--variants", "nonsense"))
    with pytest.raises(UserError, match="expected NAME:KEY=VALUE"):
        S.chosen_variants(search_args("--add", "only_a_name"))
    with pytest.raises(UserError, match="expected KEY=VALUE"):
        S.variant_config(search_args(), ["colour=red"])
