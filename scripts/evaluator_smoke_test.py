"""Offline smoke test of the evaluation pipeline with RANDOM Inception weights. The numbers are NOT FID.

    python scripts/evaluator_smoke_test.py                                   # random images, CPU or GPU
    python scripts/evaluator_smoke_test.py REF.npz SAMPLE.npz --device cuda  # your own npz files

It runs exactly what `python -m generation.evaluate` runs (npz checks, torch-fidelity's Inception graph,
pool_3 / spatial / logit features, FID, sFID, IS, Precision, Recall) but with a seeded random-weight
network of the FID Inception's layout (`generation.inception.random_inception_state_dict`), so an offline
machine can check its npz files, the feature path on its device and the statistics code before the real
`weights-inception-2015-12-05-6726825d.pth` is available. Every number it prints or writes is labelled
NOT FID: random features make them meaningless as image-quality measures.
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from generation.evaluate import evaluate_npz, write_json
from generation.inception import save_random_inception_weights
from util.cli import finish_parser
from util.errors import UserError, run_cli

BANNER = "NOT FID: random Inception weights (evaluator smoke test); never report these numbers as FID/IS/sFID."


def random_npz(path: Path, count: int, size: int, seed: int) -> Path:
    images = np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)
    np.savez(path, arr_0=images)
    return path


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Evaluator smoke test with random Inception weights (NOT FID)")
    parser.add_argument("ref_batch", nargs="?", default=None, help="reference npz (default: random images)")
    parser.add_argument("sample_batch", nargs="?", default=None, help="sample npz (default: random images)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-images", type=int, default=64, help="images per random npz")
    parser.add_argument("--image-size", type=int, default=64, help="side of the random images")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and images")
    parser.add_argument("--output-json", default=None, help="where to write the (NOT FID) metrics")
    return finish_parser(parser)


def main(argv=None) -> dict:
    args = get_args_parser().parse_args(argv)
    if (args.ref_batch is None) != (args.sample_batch is None):
        raise UserError("give both REF and SAMPLE npz files, or neither (random images are then used).")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        weights = save_random_inception_weights(tmp / "inception-random.pth", seed=args.seed)
        ref = args.ref_batch or random_npz(tmp / "ref.npz", args.num_images, args.image_size, args.seed)
        sample = args.sample_batch or random_npz(tmp / "sample.npz", args.num_images, args.image_size, args.seed + 1)
        print(BANNER)
        metrics = evaluate_npz(ref, sample, weights, args.batch_size, args.device)
    result = {"NOT_FID": BANNER, "device": args.device, "ref_batch": str(args.ref_batch or "random"),
              "sample_batch": str(args.sample_batch or "random"), "metrics_with_random_weights": metrics}
    if args.output_json:
        write_json(result, args.output_json)
    print(json.dumps(result, indent=1))
    print(BANNER)
    return result


if __name__ == "__main__":
    run_cli(main, prog="evaluator_smoke_test")
