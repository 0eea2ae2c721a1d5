"""VQGAN-style convolutional encoder and decoder (GroupNorm(32) + swish, residual blocks, attention).

Resolution halves after every level but the last, so ``len(channel_mult) - 1`` levels of 2x give
the downsampling factor (5 levels -> 16x for the ImageNet reference, 4 levels -> 8x for the demo).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=min(32, channels), num_channels=channels, eps=1e-6, affine=True)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1, self.conv1 = group_norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = group_norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Stride-2 3x3 conv with asymmetric (0, 1, 0, 1) padding, as VQGAN."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(c_in: int, c_out: int, blocks: int, attn: bool, dropout: float) -> nn.ModuleList:
    layers = nn.ModuleList()
    for i in range(blocks):
        layers.append(ResBlock(c_in if i == 0 else c_out, c_out, dropout))
        if attn:
            layers.append(AttnBlock(c_out))
    return layers


def _middle(channels: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(ResBlock(channels, channels, dropout), AttnBlock(channels),
                         ResBlock(channels, channels, dropout))


class Encoder(nn.Module):
    def __init__(
        self,
        resolution: int,
        base_channels: int,
        channel_mult: Sequence[int],
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        z_channels: int,
        in_channels: int = 3,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        self.levels = nn.ModuleList()
        self.downs = nn.ModuleList()
        c_in, res = base_channels, resolution
        for i, mult in enumerate(channel_mult):
            c_out = base_channels * mult
            self.levels.append(_level(c_in, c_out, num_res_blocks, res in attn_resolutions, dropout))
            last = i == len(channel_mult) - 1
            self.downs.append(nn.Identity() if last else Downsample(c_out))
            res = res if last else res // 2
            c_in = c_out
        self.mid = _middle(c_in, dropout)
        self.norm_out = group_norm(c_in)
        self.conv_out = nn.Conv2d(c_in, z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level, down in zip(self.levels, self.downs, strict=True):
            for layer in level:
                h = layer(h)
            h = down(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(
        self,
        resolution: int,
        base_channels: int,
        channel_mult: Sequence[int],
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        z_channels: int,
        out_channels: int = 3,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        c = base_channels * channel_mult[-1]
        res = resolution // 2 ** (len(channel_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, c, 3, padding=1)
        self.mid = _middle(c, dropout)
        self.levels = nn.ModuleList()
        self.ups = nn.ModuleList()
        for i in reversed(range(len(channel_mult))):
            c_out = base_channels * channel_mult[i]
            self.levels.append(_level(c, c_out, num_res_blocks, res in attn_resolutions, dropout))
            first = i == 0
            self.ups.append(nn.Identity() if first else Upsample(c_out))
            res = res if first else res * 2
            c = c_out
        self.norm_out = group_norm(c)
        self.conv_out = nn.Conv2d(c, out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level, up in zip(self.levels, self.ups, strict=True):
            for layer in level:
                h = layer(h)
            h = up(h)
        return self.conv_out(F.silu(self.norm_out(h)))

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight of the final conv, for the optional adaptive GAN weight."""
        return self.conv_out.weight
