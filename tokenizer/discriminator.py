"""PatchGAN discriminator (pix2pix / VQGAN style) with BatchNorm and N(0, 0.02) weights."""

from __future__ import annotations

from torch import Tensor, nn


def init_weights(module: nn.Module) -> None:
    """Convs N(0, 0.02); BatchNorm scale N(1, 0.02), shift 0 (the reference's initialisation)."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class PatchDiscriminator(nn.Module):
    """``num_layers`` stride-2 stages then two stride-1 convs; outputs a map of patch logits."""

    def __init__(self, in_channels: int = 3, base_channels: int = 64, num_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, base_channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, num_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < num_layers else 1
            layers += [
                nn.Conv2d(base_channels * prev, base_channels * mult, 4, stride, 1, bias=False),
                nn.BatchNorm2d(base_channels * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(base_channels * mult, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        self.apply(init_weights)

    def forward(self, real: Tensor, fake: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """Logits for ``real``; with ``fake`` too, both, in two separate passes (BatchNorm sees
        each set on its own, as the reference) but one module call, so DDP sees one forward."""
        if fake is None:
            return self.net(real)
        return self.net(real), self.net(fake)
