"""Every entry point accepts MAE's underscore and DiT's dash spelling of each long flag (util.cli.finish_parser)."""
import argparse
import importlib

import pytest

ENTRY_POINTS = ["generation.train", "generation.sample_ddp", "generation.sample", "generation.evaluate",
                "generation.cache_features", "pretrain.main_pretrain", "pretrain.main_finetune",
                "pretrain.main_linprobe", "pretrain.main_generate", "pretrain.cache_latents"]


def _parser(module_name: str) -> argparse.ArgumentParser:
    module = importlib.import_module(module_name)
    builder = getattr(module, "get_args_parser", None) or getattr(module, "build_parser")
    return builder()


@pytest.mark.parametrize("module_name", ENTRY_POINTS)
def test_both_spellings_of_every_long_flag_reach_the_same_option(module_name):
    parser = _parser(module_name)
    checked = 0
    for action in parser._actions:
        for name in action.option_strings:
            if not name.startswith("--") or ("_" not in name and "-" not in name[2:]):
                continue
            other = "--" + (name[2:].replace("_", "-") if "_" in name else name[2:].replace("-", "_"))
            assert parser._option_string_actions.get(other) is action, (module_name, name, other)
            checked += 1
    assert checked > 0


def test_pasted_commands_of_either_style_parse_alike():
    from generation.train import get_args_parser as generation_parser
    from pretrain.main_pretrain import get_args_parser as pretrain_parser

    dit_style = generation_parser().parse_args(["--data-path", "/d", "--global-batch-size", "8", "--cfg-scale=2"])
    mae_style = generation_parser().parse_args(["--data_path", "/d", "--global_batch_size", "8", "--cfg_scale=2"])
    assert vars(dit_style) == vars(mae_style)
    assert (dit_style.data_path, dit_style.global_batch_size, dit_style.cfg_scale) == ("/d", 8, 2.0)
    mae = pretrain_parser().parse_args(["--data_path", "/d", "--batch_size", "3", "--mask_ratio", "0.5"])
    dit = pretrain_parser().parse_args(["--data-path", "/d", "--batch-size", "3", "--mask-ratio", "0.5"])
    assert vars(mae) == vars(dit) and (mae.data_path, mae.batch_size, mae.mask_ratio) == ("/d", 3, 0.5)
