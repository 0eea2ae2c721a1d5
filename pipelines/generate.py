"""Class-conditional image generation: AR generator checkpoint + its tokenizer -> uint8 images.

One sampling recipe and one seeding rule for every tool (``tools/sample.py``, ``tools/fid.py mode=gen|demo``):
the settings are ``cfg``, ``cfg_schedule``, ``temperature``, ``top_k``, ``top_p`` (unset ones come from the run's
``generator.sample``), and sample ``i`` of class ``c`` draws from its own generator seeded by ``(seed, c, i)``, so
it is the same image whatever the batch size, the other classes asked for, or the number of processes.

The generator's ``config.yaml`` records the weights hash of the tokenizer whose tokens it was trained on
(from the shard manifest); ``load_pipeline`` refuses any other tokenizer, because the same token ids mean
different pictures under a different codebook. The checkpoint and the recorded tokenizer may be ``hf://`` specs
(a pushed run names ``hf://<repo>/tokenizer``, shards extracted from the Hub a pinned commit): the loaders resolve
them (``pipelines.hub``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from generator.llama import LlamaGPT, load_generator
from generator.sampling import CFG_SCHEDULES, generate
from pipelines.checkpoint import MissingCheckpointError, weights_hash
from pipelines.cli import require_choice, require_int, require_number
from pipelines.errors import UserError
from pipelines.images import to_uint8
from pipelines.progress import progress_bar
from pipelines.util import pick_device
from tokenizer.model import ImageTokenizer, load_tokenizer


class UnknownClassError(UserError, ValueError):
    """A class id or name the generator was not trained on; the message lists the valid ones."""


class TokenizerMismatchError(UserError, ValueError):
    """The tokenizer's weights differ from the ones that made the generator's training tokens."""


def check_tokenizer(tokenizer_dir: str | Path, config: dict[str, Any]) -> None:
    """Raise ``TokenizerMismatchError`` unless the tokenizer's weights hash is the one the generator recorded."""
    found = weights_hash(tokenizer_dir)
    if found != config["tokenizer_hash"]:
        raise TokenizerMismatchError(
            f"tokenizer {tokenizer_dir} has weights hash {found}, but this generator was trained on tokens of the "
            f"tokenizer with hash {config['tokenizer_hash']} ({config.get('tokenizer_dir')}); decode with that one")


def load_pipeline(ckpt_dir: str | Path, tokenizer_dir: str | Path | None = None,
                  device: str | torch.device = "cpu") -> tuple[LlamaGPT, ImageTokenizer, dict[str, Any]]:
    """Generator, its tokenizer (the recorded path unless ``tokenizer_dir`` is given; hash-checked) and config."""
    model, config = load_generator(ckpt_dir, device)
    tok_dir = tokenizer_dir or config.get("tokenizer_dir")
    if not tok_dir:
        raise MissingCheckpointError(f"{ckpt_dir}/config.yaml records no tokenizer_dir; pass the tokenizer explicitly")
    check_tokenizer(tok_dir, config)
    tokenizer = load_tokenizer(tok_dir, device)
    # Codebook sizes must agree; the grid may differ from the tokenizer's training grid (convolutional with global
    # attention: a generator fine-tuned on tokens extracted at another resolution decodes at that resolution).
    if tokenizer.cfg.num_codes != model.cfg.vocab_size:
        raise TokenizerMismatchError(f"tokenizer {tok_dir} has {tokenizer.cfg.num_codes} codes, the generator "
                                     f"{model.cfg.vocab_size}")
    return model, tokenizer, config


def load_run_or_demo(cfg: Any) -> tuple[str, LlamaGPT, ImageTokenizer, dict[str, Any], torch.device]:
    """The tools' ``ckpt=`` (or, without it, ``demo_ckpt``) loaded on ``device=`` with ``tokenizer=`` or the
    recorded one: (checkpoint, generator, tokenizer, config, device)."""
    ckpt = cfg.ckpt
    if ckpt is None:
        ckpt = cfg.demo_ckpt
        print(f"no ckpt= given: using the demo run {ckpt}")
    device = pick_device(cfg.device)
    model, tokenizer, config = load_pipeline(ckpt, cfg.tokenizer, device)
    return str(ckpt), model, tokenizer, config, device


