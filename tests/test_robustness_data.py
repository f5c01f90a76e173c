"""Issue 18, item 4 (unreadable images are counted and reported, strict mode is one sentence) and item 7's
latent-cache messages (a corrupt cache names the file and says to rebuild it)."""
import json
import shutil

import pytest
import torch
from PIL import Image

from util.data import SeededDataset, build_image_folder, build_loader, generation_transform
from util.sampler import ResumableDistributedSampler
from util.errors import UserError


@pytest.fixture
def folder_with_bad_images(tiny_image_folder, tmp_path):
    """train/ copy with two truncated PNGs and one 64x64 image (the 'decompression bomb' of the test)."""
    root = tmp_path / "train"
    shutil.copytree(tiny_image_folder / "train", root)
    files = sorted(root.rglob("*.png"))
    for victim in (files[3], files[9]):
        victim.write_bytes(victim.read_bytes()[:40])
    Image.new("RGB", (64, 64), (10, 20, 30)).save(files[20])
    return root, [files[3], files[9]], files[20]


def _one_epoch(folder, num_workers):
    dataset = SeededDataset(folder, generation_transform(16), seed=0)
    sampler = ResumableDistributedSampler(len(dataset), shuffle=False)
    return list(build_loader(dataset, sampler, batch_size=8, num_workers=num_workers))


def test_item4_skipped_images_are_counted_with_first_paths(folder_with_bad_images, monkeypatch):
    root, truncated, big = folder_with_bad_images
    # 64 x 64 = 4096 pixels is over twice this limit (PIL's DecompressionBombError); 32 x 32 images are under it.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)
    folder = build_image_folder(root)
    assert folder.skip_report() is None  # nothing read yet, nothing to report
    _one_epoch(folder, num_workers=0)
    report = folder.skip_report(shown=2)
    assert report["skipped_images"] == 3 and report["too_large_images"] == 1
    message = report["message"]
    assert message.startswith("3 unreadable images skipped so far, each replaced by the next readable one: "
                              f"{truncated[0]}, {truncated[1]} and 1 more")
    assert "1 of them exceed PIL's decompression-bomb limit of 1500 pixels" in message
    assert "\n" not in message


def test_item4_skips_in_dataloader_workers_are_counted_too(folder_with_bad_images):
    root, truncated, _ = folder_with_bad_images
    folder = build_image_folder(root)
    _one_epoch(folder, num_workers=1)
    assert folder.skip_report()["skipped_images"] == 2
    assert folder.skipped_files() == [str(path) for path in truncated]


def test_item4_decompression_bomb_in_strict_mode_is_named(folder_with_bad_images, monkeypatch):
    root, _, big = folder_with_bad_images
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)
    folder = build_image_folder(root, strict=True)
    index = [path for path, _ in folder.samples].index(str(big))
    with pytest.raises(UserError, match=f"image {big} cannot be read \\(it exceeds PIL's decompression-bomb limit"):
        folder.load(index)


def test_item5_strict_data_through_workers_is_one_sentence(folder_with_bad_images):
    """--strict_data on a corrupt image: the sentence, not DataLoader's 70-line worker traceback."""
    root, truncated, _ = folder_with_bad_images
    folder = build_image_folder(root, strict=True)
    with pytest.raises(UserError) as info:
        _one_epoch(folder, num_workers=1)
    message = str(info.value)
    assert message.startswith(f"image {truncated[0]} cannot be read (")
    assert message.endswith("or drop --strict_data to skip unreadable images.")
    assert "Traceback" not in message and "\n" not in message


def test_item5_folder_with_nothing_readable_is_one_sentence(tmp_path):
    (tmp_path / "cat").mkdir()
    for index in range(8):  # one full batch
        (tmp_path / "cat" / f"{index}.png").write_bytes(b"not a png")
    folder = build_image_folder(tmp_path)
    with pytest.raises(UserError) as info:
        _one_epoch(folder, num_workers=1)
    assert str(info.value).startswith(f"no image under {tmp_path} can be read (8 files tried")
    assert "Traceback" not in str(info.value)


# ------------------------------------------------------------------------------------------- item 7: latent cache

@pytest.fixture
def tiny_cache(tiny_image_folder, tiny_vae_dir, tmp_path):
    from models.vae import LatentCodec
    from pretrain.cache_latents import extract_latent_cache

    codec = LatentCodec.load("d8", tiny_vae_dir)
    cache = tmp_path / "cache"
    extract_latent_cache(tiny_image_folder / "train", cache, codec, image_size=32, batch_size=16, shard_size=32)
    return cache


def test_item7_corrupt_manifest_names_the_file_and_says_rebuild(tiny_cache):
    from util.latent_cache import LatentCacheDataset, UserError

    (tiny_cache / "manifest.json").write_text('{"complete": tru')
    with pytest.raises(UserError) as info:
        LatentCacheDataset(tiny_cache)
    assert str(info.value).startswith(f"the latent cache manifest {tiny_cache / 'manifest.json'} is corrupt (")
    assert "rebuild it" in str(info.value)


def test_item7_truncated_shard_names_the_shard_and_says_rebuild(tiny_cache):
    from util.latent_cache import LatentCacheDataset, UserError, shard_path

    shard = shard_path(tiny_cache, 1)
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(UserError) as info:
        LatentCacheDataset(tiny_cache)
    message = str(info.value)
    assert message.startswith(f"latent cache shard {shard} is ") and "rebuild it" in message
    assert "mmap length" not in message


def test_item7_garbage_shard_header_names_the_shard(tiny_cache):
    from util.latent_cache import LatentCacheDataset, UserError, shard_path

    shard = shard_path(tiny_cache, 0)
    shard.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + bytes(64))
    with pytest.raises(UserError, match=f"latent cache shard {shard} is "):
        LatentCacheDataset(tiny_cache)
    json.loads((tiny_cache / "manifest.json").read_text())  # the manifest itself is untouched
