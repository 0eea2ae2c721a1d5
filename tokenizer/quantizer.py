"""Quantizers: IBQ (Index Backpropagation Quantization) and a plain nearest-neighbour VQ baseline.

Both map encoder latents ``z`` (B, D, h, w) to quantized latents of the same shape plus integer
indices (B, h, w), and report named loss terms and codebook statistics, so training code treats
them the same. See DESIGN.md section 1 for the method.

IBQ in one line: ``logits = z . E^T``, ``soft = softmax(logits)``, ``idx = argmax(logits)`` and a
straight-through estimator on the *index distribution* (one-hot minus stop-gradient softmax plus
softmax), so the forward value is exactly ``E[idx]`` while every code receives gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ENTROPY_EPS = 1e-10  # guards log(0) in the batch-average entropy when a code's mean probability underflows


@dataclass
class QuantizerOutput:
    """What a quantizer returns. ``loss`` is the weighted total to add to the training objective."""

    z_q: Tensor
    indices: Tensor
    loss: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)  # unweighted named loss terms
    stats: dict[str, Tensor] = field(default_factory=dict)  # detached diagnostics


def _flatten(z: Tensor) -> Tensor:
    """(B, D, h, w) -> (B*h*w, D), positions in raster order per image."""
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


def _unflatten(flat: Tensor, like: Tensor) -> Tensor:
    b, d, h, w = like.shape
    return flat.reshape(b, h, w, d).permute(0, 3, 1, 2)


def entropy(p: Tensor, dim: int = -1) -> Tensor:
    """Shannon entropy (nats) of probability vectors along ``dim``; zero-probability entries add 0."""
    return -(p * torch.log(p.clamp_min(ENTROPY_EPS))).sum(dim)


def entropy_loss_terms(logits: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Per-position entropy (mean over positions) and entropy of the batch-average distribution.

    ``logits`` is (M, N). Computed in float32 whatever the autocast dtype: at T = 0.01 the
    scaled logits span thousands, which half precision cannot hold.
    """
    scaled = logits.float() / temperature
    log_p = F.log_softmax(scaled, dim=-1)
    p = log_p.exp()
    sample_entropy = -(p * log_p).sum(-1).mean()
    avg_entropy = entropy(p.mean(0))
    return sample_entropy, avg_entropy


def codebook_stats(indices: Tensor, num_codes: int) -> dict[str, Tensor]:
    """Fraction of codes used in this batch and the perplexity of the index histogram."""
    counts = torch.bincount(indices.reshape(-1), minlength=num_codes).float()
    probs = counts / counts.sum()
    return {
        "usage": (counts > 0).float().mean(),
        "perplexity": torch.exp(entropy(probs)),
    }


