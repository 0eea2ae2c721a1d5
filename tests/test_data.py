"""ImageFolder reading, corrupt files, class mapping, and the resumable sharded sampler."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from pipelines.data import (
    CorruptImageError,
    DatasetNotFoundError,
    EpochBatchSampler,
    ImageFolderDataset,
    collate_images,
    collate_tokens,
    save_class_index,
    scan_image_folder,
)


def test_reads_imagenet_style_layout_and_saves_class_index(demo_root, tmp_path):
    # Same loader on ImageNet's naming: train/n01440764/n01440764_1.JPEG
    root = tmp_path / "imagenet"
    for i, wnid in enumerate(["n01440764", "n01443537"]):
        (root / "train" / wnid).mkdir(parents=True)
        src = sorted((demo_root / "train").iterdir())[i]
        for j, f in enumerate(sorted(src.iterdir())[:3]):
            shutil.copy(f, root / "train" / wnid / f"{wnid}_{j}.JPEG")
    samples, classes = scan_image_folder(root / "train")
    assert classes == ["n01440764", "n01443537"] and len(samples) == 6
    assert [label for _, label in samples] == [0, 0, 0, 1, 1, 1]
    save_class_index(classes, tmp_path / "class_index.json")
    assert json.loads((tmp_path / "class_index.json").read_text()) == {"n01440764": 0, "n01443537": 1}

    ds = ImageFolderDataset(root, "train", resolution=16)
    x, y = ds[4]
    assert x.shape == (3, 16, 16) and y == 1 and -1 <= x.min() and x.max() <= 1


def test_missing_split_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        ImageFolderDataset(tmp_path, "train", 32)


@pytest.fixture
def corrupt_root(demo_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(demo_root / "val", root / "val")
    bad = sorted((root / "val").iterdir())[0] / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really an image")
    return root, bad


def test_corrupt_image_is_skipped_with_a_warning_naming_it(corrupt_root):
    root, bad = corrupt_root
    ds = ImageFolderDataset(root, "val", 32, on_corrupt="skip")
    index = [p for p, _ in ds.samples].index(str(bad))
    with pytest.warns(UserWarning, match="broken.png"):
        item = ds[index]
    assert item is None
    x, y = collate_images([ds[0], None, ds[1]])
    assert x.shape[0] == 2 and y.shape == (2,)


def test_collate_tokens_stacks_grids_and_labels():
    grids = [torch.full((4, 4), i, dtype=torch.long) for i in range(3)]
    x, y = collate_tokens([(g, 7 - i) for i, g in enumerate(grids)])
    assert x.shape == (3, 4, 4) and x.dtype == torch.long and x[2].eq(2).all()
    assert y.tolist() == [7, 6, 5]


def test_corrupt_image_fails_clearly_when_configured(corrupt_root):
    root, bad = corrupt_root
    ds = ImageFolderDataset(root, "val", 32, on_corrupt="error")
    index = [p for p, _ in ds.samples].index(str(bad))
    with pytest.raises(CorruptImageError, match="broken.png"):
        ds[index]


def test_augmentation_is_a_function_of_seed_epoch_and_index(demo_root):
    ds = ImageFolderDataset(demo_root, "train", 24)
    a, b = ds[(3, 0)][0], ds[(3, 0)][0]
    assert torch.equal(a, b)
    views = [ds[(3, e)][0] for e in range(8)]  # random flips differ across epochs
    assert any(not torch.equal(views[0], v) for v in views[1:])
    assert any(torch.equal(views[0], v.flip(-1)) for v in views[1:])
    assert ds[3][0].shape == (3, 24, 24)


def test_sampler_shards_disjointly_and_resumes_mid_epoch():
    ranks = [EpochBatchSampler(50, batch_size=4, rank=r, world_size=2, seed=1) for r in range(2)]
    for s in ranks:
        s.set_epoch(3)
    batches = [list(s) for s in ranks]
    assert len(batches[0]) == len(batches[1]) == 6  # 50 // 8 global batches, remainder dropped
    seen = [i for b in batches for batch in b for i, _ in batch]
    assert len(seen) == len(set(seen)) == 48
    assert all(epoch == 3 for b in batches for batch in b for _, epoch in batch)

    ranks[0].set_epoch(3, skip_batches=4)
    assert list(ranks[0]) == batches[0][4:]
    ranks[0].set_epoch(4)
    assert list(ranks[0]) != batches[0]

    with pytest.raises(ValueError, match="cannot fill one global batch"):
        EpochBatchSampler(5, batch_size=4, world_size=2)
