"""Class-conditional image generation: AR generator checkpoint + its tokenizer -> uint8 images.

The generator's ``config.yaml`` records the weights hash of the tokenizer whose tokens it was trained on
(from the shard manifest); ``load_pipeline`` refuses any other tokenizer, because the same token ids mean
different pictures under a different codebook.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from generator.llama import GPTConfig, LlamaGPT
from generator.sampling import generate
from pipelines.checkpoint import MissingCheckpointError, load_model, load_tokenizer, weights_hash
from pipelines.images import to_uint8
from tokenizer.model import IBQTokenizer


class UnknownClassError(ValueError):
    """A class id or name the generator was not trained on; the message lists the valid ones."""


class TokenizerMismatchError(ValueError):
    """The tokenizer's weights differ from the ones that made the generator's training tokens."""


def load_generator(ckpt_dir: str | Path, device: str | torch.device = "cpu") -> tuple[LlamaGPT, dict[str, Any]]:
    """A LlamaGPT in eval mode from ``model.safetensors`` + ``config.yaml`` of a ``train_ar`` run, and its config."""
    state, config = load_model(ckpt_dir)
    if "generator" not in config or "model" not in config["generator"] or "tokenizer_hash" not in config:
        raise MissingCheckpointError(f"{ckpt_dir} is not an AR generator checkpoint (its config.yaml has no "
                                     "generator.model / tokenizer_hash; was it written by pipelines.train_ar?)")
    model = LlamaGPT(GPTConfig.from_dict(config["generator"]["model"]))
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), config


def check_tokenizer(tokenizer_dir: str | Path, config: dict[str, Any]) -> None:
    """Raise ``TokenizerMismatchError`` unless the tokenizer's weights hash is the one the generator recorded."""
    found = weights_hash(tokenizer_dir)
    if found != config["tokenizer_hash"]:
        raise TokenizerMismatchError(
            f"tokenizer {tokenizer_dir} has weights hash {found}, but this generator was trained on tokens of the "
            f"tokenizer with hash {config['tokenizer_hash']} ({config.get('tokenizer_dir')}); decode with that one")


def load_pipeline(ckpt_dir: str | Path, tokenizer_dir: str | Path | None = None,
                  device: str | torch.device = "cpu") -> tuple[LlamaGPT, IBQTokenizer, dict[str, Any]]:
    """Generator, its tokenizer (the recorded path unless ``tokenizer_dir`` is given; hash-checked) and config."""
    model, config = load_generator(ckpt_dir, device)
    tok_dir = tokenizer_dir or config.get("tokenizer_dir")
    if not tok_dir:
        raise MissingCheckpointError(f"{ckpt_dir}/config.yaml records no tokenizer_dir; pass the tokenizer explicitly")
    check_tokenizer(tok_dir, config)
    tokenizer = load_tokenizer(tok_dir, device)
    grid = model.cfg.grid
    if tokenizer.cfg.num_codes != model.cfg.vocab_size or (tokenizer.cfg.grid, tokenizer.cfg.grid) != grid:
        raise TokenizerMismatchError(f"tokenizer {tok_dir} has {tokenizer.cfg.num_codes} codes on a "
                                     f"{tokenizer.cfg.grid}-grid, the generator {model.cfg.vocab_size} codes on {grid}")
    return model, tokenizer, config


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


def iter_images(model: LlamaGPT, tokenizer: IBQTokenizer, labels: Tensor | Sequence[int], batch_size: int = 32,
                seed: int | None = None, progress: bool = True, **sampling: Any) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield (labels, uint8 images (b, H, W, 3)) batch by batch, so callers can stream many samples to disk."""
    labels = torch.as_tensor(labels, dtype=torch.long).flatten()
    bad = labels[(labels < 0) | (labels >= model.cfg.num_classes)]
    if len(bad):
        raise UnknownClassError(f"unknown class id {int(bad[0])}; the generator was trained on classes "
                                f"0..{model.cfg.num_classes - 1}")
    device = model.tok_embeddings.weight.device
    if seed is not None and "generator" not in sampling:
        sampling["generator"] = torch.Generator(device=device).manual_seed(seed)
    h, w = model.cfg.grid
    bar = tqdm(total=len(labels), unit="img", desc="sample", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(labels), batch_size):
        chunk = labels[start:start + batch_size]
        tokens = generate(model, chunk, **sampling)
        with torch.no_grad():
            images = tokenizer.decode_tokens(tokens.view(-1, h, w))
        bar.update(len(chunk))
        yield chunk, to_uint8(images)
    bar.close()


def generate_images(model: LlamaGPT, tokenizer: IBQTokenizer, labels: Tensor | Sequence[int], batch_size: int = 32,
                    **sampling: Any) -> Tensor:
    """uint8 images (B, H, W, 3) for class ``labels``; ``sampling`` goes to ``generator.sampling.generate``
    (cfg_scale, temperature, top_k, top_p, cfg_schedule, generator, use_cache) plus ``seed``."""
    return torch.cat([imgs for _, imgs in iter_images(model, tokenizer, labels, batch_size, **sampling)])
