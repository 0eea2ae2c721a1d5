"""Perceptual losses: the offline ST-LPIPS alternative, and LPIPS' local-VGG16 loading and missing-file error."""

import importlib.util
from pathlib import Path

import pytest
import torch
import torchvision

import tokenizer.perceptual as perceptual
from pipelines.errors import CorruptFileError
from tokenizer.perceptual import (
    PERCEPTUAL_KINDS,
    STLPIPSVGG,
    VGG16_FILE,
    PerceptualWeightsMissing,
    build_perceptual,
)


def _images(b=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g) * 2 - 1


def _noisy(x, sigma, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (x + sigma * torch.randn(x.shape, generator=g)).clamp(-1, 1)


@pytest.fixture(scope="module")
def stlpips():
    return build_perceptual("stlpips_vgg")


@pytest.fixture(scope="module")
def vgg16_state(tmp_path_factory):
    """A file laid out like torchvision's vgg16-397923af.pth (random weights, classifier included)."""
    torch.manual_seed(0)
    state = torchvision.models.vgg16(weights=None).state_dict()
    hub = tmp_path_factory.mktemp("hub")
    (hub / "checkpoints").mkdir()
    torch.save(state, hub / "checkpoints" / VGG16_FILE)
    return hub, state


def _use_hub(monkeypatch, hub: Path) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))


# ------------------------------------------------------------------------------------------- stlpips


def test_stlpips_loads_shipped_weights_strictly(stlpips):
    shipped = torch.load(perceptual._stlpips_weights(), map_location="cpu", weights_only=True)
    ours = stlpips.state_dict()
    assert len(shipped) == 37 and set(ours) == set(shipped)
    assert all(torch.equal(ours[k], v) for k, v in shipped.items())
    assert "net.slice2.5.filt" in ours and "lin0.model.1.weight" in ours


def test_stlpips_is_frozen_and_per_sample(stlpips):
    assert isinstance(stlpips, STLPIPSVGG) and not stlpips.training
    assert not any(p.requires_grad for p in stlpips.parameters())
    stlpips.train()  # a parent's .train() must not switch the metric to train mode
    assert not stlpips.training and not any(m.training for m in stlpips.modules())
    x = _images(b=3)
    assert stlpips(x, _noisy(x, 0.2)).shape == (3,)


def test_stlpips_zero_for_identical_positive_for_different(stlpips):
    x = _images()
    with torch.no_grad():
        same = stlpips(x, x.clone())
        diff = stlpips(x, _images(seed=5))
    assert torch.all(same.abs() < 1e-6)
    assert torch.all(diff > 1e-3)


def test_stlpips_grows_with_distortion(stlpips):
    x = _images(size=64)
    with torch.no_grad():
        mild, strong = stlpips(x, _noisy(x, 0.1)), stlpips(x, _noisy(x, 0.5))
    assert torch.all(mild > 0) and torch.all(strong > mild)


def test_stlpips_is_symmetric(stlpips):
    x, y = _images(), _noisy(_images(), 0.3)
    with torch.no_grad():
        torch.testing.assert_close(stlpips(x, y), stlpips(y, x), rtol=1e-5, atol=1e-7)


def test_stlpips_gradient_reaches_input(stlpips):
    x = _images(b=2)
    y = _noisy(x, 0.3).requires_grad_()
    stlpips(x, y).sum().backward()
    assert y.grad is not None and torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0
    assert all(p.grad is None for p in stlpips.parameters())


def test_stlpips_missing_package_explains_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(PerceptualWeightsMissing, match="pip install --no-deps stlpips-pytorch"):
        build_perceptual("stlpips_vgg")


# --------------------------------------------------------------------------------------------- lpips


def test_lpips_missing_vgg16_names_file_path_and_alternatives(monkeypatch, tmp_path):
    _use_hub(monkeypatch, tmp_path)
    with pytest.raises(PerceptualWeightsMissing) as err:
        build_perceptual("lpips_vgg")
    msg = str(err.value)
    assert isinstance(err.value, RuntimeError)
    for needle in (VGG16_FILE, str(tmp_path / "checkpoints" / VGG16_FILE),
                   "https://download.pytorch.org/models/vgg16-397923af.pth",
                   "loss.perceptual=stlpips_vgg", "NOT LPIPS", "loss.perceptual_weight=0"):
        assert needle in msg, needle


def test_lpips_missing_explicit_path_is_the_path_named(tmp_path):
    missing = tmp_path / "elsewhere" / VGG16_FILE
    with pytest.raises(PerceptualWeightsMissing, match=str(missing)):
        build_perceptual("lpips_vgg", str(missing))


def test_lpips_loads_vgg16_from_hub_cache(monkeypatch, vgg16_state):
    hub, state = vgg16_state
    _use_hub(monkeypatch, hub)
    model = build_perceptual("lpips_vgg")
    trunk = {name.split(".", 1)[1]: t for name, t in model.lpips.net.state_dict().items()}  # "slice{k}.{i}.w"
    features = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
    assert set(trunk) == set(features)
    assert all(torch.equal(trunk[k], v) for k, v in features.items())
    assert not model.training and not any(p.requires_grad for p in model.parameters())

    x = _images(b=2)
    y = _noisy(x, 0.3).requires_grad_()
    with torch.no_grad():
        same = model(x, x.clone())
    assert same.shape == (2,) and torch.all(same.abs() < 1e-6)
    d = model(x, y)
    d.sum().backward()
    assert d.shape == (2,) and torch.all(d > 0) and y.grad.abs().sum() > 0


def test_lpips_explicit_path_and_wrong_file(vgg16_state, tmp_path):
    hub, state = vgg16_state
    assert build_perceptual("lpips_vgg", str(hub / "checkpoints" / VGG16_FILE)) is not None
    wrong = tmp_path / "wrong.pth"
    torch.save({k: v for k, v in state.items() if k.startswith("features.") and k != "features.28.weight"}, wrong)
    with pytest.raises(CorruptFileError, match="not torchvision.s VGG16"):  # a user error: one line
        build_perceptual("lpips_vgg", str(wrong))


# ------------------------------------------------------------------------------------------- factory


def test_none_and_unknown_kind():
    assert build_perceptual("none") is None
    with pytest.raises(ValueError) as err:
        build_perceptual("lpips_alex")
    assert all(kind in str(err.value) for kind in PERCEPTUAL_KINDS)
