"""The full-size configurations compose and build (on the meta device: no memory), with the parameter counts their
config files state. Running them through the trainers on CPU takes minutes: bench/full_size.py (README)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from generator.llama import GPTConfig, LlamaGPT
from tests.conftest import compose_config
from tokenizer.model import ImageTokenizer, TokenizerConfig

ROOT = Path(__file__).resolve().parents[1]


def stated_params(path: Path) -> float:
    """The "NNNM parameters" / "N.NB parameters" of a config file's header comment."""
    found = re.search(r"([\d.]+)([MB]) parameters", path.read_text())
    assert found, f"{path} states no parameter count"
    return float(found[1]) * (1e6 if found[2] == "M" else 1e9)


@pytest.mark.parametrize("size", ["B", "L", "XL", "XXL", "llamagen_3B"])
def test_generator_sizes_build_with_their_stated_parameter_count(size):
    spec = OmegaConf.to_container(compose_config("train_ar", [f"generator={size}"]).generator.model, resolve=True)
    cfg = GPTConfig.from_dict({**spec, "vocab_size": 16384, "num_classes": 1000, "grid": [16, 16]})
    with torch.device("meta"):
        model = LlamaGPT(cfg)
    # The stated counts are the papers' rounded figures (1.1B, 2.1B): within 3%.
    assert model.num_params() == pytest.approx(stated_params(ROOT / "conf" / "generator" / f"{size}.yaml"), rel=0.03)


def test_reference_tokenizer_builds_with_its_stated_parameter_count():
    cfg = compose_config("train_tokenizer", ["+experiment=imagenet_256", "data.root=unused"])
    model_cfg = TokenizerConfig.from_dict(OmegaConf.to_container(cfg.tokenizer.model, resolve=True))
    assert (model_cfg.resolution, model_cfg.num_codes, model_cfg.grid) == (256, 16384, 16)
    with torch.device("meta"):
        model = ImageTokenizer(model_cfg)
    n = sum(p.numel() for p in model.parameters())
    assert n == pytest.approx(stated_params(ROOT / "conf" / "tokenizer" / "imagenet_256.yaml"), rel=0.01)