class IBQuantizer(nn.Module):
    """Index Backpropagation Quantizer.

    Loss (weights from config, defaults from the reference code):
      quant = mean((z_q - z)^2) + mean((sg(E[idx]) - z)^2) + beta * mean((E[idx] - sg(z))^2)
      entropy = sample_weight * mean_i H(p_i) - batch_weight * H(mean_i p_i),  p = softmax(logits / T)
      loss = quant_weight * quant + entropy_weight * entropy
    ``beta_on_codebook=False`` moves beta to the commitment term, as the paper's equation writes it.
    """

    def __init__(
        self,
        num_codes: int,
        dim: int,
        beta: float = 0.25,
        beta_on_codebook: bool = True,
        quant_weight: float = 1.0,
        entropy_weight: float = 0.05,
        entropy_temperature: float = 0.01,
        sample_entropy_weight: float = 1.0,
        batch_entropy_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.num_codes, self.dim = num_codes, dim
        self.beta, self.beta_on_codebook = beta, beta_on_codebook
        self.quant_weight, self.entropy_weight = quant_weight, entropy_weight
        self.entropy_temperature = entropy_temperature
        self.sample_entropy_weight, self.batch_entropy_weight = sample_entropy_weight, batch_entropy_weight
        self.embedding = nn.Embedding(num_codes, dim)  # N(0, 1) init, as the reference

    def logits(self, z_flat: Tensor) -> Tensor:
        """Plain dot products between positions and codes, accumulated in float32."""
        return z_flat.float() @ self.embedding.weight.float().t()

    def forward(self, z: Tensor) -> QuantizerOutput:
        z_flat = _flatten(z)
        codebook = self.embedding.weight
        logits = self.logits(z_flat)
        soft = logits.softmax(-1)
        idx = logits.argmax(-1)
        hard_codes = codebook[idx]
        # Straight-through on the index distribution without building the one-hot:
        # onehot @ E == E[idx] + soft @ sg(E) - sg(soft @ E) in value and in every gradient.
        # E itself must be stop-gradient inside ``soft @ E``: the one-hot's *value* is hard, so the
        # codebook only gets hard^T g from z_q (plus what flows back through the logits).
        soft_codes = soft @ codebook.detach().float()
        zq_flat = hard_codes + (soft_codes - soft_codes.detach()).to(hard_codes.dtype)

        z32, zq32, hard32 = z_flat.float(), zq_flat.float(), hard_codes.float()
        st = F.mse_loss(zq32, z32)
        commitment = F.mse_loss(hard32.detach(), z32)
        codebook_term = F.mse_loss(hard32, z32.detach())
        if self.beta_on_codebook:
            quant = st + commitment + self.beta * codebook_term
        else:
            quant = st + self.beta * commitment + codebook_term
        sample_h, batch_h = entropy_loss_terms(logits, self.entropy_temperature)
        entropy_loss = self.sample_entropy_weight * sample_h - self.batch_entropy_weight * batch_h
        loss = self.quant_weight * quant + self.entropy_weight * entropy_loss

        indices = idx.reshape(z.shape[0], z.shape[2], z.shape[3])
        terms = {
            "quant_st": st,
            "commitment": commitment,
            "codebook": codebook_term,
            "quant": quant,
            "sample_entropy": sample_h,
            "batch_entropy": batch_h,
            "entropy": entropy_loss,
        }
        return QuantizerOutput(
            z_q=_unflatten(zq_flat, z),
            indices=indices,
            loss=loss,
            terms=terms,
            stats=codebook_stats(indices.detach(), self.num_codes),
        )

    @torch.no_grad()
    def encode_indices(self, z: Tensor) -> Tensor:
        """Token ids (B, h, w) for inference: argmax of the logits, no losses."""
        idx = self.logits(_flatten(z)).argmax(-1)
        return idx.reshape(z.shape[0], z.shape[2], z.shape[3])

    def lookup(self, indices: Tensor) -> Tensor:
        """Token ids (B, h, w) -> quantized latents (B, D, h, w) for decoding."""
        return self.embedding(indices).permute(0, 3, 1, 2)


class VectorQuantizer(nn.Module):
    """Plain VQ baseline: nearest code by L2 distance, straight-through on the latent.

    loss = mean((E[idx] - sg(z))^2) + beta * mean((sg(E[idx]) - z)^2). Only selected codes get
    gradient, which is exactly what IBQ changes; keeping both behind one interface makes the
    comparison a config switch.
    """

    def __init__(self, num_codes: int, dim: int, beta: float = 0.25, quant_weight: float = 1.0) -> None:
        super().__init__()
        self.num_codes, self.dim = num_codes, dim
        self.beta, self.quant_weight = beta, quant_weight
        self.embedding = nn.Embedding(num_codes, dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / num_codes, 1.0 / num_codes)

    def _nearest(self, z_flat: Tensor) -> Tensor:
        e = self.embedding.weight.float()
        z32 = z_flat.float()
        dist = z32.pow(2).sum(1, keepdim=True) - 2 * z32 @ e.t() + e.pow(2).sum(1)[None]
        return dist.argmin(-1)

    def forward(self, z: Tensor) -> QuantizerOutput:
        z_flat = _flatten(z)
        idx = self._nearest(z_flat.detach())
        hard = self.embedding.weight[idx]
        zq_flat = z_flat + (hard - z_flat).detach()
        codebook_term = F.mse_loss(hard.float(), z_flat.detach().float())
        commitment = F.mse_loss(hard.detach().float(), z_flat.float())
        quant = codebook_term + self.beta * commitment
        indices = idx.reshape(z.shape[0], z.shape[2], z.shape[3])
        return QuantizerOutput(
            z_q=_unflatten(zq_flat, z),
            indices=indices,
            loss=self.quant_weight * quant,
            terms={"commitment": commitment, "codebook": codebook_term, "quant": quant},
            stats=codebook_stats(indices, self.num_codes),
        )

    @torch.no_grad()
    def encode_indices(self, z: Tensor) -> Tensor:
        return self._nearest(_flatten(z)).reshape(z.shape[0], z.shape[2], z.shape[3])

    def lookup(self, indices: Tensor) -> Tensor:
        return self.embedding(indices).permute(0, 3, 1, 2)


QUANTIZERS = {"ibq": IBQuantizer, "vq": VectorQuantizer}


def build_quantizer(kind: str, **kwargs) -> nn.Module:
    """Quantizer by config name (``ibq`` or ``vq``)."""
    if kind not in QUANTIZERS:
        raise ValueError(f"unknown quantizer {kind!r}; choose one of {sorted(QUANTIZERS)}")
    return QUANTIZERS[kind](**kwargs)
