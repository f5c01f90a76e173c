"""Issue 27, items 1 and 5: every entry point refuses a bad number when parsing (one sentence naming the flag, the
value and the valid range; exit 2, before any data or weights load), every output path is checked writable
before the long work, and warnings go to stderr.

The expected outcomes are hand-worked from the flags' meaning: a learning rate must be a finite number > 0 (AdamW
raises on a negative one), a decay in [0, 1) (an EMA with decay 2 extrapolates), a probability in [0, 1], a count
> 0 (a shard of 0 images divides by zero), a mask ratio or drop-path rate below 1 (1 leaves nothing).
"""
import argparse
import importlib

import pytest

from util.cli import decay, finite_float, positive_int, probability

CASES = [  # (entry point, argv, the flag the sentence names)
    ("generation.train", ["--lr", "nan"], "--lr"),
    ("generation.train", ["--lr=-1"], "--lr"),
    ("generation.train", ["--lr", "inf"], "--lr"),
    ("generation.train", ["--ema-decay", "2"], "--ema-decay"),
    ("generation.train", ["--beta2", "1"], "--beta2"),
    ("generation.train", ["--global-batch-size", "0"], "--global-batch-size"),
    ("generation.train", ["--max-steps", "-3"], "--max-steps"),
    ("generation.train", ["--cfg-scale", "nan"], "--cfg-scale"),
    ("generation.train", ["--image-size", "0"], "--image-size"),
    ("generation.sample_ddp", ["--cfg-scale", "nan"], "--cfg-scale"),
    ("generation.sample_ddp", ["--per-proc-batch-size", "0"], "--per-proc-batch-size"),
    ("generation.sample_ddp", ["--guidance-interval", "0", "1.5"], "--guidance-interval"),
    ("generation.sample_ddp", ["--atol", "0"], "--atol"),
    ("generation.sample", ["--nrow", "0"], "--nrow"),
    ("generation.sample", ["--cfg-scale", "inf"], "--cfg-scale"),
    ("generation.sample", ["--class-labels", "3", "-1"], "--class-labels"),
    ("generation.evaluate", ["--batch-size", "0"], "--batch-size"),
    ("generation.cache_features", ["--shard_size", "0"], "--shard_size"),
    ("generation.cache_features", ["--num_workers", "-2"], "--num_workers"),
    ("pretrain.main_pretrain", ["--lr", "nan"], "--lr"),
    ("pretrain.main_pretrain", ["--blr", "-1e-3"], "--blr"),
    ("pretrain.main_pretrain", ["--weight_decay", "nan"], "--weight_decay"),
    ("pretrain.main_pretrain", ["--max_steps", "-3"], "--max_steps"),
    ("pretrain.main_pretrain", ["--warmup_epochs", "-5"], "--warmup_epochs"),
    ("pretrain.main_pretrain", ["--epochs", "0"], "--epochs"),
    ("pretrain.main_finetune", ["--drop_path", "1.5"], "--drop_path"),
    ("pretrain.main_finetune", ["--smoothing", "1.5"], "--smoothing"),
    ("pretrain.main_finetune", ["--layer_decay", "-1"], "--layer_decay"),
    ("pretrain.main_finetune", ["--aa", "bogus"], "--aa"),
    ("pretrain.main_finetune", ["--model_ema_decay", "1"], "--model_ema_decay"),
    ("pretrain.main_finetune", ["--t", "0"], "--t"),
    ("pretrain.main_linprobe", ["--blr", "nan"], "--blr"),
    ("pretrain.main_linprobe", ["--blr", "-1e-3"], "--blr"),
    ("pretrain.main_linprobe", ["--batch_size", "0"], "--batch_size"),
    ("pretrain.main_generate", ["--num_images", "0"], "--num_images"),
    ("pretrain.main_generate", ["--mask_ratio", "1.5"], "--mask_ratio"),
    ("pretrain.cache_latents", ["--shard_size", "0"], "--shard_size"),
    ("pretrain.cache_latents", ["--batch_size", "0"], "--batch_size"),
]


def _parser(module_name: str) -> argparse.ArgumentParser:
    return importlib.import_module(module_name).get_args_parser()


