"""The foundation the rest relies on: the latent specs and the procedural dataset."""
import pytest
from PIL import Image

from models.latent_spec import LATENT_SPECS, get_latent_spec
from demo.toy_dataset import write_toy_dataset


def test_latent_specs_match_usp():
    assert LATENT_SPECS["d8"].channels == 4 and LATENT_SPECS["d8"].scale == 0.18215
    assert LATENT_SPECS["d16"].channels == 16 and LATENT_SPECS["d16"].scale == 0.2325
    assert get_latent_spec("d8").latent_size(224) == 28
    assert get_latent_spec("d16").latent_size(256) == 16


def test_latent_size_rejects_indivisible_image_size():
    with pytest.raises(ValueError, match="not divisible by the VAE factor 8"):
        get_latent_spec("d8").latent_size(30)
    with pytest.raises(ValueError, match="unknown --vae_version"):
        get_latent_spec("d4")


def test_toy_dataset_is_deterministic(tmp_path):
    a = write_toy_dataset(tmp_path / "a", num_classes=3, train_per_class=2, val_per_class=1, image_size=16, seed=5)
    b = write_toy_dataset(tmp_path / "b", num_classes=3, train_per_class=2, val_per_class=1, image_size=16, seed=5)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*.png"))
    assert len(files_a) == 3 * 3
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes()
    assert Image.open(a / files_a[0]).size == (16, 16)
