"""Toy quality metrics of generated samples, measured with the demo's own classifier (no download).

    python -m demo.toy_metrics --data_path demo_out/data --classifier demo_out/toy_classifier \
        --vae_path demo_out/vae --samples demo_out/samples/dit_usp.npz ... --output demo_out/toy_metrics.json

For each sample npz (ADM layout from generation.sample_ddp: arr_0 uint8 (N, H, W, 3), arr_1 labels):
  class accuracy  share of samples the toy classifier assigns to the class they were generated for
                  (class-conditional correctness; chance = 1 / classes);
  toy FD          Fréchet distance between the classifier's penultimate features (64-d) of the samples
                  and of the real val images (FID's formula in a toy feature space; lower is better).
Two references put the numbers in scale: the real val images (the classifier's own accuracy, FD of
val against itself = 0) and the val images passed through the tiny VAE (mean latent -> decode), the
best a generator working in this VAE's latent space can do. These are TOY metrics: they are not
comparable to FID/IS on ImageNet and only rank the demo's generators against each other.
"""
import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from demo.images import load_split, vae_reconstructions
from demo.toy_classifier import features_and_predictions, load_classifier
from generation.adm_metrics import frechet_distance
from util.cli import finish_parser


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Toy quality metrics (class accuracy, toy FD) of sample npz files")
    parser.add_argument("--data_path", required=True, help="ImageFolder root with val/")
    parser.add_argument("--classifier", required=True, help="folder written by demo.toy_classifier")
    parser.add_argument("--vae_path", required=True, help="the tiny VAE (for the reconstruction reference)")
    parser.add_argument("--samples", nargs="+", required=True, help="sample npz files (arr_0 images, arr_1 labels)")
    parser.add_argument("--output", required=True, help="JSON file to write")
    return finish_parser(parser)


def feature_statistics(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    array = features.numpy()
    return array.mean(axis=0), np.cov(array, rowvar=False)


def score(classifier, images: torch.Tensor, labels: torch.Tensor, reference, num_classes: int) -> dict:
    """Class accuracy (overall and per class) and toy FD of uint8 `images` (N, 3, H, W) against `reference`."""
    features, predictions = features_and_predictions(classifier, images)
    correct = (predictions == labels).double()
    per_class = [correct[labels == k].mean().item() if (labels == k).any() else float("nan")
                 for k in range(num_classes)]
    mu, sigma = feature_statistics(features)
    return {"class_accuracy": correct.mean().item(), "per_class_accuracy": per_class,
            # A Fréchet distance is >= 0; sqrtm round-off can leave -1e-16 for identical statistics.
            "toy_fd": max(0.0, frechet_distance(mu, sigma, *reference)), "count": len(images)}


def load_samples(path) -> tuple[torch.Tensor, torch.Tensor]:
    with np.load(path) as npz:
        if "arr_1" not in npz:
            raise SystemExit(f"toy_metrics: error: {path} has no class labels (arr_1); make it with "
                             "generation.sample_ddp, which stores them.")
        return torch.from_numpy(npz["arr_0"]).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(npz["arr_1"]).long()


def main(args) -> dict:
    classifier = load_classifier(args.classifier)
    val_images, val_labels, classes = load_split(args.data_path, "val")
    val_features, _ = features_and_predictions(classifier, val_images)
    reference = feature_statistics(val_features)
    result = {"classes": classes, "chance_accuracy": 1.0 / len(classes),
              "real_val": score(classifier, val_images, val_labels, reference, len(classes)),
              "vae_reconstruction": score(classifier, vae_reconstructions(args.vae_path, val_images), val_labels,
                                          reference, len(classes)),
              "samples": {}}
    for path in args.samples:
        images, labels = load_samples(path)
        result["samples"][Path(path).stem] = score(classifier, images, labels, reference, len(classes))
    Path(args.output).write_text(json.dumps(result, indent=1))
    for name, metrics in [("real val", result["real_val"]), ("VAE recon", result["vae_reconstruction"]),
                          *result["samples"].items()]:
        print(f"{name:>16}: class accuracy {100 * metrics['class_accuracy']:5.1f}%  toy FD {metrics['toy_fd']:.3f}")
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