@pytest.mark.parametrize("module_name,argv,flag", CASES, ids=[f"{m}:{' '.join(a)}" for m, a, _ in CASES])
def test_a_bad_number_is_one_sentence_naming_flag_value_and_range(module_name, argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _parser(module_name).parse_args(argv)
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(errors) == 1, errors  # one line: not argparse's usage block, no traceback
    value = argv[-1].split("=")[-1]
    assert f"argument {flag}" in errors[0] and repr(value) in errors[0] and "pass " in errors[0], errors[0]


def test_the_checks_accept_their_bounds_and_negative_numbers_in_any_spelling():
    assert positive_int("1") == 1 and probability("0") == 0.0 and probability("1") == 1.0 and decay("0") == 0.0
    for check, text in ((positive_int, "0"), (decay, "1"), (probability, "1.01"), (finite_float, "-inf")):
        with pytest.raises(argparse.ArgumentTypeError):
            check(text)
    args = _parser("generation.sample").parse_args(["--ckpt", "x.pt", "--cfg-scale", "-1e-1"])
    assert args.cfg_scale == -0.1  # read as a value (the sampler's own check then asks for >= 1)
    args = _parser("pretrain.main_finetune").parse_args(["--aa", "rand-m7-mstd0.5", "--layer_decay", "1"])
    assert (args.aa, args.layer_decay) == ("rand-m7-mstd0.5", 1.0)


def _refused(main, argv_or_args, flag: str, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv_or_args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert flag in err, err
    return err


def test_pretraining_log_dir_is_checked_before_the_output_folder_is_claimed(tmp_path, capsys):
    from pretrain import main_pretrain

    (tmp_path / "file").write_text("")
    out = tmp_path / "out"
    args = main_pretrain.get_args_parser().parse_args([
        "--model", "vit_base_patch_vae", "--input_size", "32", "--model_kwargs", '{"embed_dim": 32, "depth": 1, '
        '"num_heads": 2, "decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 2}', "--device", "cpu",
        "--data_path", str(tmp_path / "no-data"), "--output_dir", str(out), "--log_dir", str(tmp_path / "file" / "tb")])
    err = _refused(main_pretrain.main, args, "--log_dir", capsys)
    assert "is a file, not a folder" in err
    assert not out.exists() or not any(out.iterdir())  # no lock, no log left behind


@pytest.mark.parametrize("name,why", [("grid.txt", "image suffix PIL can write"),
                                      ("file/grid.png", "is a file, not a folder")])
def test_sample_output_is_checked_before_sampling(tmp_path, capsys, name, why):
    from generation import sample

    (tmp_path / "file").write_text("")
    (tmp_path / "model.pt").write_bytes(b"not loaded")  # the output is refused before the weights are read
    err = _refused(sample.main, ["--model", "DiT-S/2", "--ckpt", str(tmp_path / "model.pt"), "--device", "cpu",
                                 "--output", str(tmp_path / name)], "--output", capsys)
    assert why in err


def test_reconstruction_output_is_checked_before_the_checkpoint_loads(tmp_path, capsys):
    from pretrain import main_generate
    from util.errors import run_cli

    args = main_generate.get_args_parser().parse_args([
        "--checkpoint", str(tmp_path / "missing.pth"), "--data_path", str(tmp_path),
        "--output", str(tmp_path / "r.txt")])
    err = _refused(lambda a: run_cli(main_generate.main, a, prog="main_generate"), args, "--output", capsys)
    assert "missing.pth" not in err


def test_sample_ddp_npz_path_is_checked_with_the_sample_folder(tmp_path, capsys):
    from generation import sample_ddp

    (tmp_path / "samples.npz").mkdir()  # where the npz would go
    (tmp_path / "model.pt").write_bytes(b"not loaded")
    err = _refused(sample_ddp.main, ["--model", "DiT-S/2", "--ckpt", str(tmp_path / "model.pt"), "--device", "cpu",
                                     "--sample-dir", str(tmp_path / "samples")], "--sample-dir", capsys)
    assert "samples.npz is a folder" in err


def test_feature_cache_folder_is_checked_before_the_encoder_loads(tmp_path, capsys):
    from PIL import Image

    from generation import cache_features
    from util.errors import run_cli

    (tmp_path / "data" / "a").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "data" / "a" / "0.png")
    (tmp_path / "file").write_text("")
    args = cache_features.get_args_parser().parse_args([
        "--data_path", str(tmp_path / "data"), "--cached_path", str(tmp_path / "file" / "cache"),
        "--encoder_path", str(tmp_path / "missing-encoder.pth"), "--input_size", "256", "--device", "cpu"])
    err = _refused(lambda a: run_cli(cache_features.main, a, prog="cache_features"), args, "--cached_path", capsys)
    assert "missing-encoder" not in err


def test_unreadable_image_warnings_go_to_stderr(tmp_path, capsys):
    from util.run_log import RunLogger

    logger = RunLogger(tmp_path, is_main=True, tensorboard=False)
    logger.report_skips({"skipped_images": 1, "too_large_images": 0, "message": "1 unreadable image skipped"}, 0)
    logger.close()
    captured = capsys.readouterr()
    assert "warning: 1 unreadable image skipped" in captured.err
    assert "unreadable" not in captured.out
