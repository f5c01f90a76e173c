"""Held-out diffusion / transport loss of every checkpoint of DiT or SiT experiments.

    python -m demo.heldout_loss --experiment demo_out/seed0/gen/dit_usp --cached_path demo_out/cache/val \
        --output demo_out/seed0/heldout/dit_usp.json [--experiment ... --output ...]

The training loss is measured on the batch being fitted with fresh t and noise, so two runs' curves are
noisy and not on the same data. Here every checkpoint is scored with the run's own training objective
(labels kept, no CFG dropout) on the same held-out latents (the val split's posterior means, unflipped)
with the same (t, noise) per latent, drawn once from `--seed`: curves differ only by the weights (common
random numbers). Writes {"steps", "loss", "ema_loss", ...} to --output and the same numbers as JSON lines
(`{"step", "heldout_loss", "heldout_ema_loss"}`, the trainers' log.txt format) next to it as .jsonl, which
scripts/plot_convergence.py reads.
"""
import argparse
import json
import re
import sys
from argparse import Namespace
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from generation.objectives import NoiseBundle, build_objective
from models.dit import DiT_models
from models.sit import SiT_models
from util.checkpoint import load_checkpoint
from util.cli import finish_parser
from util.latent_cache import LatentCacheDataset
from util.progress import progress_bar as tqdm


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Held-out loss of a DiT/SiT experiment's checkpoints")
    parser.add_argument("--experiment", required=True, action="append",
                        help="generation.train results folder (the NNN-<model> folder or its parent); repeatable")
    parser.add_argument("--cached_path", required=True, help="latent cache of the held-out images")
    parser.add_argument("--output", required=True, action="append",
                        help="JSON file to write, one per --experiment in the same order")
    parser.add_argument("--repeats", type=int, default=2, help="(t, noise) draws per held-out latent")
    parser.add_argument("--batch_size", type=int, default=500)
    parser.add_argument("--seed", type=int, default=1234)
    return finish_parser(parser)


def find_checkpoints(experiment) -> list[tuple[int, Path]]:
    """(step, path) of every `checkpoints/NNNNNNN.pt` under `experiment`, oldest first."""
    paths = sorted(Path(experiment).glob("**/checkpoints/*.pt"))
    found = [(int(match.group(1)), path) for path in paths if (match := re.fullmatch(r"(\d+)\.pt", path.name))]
    if not found:
        raise SystemExit(f"heldout_loss: error: no checkpoints under {experiment}; run generation.train first.")
    return sorted(found)


def heldout_batch(cached_path, repeats: int, seed: int):
    """(latents (M, C, h, w), labels (M,), bundle) with M = repeats x held-out images, fixed by `seed`."""
    dataset = LatentCacheDataset(cached_path, use_mean=True, random_flip=False)
    items = [dataset[(0, index)] for index in range(len(dataset))]
    latents = torch.stack([item[0] for item in items]).repeat(repeats, 1, 1, 1)
    labels = torch.tensor([item[1] for item in items]).repeat(repeats)
    generator = torch.Generator().manual_seed(seed)
    bundle = NoiseBundle(u=torch.rand(len(latents), generator=generator),
                         noise=torch.randn(latents.shape, generator=generator),
                         drop=torch.zeros(len(latents), dtype=torch.int64))
    return latents, labels, bundle


@torch.no_grad()
def mean_loss(model, objective, latents, labels, bundle: NoiseBundle, batch_size: int) -> float:
    model.eval()
    total = 0.0
    for start in range(0, len(latents), batch_size):
        part = slice(start, start + batch_size)
        chunk = NoiseBundle(bundle.u[part], bundle.noise[part], bundle.drop[part])
        total += objective.loss(model, latents[part], labels[part], chunk).sum().item()
    return total / len(latents)


def main(args) -> list:
    """Scores every --experiment (one process for several: the start-up costs more than the scoring)."""
    if len(args.output) != len(args.experiment):
        raise SystemExit(f"heldout_loss: error: {len(args.experiment)} --experiment but {len(args.output)} --output; "
                         "give one --output per --experiment.")
    latents, labels, bundle = heldout_batch(args.cached_path, args.repeats, args.seed)
    return [score_experiment(experiment, Path(output), latents, labels, bundle, args)
            for experiment, output in zip(args.experiment, args.output)]


def score_experiment(experiment, output: Path, latents, labels, bundle: NoiseBundle, args) -> dict:
    checkpoints = find_checkpoints(experiment)
    result = {"steps": [], "loss": [], "ema_loss": [], "num_latents": len(latents), "seed": args.seed}
    for step, path in tqdm(checkpoints, desc="held-out loss"):
        checkpoint = load_checkpoint(path)
        run_args = Namespace(**checkpoint["args"])
        model = {**DiT_models, **SiT_models}[run_args.model](
            input_size=latents.shape[-1], num_classes=run_args.num_classes, in_channels=latents.shape[1],
            **json.loads(run_args.model_kwargs))
        objective = build_objective(run_args.model, run_args.num_classes, run_args.path_type,
                                    run_args.prediction, run_args.loss_weight, run_args.train_eps,
                                    run_args.sample_eps)
        result["model"] = run_args.model
        result["steps"].append(step)
        for key, weights in (("loss", "model"), ("ema_loss", "ema")):
            model.load_state_dict(checkpoint[weights])
            result[key].append(mean_loss(model, objective, latents, labels, bundle, args.batch_size))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=1))
    output.with_suffix(".jsonl").write_text("".join(
        json.dumps({"step": step, "heldout_loss": loss, "heldout_ema_loss": ema}) + "\n"
        for step, loss, ema in zip(result["steps"], result["loss"], result["ema_loss"])))
    print(f"held-out loss of {experiment}: " +
          ", ".join(f"step {s}: {l:.4f}" for s, l in zip(result["steps"], result["loss"])))
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
