"""Toy quality metrics of generated samples, measured with a classifier of the demo's own (no download).

    python -m demo.toy_metrics --data_path demo_out/data --vae_path demo_out/vae \
        --samples demo_out/samples/dit_usp.npz ... --output demo_out/toy_metrics.json

A small CNN learns the train images as they are and as the tiny VAE reconstructs them (samples are VAE
decodings); it never sees generated images. Of each sample npz (generation.sample_ddp's) it measures the
class accuracy (share of samples it assigns to the class they were generated for) and the toy FD (Fréchet
distance of its 64-d penultimate features to the real val images'), with the real val images and their VAE
reconstructions (the best a generator in this latent space can do) as references. Toy metrics: they only
rank the demo's generators against each other.
"""
import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import torch.nn as nn

from demo.toy_dataset import fit, load_split, to_signed_unit
from generation.adm_metrics import frechet_distance
from generation.sampling import to_uint8
from models.vae import LatentCodec
from util.cli import finish_parser

FEATURE_DIM = 64
BATCH_SIZE, LR = 64, 2e-3


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Toy quality metrics (class accuracy, toy FD) of sample npz files")
    parser.add_argument("--data_path", required=True, help="ImageFolder root with train/ and val/")
    parser.add_argument("--vae_path", required=True, help="the tiny VAE whose reconstructions the classifier learns")
    parser.add_argument("--samples", nargs="+", required=True, help="sample npz files (arr_0 images, arr_1 labels)")
    parser.add_argument("--output", required=True, help="JSON file to write")
    parser.add_argument("--epochs", type=int, default=2, help="classifier passes over the real + reconstructed images")
    parser.add_argument("--seed", type=int, default=0)
    return finish_parser(parser)


class ToyClassifier(nn.Module):
    """images (N, 3, 32, 32) in [-1, 1] -> (features (N, FEATURE_DIM), logits (N, num_classes))."""

    def __init__(self, num_classes: int):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))

        self.trunk = nn.Sequential(block(3, 32), block(32, 64), block(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.embed = nn.Sequential(nn.Linear(128, FEATURE_DIM), nn.ReLU())
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.embed(self.trunk(images))
        return features, self.head(features)


@torch.no_grad()
def vae_reconstructions(vae_path, images: torch.Tensor, batch_size: int = 250) -> torch.Tensor:
    """uint8 images (N, 3, H, W) -> uint8 images decoded from their posterior-mean latents (d8 codec)."""
    codec = LatentCodec.load("d8", vae_path)
    parts = [to_uint8(codec.decode(codec.encode(to_signed_unit(images[start:start + batch_size])))).permute(0, 3, 1, 2)
             for start in range(0, len(images), batch_size)]
    return torch.cat(parts)


@torch.no_grad()
def features_and_predictions(model: ToyClassifier, images: torch.Tensor, batch_size: int = 500):
    """uint8 images (N, 3, H, W) -> (features (N, FEATURE_DIM) float64, predicted class (N,))."""
    model.eval()
    features, predictions = [], []
    for start in range(0, len(images), batch_size):
        feature, logits = model(to_signed_unit(images[start:start + batch_size]))
        features.append(feature.double())
        predictions.append(logits.argmax(dim=1))
    return torch.cat(features), torch.cat(predictions)


def train_classifier(args, real: torch.Tensor, labels: torch.Tensor, num_classes: int) -> ToyClassifier:
    """AdamW + one-cycle on the real and VAE-reconstructed train images, with random flips (as the generators)."""
    images, labels = torch.cat([real, vae_reconstructions(args.vae_path, real)]), labels.repeat(2)
    model = ToyClassifier(num_classes)
    steps = args.epochs * (len(images) // BATCH_SIZE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=LR, total_steps=max(steps, 1))
    fit(lambda batch, index: nn.functional.cross_entropy(model(batch)[1], labels[index]), optimizer, schedule,
        images, steps, BATCH_SIZE, args.seed, "toy classifier")
    return model


def feature_statistics(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    array = features.numpy()
    return array.mean(axis=0), np.cov(array, rowvar=False)


def score(classifier, images: torch.Tensor, labels: torch.Tensor, reference) -> dict:
    """Class accuracy and toy FD (against the `reference` feature statistics) of uint8 `images` (N, 3, H, W)."""
    features, predictions = features_and_predictions(classifier, images)
    # A Fréchet distance is >= 0; sqrtm round-off can leave -1e-16 for identical statistics.
    return {"class_accuracy": (predictions == labels).double().mean().item(), "count": len(images),
            "toy_fd": max(0.0, frechet_distance(*feature_statistics(features), *reference))}


def load_samples(path) -> tuple[torch.Tensor, torch.Tensor]:
    """A sample_ddp npz (arr_0 uint8 (N, H, W, 3), arr_1 labels) -> (images (N, 3, H, W), labels)."""
    with np.load(path) as npz:
        return torch.from_numpy(npz["arr_0"]).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(npz["arr_1"]).long()


def main(args) -> dict:
    torch.manual_seed(args.seed)
    train_images, train_labels, classes = load_split(args.data_path, "train")
    val_images, val_labels, _ = load_split(args.data_path, "val")
    classifier = train_classifier(args, train_images, train_labels, len(classes))
    reference = feature_statistics(features_and_predictions(classifier, val_images)[0])
    result = {"classes": classes, "chance_accuracy": 1.0 / len(classes),
              "real_val": score(classifier, val_images, val_labels, reference),
              "vae_reconstruction": score(classifier, vae_reconstructions(args.vae_path, val_images), val_labels,
                                          reference),
              "samples": {Path(path).stem: score(classifier, *load_samples(path), reference) for path in args.samples}}
    Path(args.output).write_text(json.dumps(result, indent=1))
    for name, metrics in [("real val", result["real_val"]), ("VAE recon", result["vae_reconstruction"]),
                          *result["samples"].items()]:
        print(f"{name:>16}: class accuracy {100 * metrics['class_accuracy']:5.1f}%  toy FD {metrics['toy_fd']:.3f}")
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
