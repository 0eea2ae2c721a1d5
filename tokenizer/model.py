"""The IBQ tokenizer: encoder -> 1x1 conv -> quantizer -> 1x1 conv -> decoder, with a config dataclass."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from pipelines.errors import ConfigError  # leaf modules: the error class and the option checks only
from pipelines.options import (
    build_strict,
    fields_of,
    require_bool,
    require_choice,
    require_int,
    require_int_list,
    require_number,
)
from tokenizer.autoencoder import PADDINGS, ConvStack, Decoder, Encoder
from tokenizer.quantizer import Quantizer, QuantizerOutput, build_quantizer, quantizer_config

MODEL_KEY = "tokenizer.model"  # where the architecture sits in a run's config

NORMS = ("group", "none")  # normalisation layers of the encoder and decoder


@dataclass
class TokenizerConfig:
    """Architecture of one tokenizer. Defaults are the ImageNet 256 reference (16x16 tokens): the one home of these
    values; conf/tokenizer/*.yaml extend this schema and state only what differs (``pipelines.schemas``)."""

    resolution: int = 256
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    enc_res_blocks: int = 4
    dec_res_blocks: int = 5
    attn_resolutions: tuple[int, ...] = (16,)
    z_channels: int = 256
    embed_dim: int = 256
    dropout: float = 0.0
    norm_group_channels: int = 4  # GroupNorm: at least this many channels per group (1 = the reference's)
    norm: str = "group"  # group (GroupNorm, the reference) | none (no normalisation layers; see autoencoder.py)
    mid_block: bool = True  # the res + attention + res block at the lowest resolution (reference: on)
    padding: str = "zeros"  # the 3x3 convs' border: zeros (the reference) | replicate | reflect (see autoencoder.py)
    num_codes: int = 16384
    quantizer: str = "ibq"  # see tokenizer.quantizer.QUANTIZERS
    quantizer_args: dict[str, Any] = field(default_factory=dict)  # the quantizer's options (IBQConfig / VQConfig)

    def __post_init__(self) -> None:
        v = fields_of(self, MODEL_KEY)
        for name, low in (("resolution", 8), ("base_channels", 1), ("enc_res_blocks", 0), ("dec_res_blocks", 0),
                          ("z_channels", 1), ("embed_dim", 1), ("norm_group_channels", 1), ("num_codes", 2)):
            require_int(v, f"{MODEL_KEY}.{name}", low)
        require_int_list(v, f"{MODEL_KEY}.channel_mult", 1)
        require_int_list(v, f"{MODEL_KEY}.attn_resolutions", 1)
        require_number(v, f"{MODEL_KEY}.dropout", 0, 1, high_open=True)
        require_bool(v, f"{MODEL_KEY}.mid_block")
        require_choice(v, f"{MODEL_KEY}.norm", NORMS)
        require_choice(v, f"{MODEL_KEY}.padding", PADDINGS)
        self.channel_mult, self.attn_resolutions = tuple(self.channel_mult), tuple(self.attn_resolutions)
        if not self.channel_mult:
            raise ConfigError(f"{MODEL_KEY}.channel_mult must list at least one level, got []")
        if self.resolution % self.downsample:
            raise ConfigError(f"{MODEL_KEY}.resolution {self.resolution} must be a multiple of the downsampling "
                              f"factor {self.downsample} (2 ** (len(channel_mult) - 1))")
        widths_change = len(set(self.channel_mult)) > 1
        if widths_change and min(self.enc_res_blocks, self.dec_res_blocks) < 1:
            raise ConfigError(f"{MODEL_KEY}.channel_mult {list(self.channel_mult)} changes width between levels, "
                              f"which a residual block does; {MODEL_KEY}.enc_res_blocks and dec_res_blocks must be "
                              ">= 1 (0 needs equal multipliers)")
        self.quantizer_args = dict(self.quantizer_args or {})
        quantizer_config(self.quantizer, self.quantizer_args)  # the quantizer's own options, checked here

    @classmethod
    def from_dict(cls, d: Any) -> TokenizerConfig:
        """Build from a (Hydra) dict; an unknown key is a ``ConfigError`` naming it."""
        return build_strict(cls, d, MODEL_KEY)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["channel_mult"], d["attn_resolutions"] = list(self.channel_mult), list(self.attn_resolutions)
        return d

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def grid(self) -> int:
        return self.resolution // self.downsample


class ImageTokenizer(nn.Module):
    def __init__(self, cfg: TokenizerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        stack = ConvStack(cfg.resolution, cfg.base_channels, cfg.channel_mult, cfg.attn_resolutions, cfg.z_channels,
                          cfg.dropout, cfg.norm_group_channels, cfg.mid_block, cfg.norm, cfg.padding)
        self.encoder = Encoder(stack, cfg.enc_res_blocks)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.quantizer: Quantizer = build_quantizer(cfg.quantizer, cfg.num_codes, cfg.embed_dim, cfg.quantizer_args)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
        self.decoder = Decoder(stack, cfg.dec_res_blocks)

    def encode(self, x: Tensor) -> QuantizerOutput:
        """Images in [-1, 1] (B, 3, H, W) -> quantizer output (z_q, indices, losses)."""
        return self.quantizer(self.quant_conv(self.encoder(x)))

    def decode(self, z_q: Tensor) -> Tensor:
        return self.decoder(self.post_quant_conv(z_q))

    def forward(self, x: Tensor) -> tuple[Tensor, QuantizerOutput]:
        q = self.encode(x)
        return self.decode(q.z_q), q

    def tokenize(self, x: Tensor) -> Tensor:
        """Images -> token ids (B, h, w); inference path without losses."""
        return self.quantizer.encode_indices(self.quant_conv(self.encoder(x)))

    def decode_tokens(self, indices: Tensor) -> Tensor:
        """Token ids (B, h, w) -> images in [-1, 1]."""
        return self.decode(self.quantizer.lookup(indices))


def load_tokenizer(directory, device: str | torch.device = "cpu") -> ImageTokenizer:
    """An IBQ tokenizer in eval mode from ``model.safetensors`` + ``config.yaml`` alone."""
    from pipelines.checkpoint import load_model  # file I/O only (no model code)

    state, config = load_model(directory)
    if "tokenizer" not in config or "model" not in config["tokenizer"]:
        raise ConfigError(f"{directory} is not a tokenizer checkpoint (config has no tokenizer.model)")
    model = ImageTokenizer(TokenizerConfig.from_dict(config["tokenizer"]["model"]))
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()
