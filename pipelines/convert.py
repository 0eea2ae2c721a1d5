"""Official checkpoints -> this project's checkpoint directories (``model.safetensors`` + ``config.yaml``).

    python -m pipelines.convert source=ibq-tok src=/ckpts/imagenet256_16384.ckpt out=runs/ibq_tok_16384
    python -m pipelines.convert source=ibq-ar src=/ckpts/AR_256_B.ckpt out=runs/ibq_ar_B
    python -m pipelines.convert source=llamagen-vq src=vq_ds16_c2i.pt out=runs/llamagen_vq16_384 image_size=384
    python -m pipelines.convert source=llamagen-gpt src=c2i_B_384.pt out=runs/llamagen_B_384 \\
        tokenizer=runs/llamagen_vq16_384 image_size=384

Sources (``tools/convert_checkpoint.py`` is the same command):

- ``ibq-tok``: a SEED-Voken IBQ tokenizer (Lightning ``.ckpt``: ``state_dict`` with ``encoder.* decoder.*
  quantize.* quant_conv.* post_quant_conv.*``, the GAN loss ``loss.*`` and, when trained with EMA, the EMA
  copies ``model_ema.<name without dots>``). Like the official evaluation, ``ema=true`` (default) uses the
  EMA weights when the file has them.
- ``ibq-ar``: a SEED-Voken IBQ AR model (``transformer.*``; ``first_stage_model.*`` is its tokenizer, written
  to ``<out>/tokenizer``). Without an embedded tokenizer pass ``tokenizer=<converted tokenizer dir>``.
- ``llamagen-vq``: LlamaGen's VQ-16 (``{"model": ...}``), l2-normalised 8-d codes -> ``quantizer=vq``, ``l2_norm``.
- ``llamagen-gpt``: LlamaGen's c2i GPT (``{"model": ...}`` or a raw FSDP state dict); ``tokenizer=`` required.

Mapping is by renaming and reshaping only: taming's q/k/v 1x1 convs are joined into our fused ``qkv``,
``nin_shortcut`` -> ``skip``, the IBQ decoder's ``up`` levels (stored low-resolution-last) are reversed, the
IBQ AR's AdaLN rows (gate, gate, scale, scale, shift, shift) and head rows (scale, shift) are permuted into
ours (shift, scale, gate per branch; shift, scale). The conversion is strict: every source key is used or
explicitly dropped (optimizer, loss / discriminator, EMA bookkeeping, LlamaGen's usage buffer), every
target key is filled, shapes are checked; a mismatch is one line naming the key.

``src=`` (and ``config=``) may be a file on the Hugging Face Hub, ``hf://owner/name[@revision]/path/to/file``: it is
fetched into the Hugging Face cache (``pipelines.hub``) and the output's ``converted_from`` records the spec and its
commit; ``tokenizer=`` takes a path or an ``hf://`` checkpoint spec like every tool.

    python -m pipelines.convert source=ibq-tok src=hf://TencentARC/IBQ-Tokenizer-16384/imagenet256_16384.ckpt \
        out=runs/ibq_tok_16384

Pickled files (``.ckpt`` / ``.pt``) are read with ``torch.load(weights_only=True)`` plus exactly the
globals in ``SAFE_GLOBALS`` mapped to inert stand-ins; a file needing any other global is refused with one
line naming it. Nothing from a downloaded file is executed, and the output is safetensors only.
"""

from __future__ import annotations

import functools
import math
import pickle
import re
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file
from torch import Tensor, nn

from generator.llama import GPTConfig, LlamaGPT
from pipelines.checkpoint import MODEL_FILE, save_model, weights_hash
from pipelines.cli import (
    CONF_DIR,
    entry_point,
    require_bool,
    require_checkpoint,
    require_choice,
    require_int,
    require_text,
)
from pipelines.errors import ConfigError, UserError
from pipelines.hub import hub_record, pinned, resolve_file
from pipelines.schemas import GeneratorSection
from pipelines.util import DirectoryLock, remove_stale_tmp
from tokenizer.model import ImageTokenizer, TokenizerConfig, load_tokenizer

SOURCES = ("ibq-tok", "ibq-ar", "llamagen-vq", "llamagen-gpt")


class ConversionError(UserError, ValueError):
    """A source that does not match the official layout (one line naming the key), or a bad argument."""


class UnsafeCheckpointError(ConversionError):
    """A pickled checkpoint needs a global outside the allowlist; nothing from it was executed."""


# ------------------------------------------------------------------------------------------- safe loading

class _Namespace:
    """Inert stand-in for argparse.Namespace (LlamaGen's saved ``args``): unpickling only fills ``__dict__``."""


# The only globals a pickled official checkpoint may name, each mapped to an inert stand-in: LlamaGen's saved
# ``args`` (argparse.Namespace) and Lightning's ``hyper_parameters`` (AttributeDict, read as a plain dict).
SAFE_GLOBALS: list[tuple[Callable, str]] = [
    (_Namespace, "argparse.Namespace"),
    (dict, "pytorch_lightning.utilities.parsing.AttributeDict"),
    (dict, "lightning.fabric.utilities.data.AttributeDict"),
    (dict, "lightning_fabric.utilities.data.AttributeDict"),
]
_UNSUPPORTED = re.compile(r"Unsupported global: GLOBAL (\S+)")


