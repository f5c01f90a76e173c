"""A procedural, class-labelled image dataset that needs no download: ten classes of simple shapes with random
colour, size, position and background, written as an ImageFolder tree (`<root>/<split>/<class>/<index>.png`).
The same (seed, counts, size) always gives the same files; the demo and the tests share it."""
import os
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from util.data import build_image_folder
from util.progress import progress_bar

CLASS_NAMES = ("circle", "square", "triangle", "cross", "ring", "hbars", "vbars", "diagonal", "dots", "diamond")


def _draw_shape(draw: ImageDraw.ImageDraw, name: str, cx: float, cy: float, r: float, colour) -> None:
    """Draws one shape of class `name` centred at (cx, cy) with half-size r."""
    if name == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif name == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif name == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    elif name == "cross":
        w = max(1.0, r / 3)
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=colour)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=colour)
    elif name == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=colour, width=max(1, int(r / 3)))
    elif name in ("hbars", "vbars"):
        step = max(2.0, r / 2)
        for k in range(-2, 3):
            offset = k * step
            if name == "hbars":
                draw.rectangle([cx - r, cy + offset - step / 4, cx + r, cy + offset + step / 4], fill=colour)
            else:
                draw.rectangle([cx + offset - step / 4, cy - r, cx + offset + step / 4, cy + r], fill=colour)
    elif name == "diagonal":
        draw.line([(cx - r, cy - r), (cx + r, cy + r)], fill=colour, width=max(1, int(r / 3)))
    elif name == "dots":
        d = max(1.0, r / 4)
        for dx in (-r / 2, r / 2):
            for dy in (-r / 2, r / 2):
                draw.ellipse([cx + dx - d, cy + dy - d, cx + dx + d, cy + dy + d], fill=colour)
    elif name == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=colour)
    else:
        raise ValueError(f"unknown toy class {name!r}")


def render_toy_image(class_index: int, rng: random.Random, image_size: int) -> Image.Image:
    """One RGB image of class `class_index`, drawn with randomness from `rng`."""
    background = tuple(rng.randint(0, 90) for _ in range(3))
    colour = tuple(rng.randint(140, 255) for _ in range(3))
    image = Image.new("RGB", (image_size, image_size), background)
    r = image_size * rng.uniform(0.22, 0.36)
    margin = r + 1
    cx = rng.uniform(margin, image_size - margin)
    cy = rng.uniform(margin, image_size - margin)
    _draw_shape(ImageDraw.Draw(image), CLASS_NAMES[class_index], cx, cy, r, colour)
    return image


def write_toy_dataset(root, num_classes: int = 10, train_per_class: int = 200, val_per_class: int = 50,
                      image_size: int = 32, seed: int = 0) -> Path:
    """Writes `<root>/train` and `<root>/val` ImageFolder trees (unless `<root>/.complete` says they exist with
    these parameters); returns `root`."""
    if not 1 <= num_classes <= len(CLASS_NAMES):
        raise ValueError(f"num_classes must be between 1 and {len(CLASS_NAMES)}, got {num_classes}.")
    root = Path(root)
    marker = root / ".complete"
    signature = f"{num_classes} {train_per_class} {val_per_class} {image_size} {seed}"
    if marker.exists() and marker.read_text() == signature:
        return root
    for split, per_class, split_seed in (("train", train_per_class, seed), ("val", val_per_class, seed + 1)):
        for class_index in range(num_classes):
            class_dir = root / split / f"{class_index:02d}_{CLASS_NAMES[class_index]}"
            class_dir.mkdir(parents=True, exist_ok=True)
            rng = random.Random(split_seed * 1_000_003 + class_index)
            for i in range(per_class):
                image = render_toy_image(class_index, rng, image_size)
                tmp = class_dir / f".{i:05d}.png.tmp"
                image.save(tmp, format="PNG")
                os.replace(tmp, class_dir / f"{i:05d}.png")
    marker.write_text(signature)
    return root


def load_split(data_path, split: str) -> tuple[torch.Tensor, torch.Tensor, list]:
    """`<data_path>/<split>` -> (images (N, 3, H, W) uint8, labels (N,) int64, class names), in the
    ImageFolder's sorted order (the latent cache's). The toy splits are small enough to hold at once."""
    folder = build_image_folder(Path(data_path), split=split)
    images = np.stack([np.asarray(folder.load(index)[0].convert("RGB")) for index in range(len(folder))])
    labels = torch.tensor([label for _, label in folder.samples], dtype=torch.int64)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels, list(folder.classes)


def to_signed_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float in [-1, 1], the range the VAE reads and writes."""
    return images.float() / 127.5 - 1.0


def fit(loss_fn, optimizer, schedule, images: torch.Tensor, steps: int, batch_size: int, seed: int, desc: str):
    """`steps` optimizer steps on `loss_fn(batch, index)`, batches drawn at random (from `seed`) from uint8
    `images` (N, 3, H, W), scaled to [-1, 1] and flipped at random (the generators see flips too)."""
    generator = torch.Generator().manual_seed(seed)
    bar = progress_bar(range(steps), desc=desc)
    for _ in bar:
        index = torch.randint(0, len(images), (batch_size,), generator=generator)
        batch = to_signed_unit(images[index])
        flip = torch.rand(batch_size, generator=generator) < 0.5
        loss = loss_fn(torch.where(flip.view(-1, 1, 1, 1), batch.flip(-1), batch), index)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
