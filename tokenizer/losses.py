"""Tokenizer training objective: L1 + perceptual + quantizer losses + PatchGAN (hinge, LeCAM).

Two entry points mirror the two optimizer steps: ``discriminator_loss`` (run first each step) and
``autoencoder_loss``. All weights come from ``LossConfig``; the defaults are the reference values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipelines.errors import ConfigError  # leaf modules: the error class and the option checks only
from pipelines.options import build_strict, fields_of, require_choice, require_int, require_number, require_text
from tokenizer.perceptual import PERCEPTUAL_KINDS
from tokenizer.quantizer import QuantizerOutput

LOSS_KEY = "tokenizer.loss"  # where the objective's settings sit in a run's config


@dataclass
class LossConfig:
    """The training objective's weights. Defaults are the ImageNet reference recipe (the one home of these values;
    conf/tokenizer/*.yaml state only what differs)."""

    pixel_weight: float = 1.0
    perceptual: str = "lpips_vgg"  # lpips_vgg | stlpips_vgg (alternative, not LPIPS) | none
    perceptual_weight: float = 1.0
    vgg_weights: str | None = None  # torchvision vgg16 file for lpips_vgg when not in the torch hub cache
    gen_weight: float | None = 0.1  # fixed weight of the generator GAN loss; None -> adaptive
    disc_weight: float = 0.4  # scales the adaptive weight (only used when gen_weight is None)
    disc_factor: float = 1.0
    disc_start: int = 0  # optimizer step at which the GAN losses switch on
    lecam_weight: float = 0.05
    lecam_decay: float = 0.999
    disc_channels: int = 64
    disc_layers: int = 3

    def __post_init__(self) -> None:
        v = fields_of(self, LOSS_KEY)
        for name in ("pixel_weight", "perceptual_weight", "disc_weight", "disc_factor", "lecam_weight"):
            require_number(v, f"{LOSS_KEY}.{name}", 0)
        require_number(v, f"{LOSS_KEY}.gen_weight", 0, optional=True)
        require_number(v, f"{LOSS_KEY}.lecam_decay", 0, 1, high_open=True)
        require_choice(v, f"{LOSS_KEY}.perceptual", PERCEPTUAL_KINDS)
        require_text(v, f"{LOSS_KEY}.vgg_weights", optional=True)
        require_int(v, f"{LOSS_KEY}.disc_start", 0)
        require_int(v, f"{LOSS_KEY}.disc_channels", 1)
        require_int(v, f"{LOSS_KEY}.disc_layers", 1)
        if self.perceptual == "none" and self.perceptual_weight > 0:
            raise ConfigError(f"{LOSS_KEY}.perceptual_weight > 0 needs a perceptual network "
                              f"({LOSS_KEY}.perceptual=none given); set {LOSS_KEY}.perceptual_weight=0")

    @classmethod
    def from_dict(cls, d: Any) -> LossConfig:
        """Build from a (Hydra) dict; an unknown key is a ``ConfigError`` naming it."""
        return build_strict(cls, d, LOSS_KEY)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def non_saturating_g_loss(logits_fake: Tensor) -> Tensor:
    """-log sigmoid of each image's mean patch logit, averaged over the batch (the reference's form)."""
    per_image = logits_fake.float().flatten(1).mean(1)
    return F.softplus(-per_image).mean()


def lecam_reg(logits_real: Tensor, logits_fake: Tensor, ema_real: Tensor, ema_fake: Tensor) -> Tensor:
    """LeCAM: keep real logits from drifting above the fake EMA and fake logits below the real EMA."""
    return F.relu(logits_real - ema_fake).pow(2).mean() + F.relu(ema_real - logits_fake).pow(2).mean()


def adaptive_gan_weight(nll: Tensor, g_loss: Tensor, last_layer: Tensor, scale: float) -> Tensor:
    """VQGAN's balance: ratio of gradient norms of the two losses at the decoder's last layer."""
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach() * scale


class TokenizerLoss(nn.Module):
    """Holds the perceptual network and the LeCAM EMAs (buffers, so they are checkpointed)."""

    def __init__(self, cfg: LossConfig, perceptual: nn.Module | None) -> None:
        super().__init__()
        if cfg.perceptual_weight > 0 and perceptual is None:
            raise ConfigError(f"{LOSS_KEY}.perceptual_weight > 0 needs a perceptual network "
                              f"({LOSS_KEY}.perceptual={cfg.perceptual} built none)")
        self.cfg = cfg
        self.perceptual = perceptual
        self.register_buffer("lecam_ema_real", torch.zeros(()))
        self.register_buffer("lecam_ema_fake", torch.zeros(()))

    def lecam_state(self) -> dict[str, Tensor]:
        """The only training state here (the perceptual weights are fixed and not checkpointed)."""
        return {"lecam_ema_real": self.lecam_ema_real.clone(), "lecam_ema_fake": self.lecam_ema_fake.clone()}

    def gan_active(self, step: int) -> bool:
        return step >= self.cfg.disc_start and self.cfg.disc_factor > 0

    def autoencoder_loss(
        self,
        x: Tensor,
        recon: Tensor,
        q: QuantizerOutput,
        step: int,
        logits_fake: Tensor | None = None,
        last_layer: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Total autoencoder loss and its named, unweighted terms (plus the weights that vary)."""
        x, recon = x.float(), recon.float()
        l1 = (x - recon).abs().mean()
        nll = self.cfg.pixel_weight * l1
        terms = {"l1": l1}
        if self.perceptual is not None and self.cfg.perceptual_weight > 0:
            p = self.perceptual(x, recon).mean()
            nll = nll + self.cfg.perceptual_weight * p
            terms["perceptual"] = p
        total = nll + q.loss
        if logits_fake is not None and self.gan_active(step):
            g = non_saturating_g_loss(logits_fake)
            if self.cfg.gen_weight is None:
                weight = adaptive_gan_weight(nll, g, last_layer, self.cfg.disc_weight)
            else:
                weight = torch.tensor(self.cfg.gen_weight, device=g.device)
            total = total + weight * self.cfg.disc_factor * g
            terms.update(g_loss=g, g_weight=weight)
        terms.update({f"q_{k}": v for k, v in q.terms.items()})
        terms["nll"] = nll
        terms["total"] = total
        return total, terms

    def discriminator_loss(
        self, logits_real: Tensor, logits_fake: Tensor, mean_real: Tensor, mean_fake: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Hinge loss + LeCAM. ``mean_real/mean_fake`` are the batch-mean logits, averaged over all
        processes by the caller, so the EMAs stay identical on every process."""
        logits_real, logits_fake = logits_real.float(), logits_fake.float()
        hinge = hinge_d_loss(logits_real, logits_fake)
        total = self.cfg.disc_factor * hinge
        terms = {"d_hinge": hinge, "logits_real": logits_real.detach().mean(),
                 "logits_fake": logits_fake.detach().mean()}
        if self.cfg.lecam_weight > 0:
            decay = self.cfg.lecam_decay
            self.lecam_ema_real.mul_(decay).add_((1 - decay) * mean_real.detach().float())
            self.lecam_ema_fake.mul_(decay).add_((1 - decay) * mean_fake.detach().float())
            lecam = lecam_reg(logits_real, logits_fake, self.lecam_ema_real, self.lecam_ema_fake)
            total = total + self.cfg.disc_factor * self.cfg.lecam_weight * lecam
            terms["lecam"] = lecam
        terms["d_total"] = total
        return total, terms
