"""Perceptual distances for tokenizer training, built offline.

`lpips_vgg` is real LPIPS (VGG trunk). Its trunk is torchvision's ImageNet VGG16, which torchvision would
download; with no internet we look for that file on disk and fail loudly when it is absent, rather than
train against a randomly initialised trunk.

`stlpips_vgg` exists because that download is not always possible: it is shift-tolerant LPIPS
(Ghildyal & Liu, ECCV 2022), a *different* metric whose complete weights (trunk included) ship inside the
`stlpips-pytorch` wheel. It is re-implemented here because the package's code imports things we do not
have. It is an alternative and is never reported as LPIPS.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipelines.errors import ConfigError, CorruptFileError, UserError

PERCEPTUAL_KINDS = ("lpips_vgg", "stlpips_vgg", "none")

VGG16_FILE = "vgg16-397923af.pth"
VGG16_URL = f"https://download.pytorch.org/models/{VGG16_FILE}"
STLPIPS_WEIGHTS = Path("weights") / "vST0.0" / "vgg_shift_tolerant.pth"

_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
_STLPIPS_SLICES = ((0, 4), (4, 10), (10, 18), (18, 26), (26, 34))  # ends at relu1_2 .. relu5_3
_VGG16_CHANNELS = (64, 128, 256, 512, 512)


class PerceptualWeightsMissing(UserError, RuntimeError):
    """A perceptual network's weights are not on disk, and nothing may be downloaded."""


class _FrozenMetric(nn.Module):
    """A fixed metric: parameters never train, and a parent's `.train()` cannot switch it to train mode."""

    def train(self, mode: bool = True) -> _FrozenMetric:
        return super().train(False)

    def _freeze(self) -> None:
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)


# ----------------------------------------------------------------------------------------------- LPIPS


def _vgg16_path(vgg_weights: str | None) -> Path:
    """Where torchvision's VGG16 file is: the explicit path if given, else the torch hub cache."""
    if vgg_weights is not None:
        path = Path(vgg_weights).expanduser()
        path = path / VGG16_FILE if path.is_dir() else path
    else:
        path = Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE
    if path.is_file():
        return path
    raise PerceptualWeightsMissing(
        f"loss.perceptual=lpips_vgg needs torchvision's ImageNet VGG16 weights, file '{VGG16_FILE}', "
        f"and they cannot be downloaded here.\n"
        f"  Looked at: {path}\n"
        f"  Fix: on a machine with internet fetch {VGG16_URL} and copy it to {path}"
        + ("" if vgg_weights is not None else f" (or anywhere, and set loss.vgg_weights=/path/to/{VGG16_FILE})")
        + ".\n"
        "  Alternatives: loss.perceptual=stlpips_vgg (shift-tolerant LPIPS: a different metric, NOT LPIPS, "
        "whose weights ship with the pip package stlpips-pytorch), or loss.perceptual_weight=0 "
        "(no perceptual loss)."
    )