def _existing_source(path: str | Path) -> Path:
    path = resolve_file(path)  # a local path as it is; an hf:// file fetched (cached)
    if not path.is_file():
        raise ConversionError(f"source checkpoint not found: {path}")
    return path


def load_checkpoint_file(path: str | Path) -> Any:
    """The object in ``path``: safetensors as a dict of tensors, pickles via ``weights_only`` and the allowlist."""
    path = _existing_source(path)
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = _UNSUPPORTED.search(str(err))
        if found:
            raise UnsafeCheckpointError(
                f"{path} needs the global {found.group(1)}, which is not in the allowlist (pipelines.convert."
                "SAFE_GLOBALS); refusing to unpickle it (loading it would execute code from the file)") from None
        raise ConversionError(f"{path} is not a readable torch checkpoint: {str(err).splitlines()[0]}") from None


def _tensors(obj: Any, where: str) -> dict[str, Tensor]:
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ConversionError(f"{where} is not a state dict (a mapping of names to tensors)")
    return obj


def official_state_dict(obj: Any, source: str) -> tuple[dict[str, Tensor], list[str]]:
    """The weights inside an official file, and the names of the top-level entries left out (optimizer, ...)."""
    if isinstance(obj, dict) and obj and all(isinstance(v, Tensor) for v in obj.values()):
        return obj, []  # a raw state dict (LlamaGen's FSDP-trained models, safetensors)
    keys = ("state_dict",) if source.startswith("ibq") else ("model", "module", "state_dict")
    for key in keys:
        if isinstance(obj, dict) and key in obj:
            return _tensors(obj[key], f"entry {key!r}"), sorted(str(k) for k in obj if k != key)
    top = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
    raise ConversionError(f"no weights found for source={source}: expected one of {list(keys)} or a raw state dict, "
                          f"the file has {top}")


# ------------------------------------------------------------------------------------------- strict mapping

class StrictMap:
    """Source tensors -> target tensors, recording which source keys were used and which were dropped."""

    def __init__(self, source: dict[str, Tensor], what: str) -> None:
        self.src, self.what = source, what
        self.used: set[str] = set()
        self.dropped: set[str] = set()
        self.out: dict[str, tuple[Tensor, str]] = {}

    def has(self, key: str) -> bool:
        return key in self.src

    def take(self, key: str) -> Tensor:
        if key not in self.src:
            raise ConversionError(f"{self.what}: source key {key} is missing (the official layout has it)")
        self.used.add(key)
        return self.src[key]

    def put(self, target: str, tensor: Tensor, origin: str) -> None:
        if target in self.out:
            raise ConversionError(f"{self.what}: target key {target} filled twice ({self.out[target][1]}, {origin})")
        self.out[target] = (tensor, origin)

    def copy(self, src: str, target: str) -> None:
        self.put(target, self.take(src), src)

    def drop(self, keep: Callable[[str], bool]) -> None:
        """Mark every not yet used source key matching ``keep`` as deliberately dropped."""
        self.dropped |= {k for k in self.src if k not in self.used and keep(k)}

    def finish(self, model: nn.Module) -> dict[str, Tensor]:
        """Check completeness and shapes against ``model``; the target state dict."""
        left = sorted(k for k in self.src if k not in self.used and k not in self.dropped)
        if left:
            more = f" (and {len(left) - 1} more)" if len(left) > 1 else ""
            raise ConversionError(f"{self.what}: source key {left[0]} is not mapped{more}")
        expected = model.state_dict()
        for key, ref in expected.items():
            if key not in self.out:
                raise ConversionError(f"{self.what}: target key {key} is not filled by any source key")
            tensor, origin = self.out[key]
            if tuple(tensor.shape) != tuple(ref.shape):
                raise ConversionError(f"{self.what}: target key {key} needs shape {tuple(ref.shape)}, "
                                      f"source {origin} gives {tuple(tensor.shape)}")
        extra = sorted(set(self.out) - set(expected))
        if extra:
            raise ConversionError(f"{self.what}: target key {extra[0]} does not exist in the model")
        return {k: self.out[k][0].detach().to(expected[k].dtype).contiguous() for k in expected}


def _count(keys: Iterable[str], pattern: str) -> int:
    """Number of distinct integers captured by ``pattern`` (one group) among ``keys``."""
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    if found and found != set(range(len(found))):
        raise ConversionError(f"indices {sorted(found)} of {pattern} are not 0..{len(found) - 1}")
    return len(found)


def _resblock(m: StrictMap, src: str, dst: str) -> None:
    for name in ("norm1", "conv1", "norm2", "conv2"):
        for p in ("weight", "bias"):
            m.copy(f"{src}.{name}.{p}", f"{dst}.{name}.{p}")
    if m.has(f"{src}.nin_shortcut.weight"):
        for p in ("weight", "bias"):
            m.copy(f"{src}.nin_shortcut.{p}", f"{dst}.skip.{p}")


