"""Data runtime: corrupt-image skipping, folder errors, seeded transforms, resumable sampler, small utilities."""
import copy
import json
import shutil

import pytest
import torch
from PIL import Image

from util.data import SeededDataset, build_image_folder, build_loader, center_crop_arr, generation_transform, pretrain_transform
from util.ema import update_ema
from util.run_log import RunLogger
from util.lr_sched import adjust_learning_rate, effective_lr
from util.rng import capture_rng_state, restore_rng_state, sample_generator
from util.sampler import ResumableDistributedSampler
from util.errors import UserError


@pytest.fixture
def folder_with_corrupt_image(tiny_image_folder, tmp_path):
    root = tmp_path / "train"
    shutil.copytree(tiny_image_folder / "train", root)
    victim = sorted(root.rglob("*.png"))[5]
    victim.write_bytes(victim.read_bytes()[:40])  # header survives, pixel data gone
    return root, victim


def test_corrupt_image_is_skipped_and_counted_even_in_workers(folder_with_corrupt_image):
    root, victim = folder_with_corrupt_image
    folder = build_image_folder(root)
    dataset = SeededDataset(folder, generation_transform(16), seed=0)
    sampler = ResumableDistributedSampler(len(dataset), shuffle=False)
    batches = list(build_loader(dataset, sampler, batch_size=8, num_workers=1))
    assert sum(len(batch[0]) for batch in batches) == len(folder)  # shapes intact, nothing lost
    assert folder.num_skipped == 1 and folder.skipped_files() == [str(victim)]  # counted in the worker
    # The corrupt slot holds the next readable image.
    assert folder.load(5)[0].tobytes() == folder.load(6)[0].tobytes()


def test_strict_data_raises_on_corrupt_image(folder_with_corrupt_image):
    root, victim = folder_with_corrupt_image
    folder = build_image_folder(root, strict=True)
    with pytest.raises(UserError, match=f"image {victim} cannot be read"):
        folder[5]


def test_missing_or_empty_folder_is_one_sentence(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        build_image_folder(tmp_path / "missing")
    with pytest.raises(UserError, match="has no class subfolders"):
        build_image_folder(tmp_path)
    (tmp_path / "cat").mkdir()
    with pytest.raises(UserError, match="contains no images"):
        build_image_folder(tmp_path)


def test_seeded_transforms_depend_only_on_key_and_leave_global_rng_alone(tiny_image_folder):
    dataset = SeededDataset(build_image_folder(tiny_image_folder, split="train"), pretrain_transform(16), seed=3)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    first = dataset[(1, 7)][0]
    assert torch.equal(torch.get_rng_state(), before)
    dataset[(0, 7)], dataset[(1, 8)]  # other samples in between change nothing
    assert torch.equal(dataset[(1, 7)][0], first)
    assert not torch.equal(dataset[(2, 7)][0], first)  # a new epoch re-augments
    assert first.shape == (3, 16, 16) and first.min() >= -1 and first.max() <= 1


def test_sampler_resume_and_rank_split():
    full = [list(ResumableDistributedSampler(50, 2, rank, seed=1)) for rank in range(2)]
    assert len(full[0]) == 25 and not set(full[0]) & set(full[1])
    resumed = ResumableDistributedSampler(50, 2, 1, seed=1)
    resumed.set_epoch(0, start_batch=3, batch_size=4)
    assert list(resumed) == full[1][12:] and len(resumed) == 13
    # The first k*B*W global positions are consumed whatever the world size, so 1 rank can take over.
    single = ResumableDistributedSampler(50, 1, 0, seed=1)
    single.set_epoch(0, start_batch=24, batch_size=1)
    assert set(single) == {key for rank in range(2) for key in full[rank][12:]}


def test_rng_state_roundtrip_survives_weights_only(tmp_path):
    state = capture_rng_state()
    expected = (torch.rand(3), __import__("random").random(), __import__("numpy").random.rand())
    torch.save({"rng": [state]}, tmp_path / "rng.pt")
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"][0])
    again = (torch.rand(3), __import__("random").random(), __import__("numpy").random.rand())
    assert torch.equal(expected[0], again[0]) and expected[1:] == again[1:]
    assert torch.equal(torch.rand(4, generator=sample_generator(0, 1, 2)),
                       torch.rand(4, generator=sample_generator(0, 1, 2)))


def test_center_crop_lr_schedule_ema_and_jsonl_logger(tmp_path):
    assert center_crop_arr(Image.new("RGB", (300, 100)), 32).size == (32, 32)
    assert effective_lr(1.5e-4, None, 64, 2, 8, ) == pytest.approx(1.5e-4 * 4)
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW([{"params": [model.weight], "lr_scale": 0.5}, {"params": [model.bias]}])
    assert adjust_learning_rate(optimizer, 0.5, 1.0, 0.1, 1, 3) == pytest.approx(0.5)
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([0.25, 0.5])
    assert adjust_learning_rate(optimizer, 2.0, 1.0, 0.1, 1, 3) == pytest.approx(0.55)
    ema = copy.deepcopy(model)
    expected = 0.9 * ema.weight.detach() + 0.1 * (model.weight.detach() + 1)
    with torch.no_grad():
        model.weight.add_(1)
    update_ema(ema, model, 0.9)
    assert torch.allclose(ema.weight, expected)
    logger = RunLogger(tmp_path, is_main=True)
    logger.log(5, {"loss": torch.tensor(0.25), "lr": 1e-4})
    logger.close()
    assert json.loads((tmp_path / "log.txt").read_text()) == {"step": 5, "loss": 0.25, "lr": 1e-4}
    assert any(p.name.startswith("events.out.tfevents") for p in tmp_path.iterdir())
