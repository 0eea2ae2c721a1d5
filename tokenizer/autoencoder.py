"""VQGAN-style convolutional encoder and decoder (GroupNorm + swish, residual blocks, attention).

Resolution halves after every level but the last, so ``len(channel_mult) - 1`` levels of 2x give
the downsampling factor (5 levels -> 16x for the ImageNet reference, 4 levels -> 8x for the demo).

GroupNorm uses 32 groups, as the reference, but never fewer than ``norm_group_channels`` channels per
group. Why: a group of one channel is instance norm, which removes each channel's per-image mean (a flat
colour) and, right before the RGB conv, causes "droplet" artefacts (a spike with a dark halo). Widths of
128 and more (every reference model) have >= 4 channels per group either way, so only narrow models change.

``norm_kind="none"`` drops every normalisation layer. Why: GroupNorm removes each group's per-image mean and
scale, so a small decoder has to rebuild a photograph's absolute colour and contrast from the relations between
channels; on a flat region (a blue sky) little of it is left (README, "Real photographs").

``padding`` is how every 3x3 conv sees beyond the image: "zeros" (the reference) or "replicate" / "reflect". Why:
without normalisation layers a shallow model reads the zero border as content (0 is mid-grey in [-1, 1]) and paints
a frame one token wide around flat regions; replicated edges have none (measured trade-off: docs/design.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Norm = Callable[[int], nn.Module]
Conv3 = Callable[[int, int], nn.Conv2d]
PADDINGS = ("zeros", "replicate", "reflect")  # nn.Conv2d padding modes offered for the 3x3 convs


def conv3x3(c_in: int, c_out: int, padding: str = "zeros") -> nn.Conv2d:
    """The 3x3, stride-1, same-size conv of every block, with the border handled as ``padding`` says."""
    return nn.Conv2d(c_in, c_out, 3, padding=1, padding_mode=padding)


def group_norm(channels: int, norm_group_channels: int = 1) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= 32 that divides ``channels`` and keeps
    ``norm_group_channels`` channels per group (1 = the reference's ``min(32, channels)`` groups)."""
    groups = max(1, min(32, channels // max(1, norm_group_channels)))
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, dropout: float = 0.0, norm: Norm = group_norm,
                 conv: Conv3 = conv3x3) -> None:
        super().__init__()
        self.norm1, self.conv1 = norm(c_in), conv(c_in, c_out)
        self.norm2, self.conv2 = norm(c_out), conv(c_out, c_out)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions."""

    def __init__(self, channels: int, norm: Norm = group_norm) -> None:
        super().__init__()
        self.norm = norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Stride-2 3x3 conv with asymmetric (0, 1, 0, 1) padding, as VQGAN (zeros, or the stack's padding mode)."""

    def __init__(self, channels: int, padding: str = "zeros") -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)
        self.pad_mode = "constant" if padding == "zeros" else padding

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode=self.pad_mode))


class Upsample(nn.Module):
    def __init__(self, channels: int, conv: Conv3 = conv3x3) -> None:
        super().__init__()
        self.conv = conv(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


@dataclass(frozen=True)
class ConvStack:
    """What the encoder and decoder share: widths per level, where attention runs, the latent width."""

    resolution: int
    base_channels: int
    channel_mult: Sequence[int]
    attn_resolutions: Sequence[int]
    z_channels: int
    dropout: float = 0.0
    norm_group_channels: int = 1
    mid_block: bool = True  # res + attention + res at the lowest resolution (the reference); False: identity
    norm_kind: str = "group"  # group | none
    padding: str = "zeros"  # zeros (the reference) | replicate | reflect: the 3x3 convs' border

    def norm(self, channels: int) -> nn.Module:
        return group_norm(channels, self.norm_group_channels) if self.norm_kind == "group" else nn.Identity()

    def conv(self, c_in: int, c_out: int) -> nn.Conv2d:
        return conv3x3(c_in, c_out, self.padding)

    def level(self, c_in: int, c_out: int, blocks: int, res: int) -> nn.ModuleList:
        layers = nn.ModuleList()
        for i in range(blocks):
            layers.append(ResBlock(c_in if i == 0 else c_out, c_out, self.dropout, self.norm, self.conv))
            if res in self.attn_resolutions:
                layers.append(AttnBlock(c_out, self.norm))
        return layers

    def middle(self, channels: int) -> nn.Sequential:
        if not self.mid_block:
            return nn.Sequential()  # an empty Sequential returns its input
        block = (channels, channels, self.dropout, self.norm, self.conv)
        return nn.Sequential(ResBlock(*block), AttnBlock(channels, self.norm), ResBlock(*block))


class Encoder(nn.Module):
    def __init__(self, stack: ConvStack, num_res_blocks: int, in_channels: int = 3) -> None:
        super().__init__()
        base, mults = stack.base_channels, stack.channel_mult
        self.conv_in = stack.conv(in_channels, base)
        self.levels = nn.ModuleList()
        self.downs = nn.ModuleList()
        c_in, res = base, stack.resolution
        for i, mult in enumerate(mults):
            c_out = base * mult
            self.levels.append(stack.level(c_in, c_out, num_res_blocks, res))
            last = i == len(mults) - 1
            self.downs.append(nn.Identity() if last else Downsample(c_out, stack.padding))
            res = res if last else res // 2
            c_in = c_out
        self.mid = stack.middle(c_in)
        self.norm_out = stack.norm(c_in)
        self.conv_out = stack.conv(c_in, stack.z_channels)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level, down in zip(self.levels, self.downs, strict=True):
            for layer in level:
                h = layer(h)
            h = down(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, stack: ConvStack, num_res_blocks: int, out_channels: int = 3) -> None:
        super().__init__()
        base, mults = stack.base_channels, stack.channel_mult
        c = base * mults[-1]
        res = stack.resolution // 2 ** (len(mults) - 1)
        self.conv_in = stack.conv(stack.z_channels, c)
        self.mid = stack.middle(c)
        self.levels = nn.ModuleList()
        self.ups = nn.ModuleList()
        for i in reversed(range(len(mults))):
            c_out = base * mults[i]
            self.levels.append(stack.level(c, c_out, num_res_blocks, res))
            first = i == 0
            self.ups.append(nn.Identity() if first else Upsample(c_out, stack.conv))
            res = res if first else res * 2
            c = c_out
        self.norm_out = stack.norm(c)
        self.conv_out = stack.conv(c, out_channels)

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
