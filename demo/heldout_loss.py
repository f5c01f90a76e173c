"""Held-out diffusion / transport loss of every checkpoint of DiT or SiT experiments.

    python -m demo.heldout_loss --experiment demo_out/seed0/gen/dit_usp [--experiment ...] \
        --cached_path demo_out/cache/val --output_dir demo_out/seed0/heldout

The training loss is measured on the batch being fitted, with fresh t and noise. Here every checkpoint is
scored with its run's training objective (labels kept, no CFG dropout) on the same held-out latents (the val
split's posterior means) with the same (t, noise) per latent, drawn once from `--seed`: curves differ only
by the weights (common random numbers). Writes `<output_dir>/<experiment>.json` ({"steps", "loss",
"ema_loss", ...}) and the same numbers as `.jsonl` in the trainers' log.txt format, for plot_convergence.py.
"""
import argparse
import json
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
    parser.add_argument("--output_dir", required=True, help="folder for <experiment folder name>.json[l]")
    parser.add_argument("--repeats", type=int, default=2, help="(t, noise) draws per held-out latent")
    parser.add_argument("--seed", type=int, default=1234)
    return finish_parser(parser)


def find_checkpoints(experiment) -> list[tuple[int, Path]]:
    """(step, path) of every `checkpoints/NNNNNNN.pt` under `experiment`, oldest first."""
    paths = Path(experiment).glob("**/checkpoints/*.pt")
    found = sorted((int(path.stem), path) for path in paths if path.stem.isdigit())
    if not found:
        raise SystemExit(f"heldout_loss: error: no checkpoints under {experiment}; run generation.train first.")
    return found


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


def main(args) -> list:
    latents, labels, bundle = heldout_batch(args.cached_path, args.repeats, args.seed)
    return [score_experiment(experiment, latents, labels, bundle, args) for experiment in args.experiment]


def score_experiment(experiment, latents, labels, bundle: NoiseBundle, args) -> dict:
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
            with torch.no_grad():  # the toy's held-out set is a single batch
                result[key].append(objective.loss(model.eval(), latents, labels, bundle).sum().item() / len(latents))
    output = Path(args.output_dir) / f"{Path(experiment).name}.json"
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
