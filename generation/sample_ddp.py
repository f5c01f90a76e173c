"""Samples a DiT or SiT checkpoint on all ranks into PNGs and an ADM-layout npz for FID evaluation.

    # DiT (DDPM respaced to 250 steps, as the USP tables):
    torchrun --nproc_per_node=8 -m generation.sample_ddp --model DiT-XL/2 --ckpt DiT-XL-2-256x256.pt \
        --num-fid-samples 50000 --per-proc-batch-size 32 --cfg-scale 1.0 --sample-dir samples/dit-xl
    # SiT (mode first, as SiT's sample_ddp.py; `--mode SDE` works too; without a mode: SDE, as USP's recipe):
    torchrun --nproc_per_node=8 -m generation.sample_ddp SDE --model SiT-XL/2 --ckpt SiT-XL-2-256x256.pt ...

Writes `<sample-dir>/<index:06d>.png` (the label in a PNG text chunk) and then `<sample-dir>.npz` with
arr_0 (N, H, W, 3) uint8 and arr_1 (N,) labels, exactly --num-fid-samples images in index order.
Image i depends only on (--global-seed, i) (and, bit for bit, on --per-proc-batch-size), never on the
number of processes; see `generation/sampling.py`. Rerunning an interrupted command resumes: complete
batches are skipped, and the npz equals that of an uninterrupted run.

Checkpoints: official DiT/SiT raw state dicts, or this project's training checkpoints, whose `ema`
weights are used (the `model` weights only when there is no `ema`, with a warning). REPA-trained checkpoints
sample as they are (the training-only `projectors.*` are dropped, QK-norm is read from the weights); REPA's
own SiT files need `--repa-checkpoint` (its time runs the other way; see models/repa.py).
Differences from the official scripts: --sample-dir is the PNG folder itself (DiT names a subfolder after
the settings; here `sampling_config.json` in the folder records them and a resume with other settings is
refused), no checkpoint is downloaded (--ckpt is required), and labels are drawn per image. The sampler flags
and the checkpoint loading are shared with the quick grid sampler `generation/sample.py` (sampler_setup.py).
"""
import argparse
import sys
import warnings
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from generation.eval_hooks import total_throughput
from generation.sampler_setup import (add_sampler_flags, build_generator, check_sampler_args, load_model,
                                      parse_with_mode)
from generation.sampling import (ImageGenerator, check_sample_folder, create_npz_from_sample_folder, npz_path_for,
                                 sample_to_folder)
from generation.train_utils import add_model_flags
from util.cli import finish_parser, finite_float, non_negative_int, positive_float, positive_int
from util.disk import ensure_writable_dir, ensure_writable_file
from util.errors import run_cli
from util.distributed import DEFAULT_TIMEOUT_MINUTES, barrier, cleanup, init_distributed
from util.precision import PRECISIONS, configure_cuda

# Arguments that do not change any image: a resume may alter them.
NOT_IN_CONFIG = ("num_fid_samples", "sample_dir", "npz_workers", "progress")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("DiT / SiT DDP sampling into an ADM npz",
                                     usage="%(prog)s [ODE|SDE] --model NAME --ckpt PATH [options]")
    # DiT / SiT sample_ddp.py flags.
    add_model_flags(parser)
    parser.add_argument("--ckpt", type=str, required=True, help="official raw state dict or a training checkpoint")
    parser.add_argument("--sample-dir", type=str, default="samples", help="PNG folder; the npz goes next to it")
    parser.add_argument("--per-proc-batch-size", type=positive_int, default=32)
    parser.add_argument("--num-fid-samples", type=positive_int, default=50_000)
    parser.add_argument("--cfg-scale", type=finite_float, default=1.0,
                        help="1.0 = no guidance (USP's default and the setting of its tables; DiT's is 1.5)")
    parser.add_argument("--global-seed", type=non_negative_int, default=0)
    add_sampler_flags(parser)
    parser.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                        help="TF32 matmuls on Ampere+ (DiT's default; --no-tf32 for strict fp32)")
    # This re-implementation's additions.
    parser.add_argument("--precision", default="fp32", choices=sorted(PRECISIONS),
                        help="autocast dtype of the network (fp32: none)")
    parser.add_argument("--dist-timeout-minutes", type=positive_float, default=DEFAULT_TIMEOUT_MINUTES,
                        help="minutes a collective may wait before the process group aborts (rank 0 packs the npz)")
    parser.add_argument("--npz-workers", type=positive_int, default=8, help="threads reading PNGs into the npz")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm bar on rank 0")
    return finish_parser(parser)


def parse_args(argv=None) -> argparse.Namespace:
    """Parses the command line; SiT's leading `ODE`/`SDE` word is accepted as well as --mode."""
    return parse_with_mode(get_args_parser(), argv)


# ----------------------------------------------------------------------------------------------
# Checks that need no weights
# ----------------------------------------------------------------------------------------------

def check_args(args) -> dict:
    """Validates the command line before anything is loaded; returns the parsed --model-kwargs."""
    return check_sampler_args(args)


def sampling_config(args, dist_env) -> dict:
    """What fixes the images of a sample folder (recorded in it, so a resume cannot mix settings)."""
    config = {key: value for key, value in vars(args).items() if key not in NOT_IN_CONFIG}
    config["ckpt"] = str(Path(args.ckpt).resolve())
    config["device"] = dist_env.device.type  # CPU and GPU kernels differ in the last bits
    return config


def setup(args, dist_env, log=print) -> ImageGenerator:
    model_kwargs = check_args(args)
    ensure_writable_dir(args.sample_dir, flag="--sample-dir")  # before the model and the VAE, not after
    ensure_writable_file(npz_path_for(args.sample_dir), "--sample-dir")  # the npz, beside the folder
    model = load_model(args, model_kwargs, dist_env.device,
                       warn=warnings.warn if dist_env.is_main else (lambda *a, **k: None))
    generator = build_generator(args, model, dist_env.device)
    check_sample_folder(args.sample_dir, sampling_config(args, dist_env), dist_env.is_main)
    if dist_env.is_main:
        log(f"{args.model}: {sum(p.numel() for p in model.parameters()):,} parameters from {args.ckpt}; "
            f"{args.num_fid_samples} samples into {args.sample_dir} on {dist_env.world_size} process(es)")
    return generator


def main(argv=None) -> None:
    """Exit codes (util.errors): 2 = a user error, reported as one sentence on stderr."""
    run_cli(sample, argv, prog="generation.sample_ddp", cleanup=cleanup)


def sample(argv=None) -> None:
    args = parse_args(argv)
    dist_env = init_distributed(args.device, args.dist_timeout_minutes)
    if dist_env.device.type == "cuda":
        configure_cuda(tf32=args.tf32)
    generator = setup(args, dist_env)
    try:
        result = sample_to_folder(generator, args.sample_dir, args.num_fid_samples, args.per_proc_batch_size,
                                  args.global_seed, dist_env.rank, dist_env.world_size,
                                  progress=args.progress and dist_env.is_main)
        total, seconds, rate = total_throughput(result["images"], result["seconds"], dist_env.device)
        barrier()  # every PNG exists before rank 0 packs them
        if dist_env.is_main:
            print(f"sampled {total} images in {seconds:.1f}s ({rate:.2f} images/s over "
                  f"{dist_env.world_size} process(es))")
            out = create_npz_from_sample_folder(args.sample_dir, args.num_fid_samples, args.npz_workers)
            print(f"Saved .npz file to {out} [shape={(args.num_fid_samples, args.image_size, args.image_size, 3)}].")
    finally:
        cleanup()


if __name__ == "__main__":
    main()