def _load_vgg16_trunk(trunk: nn.Module, state: dict[str, Tensor], source: Path) -> None:
    """Copy torchvision's `features.{i}.*` into lpips' `slice{k}.{i}.*` (the slice that holds layer i)."""
    slice_of = {name: f"slice{k}" for k in range(1, 6) for name, _ in getattr(trunk, f"slice{k}").named_children()}
    mapped = {}
    for key, value in state.items():
        if not key.startswith("features."):
            continue  # the classifier is not part of LPIPS
        _, idx, rest = key.split(".", 2)
        if idx not in slice_of:
            raise CorruptFileError(f"{source}: '{key}' has no place in LPIPS' VGG16 trunk; tokenizer.loss.vgg_weights "
                                   f"must be torchvision's {VGG16_FILE}")
        mapped[f"{slice_of[idx]}.{idx}.{rest}"] = value
    try:
        trunk.load_state_dict(mapped, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise CorruptFileError(f"{source} is not torchvision's VGG16 ImageNet file ({VGG16_FILE}; "
                               f"tokenizer.loss.vgg_weights): {first}") from e


class LPIPSVGG(_FrozenMetric):
    """Real LPIPS (VGG), with the trunk loaded from a local torchvision VGG16 file instead of a download."""

    def __init__(self, vgg16_path: Path) -> None:
        super().__init__()
        import lpips

        with warnings.catch_warnings():  # torchvision's "pretrained is deprecated" from inside lpips
            warnings.simplefilter("ignore", UserWarning)
            # pnet_rand=True: random trunk, no download; the linear heads ship inside the lpips package.
            self.lpips = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
        state = torch.load(vgg16_path, map_location="cpu", weights_only=True)
        _load_vgg16_trunk(self.lpips.net, state, vgg16_path)
        self._freeze()

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Per-sample LPIPS of images in [-1, 1], shape (B,)."""
        return self.lpips(x, y).reshape(x.shape[0])


# -------------------------------------------------------------------------------- shift-tolerant LPIPS


class _ScalingLayer(nn.Module):
    """LPIPS' input normalisation from [-1, 1] towards ImageNet statistics (values come from the weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.zeros(1, 3, 1, 1))
        self.register_buffer("scale", torch.ones(1, 3, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.shift) / self.scale


class _BlurDown(nn.Module):
    """Anti-aliased stride-2 subsampling: reflect-pad by 2, depthwise 3x3 binomial blur, stride 2.

    The extra padding (2 rather than 1) is part of what makes the trunk shift tolerant.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        k = torch.tensor([1.0, 2.0, 1.0])
        self.register_buffer("filt", (torch.outer(k, k) / 16).expand(channels, 1, 3, 3).clone())

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), self.filt, stride=2, groups=x.shape[1])


class _ShiftTolerantVGG16(nn.Module):
    """VGG16 conv stack with every max-pool as MaxPool(2, stride 1) + blur-downsample; five feature taps."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for v in _VGG16_CFG:
            if v == "M":
                layers += [nn.MaxPool2d(kernel_size=2, stride=1), _BlurDown(channels)]
            else:
                layers += [nn.Conv2d(channels, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                channels = v
        # Keep the flat layer index in the names, as the shipped state dict does (e.g. `slice2.5.filt`).
        for k, (start, end) in enumerate(_STLPIPS_SLICES, 1):
            named = OrderedDict((str(i), layers[i]) for i in range(start, end))
            self.add_module(f"slice{k}", nn.Sequential(named))

    def forward(self, x: Tensor) -> list[Tensor]:
        feats = []
        for k in range(1, 6):
            x = getattr(self, f"slice{k}")(x)
            feats.append(x)
        return feats


class _Lin(nn.Module):
    """Per-layer 1x1 weighting of squared feature differences; index 0 was dropout (identity at inference)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


def _unit_channels(x: Tensor, eps: float = 1e-10) -> Tensor:
    """Normalise each spatial feature vector to unit length, as LPIPS does."""
    return x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


class STLPIPSVGG(_FrozenMetric):
    """Shift-tolerant LPIPS (VGG), an alternative to LPIPS; NOT LPIPS. Weights from `stlpips-pytorch`."""

    def __init__(self, weights: Path) -> None:
        super().__init__()
        self.scaling_layer = _ScalingLayer()
        self.net = _ShiftTolerantVGG16()
        for k, c in enumerate(_VGG16_CHANNELS):
            self.add_module(f"lin{k}", _Lin(c))
        self.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
        self._freeze()

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Per-sample distance of images in [-1, 1], shape (B,)."""
        b = x.shape[0]
        feats = self.net(self.scaling_layer(torch.cat([x, y])))  # one trunk pass for both images
        dist = x.new_zeros(b)
        for k, f in enumerate(feats):
            diff = (_unit_channels(f[:b]) - _unit_channels(f[b:])) ** 2
            dist = dist + getattr(self, f"lin{k}")(diff).mean(dim=(1, 2, 3))
        return dist


def _stlpips_weights() -> Path:
    """The shipped weights, found without importing `stlpips_pytorch` (its code needs IPython etc.)."""
    spec = importlib.util.find_spec("stlpips_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise PerceptualWeightsMissing(
            "loss.perceptual=stlpips_vgg needs the weights shipped in the pip package stlpips-pytorch, which is "
            "not installed. Install it without its dependencies (its code is not used, only its weights file): "
            "pip install --no-deps stlpips-pytorch"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / STLPIPS_WEIGHTS
    if not path.is_file():
        raise PerceptualWeightsMissing(
            f"stlpips-pytorch is installed but its weights file is missing: {path}. "
            "Reinstall it: pip install --no-deps --force-reinstall stlpips-pytorch"
        )
    return path


def build_perceptual(kind: str, vgg_weights: str | None = None) -> nn.Module | None:
    """The perceptual distance `kind` (see PERCEPTUAL_KINDS): frozen, eval, forward(x, y) -> (B,); or None.

    `vgg_weights` is the local torchvision VGG16 file for lpips_vgg when it is not in the torch hub cache.
    """
    if kind == "lpips_vgg":
        return LPIPSVGG(_vgg16_path(vgg_weights))
    if kind == "stlpips_vgg":
        return STLPIPSVGG(_stlpips_weights())
    if kind == "none":
        return None
    raise ConfigError(f"tokenizer.loss.perceptual must be one of {', '.join(PERCEPTUAL_KINDS)}, got {kind!r}")