def resolve_classes(spec: Any, config: dict[str, Any]) -> list[int]:
    """Class ids from an id, a name, a list of either, or ``"all"``; anything untrained is an UnknownClassError."""
    names = list(config.get("classes") or [])
    num = int(config["generator"]["model"]["num_classes"])
    items = list(spec) if isinstance(spec, Sequence) and not isinstance(spec, str) else [spec]
    if items == ["all"]:
        return list(range(num))
    ids = []
    for item in items:
        if isinstance(item, str) and not item.lstrip("-").isdigit():
            if item not in names:
                raise UnknownClassError(f"unknown class {item!r}; the generator knows {num} classes: "
                                        f"{', '.join(f'{i}={n}' for i, n in enumerate(names))}")
            ids.append(names.index(item))
            continue
        i = int(item)
        if not 0 <= i < num:
            shown = f": {', '.join(f'{k}={n}' for k, n in enumerate(names))}" if 0 < len(names) <= 20 else ""
            raise UnknownClassError(f"unknown class id {i}; the generator was trained on classes 0..{num - 1}{shown}")
        ids.append(i)
    if not ids:
        raise UnknownClassError("no class given (class=<id>, class=[1,2,3], class=<name> or class=all)")
    return ids


NEUTRAL_RECIPE = {"cfg": 1.0, "cfg_schedule": "constant", "temperature": 1.0, "top_k": 0, "top_p": 1.0}
SAMPLING_KEYS = tuple(NEUTRAL_RECIPE)  # the same key names in conf/tools/sample.yaml and conf/tools/fid.yaml


def check_sampling_options(values: Any, optional: bool = True) -> None:
    """The sampling keys' ranges (``ConfigError`` naming the key); ``optional``: None means unset."""
    require_number(values, "cfg", 0, optional=optional)
    require_choice(values, "cfg_schedule", CFG_SCHEDULES, optional=optional)
    require_number(values, "temperature", 0, low_open=True, optional=optional)
    require_int(values, "top_k", 0, optional=optional)
    require_number(values, "top_p", 0, 1, low_open=True, optional=optional)


def sampling_recipe(given: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """The settings to sample with: ``given`` values (None = unset), else the run's ``generator.sample``
    (``cfg_scale`` there), else no guidance / temperature 1 / no filtering. Every value is range-checked."""
    check_sampling_options(given)
    recipe = dict(config.get("generator", {}).get("sample") or {})
    if "cfg_scale" in recipe:
        recipe["cfg"] = recipe.pop("cfg_scale")
    out = {k: given[k] if given.get(k) is not None else recipe.get(k, v) for k, v in NEUTRAL_RECIPE.items()}
    check_sampling_options(out, optional=False)
    return out


def sample_generators(labels: Tensor, indices: Tensor, seed: int, device: torch.device) -> list[torch.Generator]:
    """The seeding rule: one generator per sample, seeded by (seed, class, index of the sample within its class)."""
    return [torch.Generator(device=device).manual_seed(((seed * 1_000_003 + c) * 1_000_003 + i) % (1 << 63))
            for c, i in zip(labels.tolist(), indices.tolist(), strict=True)]


def sample_plan(classes: Sequence[int], n: int) -> tuple[Tensor, Tensor]:
    """(labels, index within class) of ``n`` samples of each class, class by class."""
    labels = torch.tensor(list(classes), dtype=torch.long).repeat_interleave(n)
    return labels, torch.arange(n).repeat(len(classes))


def iter_images(model: LlamaGPT, tokenizer: ImageTokenizer, labels: Tensor, indices: Tensor, recipe: dict[str, Any],
                seed: int = 0, batch_size: int = 32, use_cache: bool = True, progress: bool = True,
                compiled: bool = False) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield (labels, uint8 images (b, H, W, 3)) batch by batch, so callers can stream many samples to disk.
    ``compiled``: the compiled decode step (``generator.sampling``; the same tokens, compiled once per batch size)."""
    labels = torch.as_tensor(labels, dtype=torch.long).flatten()
    bad = labels[(labels < 0) | (labels >= model.cfg.num_classes)]
    if len(bad):
        raise UnknownClassError(f"unknown class id {int(bad[0])}; the generator was trained on classes "
                                f"0..{model.cfg.num_classes - 1}")
    device = model.tok_embeddings.weight.device
    h, w = model.cfg.grid
    with progress_bar(len(labels), "sample", unit="img", enabled=progress) as bar:
        for start in range(0, len(labels), batch_size):
            chunk = labels[start:start + batch_size]
            gens = sample_generators(chunk, indices[start:start + batch_size], seed, device)
            tokens = generate(model, chunk, cfg_scale=recipe["cfg"], temperature=recipe["temperature"],
                              top_k=recipe["top_k"], top_p=recipe["top_p"], cfg_schedule=recipe["cfg_schedule"],
                              generator=gens, use_cache=use_cache, compiled=compiled)
            with torch.no_grad():
                images = tokenizer.decode_tokens(tokens.view(-1, h, w))
            bar.update(len(chunk))
            yield chunk, to_uint8(images)
