"""generation/sample.py, the quick one-grid sampler (DiT's / SiT's sample.py), on CPU with tiny models."""
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from generation import sample as quick
from test_sampling import IMAGE_SIZE, NUM_CLASSES, TINY, tiny_model


def run(model, ckpt, vae_dir, out, extra=()):
    return quick.main([*extra, "--model", model, "--ckpt", str(ckpt), "--model-kwargs", json.dumps(TINY),
                       "--image-size", str(IMAGE_SIZE), "--num-classes", str(NUM_CLASSES), "--vae-path",
                       str(vae_dir), "--device", "cpu", "--num-sampling-steps", "3", "--output", str(out)])


@pytest.mark.slow
def test_dit_grid_from_a_training_checkpoint(tiny_vae_dir, tmp_path):
    ckpt = tmp_path / "dit.pt"
    torch.save({"ema": tiny_model("DiT-S/2", 0).state_dict(), "model": tiny_model("DiT-S/2", 1).state_dict()}, ckpt)
    out = tmp_path / "grid.png"
    run("DiT-S/2", ckpt, tiny_vae_dir, out, ["--class-labels", "0", "1", "2", "3", "0", "--cfg-scale", "2.0"])
    with Image.open(out) as grid:
        # save_image(nrow=4, padding=2): 5 images -> 4 columns x 2 rows of 32 px tiles with 2 px borders.
        assert grid.size == (4 * (IMAGE_SIZE + 2) + 2, 2 * (IMAGE_SIZE + 2) + 2)
        pixels = np.asarray(grid.convert("RGB"))
    first, fifth = pixels[2:34, 2:34], pixels[36:68, 2:34]
    assert not np.array_equal(first, fifth)  # same class, another index: other noise


@pytest.mark.slow
def test_sit_ode_likelihood_and_one_sentence_errors(tiny_vae_dir, tmp_path, capsys):
    ckpt = tmp_path / "sit.pt"
    torch.save(tiny_model("SiT-S/2", 2).state_dict(), ckpt)
    result = run("SiT-S/2", ckpt, tiny_vae_dir, tmp_path / "sit.png",
                 ["ODE", "--class-labels", "1", "3", "--cfg-scale", "1.0", "--likelihood", "--sampling-method",
                  "euler"])
    bpd = result["bits_per_dim"]
    assert bpd.shape == (2,) and torch.isfinite(bpd).all()
    printed = re.search(r"bits/dim \(latent space\): (\S+) (\S+)", capsys.readouterr().out)
    assert printed and float(printed.group(1)) == pytest.approx(bpd[0].item(), abs=1e-4)
    with pytest.raises(SystemExit) as exit_info:
        run("SiT-S/2", ckpt, tiny_vae_dir, tmp_path / "x.png", ["SDE", "--likelihood", "--class-labels", "1"])
    assert exit_info.value.code == 2 and "--likelihood needs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run("SiT-S/2", ckpt, tiny_vae_dir, tmp_path / "x.png", ["--class-labels", "9"])
    assert "outside 0..3" in capsys.readouterr().err
