"""The IBQ tokenizer: encoder -> 1x1 conv -> quantizer -> 1x1 conv -> decoder, with a config dataclass."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import Tensor, nn

from pipelines.errors import ConfigError  # a leaf module: the error class only
from tokenizer.autoencoder import ConvStack, Decoder, Encoder
from tokenizer.quantizer import Quantizer, QuantizerOutput, build_quantizer


@dataclass
class TokenizerConfig:
    """Architecture of one tokenizer. Defaults are the ImageNet 256 reference (16x16 tokens)."""

    resolution: int = 256
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    enc_res_blocks: int = 4
    dec_res_blocks: int = 5
    attn_resolutions: tuple[int, ...] = (16,)
    z_channels: int = 256
    embed_dim: int = 256
    dropout: float = 0.0
    norm_group_channels: int = 4  # GroupNorm: at least this many channels per group (see autoencoder.py)
    mid_block: bool = True  # the res + attention + res block at the lowest resolution (reference: on)
    num_codes: int = 16384
    quantizer: str = "ibq"
    quantizer_args: dict[str, Any] = field(default_factory=dict)  # beta, entropy weights, ...

    def __post_init__(self) -> None:
        widths_change = len(set(self.channel_mult)) > 1
        if widths_change and min(self.enc_res_blocks, self.dec_res_blocks) < 1:
            raise ConfigError(f"channel_mult {list(self.channel_mult)} changes width between levels, which a residual "
                              "block does; enc_res_blocks and dec_res_blocks must be >= 1 (0 needs equal multipliers)")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TokenizerConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown tokenizer config keys {sorted(unknown)}; known: {sorted(known)}")
        d = dict(d)
        # Configs written before the option existed had one channel per group in narrow layers; keep them exact.
        d.setdefault("norm_group_channels", 1)
        for key in ("channel_mult", "attn_resolutions"):
            if key in d:
                d[key] = tuple(d[key])
        if "quantizer_args" in d:
            d["quantizer_args"] = dict(d["quantizer_args"])
        return cls(**d)

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
                          cfg.dropout, cfg.norm_group_channels, cfg.mid_block)
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
        raise ValueError(f"{directory} is not a tokenizer checkpoint (config has no tokenizer.model)")
    model = ImageTokenizer(TokenizerConfig.from_dict(config["tokenizer"]["model"]))
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()