def _attnblock(m: StrictMap, src: str, dst: str) -> None:
    for p in ("weight", "bias"):
        m.copy(f"{src}.norm.{p}", f"{dst}.norm.{p}")
        m.copy(f"{src}.proj_out.{p}", f"{dst}.proj.{p}")
        parts = [m.take(f"{src}.{qkv}.{p}") for qkv in "qkv"]  # our fused conv: q rows, then k, then v
        m.put(f"{dst}.qkv.{p}", torch.cat(parts, 0), f"{src}.{{q,k,v}}.{p}")


def _level(m: StrictMap, src: str, dst: str, blocks: int, attn: bool, block: str = "block") -> None:
    """One resolution level: our list interleaves ResBlock, AttnBlock when the level has attention."""
    for j in range(blocks):
        _resblock(m, f"{src}.{block}.{j}", f"{dst}.{2 * j if attn else j}")
        if attn:
            _attnblock(m, f"{src}.attn.{j}", f"{dst}.{2 * j + 1}")


# ------------------------------------------------------------------------------------------- tokenizers

def _layout(sd: dict[str, Tensor], enc: str, dec: str, block: str, what: str,
            kind: str) -> tuple[int, int, list[int], int, int, list[bool], list[bool]]:
    """(levels, base width, width multipliers, res blocks per level of the encoder and the decoder, which levels
    have attention in each) read from the key names and shapes; ``enc`` / ``dec`` prefix the levels."""
    keys = list(sd)
    levels = _count(keys, rf"{re.escape(enc)}\.(\d+)\.")
    if not levels:
        raise ConversionError(f"{what}: no {enc}.* keys: not a {kind} state dict")
    base = sd["encoder.conv_in.weight"].shape[0]
    mult = [sd[f"{enc}.{i}.{block}.0.conv2.weight"].shape[0] // base for i in range(levels)]
    enc_blocks, dec_blocks = (_count(keys, rf"{re.escape(p)}\.0\.{block}\.(\d+)\.") for p in (enc, dec))
    enc_attn, dec_attn = ([f"{p}.{i}.attn.0.q.weight" in sd for i in range(levels)] for p in (enc, dec))
    return levels, base, mult, enc_blocks, dec_blocks, enc_attn, dec_attn


def _shared_parts(m: StrictMap, mid: tuple[str, str, str]) -> None:
    """What both tokenizer layouts map alike: conv_in / norm_out / conv_out and the middle (res, attn, res blocks
    named ``mid``) of encoder and decoder, the codebook and the 1x1 convs around it."""
    for enc_dec in ("encoder", "decoder"):
        for name in ("conv_in", "norm_out", "conv_out"):
            for p in ("weight", "bias"):
                m.copy(f"{enc_dec}.{name}.{p}", f"{enc_dec}.{name}.{p}")
        _resblock(m, f"{enc_dec}.mid.{mid[0]}", f"{enc_dec}.mid.0")
        _attnblock(m, f"{enc_dec}.mid.{mid[1]}", f"{enc_dec}.mid.1")
        _resblock(m, f"{enc_dec}.mid.{mid[2]}", f"{enc_dec}.mid.2")
    m.copy("quantize.embedding.weight", "quantizer.embedding.weight")
    for name in ("quant_conv", "post_quant_conv"):
        for p in ("weight", "bias"):
            m.copy(f"{name}.{p}", f"{name}.{p}")


def _ibq_generator_keys(sd: dict[str, Tensor]) -> list[str]:
    heads = ("encoder.", "decoder.", "quantize.", "quant_conv.", "post_quant_conv.")
    return [k for k in sd if k.startswith(heads)]


def select_ibq_ema(sd: dict[str, Tensor], ema: bool) -> tuple[dict[str, Tensor], str]:
    """The tokenizer weights the official evaluation uses: ``model_ema.<name without dots>`` when present and
    ``ema``, else the raw ones. EMA bookkeeping and EMA copies of other modules (discriminator) are dropped."""
    has_ema = any(k.startswith("model_ema.") for k in sd)
    out = {k: v for k, v in sd.items() if not k.startswith("model_ema.")}
    if not has_ema:
        return out, "raw (the file has no EMA)"
    if not ema:
        return out, "raw (ema=false)"
    for key in _ibq_generator_keys(sd):
        ema_key = "model_ema." + key.replace(".", "")
        if ema_key not in sd:
            raise ConversionError(f"ibq-tok: EMA key {ema_key} for {key} is missing (pass ema=false for raw weights)")
        out[key] = sd[ema_key]
    return out, "EMA (model_ema.*)"


MODEL_ARGUMENT_KEYS = ("params", "init_args")  # model.params: taming's main.py; model.init_args: LightningCLI


def _model_arguments(config: dict[str, Any]) -> dict[str, Any] | None:
    """The model's constructor arguments in an official training YAML: ``model.params`` (taming's ``main.py``
    layout) or ``model.init_args`` (LightningCLI, the layout of SEED-Voken's own configs); None when neither."""
    model = config.get("model")
    if isinstance(model, dict):
        for key in MODEL_ARGUMENT_KEYS:
            if isinstance(model.get(key), dict):
                return model[key]
    return None


def _ibq_ddconfig(config: dict[str, Any] | None) -> dict[str, Any]:
    if not config:
        return {}
    node = _model_arguments(config) or {}
    node = node.get("first_stage_config", {}).get("params", node) if "ddconfig" not in node else node
    dd = dict(node.get("ddconfig") or {})
    for key in ("n_embed", "embed_dim"):
        if key in node:
            dd[key] = node[key]
    return dd


def _check_against(inferred: dict[str, Any], official: dict[str, Any], what: str) -> None:
    for key, value in inferred.items():
        if key in official and official[key] is not None:
            theirs = list(official[key]) if isinstance(official[key], list | tuple) else official[key]
            ours = list(value) if isinstance(value, list | tuple) else value
            if theirs != ours:
                raise ConversionError(f"{what}: config= says {key}={theirs}, the weights say {ours}")


def convert_ibq_tokenizer(sd: dict[str, Tensor], config: dict[str, Any] | None = None,
                          ema: bool = True, what: str = "ibq-tok") -> tuple[dict[str, Tensor], dict[str, Any], str]:
    """(our state dict, our TokenizerConfig dict, which weights) from a taming-layout IBQ tokenizer state dict."""
    sd, which = select_ibq_ema(sd, ema)
    levels, base, mult, enc_blocks, dec_blocks, enc_attn, dec_attn = _layout(
        sd, "encoder.down", "decoder.up", "block", what, "SEED-Voken IBQ tokenizer")
    if enc_attn != dec_attn:
        raise ConversionError(f"{what}: encoder attention levels {enc_attn} differ from the decoder's {dec_attn}")
    dd = _ibq_ddconfig(config)
    resolution = int(dd.get("resolution", 256))
    z_channels = sd["quant_conv.weight"].shape[1]
    if sd["encoder.conv_out.weight"].shape[0] != z_channels:
        raise ConversionError(f"{what}: encoder.conv_out has {sd['encoder.conv_out.weight'].shape[0]} channels, "
                              f"quant_conv takes {z_channels} (double_z is not supported)")
    codes = sd["quantize.embedding.weight"]
    cfg = TokenizerConfig(
        resolution=resolution, base_channels=base, channel_mult=tuple(mult), enc_res_blocks=enc_blocks,
        dec_res_blocks=dec_blocks, attn_resolutions=tuple(resolution // 2**i for i in range(levels) if enc_attn[i]),
        z_channels=z_channels, embed_dim=codes.shape[1], num_codes=codes.shape[0], quantizer="ibq",
        norm_group_channels=1)  # the official GroupNorm always has min(32, channels) groups
    _check_against({"ch": base, "ch_mult": mult, "num_res_blocks": enc_blocks, "z_channels": z_channels,
                    "n_embed": cfg.num_codes, "embed_dim": cfg.embed_dim,
                    "attn_resolutions": list(cfg.attn_resolutions)}, dd, what)
    if dd.get("double_z"):
        raise ConversionError(f"{what}: config= has double_z=true, which this tokenizer does not support")

    m = StrictMap(sd, what)
    _shared_parts(m, ("block_1", "attn_1", "block_2"))
    for i in range(levels):
        _level(m, f"encoder.down.{i}", f"encoder.levels.{i}", enc_blocks, enc_attn[i])
        if i < levels - 1:
            for p in ("weight", "bias"):
                m.copy(f"encoder.down.{i}.downsample.conv.{p}", f"encoder.downs.{i}.conv.{p}")
        k = levels - 1 - i  # our decoder runs from the lowest resolution up; the official one stores level i at up[i]
        _level(m, f"decoder.up.{i}", f"decoder.levels.{k}", dec_blocks, dec_attn[i])
        if i > 0:
            for p in ("weight", "bias"):
                m.copy(f"decoder.up.{i}.upsample.conv.{p}", f"decoder.ups.{k}.conv.{p}")
    m.drop(lambda k: k.startswith("loss."))  # discriminator, perceptual network, LeCAM buffers
    return m.finish(ImageTokenizer(cfg)), cfg.to_dict(), which


def convert_llamagen_vq(sd: dict[str, Tensor], image_size: int = 256,
                        what: str = "llamagen-vq") -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(our state dict, our TokenizerConfig dict) from LlamaGen's VQ model (attention at the last level only)."""
    levels, base, mult, enc_blocks, dec_blocks, attn_enc, attn_dec = _layout(
        sd, "encoder.conv_blocks", "decoder.conv_blocks", "res", what, "LlamaGen VQ")
    if attn_enc != [i == levels - 1 for i in range(levels)] or attn_dec != [k == 0 for k in range(levels)]:
        raise ConversionError(f"{what}: attention is not at the lowest resolution only (encoder {attn_enc}, "
                              f"decoder {attn_dec})")
    codes = sd["quantize.embedding.weight"]
    z_channels = sd["quant_conv.weight"].shape[1]
    if image_size % 2 ** (levels - 1):
        raise ConversionError(f"{what}: image_size={image_size} is not a multiple of {2 ** (levels - 1)}")
    cfg = TokenizerConfig(
        resolution=image_size, base_channels=base, channel_mult=tuple(mult), enc_res_blocks=enc_blocks,
        dec_res_blocks=dec_blocks, attn_resolutions=(image_size // 2 ** (levels - 1),), z_channels=z_channels,
        embed_dim=codes.shape[1], num_codes=codes.shape[0], quantizer="vq", norm_group_channels=1,
        quantizer_args={"beta": 0.25, "l2_norm": True})

    m = StrictMap(sd, what)
    _shared_parts(m, ("0", "1", "2"))
    for i in range(levels):
        _level(m, f"encoder.conv_blocks.{i}", f"encoder.levels.{i}", enc_blocks, attn_enc[i], block="res")
        _level(m, f"decoder.conv_blocks.{i}", f"decoder.levels.{i}", dec_blocks, attn_dec[i], block="res")
        if i < levels - 1:
            for p in ("weight", "bias"):
                m.copy(f"encoder.conv_blocks.{i}.downsample.conv.{p}", f"encoder.downs.{i}.conv.{p}")
                m.copy(f"decoder.conv_blocks.{i}.upsample.conv.{p}", f"decoder.ups.{i}.conv.{p}")
    m.drop(lambda k: k == "quantize.codebook_used")  # training-time usage statistics
    return m.finish(ImageTokenizer(cfg)), cfg.to_dict()


# ------------------------------------------------------------------------------------------- generators

# n_head is not in the weights: the published sizes by (width, layers), read from conf/generator/<name>.yaml.
IBQ_AR_SIZE_NAMES = ("B", "L", "XL", "XXL")  # the IBQ AR models; LlamaGen's GPTs are conf/generator/llamagen_*.yaml
LLAMAGEN_PREFIX = "llamagen_"


@functools.cache
def published_sizes(family: str) -> dict[tuple[int, int], tuple[str, int]]:
    """(dim, n_layer) -> (size name, n_head) of ``family`` "ibq" or "llamagen" from the generator YAML files (the
    one home of the sizes); LlamaGen's names lose their ``llamagen_`` prefix ("B", ..., "3B")."""
    if family == "ibq":
        names = list(IBQ_AR_SIZE_NAMES)
    else:
        names = sorted(f.stem for f in (CONF_DIR / "generator").glob(f"{LLAMAGEN_PREFIX}*.yaml"))
    table = {}
    for name in names:
        model = _generator_spec(name)["model"]
        table[(model["dim"], model["n_layer"])] = (name.removeprefix(LLAMAGEN_PREFIX), model["n_head"])
    return table


# Official IBQ AdaLN rows: (gate_attn, gate_ffn, scale_attn, scale_ffn, shift_attn, shift_ffn); ours:
# (shift_attn, scale_attn, gate_attn, shift_ffn, scale_ffn, gate_ffn). Ours[j] = theirs[IBQ_ADALN_ORDER[j]].
IBQ_ADALN_ORDER = (4, 2, 0, 5, 3, 1)
IBQ_HEAD_ORDER = (1, 0)  # official head rows (scale, shift); ours (shift, scale)


def permute_chunks(t: Tensor, order: tuple[int, ...]) -> Tensor:
    """Reorder the ``len(order)`` equal row blocks of ``t`` (dim 0): block j of the result is block order[j]."""
    chunks = t.chunk(len(order), 0)
    return torch.cat([chunks[i] for i in order], 0)


def _generator_spec(name: str | None) -> dict[str, Any]:
    """``conf/generator/<name>.yaml`` as Hydra composes it: the schema's defaults (``GPTConfig``'s, less the keys
    the converter sets), then the file's own keys."""
    if name is None:
        return {}
    spec = OmegaConf.load(CONF_DIR / "generator" / f"{name}.yaml")
    spec.pop("defaults", None)
    return OmegaConf.to_container(OmegaConf.merge(OmegaConf.structured(GeneratorSection), spec))


def _gpt_config(sd: dict[str, Tensor], prefix: str, tok: str, cls: str, layers_pat: str, w1: str,
                n_head: int | None, grid: tuple[int, int], base: dict[str, Any], what: str) -> GPTConfig:
    vocab, dim = sd[prefix + tok].shape
    n_layer = _count(sd, layers_pat)
    hidden = sd[prefix + w1.format(0)].shape[0]
    if n_head is None:
        raise ConversionError(f"{what}: the number of heads is not in the weights and width {dim} x {n_layer} "
                              "layers is no published size; pass n_head= (or config= with the official YAML)")
    model = {**base.get("model", {}), "vocab_size": vocab, "num_classes": sd[prefix + cls].shape[0] - 1,
             "grid": list(grid), "dim": dim, "n_layer": n_layer, "n_head": n_head}
    cfg = GPTConfig.from_dict(model)
    if cfg.hidden_dim != hidden:
        cfg.ffn_hidden = hidden
    return cfg


def _ibq_transformer_params(config: dict[str, Any] | None) -> dict[str, Any]:
    if not config:
        return {}
    node = _model_arguments(config) or {}
    return dict(node.get("transformer_config", {}).get("params", {}))


def convert_ibq_ar(sd: dict[str, Tensor], config: dict[str, Any] | None = None, n_head: int | None = None,
                   what: str = "ibq-ar") -> tuple[dict[str, Tensor], GPTConfig, str | None]:
    """(our state dict, GPTConfig, size name) from the official IBQ transformer (``transformer.*`` or bare)."""
    prefix = "transformer." if any(k.startswith("transformer.") for k in sd) else ""
    stray = sorted(k for k in sd if not k.startswith(prefix))
    if stray:
        raise ConversionError(f"{what}: source key {stray[0]} is not mapped (neither transformer.* nor the tokenizer)")
    tsd = {k[len(prefix):]: v for k, v in sd.items()}
    if "tok_emb.weight" not in tsd:
        raise ConversionError(f"{what}: no {prefix}tok_emb.weight: not a SEED-Voken IBQ AR state dict")
    if "blocks.0.ada_gss" in tsd:
        raise ConversionError(f"{what}: shared AdaLN (blocks.*.ada_gss) is not supported")
    if "embedding_projection.fc1.weight" in tsd:
        raise ConversionError(f"{what}: use_pretrained_codebook models (embedding_projection.*) are not supported")
    params = _ibq_transformer_params(config)
    dim, n_layer = tsd["tok_emb.weight"].shape[1], _count(tsd, r"blocks\.(\d+)\.")
    size = published_sizes("ibq").get((dim, n_layer))
    heads = n_head or params.get("n_head") or (size[1] if size else None)
    block_size = int(params.get("block_size", 256))
    side = math.isqrt(block_size)
    if side * side != block_size:
        raise ConversionError(f"{what}: block_size {block_size} is not a square grid")
    base = _generator_spec(size[0] if size else "B")
    base.setdefault("model", {}).update(adaln=True, head_norm="adaln_rms", rope_cls="zero")
    for ours, theirs in (("rope_base", "rope_base"), ("norm_eps", "norm_eps"), ("ffn_dropout", "ffn_dropout_p"),
                         ("resid_dropout", "resid_dropout_p"), ("attn_dropout", "attn_dropout_p"),
                         ("token_dropout", "token_drop")):
        if theirs in params:
            base["model"][ours] = params[theirs]
    if params.get("n_kv_head") not in (None, heads):
        raise ConversionError(f"{what}: grouped-query attention (n_kv_head) is not supported")
    cfg = _gpt_config(tsd, "", "tok_emb.weight", "class_emb.embedding_table.weight", r"blocks\.(\d+)\.",
                      "blocks.{}.feed_forward.w1.weight", heads, (side, side), base, what)
    _check_against({"vocab_size": cfg.vocab_size, "n_layer": cfg.n_layer, "n_embd": cfg.dim,
                    "class_num": cfg.num_classes}, params, what)

    m = StrictMap(tsd, what)
    m.copy("tok_emb.weight", "tok_embeddings.weight")
    m.copy("class_emb.embedding_table.weight", "class_embedding.weight")
    for i in range(cfg.n_layer):
        src, dst = f"blocks.{i}", f"layers.{i}"
        for name in ("attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3",
                     "attention_norm", "ffn_norm"):
            m.copy(f"{src}.{name}.weight", f"{dst}.{name}.weight")
        for p in ("weight", "bias"):
            key = f"{src}.ada_lin.1.{p}"
            m.put(f"{dst}.adaln.1.{p}", permute_chunks(m.take(key), IBQ_ADALN_ORDER), key)
    m.copy("head_nm.rmsnorm.weight", "final_norm.norm.weight")
    for p in ("weight", "bias"):
        key = f"head_nm.ada_lin.1.{p}"
        m.put(f"final_norm.adaln.1.{p}", permute_chunks(m.take(key), IBQ_HEAD_ORDER), key)
    m.copy("head.weight", "output.weight")
    m.drop(lambda k: ".kv_cache." in k)
    with torch.device("meta"):
        model = LlamaGPT(cfg)
    return m.finish(model), cfg, size[0] if size else None


def convert_llamagen_gpt(sd: dict[str, Tensor], image_size: int = 256, n_head: int | None = None,
                         what: str = "llamagen-gpt") -> tuple[dict[str, Tensor], GPTConfig, str | None]:
    """(our state dict, GPTConfig, size name) from LlamaGen's c2i GPT (same names but the class table / head)."""
    for strip in ("module.", "_orig_mod."):
        if all(k.startswith(strip) for k in sd):
            sd = {k[len(strip):]: v for k, v in sd.items()}
    if "tok_embeddings.weight" not in sd or "cls_embedding.embedding_table.weight" not in sd:
        raise ConversionError(f"{what}: no tok_embeddings / cls_embedding.embedding_table: not a LlamaGen c2i GPT")
    if "cls_embedding.cap_proj.fc1.weight" in sd:
        raise ConversionError(f"{what}: text-conditional (t2i) models are not supported")
    dim, n_layer = sd["tok_embeddings.weight"].shape[1], _count(sd, r"layers\.(\d+)\.")
    size = published_sizes("llamagen").get((dim, n_layer))
    heads = n_head or (size[1] if size else None)
    if image_size % 16:
        raise ConversionError(f"{what}: image_size={image_size} is not a multiple of 16 (VQ-16 tokens)")
    side = image_size // 16
    base = _generator_spec(f"{LLAMAGEN_PREFIX}{size[0]}" if size else f"{LLAMAGEN_PREFIX}B")
    base["model"].update(adaln=False, head_norm="rms", rope_cls="zero")  # LlamaGen's GPT, whatever the YAML says
    cfg = _gpt_config(sd, "", "tok_embeddings.weight", "cls_embedding.embedding_table.weight", r"layers\.(\d+)\.",
                      "layers.{}.feed_forward.w1.weight", heads, (side, side), base, what)
    if sd["layers.0.attention.wqkv.weight"].shape[0] != 3 * dim:
        raise ConversionError(f"{what}: grouped-query attention (n_kv_head) is not supported")

    m = StrictMap(sd, what)
    m.copy("tok_embeddings.weight", "tok_embeddings.weight")
    m.copy("cls_embedding.embedding_table.weight", "class_embedding.weight")
    for i in range(cfg.n_layer):
        for name in ("attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3",
                     "attention_norm", "ffn_norm"):
            m.copy(f"layers.{i}.{name}.weight", f"layers.{i}.{name}.weight")
    m.copy("norm.weight", "final_norm.norm.weight")
    m.copy("output.weight", "output.weight")
    m.drop(lambda k: ".kv_cache." in k or k in ("freqs_cis", "causal_mask"))
    with torch.device("meta"):
        model = LlamaGPT(cfg)
    return m.finish(model), cfg, size[0] if size else None


# ------------------------------------------------------------------------------------------- writing

def _origin(source: str, src: str | Path, **extra: Any) -> dict[str, Any]:
    return {"converted_from": {"source": source, "file": str(src), **hub_record(src),
                               **{k: v for k, v in extra.items() if v is not None}}}


def write_tokenizer(out: str | Path, state: dict[str, Tensor], model_cfg: dict[str, Any],
                    origin: dict[str, Any]) -> Path:
    ImageTokenizer(TokenizerConfig.from_dict(model_cfg)).load_state_dict(state, strict=True)
    save_model(out, state, {"tokenizer": {"model": model_cfg}, **origin})
    return Path(out)


def write_generator(out: str | Path, state: dict[str, Tensor], cfg: GPTConfig, name: str, sample: dict[str, Any],
                    tokenizer_dir: str | Path, origin: dict[str, Any]) -> Path:
    tokenizer = load_tokenizer(tokenizer_dir)
    grid = (tokenizer.cfg.grid, tokenizer.cfg.grid)
    if tokenizer.cfg.num_codes != cfg.vocab_size or grid != cfg.grid:
        raise ConversionError(f"tokenizer {tokenizer_dir} has {tokenizer.cfg.num_codes} codes on a {grid} grid, the "
                              f"generator {cfg.vocab_size} codes on {cfg.grid} (for 384 px models convert the VQ "
                              "with image_size=384)")
    LlamaGPT(cfg).load_state_dict(state, strict=True)
    config = {"generator": {"name": name, "model": cfg.to_dict(), "sample": sample},
              "tokenizer_hash": weights_hash(tokenizer_dir), "tokenizer_dir": pinned(tokenizer_dir), **origin}
    save_model(out, state, config)
    return Path(out)


def _load_yaml(path: str | None) -> dict[str, Any] | None:
    """The official training YAML, refused in one line unless the model's arguments are found in it (a YAML read
    in the wrong place would silently convert with default sizes and dropouts)."""
    if not path:
        return None
    if not resolve_file(path).is_file():
        raise ConversionError(f"config= file not found: {path}")
    try:
        config = OmegaConf.to_container(OmegaConf.load(resolve_file(path)), resolve=False)
    except Exception as err:  # yaml scanner / parser errors, OmegaConf errors: all mean "not a YAML mapping"
        raise ConfigError(f"config={path} is not readable YAML ({type(err).__name__}); pass the official training "
                          "YAML of the checkpoint") from err
    if not isinstance(config, dict) or _model_arguments(config) is None:
        raise ConfigError(f"config={path} has neither model.params nor model.init_args (the model's arguments in "
                          "SEED-Voken's training YAMLs); pass the official training YAML of the checkpoint")
    return config


def convert(source: str, src: str | Path, out: str | Path, config: str | None = None, ema: bool = True,
            tokenizer: str | Path | None = None, image_size: int = 256, n_head: int | None = None,
            overwrite: bool = False) -> dict[str, Any]:
    """Convert one official file; returns a summary (written directories, weights used, dropped entries).

    ``out`` is locked while it is written, and a directory that already holds weights is only replaced with
    ``overwrite=True``, the rule every command that writes a checkpoint follows."""
    if source not in SOURCES:
        raise ConversionError(f"unknown source={source!r}; choose one of {', '.join(SOURCES)}")
    if not src or not out:
        raise ConversionError("give src=<official checkpoint> and out=<directory to write>")
    _existing_source(src)  # before anything about out: a typo in src= is the likelier mistake
    if not overwrite and (Path(out) / MODEL_FILE).exists():
        raise ConversionError(f"{out} already holds a checkpoint ({MODEL_FILE}); pass overwrite=true to replace it, "
                              "or choose another out")
    created = not Path(out).exists()
    try:
        with DirectoryLock(out, "conversion output directory").acquire():
            remove_stale_tmp(out)
            return _convert(source, src, out, config, ema, tokenizer, image_size, n_head)
    except BaseException:
        if created:  # a failed conversion leaves no half-written directory behind
            shutil.rmtree(out, ignore_errors=True)
        raise


def _convert(source: str, src: str | Path, out: str | Path, config: str | None, ema: bool,
             tokenizer: str | Path | None, image_size: int, n_head: int | None) -> dict[str, Any]:
    obj = load_checkpoint_file(src)
    sd, skipped = official_state_dict(obj, source)
    official = _load_yaml(config)
    summary: dict[str, Any] = {"source": source, "out": str(out), "skipped_entries": skipped}

    if source == "ibq-tok":
        state, model_cfg, which = convert_ibq_tokenizer(sd, official, ema)
        write_tokenizer(out, state, model_cfg, _origin(source, src, weights=which))
        summary["weights"] = which
    elif source == "llamagen-vq":
        state, model_cfg = convert_llamagen_vq(sd, image_size)
        write_tokenizer(out, state, model_cfg, _origin(source, src, image_size=image_size))
    elif source == "ibq-ar":
        embedded = {k[len("first_stage_model."):]: v for k, v in sd.items() if k.startswith("first_stage_model.")}
        ar_sd = {k: v for k, v in sd.items() if not k.startswith(("first_stage_model.", "cond_stage_model."))}
        if embedded:
            tok_state, tok_cfg, which = convert_ibq_tokenizer(embedded, official, ema, what="ibq-ar tokenizer")
            if not any(k.startswith("model_ema.") for k in embedded):  # the AR stage stores the EMA weights as such
                which = "as embedded (the official AR stage loads the tokenizer's EMA weights into first_stage_model)"
            tokenizer = Path(out) / "tokenizer"
            write_tokenizer(tokenizer, tok_state, tok_cfg, _origin("ibq-ar (first_stage_model)", src, weights=which))
            summary["tokenizer"] = str(tokenizer)
        elif tokenizer is None:
            raise ConversionError("ibq-ar: the file embeds no tokenizer (first_stage_model.*); pass tokenizer=<the "
                                  "converted IBQ tokenizer dir>")
        state, cfg, size = convert_ibq_ar(ar_sd, official, n_head)
        sample = _generator_spec(size).get("sample", {}) if size else {}
        write_generator(out, state, cfg, f"ibq_{size or 'custom'}", sample, tokenizer, _origin(source, src))
    else:
        if tokenizer is None:
            raise ConversionError("llamagen-gpt: pass tokenizer=<the converted LlamaGen VQ dir> (its image_size must "
                                  "match this model's)")
        state, cfg, size = convert_llamagen_gpt(sd, image_size, n_head)
        sample = _generator_spec(f"llamagen_{size}").get("sample", {}) if size else {}
        write_generator(out, state, cfg, f"llamagen_{size or 'custom'}", sample, tokenizer,
                        _origin(source, src, image_size=image_size))
    return summary


def check_options(cfg: DictConfig) -> None:
    if cfg.source is not None:  # null: convert() says which sources there are and what else to give
        require_choice(cfg, "source", SOURCES)
    for key in ("src", "config"):  # a path or hf://owner/name[@revision]/path/to/file
        require_checkpoint(cfg, key, optional=True, file=True)
    require_checkpoint(cfg, "tokenizer", optional=True)
    require_text(cfg, "out", optional=True)
    for key in ("ema", "overwrite"):
        require_bool(cfg, key)
    require_int(cfg, "image_size", 16)
    require_int(cfg, "n_head", 1, optional=True)


def run(cfg: DictConfig) -> None:
    check_options(cfg)
    summary = convert(cfg.source, cfg.src, cfg.out, cfg.config, cfg.ema, cfg.tokenizer, cfg.image_size, cfg.n_head,
                      cfg.overwrite)
    extra = f"; tokenizer -> {summary['tokenizer']}" if "tokenizer" in summary else ""
    weights = f" ({summary['weights']} weights)" if "weights" in summary else ""
    skipped = f"; left out of the file: {', '.join(summary['skipped_entries'])}" if summary["skipped_entries"] else ""
    print(f"converted {cfg.source} {cfg.src}{weights} -> {cfg.out} (model.safetensors + config.yaml){extra}{skipped}")


main = entry_point("convert", run, tool=True)


if __name__ == "__main__":
    main()
