"""The procedural demo dataset: layout, determinism, class separability, skip-if-complete and the CLI."""

import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pipelines.demo_data as demo
from pipelines.demo_data import CLASSES, make_demo_dataset, parse_args, render_image

SCRIPT = Path(demo.__file__).resolve()


def _pngs(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.glob("*/*/*.png"))}


def _load(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images as float arrays, labels from the sorted class folders), like an ImageFolder reader."""
    xs, ys = [], []
    for label, folder in enumerate(sorted((root / split).iterdir())):
        for p in sorted(folder.glob("*.png")):
            xs.append(np.asarray(Image.open(p).convert("RGB"), dtype=np.float32))
            ys.append(label)
    return np.stack(xs), np.array(ys)


def _foreground(img: np.ndarray) -> np.ndarray:
    """Pixels far from the median border colour (the background), eroded by one pixel to drop edges."""
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    fg = np.abs(img - np.median(border, 0)).sum(-1) > 60
    inner = fg[1:-1, 1:-1] & fg[:-2, 1:-1] & fg[2:, 1:-1] & fg[1:-1, :-2] & fg[1:-1, 2:]
    return img[1:-1, 1:-1][inner]


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "data", seed=0, train_per_class=4, val_per_class=2)


def test_layout_counts_and_metadata(small):
    folders = [f"{i:02d}_{c['name']}" for i, c in enumerate(CLASSES)]
    assert len(CLASSES) == 10 and folders == sorted(folders)  # sorted folder order == class index
    assert sorted(p.name for p in small.iterdir()) == ["classes.json", "demo_meta.json", "train", "val"]
    for split, n in (("train", 4), ("val", 2)):
        assert sorted(p.name for p in (small / split).iterdir()) == folders
        for folder in folders:
            names = sorted(p.name for p in (small / split / folder).iterdir())
            assert names == [f"{i:05d}.png" for i in range(n)]
    with Image.open(small / "val" / folders[3] / "00001.png") as img:
        assert img.format == "PNG" and img.mode == "RGB" and img.size == (64, 64)

    classes = json.loads((small / "classes.json").read_text())
    assert [c["folder"] for c in classes] == folders and [c["index"] for c in classes] == list(range(10))
    assert classes[0]["description"] == "red solid circle"
    assert all({"shape", "colour", "texture", "name"} <= c.keys() for c in classes)
    meta = json.loads((small / "demo_meta.json").read_text())
    assert (meta["seed"], meta["train_per_class"], meta["val_per_class"], meta["size"]) == (0, 4, 2, 64)
    # The temporary directory was renamed into place, nothing is left beside the dataset.
    assert [p.name for p in small.parent.iterdir()] == ["data"]


def test_every_pair_of_classes_differs_in_two_attributes():
    assert len({c["name"] for c in CLASSES}) == len(CLASSES)
    for a, b in itertools.combinations(CLASSES, 2):
        differing = sum(a[k] != b[k] for k in ("shape", "colour", "texture"))
        assert differing >= 2, (a["name"], b["name"])


def test_deterministic_and_order_independent(small, tmp_path):
    again = make_demo_dataset(tmp_path / "again", seed=0, train_per_class=4, val_per_class=2, workers=2)
    assert _pngs(again) == _pngs(small)  # byte-identical, also when rendered by 2 worker processes
    assert (again / "classes.json").read_bytes() == (small / "classes.json").read_bytes()

    # Any single image can be regenerated on its own from (seed, split, class, index).
    alone = render_image(7, np.random.default_rng([0, demo.SPLITS["val"], 7, 1]))
    assert np.array_equal(np.asarray(alone), np.asarray(Image.open(small / "val/07_purple_diamond/00001.png")))

    other = _pngs(make_demo_dataset(tmp_path / "seed1", seed=1, train_per_class=4, val_per_class=2))
    assert other.keys() == _pngs(small).keys()
    assert all(other[k] != v for k, v in _pngs(small).items())


def test_images_within_a_class_vary(small):
    x, y = _load(small, "train")
    for c in range(len(CLASSES)):
        imgs = x[y == c]
        assert all(np.abs(a - b).mean() > 5 for a, b in itertools.combinations(imgs, 2))


def test_classes_are_separable_on_held_out_images(tmp_path):
    root = make_demo_dataset(tmp_path / "d", seed=3, train_per_class=12, val_per_class=8, size=48)
    (xtr, ytr), (xva, yva) = _load(root, "train"), _load(root, "val")
    feats_tr = np.stack([_foreground(img).mean(0) for img in xtr])
    feats_va = np.stack([_foreground(img).mean(0) for img in xva])
    means = np.stack([feats_tr[ytr == c].mean(0) for c in range(len(CLASSES))])
    pred = ((feats_va[:, None] - means[None]) ** 2).sum(-1).argmin(1)
    assert (pred == yva).mean() > 0.9  # nearest class mean of the foreground colour

    # Textures are really drawn: patterned classes have a high spread of foreground colours, solid ones not.
    spread = {c: np.median([_foreground(img).std(0).mean() for img in xtr[ytr == c]]) for c in range(10)}
    solid = [spread[i] for i, c in enumerate(CLASSES) if c["texture"] == "solid"]
    patterned = [spread[i] for i, c in enumerate(CLASSES) if c["texture"] != "solid"]
    assert len(solid) >= 2 and max(solid) < 8 < 15 < min(patterned)


def test_complete_dataset_is_reused_unless_overwrite(tmp_path):
    root = tmp_path / "d"
    make_demo_dataset(root, train_per_class=2, val_per_class=1, size=32)
    marker = root / "marker.txt"  # survives only if the dataset is not regenerated
    marker.write_text("x")
    before = {p: p.stat().st_mtime_ns for p in root.glob("*/*/*.png")}

    assert make_demo_dataset(str(root), train_per_class=2, val_per_class=1, size=32) == root
    assert marker.exists() and {p: p.stat().st_mtime_ns for p in root.glob("*/*/*.png")} == before

    make_demo_dataset(root, train_per_class=2, val_per_class=1, size=32, overwrite=True)
    assert not marker.exists() and len(_pngs(root)) == 30

    marker.write_text("x")  # different parameters: regenerated
    make_demo_dataset(root, train_per_class=3, val_per_class=1, size=32)
    assert not marker.exists() and len(_pngs(root)) == 40

    marker.write_text("x")  # a missing image makes it incomplete: regenerated
    (root / "train/05_cyan_circle/00002.png").unlink()
    make_demo_dataset(root, train_per_class=3, val_per_class=1, size=32)
    assert not marker.exists() and (root / "train/05_cyan_circle/00002.png").exists()


def test_foreign_directory_is_not_replaced_without_overwrite(tmp_path):
    root = tmp_path / "mine"
    root.mkdir()
    (root / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="overwrite"):
        make_demo_dataset(root, train_per_class=1, val_per_class=0, size=16)
    assert (root / "notes.txt").read_text() == "keep me"
    make_demo_dataset(root, train_per_class=1, val_per_class=0, size=16, overwrite=True)
    assert not (root / "notes.txt").exists() and len(_pngs(root)) == 10

    a_file = tmp_path / "file.txt"
    a_file.write_text("keep me")
    with pytest.raises(FileExistsError):
        make_demo_dataset(a_file, train_per_class=1, val_per_class=0, size=16)
    assert a_file.read_text() == "keep me"


def test_interrupted_run_leaves_no_dataset(tmp_path, monkeypatch):
    calls = 0

    def failing_render(class_index, rng, size=64):
        nonlocal calls
        calls += 1
        if calls > 5:
            raise KeyboardInterrupt
        return Image.new("RGB", (size, size))

    monkeypatch.setattr(demo, "render_image", failing_render)
    with pytest.raises(KeyboardInterrupt):
        make_demo_dataset(tmp_path / "d", train_per_class=2, val_per_class=1, size=16, workers=1)
    assert list(tmp_path.iterdir()) == []  # no root and no leftover temporary directory


def test_parse_args_types_and_errors():
    cfg = parse_args(["root=out/x", "seed=3", "overwrite=yes", "size=32"])
    assert cfg["root"] == "out/x" and cfg["seed"] == 3 and cfg["overwrite"] is True and cfg["size"] == 32
    assert cfg["train_per_class"] == 300 and cfg["val_per_class"] == 50  # defaults kept
    with pytest.raises(ValueError, match=r"unknown key 'sedd'.*valid keys: root, seed, train_per_class"):
        parse_args(["sedd=1"])
    with pytest.raises(ValueError, match="integer"):
        parse_args(["seed=abc"])
    with pytest.raises(ValueError, match="true or false"):
        parse_args(["overwrite=maybe"])
    with pytest.raises(ValueError, match="key=value"):
        parse_args(["--seed"])


def test_cli_as_script(tmp_path):
    run = [sys.executable, str(SCRIPT)]
    bad = subprocess.run([*run, "bogus=1"], cwd=tmp_path, capture_output=True, text=True)
    assert bad.returncode == 2
    assert "unknown key 'bogus'" in bad.stderr and "train_per_class" in bad.stderr
    assert not any(tmp_path.iterdir())

    args = ["root=out", "train_per_class=2", "val_per_class=1", "size=16"]
    ok = subprocess.run([*run, *args], cwd=tmp_path, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert str((tmp_path / "out").resolve()) in ok.stdout and "20 train + 10 val" in ok.stdout
    assert len(_pngs(tmp_path / "out")) == 30
    again = subprocess.run([*run, *args], cwd=tmp_path, capture_output=True, text=True)
    assert again.returncode == 0 and "reused" in again.stdout
