"""Quick sampler (DiT's / SiT's sample.py): a few class labels in, one PNG grid out, on one device.

    python -m generation.sample --model DiT-XL/2 --ckpt DiT-XL-2-256x256.pt --vae-path weights/sd-vae-ft-mse
    python -m generation.sample SDE --model SiT-XL/2-VAE-simple --ckpt results/.../0400000.pt --cfg-scale 1.0
    python -m generation.sample ODE --model SiT-XL/2 --ckpt SiT-XL-2-256x256.pt --likelihood

Any checkpoint sample_ddp.py reads (this project's training checkpoints, DiT's or SiT's released state
dicts), DiT or SiT, with the same sampler and guidance flags (see generation/sampler_setup.py). As the
official script: labels 207 360 387 974 88 979 417 279, cfg 4.0, 250 steps, a 4-wide grid in sample.png.
Image k gets the noise of index k of --seed (the same noise sample_ddp.py gives index k).
--likelihood (SiT, ODE, cfg 1): also prints each sample's log-likelihood in bits per latent dimension under
the model's probability-flow ODE (SiT's `sample_ode_likelihood`).
"""
import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torchvision.utils import save_image

from generation.objectives import objective_family
from generation.sampler_setup import (add_sampler_flags, build_generator, check_sampler_args, load_model,
                                      parse_with_mode, sit_mode)
from generation.train_utils import add_model_flags
from generation.transport import Sampler, create_transport
from generation.transport.likelihood import bits_per_dim
from util.disk import ensure_writable_image
from util.errors import UserError, run_cli
from util.cli import finish_parser, finite_float, non_negative_int, positive_int
from util.precision import PRECISIONS, configure_cuda

DIT_CLASS_LABELS = [207, 360, 387, 974, 88, 979, 417, 279]  # DiT's and SiT's sample.py


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("DiT / SiT quick sampler: one PNG grid",
                                     usage="%(prog)s [ODE|SDE] --model NAME --ckpt PATH [options]")
    add_model_flags(parser)
    parser.add_argument("--ckpt", type=str, required=True, help="official raw state dict or a training checkpoint")
    parser.add_argument("--cfg-scale", type=finite_float, default=4.0,
                        help="DiT's / SiT's sample.py default (1.0 = off)")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--class-labels", type=non_negative_int, nargs="+", default=DIT_CLASS_LABELS)
    parser.add_argument("--output", type=str, default="sample.png", help="the PNG grid")
    parser.add_argument("--nrow", type=positive_int, default=4, help="images per grid row")
    parser.add_argument("--likelihood", action="store_true",
                        help="SiT ODE, cfg 1: print bits/dim of each sample under the probability-flow ODE")
    parser.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True)
    add_sampler_flags(parser)
    parser.add_argument("--precision", default="fp32", choices=sorted(PRECISIONS),
                        help="autocast dtype of the network (fp32: none)")
    return finish_parser(parser)


def check_args(args) -> dict:
    bad = [label for label in args.class_labels if not 0 <= label < args.num_classes]
    if bad:
        raise UserError(f"--class-labels {bad[0]} is outside 0..{args.num_classes - 1}; pick labels of the "
                        f"{args.num_classes} classes.")
    if args.likelihood and (objective_family(args.model) != "transport" or sit_mode(args) != "ODE"
                            or args.cfg_scale != 1.0):
        raise UserError("--likelihood needs a SiT model in ODE mode with --cfg-scale 1.0 (as SiT's sample.py).")
    return check_sampler_args(args)


def sample(argv=None) -> dict:
    args = parse_with_mode(get_args_parser(), argv)
    model_kwargs = check_args(args)
    output = ensure_writable_image(args.output, "--output")  # before sampling, not after
    device = torch.device(args.device if args.device != "cuda" or torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        configure_cuda(tf32=args.tf32)
    torch.manual_seed(args.seed)
    model = load_model(args, model_kwargs, device)
    generator = build_generator(args, model, device)
    indices = list(range(len(args.class_labels)))
    latents, labels = generator.latents(args.seed, indices, labels=args.class_labels)
    images = generator.codec.decode(latents.float())  # (N, 3, H, W) in [-1, 1], fp32
    save_image(images, output, nrow=args.nrow, normalize=True, value_range=(-1, 1))
    print(f"Saved {len(indices)} samples of classes {labels.tolist()} to {output}")
    result = {"output": output}
    if args.likelihood:
        transport = create_transport(args.path_type, args.prediction, args.loss_weight, args.train_eps,
                                     args.sample_eps)
        likelihood = Sampler(transport).sample_ode_likelihood(sampling_method=args.sampling_method or "dopri5",
                                                             num_steps=args.num_sampling_steps, atol=args.atol,
                                                             rtol=args.rtol)
        with torch.no_grad():
            logp, _ = likelihood(latents.float(), model.forward, y=labels.to(device))
        bpd = bits_per_dim(logp, latents.shape[1:])
        print("bits/dim (latent space): " + " ".join(f"{value:.4f}" for value in bpd.tolist()))
        result["bits_per_dim"] = bpd.cpu()
    return result


def main(argv=None):
    """Exit codes (util.errors): 2 = a user error, reported as one sentence on stderr."""
    return run_cli(sample, argv, prog="generation.sample")


if __name__ == "__main__":
    main()
