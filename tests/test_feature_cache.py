"""The REPA feature cache stores the target encoder's tokens of each image and of its flip, by image index."""
import json

import pytest
import torch

from dinov2_reference import TINY_VIT, hub_state_dict
from models.repa import DinoV2Target, encoder_identity
from util.data import build_image_folder
from generation.cache_features import extract_feature_cache, get_args_parser, main
from util.feature_cache import FeatureCache
from util.latent_cache import cache_transform
from util.errors import UserError


@pytest.fixture(scope="module")
def tiny_target(tmp_path_factory):
    path = tmp_path_factory.mktemp("dinov2") / "dinov2_vitb14_pretrain.pth"
    torch.save(hub_state_dict(seed=5), path)
    return DinoV2Target("dinov2-vit-b", str(path), image_size=32, model_kwargs=TINY_VIT), path


def test_cache_holds_the_features_of_each_image_and_its_flip(tiny_image_folder, tiny_target, tmp_path):
    target, weights = tiny_target
    root = tiny_image_folder / "train"
    identity = encoder_identity("dinov2-vit-b", weights)
    manifest = extract_feature_cache(root, tmp_path / "features", target, identity, image_size=32,
                                     batch_size=5, shard_size=24, dtype="float32", show_progress=False)
    assert manifest["complete"] and manifest["count"] == 64 and (manifest["tokens"], manifest["dim"]) == (4, 32)
    assert len(list((tmp_path / "features").glob("shard-*.safetensors"))) == 3  # 24 + 24 + 16 images

    cache = FeatureCache(tmp_path / "features", expect={"encoder": identity, "image_size": 32, "crop": "center"})
    folder = build_image_folder(root)
    transform = cache_transform(32, "center")
    for index in (0, 23, 24, 63):
        image = transform(folder.load(index)[0])[None]  # (1, 3, 32, 32) in [-1, 1], the latent cache's crop
        torch.testing.assert_close(cache.features(index, 0), target(image)[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cache.features(index, 1), target(image.flip(-1))[0], rtol=1e-5, atol=1e-5)

    # Re-running the same extraction is a no-op; another encoder is refused in one sentence.
    again = extract_feature_cache(root, tmp_path / "features", target, identity, image_size=32, batch_size=5,
                                  shard_size=24, dtype="float32", show_progress=False)
    assert again["count"] == 64
    with pytest.raises(UserError, match="made with encoder="):
        FeatureCache(tmp_path / "features", expect={"encoder": "dinov2-vit-l:0123"})
    with pytest.raises(UserError, match="other settings"):
        extract_feature_cache(root, tmp_path / "features", target, "other", image_size=32, shard_size=24,
                              dtype="float32", show_progress=False)


def test_cli_refuses_bad_input_before_writing_and_unfinished_caches(tiny_image_folder, tmp_path):
    out = tmp_path / "cli"
    args = get_args_parser().parse_args([
        "--data_path", str(tiny_image_folder / "val"), "--cached_path", str(out), "--encoder_path",
        str(tmp_path / "missing.pth"), "--input_size", "32", "--device", "cpu", "--num_workers", "0"])
    with pytest.raises(UserError, match="do not exist"):
        main(args)
    assert not out.exists()  # refused before any output was written
    with pytest.raises(ValueError, match="divisible by 16"):
        main(get_args_parser().parse_args(["--data_path", str(tiny_image_folder / "val"), "--cached_path", str(out),
                                           "--encoder_path", "x", "--input_size", "40", "--device", "cpu"]))
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "manifest.json").write_text(json.dumps({"complete": False}))
    with pytest.raises(UserError, match="incomplete"):
        FeatureCache(unfinished)
