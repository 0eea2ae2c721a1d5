"""Metric formulas and readers: Fréchet distance, Inception Score, precision/recall, SSIM, npz/folder input."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from pipelines.data import DatasetNotFoundError
from pipelines.eval.metrics import (
    FeatureStats,
    ImageArrayError,
    ImageSet,
    feature_stats,
    frechet_distance,
    inception_score,
    load_stats,
    open_images,
    precision_recall,
    read_npz,
    save_images_npz,
    save_stats,
    ssim,
)
from pipelines.eval.results import DemoSamples, GenerationMetrics, ImageFeatures, Report, Unavailable


def _gaussian(n: int, d: int, seed: int, shift: float = 0.0, scale: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ mix * scale + shift


def _scipy_fid(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook formula with scipy's matrix square root (what the TTUR / ADM code does)."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_frechet_distance_matches_scipy_and_is_zero_for_identical_sets():
    a, b = _gaussian(400, 16, 0), _gaussian(300, 16, 1, shift=0.5, scale=1.3)
    ours = frechet_distance(feature_stats(a), feature_stats(b))
    assert ours == pytest.approx(_scipy_fid(a, b), rel=1e-6)
    assert ours > 1.0
    assert abs(frechet_distance(feature_stats(a), feature_stats(a))) < 1e-8
    # Fewer vectors than dimensions (rank-deficient covariances): the n x n path, either side.
    c, d = _gaussian(20, 64, 5), _gaussian(30, 64, 6, shift=0.3)
    assert frechet_distance(feature_stats(c), feature_stats(d)) == pytest.approx(_scipy_fid(c, d), rel=1e-6)
    assert frechet_distance(feature_stats(d), feature_stats(c)) == pytest.approx(_scipy_fid(c, d), rel=1e-6)
    without = FeatureStats(*(getattr(feature_stats(c), k) for k in ("mu", "sigma", "num")))  # e.g. loaded from npz
    assert frechet_distance(without, feature_stats(d)) == pytest.approx(_scipy_fid(c, d), rel=1e-6)
    # The same number as torch-fidelity's own function.
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    tf = fid_statistics_to_metric(*({"mu": x.mean(0), "sigma": np.cov(x, rowvar=False)} for x in (a, b)), False)
    assert ours == pytest.approx(tf["frechet_inception_distance"], rel=1e-6)
    # Torch tensors (float32 features) give the same statistics as float64 arrays.
    as_float32 = feature_stats(torch.from_numpy(a).float())
    assert frechet_distance(as_float32, feature_stats(b)) == pytest.approx(ours, rel=1e-4)


def test_frechet_distance_refuses_mixed_extractors_and_dimensions():
    a = feature_stats(_gaussian(50, 4, 0), "inception")
    with pytest.raises(ImageArrayError, match="different feature extractors"):
        frechet_distance(a, feature_stats(_gaussian(50, 4, 1), "demo-classifier"))
    with pytest.raises(ImageArrayError, match="dimensions differ"):
        frechet_distance(a, feature_stats(_gaussian(50, 5, 1)))


def test_inception_score_equals_the_formula():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.full(7, 0.3), size=40)  # hand-made p(y|x) for 40 "images"
    logits = torch.from_numpy(np.log(p))
    marginal = p.mean(0)
    expected = np.exp(np.mean(np.sum(p * (np.log(p) - np.log(marginal)), axis=1)))
    mean, std = inception_score(logits, splits=1)
    assert mean == pytest.approx(expected, rel=1e-9) and std == 0.0
    # Two splits: the mean of the per-half scores, halves in order (no shuffling).
    halves = [np.exp(np.mean(np.sum(q * (np.log(q) - np.log(q.mean(0))), axis=1))) for q in (p[:20], p[20:])]
    assert inception_score(logits, splits=2) == pytest.approx((np.mean(halves), np.std(halves)), rel=1e-9)
    # Confident, evenly spread predictions over C classes score C; identical predictions score 1.
    onehot = torch.full((30, 3), -1e4)
    onehot[torch.arange(30), torch.arange(30) % 3] = 0
    assert inception_score(onehot, splits=1)[0] == pytest.approx(3.0, rel=1e-6)
    assert inception_score(torch.zeros(10, 5) + torch.randn(5), splits=1)[0] == pytest.approx(1.0, rel=1e-9)
    with pytest.raises(ValueError, match="at least 10 samples"):
        inception_score(logits[:5], splits=10)


def test_precision_recall_extremes():
    a = torch.from_numpy(_gaussian(60, 8, 0)).float()
    assert precision_recall(a, a.clone()) == (1.0, 1.0)
    far = a + 1000.0
    assert precision_recall(a, far) == (0.0, 0.0)
    # Samples covering only part of the reference: every sample is realistic, but recall drops.
    ref = torch.cat([a, a + 50.0])
    precision, recall = precision_recall(a, ref)
    assert precision == 1.0 and recall == pytest.approx(0.5)


def test_ssim_identity_constant_images_and_noise():
    x = torch.rand(2, 3, 24, 24) * 255
    assert torch.allclose(ssim(x, x), torch.ones(2), atol=1e-6)
    # Constant images: no variance, so SSIM = (2 m1 m2 + C1) / (m1^2 + m2^2 + C1).
    c1 = (0.01 * 255) ** 2
    m1, m2 = 100.0, 140.0
    expected = (2 * m1 * m2 + c1) / (m1**2 + m2**2 + c1)
    got = ssim(torch.full((1, 3, 16, 16), m1), torch.full((1, 3, 16, 16), m2))
    assert got.item() == pytest.approx(expected, rel=1e-6)
    noisy = (x + torch.randn_like(x) * 40).clamp(0, 255)
    very_noisy = (x + torch.randn_like(x) * 120).clamp(0, 255)
    s1, s2 = ssim(x, noisy), ssim(x, very_noisy)
    assert (s1 < 1).all() and (s2 < s1).all()


def test_stats_round_trip(tmp_path):
    a, b = _gaussian(200, 12, 3), _gaussian(150, 12, 4, shift=0.2)
    sa, sb = feature_stats(a, "x"), feature_stats(b, "x")
    path = save_stats(tmp_path / "ref.npz", sb)
    loaded = load_stats(path)
    assert loaded.num == 150 and loaded.extractor == "x"
    assert frechet_distance(sa, loaded) == frechet_distance(sa, sb)
    # The same file opened as a reference (what ref=stats.npz does) is statistics, not images.
    opened = open_images(path)
    assert isinstance(opened, FeatureStats) and frechet_distance(sa, opened) == frechet_distance(sa, sb)


def test_adm_npz_layout_round_trip(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 6, 3), dtype=np.uint8)
    labels = np.array([0, 1, 2, 1, 0])
    path = save_images_npz(tmp_path / "samples.npz", images, labels)
    with np.load(path) as data:
        assert sorted(data.keys()) == ["arr_0", "arr_1"]
    got = read_npz(path)
    assert isinstance(got, ImageSet) and len(got) == 5 and got.stats is None
    assert got.labels.tolist() == labels.tolist()
    batches = list(got.batches(2))
    assert [b.shape for b in batches] == [(2, 3, 8, 6), (2, 3, 8, 6), (1, 3, 8, 6)]
    assert batches[0].dtype == torch.uint8
    assert torch.equal(torch.cat(batches).permute(0, 2, 3, 1), torch.from_numpy(images))
    # An ADM reference batch carries statistics beside the images.
    np.savez(tmp_path / "ref.npz", arr_0=images, mu=np.zeros(4), sigma=np.eye(4))
    ref = read_npz(tmp_path / "ref.npz")
    assert isinstance(ref, ImageSet) and ref.stats is not None and ref.stats.mu.shape == (4,)


@pytest.mark.parametrize(
    "arrays, match",
    [
        ({"arr_0": np.zeros((4, 8, 8, 3), np.float32)}, r"dtype float32; expected uint8 images N x H x W x 3"),
        ({"arr_0": np.zeros((4, 8, 8), np.uint8)}, r"shape \(4, 8, 8\)"),
        ({"arr_0": np.zeros((4, 3, 8, 8), np.uint8)}, r"shape \(4, 3, 8, 8\)"),
        ({"arr_0": np.zeros((0, 8, 8, 3), np.uint8)}, "holds no images"),
        ({"arr_0": np.zeros((4, 8, 8, 3), np.uint8), "arr_1": np.zeros(3, np.int64)}, "labels"),
        ({"images": np.zeros((4, 8, 8, 3), np.uint8)}, r"neither images .* nor statistics .*keys: \['images'\]"),
        ({"mu": np.zeros(4), "sigma": np.zeros((3, 3))}, r"mu must be a float \(D,\) vector and sigma \(D, D\)"),
    ],
)
def test_bad_npz_gives_a_clear_error(tmp_path, arrays, match):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(ImageArrayError, match=match) as err:
        open_images(path)
    assert "bad.npz" in str(err.value)


def _write_png(path, size, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)


def test_image_folders_labels_sizes_and_missing(tmp_path):
    for i, cls in enumerate(["b_cls", "a_cls", "b_cls"]):
        _write_png(tmp_path / "set" / cls / f"{i}.png", (10, 10), 20 * i)
    images = open_images(tmp_path / "set", class_names=["a_cls", "b_cls"])
    assert images.labels.tolist() == [0, 1, 1]  # sorted files: a_cls/1.png, b_cls/0.png, b_cls/2.png
    with pytest.raises(ImageArrayError, match=r"not class names"):
        open_images(tmp_path / "set", class_names=["a_cls"])
    _write_png(tmp_path / "mixed" / "0.png", (10, 10), 0)
    _write_png(tmp_path / "mixed" / "1.png", (12, 10), 0)
    with pytest.raises(ImageArrayError, match=r"differ in size.*resolution=N"):
        list(open_images(tmp_path / "mixed").batches(4))
    resized = open_images(tmp_path / "mixed", resolution=8)
    assert resized.labels is None and [b.shape for b in resized.batches(4)] == [(2, 3, 8, 8)]
    with pytest.raises(DatasetNotFoundError, match="neither an image folder nor an .npz"):
        open_images(tmp_path / "nothing")


def test_report_names_unavailable_metrics():
    report = Report("t", GenerationMetrics(fid=1.25, inception_score=Unavailable("no logits layer")).rows())
    table = report.table()
    assert "| fid" in table and "1.25" in table
    assert "unavailable" in table and "inception_score: unavailable - no logits layer" in table
    assert report.metrics == {"fid": 1.25, "inception_score": None}  # never a made-up number; not asked: left out
    assert report.unavailable == {"inception_score": "no logits layer"}
    demo = DemoSamples(4, GenerationMetrics(fid=2.0, precision=0.5, recall=Unavailable("few")), 3.0, 0.75,
                       {"a": 1.0, "b": None})
    assert Report("d", demo.rows()).metrics == {  # the keys demo_eval.json has always had
        "num_samples": 4, "sample_fid": 2.0, "sample_precision": 0.5, "sample_recall": None, "fd_demo": 3.0,
        "sample_accuracy": 0.75, "sample_accuracy/a": 1.0, "sample_accuracy/b": None}


def test_image_features_join_batches_and_keep_absent_ones_absent():
    parts = [ImageFeatures(inception_pool=torch.ones(2, 3), classifier_logits=torch.zeros(2, 5, dtype=torch.float64)),
             ImageFeatures(inception_pool=torch.zeros(1, 3), classifier_logits=torch.ones(1, 5, dtype=torch.float64))]
    joined = ImageFeatures.cat([p.cpu() for p in parts])
    assert joined.inception_pool.tolist() == [[1.0] * 3] * 2 + [[0.0] * 3]
    assert joined.classifier_logits.dtype == torch.float32 and joined.classifier_logits.shape == (3, 5)
    assert joined.inception_logits is None and joined.classifier_features is None
    partly = ImageFeatures.cat([parts[0], ImageFeatures(classifier_logits=torch.ones(1, 5))])
    assert partly.inception_pool is None and partly.classifier_logits.shape == (3, 5)
