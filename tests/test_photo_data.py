"""The photo dataset: held-out photographs never reach train, sizes, determinism from the seed."""

import hashlib
import itertools
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("skimage")

from pipelines.errors import ConfigError  # noqa: E402
from pipelines.photo_data import TRAIN_PHOTOS, VAL_PHOTOS, main, make_photo_dataset, photo_path  # noqa: E402


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.png"))}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    make_photo_dataset(root, sizes=(16, 32), train_per_photo=3, val_per_photo=2, seed=5)
    return root


def test_val_photographs_are_held_out(built: Path) -> None:
    assert not set(TRAIN_PHOTOS) & set(VAL_PHOTOS)
    for size in (16, 32):
        train = {p.name for p in (built / f"{size}px" / "train").iterdir()}
        val = {p.name for p in (built / f"{size}px" / "val").iterdir()}
        assert train == set(TRAIN_PHOTOS) and val == set(VAL_PHOTOS)
    # and no train crop is pixel-equal to a val crop
    px = built / "16px"
    train_bytes = {np.asarray(Image.open(p)).tobytes() for p in (px / "train").rglob("*.png")}
    assert not train_bytes & {np.asarray(Image.open(p)).tobytes() for p in (px / "val").rglob("*.png")}


def test_sizes_counts_and_colour(built: Path) -> None:
    for size in (16, 32):
        for split, photos, n in (("train", TRAIN_PHOTOS, 3), ("val", VAL_PHOTOS, 2)):
            files = sorted((built / f"{size}px" / split).rglob("*.png"))
            assert len(files) == len(photos) * n
            for f in files:
                with Image.open(f) as img:
                    assert img.size == (size, size) and img.mode == "RGB"
    a = np.asarray(Image.open(built / "32px" / "val" / "coffee" / "00000.png")).astype(float)
    assert np.abs(a[..., 0] - a[..., 2]).mean() > 5  # a colour photograph, not greyscale


def test_same_crops_at_every_size(built: Path) -> None:
    small = Image.open(built / "16px" / "train" / "chelsea" / "00001.png")
    big = Image.open(built / "32px" / "train" / "chelsea" / "00001.png").resize((16, 16), Image.Resampling.BOX)
    assert np.abs(np.asarray(small, float) - np.asarray(big, float)).mean() < 12


def test_deterministic_from_seed(built: Path, tmp_path: Path) -> None:
    make_photo_dataset(tmp_path / "same", sizes=(16,), train_per_photo=3, val_per_photo=2, seed=5)
    make_photo_dataset(tmp_path / "other", sizes=(16,), train_per_photo=3, val_per_photo=2, seed=6)
    assert _digests(tmp_path / "same" / "16px") == _digests(built / "16px")
    assert _digests(tmp_path / "other" / "16px") != _digests(built / "16px")


def test_complete_tree_is_reused(built: Path) -> None:
    f = built / "16px" / "train" / "ihc" / "00000.png"
    before = f.stat().st_mtime_ns
    make_photo_dataset(built, sizes=(16,), train_per_photo=3, val_per_photo=2, seed=5)
    assert f.stat().st_mtime_ns == before


def test_bad_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match="min_scale"):
        make_photo_dataset(tmp_path, sizes=(16,), min_scale=0.7, max_scale=0.5)
    assert main([f"root={tmp_path}", "sizes=16,x"]) == 2
    assert "sizes must be integers" in capsys.readouterr().err
    assert photo_path("astronaut").is_file()


def test_channel_shuffle_permutes_train_crops_only(built: Path, tmp_path: Path) -> None:
    make_photo_dataset(tmp_path, sizes=(16,), train_per_photo=3, val_per_photo=2, seed=5, channel_shuffle=True)
    plain, shuffled = built / "16px", tmp_path / "16px"
    assert _digests(plain / "val") == _digests(shuffled / "val")
    changed = 0
    for f in sorted((plain / "train").rglob("*.png")):
        a = np.asarray(Image.open(f))
        b = np.asarray(Image.open(shuffled / f.relative_to(plain)))
        assert any(np.array_equal(a[..., list(p)], b) for p in itertools.permutations(range(3)))
        changed += not np.array_equal(a, b)
    assert changed > 0
