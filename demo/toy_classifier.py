"""The demo's own image classifier, the yardstick of its toy quality metrics (no download needed).

    python -m demo.toy_classifier --data_path demo_out/data --vae_path demo_out/vae --output demo_out/toy_classifier

A small CNN trained on the toy dataset's train pixels, both as they are and as the tiny VAE
reconstructs them (encode to the posterior mean, decode): generated images are VAE decodings, so
the classifier must know what a shape looks like after the VAE (blurred, colours washed out) for
its verdict on samples to mean anything. Its accuracy on generated images of a given class says
whether a generator draws the class it was asked for; its penultimate features (64-d) play the
role Inception's pool_3 plays for FID. It never sees generated images while training.
Writes `<output>/classifier.pt` (weights-only) and `<output>/classifier.json` (val accuracy).
"""
import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn as nn

from demo.images import load_split, to_signed_unit, vae_reconstructions
from util.cli import finish_parser
from util.progress import progress_bar as tqdm

FEATURE_DIM = 64
WEIGHTS_NAME = "classifier.pt"


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
def features_and_predictions(model: ToyClassifier, images: torch.Tensor, batch_size: int = 500):
    """uint8 images (N, 3, H, W) -> (features (N, FEATURE_DIM) float64, predicted class (N,))."""
    model.eval()
    features, predictions = [], []
    for start in range(0, len(images), batch_size):
        feature, logits = model(to_signed_unit(images[start:start + batch_size]))
        features.append(feature.double())
        predictions.append(logits.argmax(dim=1))
    return torch.cat(features), torch.cat(predictions)


def load_classifier(directory) -> ToyClassifier:
    state = torch.load(Path(directory) / WEIGHTS_NAME, map_location="cpu", weights_only=True)
    model = ToyClassifier(state["num_classes"])
    model.load_state_dict(state["model"])
    return model.eval()


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Train the demo's toy classifier on the training pixels")
    parser.add_argument("--data_path", required=True, help="ImageFolder root with train/ and val/")
    parser.add_argument("--vae_path", required=True, help="the tiny VAE whose reconstructions it also learns")
    parser.add_argument("--output", required=True, help="folder for classifier.pt and classifier.json")
    parser.add_argument("--epochs", type=int, default=2, help="passes over the real + reconstructed images")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    return finish_parser(parser)


def train(args) -> dict:
    torch.manual_seed(args.seed)
    real, labels, classes = load_split(args.data_path, "train", show_progress=True)
    val_images, val_labels, _ = load_split(args.data_path, "val")
    images = torch.cat([real, vae_reconstructions(args.vae_path, real)])  # (2N, 3, H, W)
    labels = labels.repeat(2)
    model = ToyClassifier(len(classes))
    steps = args.epochs * (len(images) // args.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=max(steps, 1))
    generator = torch.Generator().manual_seed(args.seed)
    bar = tqdm(range(steps), desc="toy classifier")
    model.train()
    for _ in bar:
        index = torch.randint(0, len(images), (args.batch_size,), generator=generator)
        batch = to_signed_unit(images[index])
        flip = torch.rand(args.batch_size, generator=generator) < 0.5  # the generators see flips too
        batch = torch.where(flip.view(-1, 1, 1, 1), batch.flip(-1), batch)
        loss = nn.functional.cross_entropy(model(batch)[1], labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    _, predictions = features_and_predictions(model, val_images)
    _, reconstructed = features_and_predictions(model, vae_reconstructions(args.vae_path, val_images))
    result = {"val_accuracy": (predictions == val_labels).double().mean().item(),
              "val_reconstruction_accuracy": (reconstructed == val_labels).double().mean().item(),
              "steps": steps, "classes": classes}
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "num_classes": len(classes)}, output / WEIGHTS_NAME)
    (output / "classifier.json").write_text(json.dumps(result, indent=1))
    print(f"toy classifier: val accuracy {100 * result['val_accuracy']:.1f}% on real images, "
          f"{100 * result['val_reconstruction_accuracy']:.1f}% on their VAE reconstructions, after {steps} steps")
    return result


if __name__ == "__main__":
    train(get_args_parser().parse_args())
