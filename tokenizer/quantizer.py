"""Quantizers: IBQ (Index Backpropagation Quantization) and a plain nearest-neighbour VQ baseline.

Both map encoder latents ``z`` (B, D, h, w) to quantized latents of the same shape plus integer
indices (B, h, w), and report named loss terms and codebook statistics, so training code treats
them the same. See docs/design.md for the method.

IBQ in one line: ``logits = z . E^T``, ``soft = softmax(logits)``, ``idx = argmax(logits)`` and a
straight-through estimator on the *index distribution* (one-hot minus stop-gradient softmax plus
softmax), so the forward value is exactly ``E[idx]`` while every code receives gradient.

At N = 2^18 codes the textbook computation holds several (positions x N) float tensors (logits,
softmax, their gradients: gigabytes per batch). ``IBQuantizer(impl="tiled")`` computes the same
values and gradients with a custom autograd function that sweeps the codebook in tiles with an
online log-sum-exp and recomputes the logits in backward (see ``_TiledIBQ``); ``impl="auto"``
(the default) picks it from ``TILED_MIN_CODES`` codes on.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from pipelines.errors import ConfigError  # leaf modules: the error class and the option checks only
from pipelines.options import build_strict, fields_of, require_bool, require_choice, require_int, require_number

ENTROPY_EPS = 1e-10  # guards log(0) in the exact batch-average entropy when a code's mean probability underflows
# The official IBQ code (like MAGVIT-2's) computes the batch-average entropy as -sum(p * log(p + 1e-5)).
# It is not a guard only: at 2^18 codes the mean code probability (~4e-6) is below 1e-5, so the term and its
# gradient (-(log(p + eps) + p / (p + eps)) instead of -(log p + 1)) differ exactly where utilisation matters.
# ``IBQuantizer(entropy_eps=...)`` defaults to this official form; 0 selects the exact entropy.
OFFICIAL_ENTROPY_EPS = 1e-5


@dataclass
class QuantizerOutput:
    """What a quantizer returns. ``loss`` is the weighted total to add to the training objective."""

    z_q: Tensor
    indices: Tensor
    loss: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)  # unweighted named loss terms
    stats: dict[str, Tensor] = field(default_factory=dict)  # detached diagnostics


@runtime_checkable
class Quantizer(Protocol):
    """What the tokenizer and the trainers rely on; a new quantizer (e.g. LFQ) implements this and registers in
    ``QUANTIZERS``. Latents are (B, D, h, w), indices (B, h, w)."""

    num_codes: int

    def __call__(self, z: Tensor) -> QuantizerOutput: ...  # forward: training path with losses

    def encode_indices(self, z: Tensor) -> Tensor: ...  # inference: latents -> ids

    def lookup(self, indices: Tensor) -> Tensor: ...  # ids -> quantized latents (B, D, h, w)

    def codebook_parameters(self) -> Iterator[nn.Parameter]: ...  # for a separate lr (may be empty)


def _upcast(x: Tensor) -> Tensor:
    """At least float32: half precision is raised, float64 (gradcheck) is kept."""
    return x if x.dtype == torch.float64 else x.float()


def _no_autocast(x: Tensor) -> contextlib.AbstractContextManager:
    """Autocast off on x's device: the quantizer computes in float32 (T = 0.01 logits need it)."""
    if torch.amp.is_autocast_available(x.device.type):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()  # e.g. the meta device


def _flatten(z: Tensor) -> Tensor:
    """(B, D, h, w) -> (B*h*w, D), positions in raster order per image."""
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


def _unflatten(flat: Tensor, like: Tensor) -> Tensor:
    b, d, h, w = like.shape
    return flat.reshape(b, h, w, d).permute(0, 3, 1, 2)


def entropy(p: Tensor, dim: int = -1) -> Tensor:
    """Shannon entropy (nats) of probability vectors along ``dim``; zero-probability entries add 0."""
    return -(p * torch.log(p.clamp_min(ENTROPY_EPS))).sum(dim)


def batch_entropy(pbar: Tensor, eps: float = OFFICIAL_ENTROPY_EPS) -> Tensor:
    """Entropy of the batch-average distribution: ``-sum(p log(p + eps))``, or the exact entropy when eps == 0."""
    if eps > 0:
        return -(pbar * torch.log(pbar + eps)).sum(-1)
    return entropy(pbar)


def entropy_loss_terms(logits: Tensor, temperature: float,
                       eps: float = OFFICIAL_ENTROPY_EPS) -> tuple[Tensor, Tensor]:
    """Per-position entropy (mean over positions) and entropy of the batch-average distribution.

    ``logits`` is (M, N). Computed in float32 whatever the autocast dtype: at T = 0.01 the
    scaled logits span thousands, which half precision cannot hold. ``eps`` enters the batch term
    only (see ``OFFICIAL_ENTROPY_EPS``); the official per-position term adds it inside log_softmax,
    where it cancels, so that term is exact in both.
    """
    scaled = _upcast(logits) / temperature
    log_p = F.log_softmax(scaled, dim=-1)
    p = log_p.exp()
    sample_entropy = -(p * log_p).sum(-1).mean()
    avg_entropy = batch_entropy(p.mean(0), eps)
    return sample_entropy, avg_entropy


def code_counts(indices: Tensor, num_codes: int) -> Tensor:
    """How often each code occurs in ``indices``: float32 (num_codes,) on their device.

    Not ``torch.bincount``: its output size depends on the data, so on a GPU it reads the maximum back to the
    host, a sync in every training step. Counts are integers, exact in float32 up to 2^24 per code.
    """
    flat = indices.reshape(-1)
    ones = torch.ones(flat.shape, device=flat.device)
    return torch.zeros(num_codes, device=flat.device).index_add_(0, flat, ones)


def codebook_stats(indices: Tensor, num_codes: int) -> dict[str, Tensor]:
    """Fraction of codes used in this batch and the perplexity of the index histogram."""
    counts = code_counts(indices, num_codes)
    probs = counts / counts.sum()
    return {
        "usage": (counts > 0).float().mean(),
        "perplexity": torch.exp(entropy(probs)),
    }


# ---------------------------------------------------------------------------------------------
# Tiled IBQ: the same values and gradients without any (positions x codes) tensor.
#
# Notation (flattened position i, code n): l = z E^T, p = softmax(l) (straight-through softmax),
# a = l / T, q = softmax(a) (entropy softmax), pbar = mean_i q_i, B = H(pbar), g = dB/dpbar.
# Forward, two sweeps over code tiles (a tile is at most pos_tile x code_tile logits):
#   1. running max m / argmax of l and the entropy softmax's normaliser sum exp((l - m) / T),
#      rescaled whenever the running max grows (online log-sum-exp);
#   2. with the final m and normaliser: H_i = -sum_n q log q, the tile's column of pbar and, for
#      backward, sum exp(l - m) (p's normaliser), s = p E (soft codes) and c_i = sum_n q_in g_n,
#      since g_n is known as soon as the tile's pbar column is complete (every position seen).
# Backward, one sweep that recomputes l and forms the tile's whole logit gradient
#   dl = p (G E^T - <G, s_i>)                          z_q = E[idx] + p sg(E) - sg(p E), G = dL/dz_q
#      + gS / (M T) * (-q (log q + H_i))                sample entropy  mean_i H(q_i)
#      + gB / (M T) * q (g_n - c_i)                     batch entropy   H(pbar)
# then dz += dl E_t and dE_t += dl^T z. The hard lookup E[idx] (z_q's value and the codebook loss
# term) scatters its gradient with one index_add, so backward holds a single (N, D) buffer.
# Cost: 7 (M x tile x D) matmul sweeps against the naive 5 (two logit recomputations), but every
# elementwise pass stays on a tile instead of gigabyte tensors; see bench/quantizer.py.
# ---------------------------------------------------------------------------------------------

IMPLS = ("naive", "tiled", "auto")
TILED_MIN_CODES = 8192  # impl="auto" uses the tiled kernel from this codebook size on
# Exponents are raised to this floor before exp: exp(-87) < 2e-38, so no sum moves, but CPU's
# vectorised exp takes a ~10x slower path for arguments whose result would be subnormal or zero,
# and at T = 0.01 almost every argument is like that.
EXP_FLOOR = -87.0


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 stays float64 (gradcheck); fp16 / bf16 / fp32 inputs are computed in float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _tiles(total: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(start + size, total)) for start in range(0, total, size)]


class _Scratch:
    """Tile buffers allocated once per call and handed out as contiguous (rows, cols) views.

    Allocating tens of MB per tile makes the CPU allocator map and fault fresh pages every time,
    which costs about as much as the arithmetic; reusing one buffer per role keeps them hot.
    """

    def __init__(self, count: int, numel: int, like: Tensor, dtype: torch.dtype) -> None:
        self.bufs = [torch.empty(numel, device=like.device, dtype=dtype) for _ in range(count)]

    def views(self, *shapes: tuple[int, int]) -> list[Tensor]:
        """One (rows, cols) view per shape, of the buffers in order."""
        return [b[: r * c].view(r, c) for b, (r, c) in zip(self.bufs, shapes, strict=False)]


def _batch_entropy_grad(pbar: Tensor, eps: float) -> Tensor:
    """d/dpbar of ``batch_entropy(pbar, eps)`` exactly as autograd differentiates it (the clamp too when eps == 0)."""
    if eps > 0:
        shifted = pbar + eps
        return -(shifted.log() + pbar / shifted)
    return -(pbar.clamp_min(ENTROPY_EPS).log() + (pbar >= ENTROPY_EPS).to(pbar.dtype))


@torch.no_grad()
def tiled_argmax(z_flat: Tensor, codebook: Tensor, code_tile: int = 4096, pos_tile: int = 8192) -> Tensor:
    """argmax_n z_i . E_n for every row of ``z_flat`` holding at most pos_tile x code_tile logits.

    Ties go to the lowest code index, as ``Tensor.argmax`` on the full logits does.
    """
    dtype = _compute_dtype(z_flat, codebook)
    z, codes = z_flat.to(dtype), codebook.to(dtype)
    m, n = z.shape[0], codes.shape[0]
    best = torch.full((m,), -torch.inf, device=z.device, dtype=dtype)
    idx = torch.zeros(m, device=z.device, dtype=torch.long)
    scratch = _Scratch(1, min(pos_tile, m) * min(code_tile, n), z, dtype)
    for n0, n1 in _tiles(n, code_tile):
        for i0, i1 in _tiles(m, pos_tile):
            (logits,) = scratch.views((i1 - i0, n1 - n0))
            tile_max, tile_arg = torch.matmul(z[i0:i1], codes[n0:n1].t(), out=logits).max(1)
            better = tile_max > best[i0:i1]  # strict: a tie in a later tile keeps the earlier code
            best[i0:i1] = torch.where(better, tile_max, best[i0:i1])
            idx[i0:i1] = torch.where(better, tile_arg + n0, idx[i0:i1])
    return idx


class _TiledIBQ(torch.autograd.Function):
    """(z_flat (M, D), codebook (N, D)) -> z_q, E[idx], mean_i H(q_i), H(pbar), idx; see the notes above.

    z_q and E[idx] have the same value; they are separate outputs because their gradients differ
    (z_q's also flows through the softmax). Only per-position and per-code vectors are saved.
    Tile ops work in place on buffers allocated once per call, and elementwise passes are counted:
    on CPU each one over a tile costs a tenth of a matmul sweep.
    """

    @staticmethod
    def forward(ctx, z_flat: Tensor, codebook: Tensor, temperature: float, code_tile: int, pos_tile: int,
                need_grad: bool = True, entropy_eps: float = OFFICIAL_ENTROPY_EPS):
        dtype = _compute_dtype(z_flat, codebook)
        z, codes = z_flat.detach().to(dtype), codebook.detach().to(dtype)
        (m, d), n, t = z.shape, codes.shape[0], temperature
        code_tiles, pos_tiles = _tiles(n, code_tile), _tiles(m, pos_tile)
        scratch = _Scratch(2, min(pos_tile, m) * min(code_tile, n), z, dtype)

        def zeros(*shape: int) -> Tensor:
            return torch.zeros(shape, device=z.device, dtype=dtype)

        # Sweep 1: running max / argmax and the entropy softmax's normaliser (online log-sum-exp).
        row_max = torch.full((m,), -torch.inf, device=z.device, dtype=dtype)
        idx = torch.zeros(m, device=z.device, dtype=torch.long)
        sum_q = zeros(m)
        for n0, n1 in code_tiles:
            for i0, i1 in pos_tiles:
                logits, buf = scratch.views((i1 - i0, n1 - n0), (i1 - i0, n1 - n0))
                torch.matmul(z[i0:i1], codes[n0:n1].t(), out=logits)
                tile_max, tile_arg = logits.max(1)
                old = row_max[i0:i1]
                idx[i0:i1] = torch.where(tile_max > old, tile_arg + n0, idx[i0:i1])  # ties keep the lower code
                new = torch.maximum(old, tile_max)
                tile_sum = torch.sub(logits, new[:, None], out=buf).div_(t).clamp_min_(EXP_FLOOR).exp_().sum(1)
                sum_q[i0:i1] = sum_q[i0:i1] * ((old - new) / t).exp() + tile_sum
                row_max[i0:i1] = new
        log_sum_q = sum_q.log()  # log q = (l - max) / T - log_sum_q

        # Sweep 2 (final max known): per-position entropy, batch-average probabilities and, for
        # backward only, the straight-through softmax's normaliser, the soft codes and c (fused here
        # when a tile holds every position, since the tile's pbar column is then complete).
        sum_p, soft_codes, sample_ent, pbar_sum, c = zeros(m), zeros(m, d), zeros(m), zeros(n), zeros(m)
        fused_c = need_grad and len(pos_tiles) == 1
        ones = torch.ones(min(pos_tile, m), device=z.device, dtype=dtype)
        for n0, n1 in code_tiles:
            for i0, i1 in pos_tiles:
                logits, buf = scratch.views((i1 - i0, n1 - n0), (i1 - i0, n1 - n0))
                shifted = torch.matmul(z[i0:i1], codes[n0:n1].t(), out=logits).sub_(row_max[i0:i1, None])
                if need_grad:
                    e = torch.clamp(shifted, min=EXP_FLOOR, out=buf).exp_()  # unnormalised p
                    sum_p[i0:i1] += e.sum(1)
                    soft_codes[i0:i1].addmm_(e, codes[n0:n1])
                log_q = shifted.div_(t).sub_(log_sum_q[i0:i1, None])
                q = torch.clamp(log_q, min=EXP_FLOOR, out=buf).exp_()
                pbar_sum[n0:n1] += ones[: i1 - i0] @ q  # column sums; BLAS is faster than sum(0)
                if fused_c:
                    c += q @ _batch_entropy_grad(pbar_sum[n0:n1] / m, entropy_eps)
                sample_ent[i0:i1] -= log_q.mul_(q).sum(1)
        if need_grad:
            soft_codes /= sum_p[:, None]
        pbar = pbar_sum / m
        g = _batch_entropy_grad(pbar, entropy_eps)
        if need_grad and not fused_c:  # positions were split: one more sweep for c_i = sum_n q_in g_n
            for n0, n1 in code_tiles:
                for i0, i1 in pos_tiles:
                    (logits,) = scratch.views((i1 - i0, n1 - n0))
                    log_q = torch.matmul(z[i0:i1], codes[n0:n1].t(), out=logits).sub_(row_max[i0:i1, None])
                    c[i0:i1] += log_q.div_(t).sub_(log_sum_q[i0:i1, None]).clamp_min_(EXP_FLOOR).exp_() @ g[n0:n1]

        hard = codebook.detach()[idx]
        ctx.mark_non_differentiable(idx)
        ctx.save_for_backward(z_flat, codebook, idx, row_max, sum_p, log_sum_q, sample_ent, c, g, soft_codes)
        ctx.temperature, ctx.code_tile, ctx.pos_tile = t, code_tile, pos_tile
        return hard.clone(), hard, sample_ent.mean(), batch_entropy(pbar, entropy_eps), idx

    @staticmethod
    @once_differentiable
    def backward(ctx, g_zq: Tensor, g_hard: Tensor, g_sample: Tensor, g_batch: Tensor, _g_idx: Tensor):
        z_flat, codebook, idx, row_max, sum_p, log_sum_q, sample_ent, c, g, soft_codes = ctx.saved_tensors
        need_z, need_e = ctx.needs_input_grad[:2]
        with _no_autocast(z_flat):
            dtype = _compute_dtype(z_flat, codebook)
            z, codes = z_flat.to(dtype), codebook.to(dtype)
            m, n, t = z.shape[0], codes.shape[0], ctx.temperature
            g_zq, g_sample, g_batch = g_zq.to(dtype), g_sample.to(dtype), g_batch.to(dtype)
            # Straight-through softmax: dl = p * (G E^T - <G, s>) with p = e / sum_p, e = exp(l - max);
            # 1 / sum_p is folded into G so that the tile only needs e.
            g_scaled = g_zq / sum_p[:, None]
            g_soft_bar = (g_scaled * soft_codes).sum(1)
            # Entropy terms: dl += q * X / (M T), X = -gS (log q + H_i) + gB (g_n - c_i) with
            # log q = (l - max) / T - log_sum_q, i.e. X = -gS / T * (l - max) + row_i + col_n.
            row_term = g_sample * (log_sum_q - sample_ent) - g_batch * c
            col_term = g_batch * g
            scale = -g_sample / t
            dz = torch.zeros_like(z) if need_z else None
            # The straight-through part's row sums, 0 in exact arithmetic. <G, s_i> is one dot product while the
            # tiles' G E_n come from matmuls, so each dl_in carries e_in * (the two roundings' difference), the
            # same for the whole row: with (near-)tied codes the true dl is ~0 and dz = dl E would be that
            # difference times sum_n e_n E_n = sum_p s_i (measured: 4e-4 relative with two tied codes against 1e-7
            # untiled, where softmax's backward subtracts the mean of the very values it has). Removed after the
            # sweeps: dz_i -= soft_row_sum_i * s_i.
            soft_row_sum = torch.zeros(m, device=z.device, dtype=dtype)
            de = torch.zeros_like(codes) if need_e else None
            scratch = _Scratch(3, min(ctx.pos_tile, m) * min(ctx.code_tile, n), z, dtype)
            for n0, n1 in _tiles(n, ctx.code_tile):
                for i0, i1 in _tiles(m, ctx.pos_tile):
                    logits, dl, buf = scratch.views(*[(i1 - i0, n1 - n0)] * 3)
                    # The logits exactly as forward made them (same operands, shapes and output layout): one
                    # matmul of other shape (e.g. z stacked with G) rounds differently, and at T = 0.01 an ulp
                    # of |l| ~ 3e4 is a factor e^0.2 in q, i.e. a wrong entropy gradient.
                    shifted = torch.matmul(z[i0:i1], codes[n0:n1].t(), out=logits).sub_(row_max[i0:i1, None])
                    torch.matmul(g_scaled[i0:i1], codes[n0:n1].t(), out=dl)
                    dl.sub_(g_soft_bar[i0:i1, None]).mul_(torch.clamp(shifted, min=EXP_FLOOR, out=buf).exp_())
                    if need_z:
                        soft_row_sum[i0:i1] += dl.sum(1)
                    q = torch.div(shifted, t, out=buf).sub_(log_sum_q[i0:i1, None]).clamp_min_(EXP_FLOOR).exp_()
                    x = shifted.mul_(scale).add_(row_term[i0:i1, None]).add_(col_term[None, n0:n1])
                    dl.addcmul_(x, q, value=1.0 / (m * t))
                    if need_z:
                        dz[i0:i1].addmm_(dl, codes[n0:n1])
                    if need_e:
                        de[n0:n1].addmm_(dl.t(), z[i0:i1])
            if need_z:
                dz.sub_(soft_row_sum[:, None] * soft_codes)
            if need_e:
                de.index_add_(0, idx, g_zq + g_hard.to(dtype))
        return (dz.to(z_flat.dtype) if need_z else None, de.to(codebook.dtype) if need_e else None,
                None, None, None, None, None)


QUANTIZER_ARGS = "tokenizer.model.quantizer_args"  # where a quantizer's options sit in the tokenizer config


@dataclass
class IBQConfig:
    """IBQ's options (``tokenizer.model.quantizer_args`` with ``quantizer: ibq``); defaults = the official code's."""

    beta: float = 0.25  # weight of the codebook term (or of the commitment term: beta_on_codebook=false)
    beta_on_codebook: bool = True  # the reference code; false = the paper's equation
    quant_weight: float = 1.0
    entropy_weight: float = 0.05
    entropy_temperature: float = 0.01
    sample_entropy_weight: float = 1.0
    batch_entropy_weight: float = 1.0
    entropy_eps: float = OFFICIAL_ENTROPY_EPS  # 0 = the exact batch entropy
    init_std: float = 1.0  # codebook N(0, init_std^2)
    impl: str = "auto"  # naive | tiled | auto (tiled from TILED_MIN_CODES codes on): same values and gradients
    code_tile: int = 4096  # codes per tile of the tiled kernel
    pos_tile: int = 8192  # positions per tile

    def __post_init__(self) -> None:
        v = fields_of(self, QUANTIZER_ARGS)
        for name in ("beta", "quant_weight", "entropy_weight", "sample_entropy_weight", "batch_entropy_weight",
                     "entropy_eps"):
            require_number(v, f"{QUANTIZER_ARGS}.{name}", 0)
        for name in ("entropy_temperature", "init_std"):
            require_number(v, f"{QUANTIZER_ARGS}.{name}", 0, low_open=True)
        require_bool(v, f"{QUANTIZER_ARGS}.beta_on_codebook")
        require_choice(v, f"{QUANTIZER_ARGS}.impl", IMPLS)
        require_int(v, f"{QUANTIZER_ARGS}.code_tile", 1)
        require_int(v, f"{QUANTIZER_ARGS}.pos_tile", 1)
        self.entropy_eps, self.init_std = float(self.entropy_eps), float(self.init_std)


@dataclass
class VQConfig:
    """The VQ baseline's options (``quantizer: vq``)."""

    beta: float = 0.25  # weight of the commitment term
    quant_weight: float = 1.0
    l2_norm: bool = False  # LlamaGen's VQ: latents and codes l2-normalised

    def __post_init__(self) -> None:
        v = fields_of(self, QUANTIZER_ARGS)
        require_number(v, f"{QUANTIZER_ARGS}.beta", 0)
        require_number(v, f"{QUANTIZER_ARGS}.quant_weight", 0)
        require_bool(v, f"{QUANTIZER_ARGS}.l2_norm")


def _options(cls: type, cfg: Any, options: dict[str, Any]) -> Any:
    """``cfg`` (default ``cls()``) with single fields replaced by keyword ``options`` (checked as config keys)."""
    cfg = cfg if cfg is not None else cls()
    return build_strict(cls, {**dataclasses.asdict(cfg), **options}, QUANTIZER_ARGS) if options else cfg


class IBQuantizer(nn.Module):
    """Index Backpropagation Quantizer.

    Loss (weights from config, defaults from the reference code):
      quant = mean((z_q - z)^2) + mean((sg(E[idx]) - z)^2) + beta * mean((E[idx] - sg(z))^2)
      entropy = sample_weight * mean_i H(p_i) - batch_weight * H(mean_i p_i),  p = softmax(logits / T)
      loss = quant_weight * quant + entropy_weight * entropy
    The batch term H(pbar) is -sum(pbar log(pbar + entropy_eps)) as in the official code (``entropy_eps=0``:
    the exact entropy; see ``OFFICIAL_ENTROPY_EPS``).
    ``beta_on_codebook=False`` moves beta to the commitment term, as the paper's equation writes it.
    ``init_std``: the codebook starts N(0, init_std^2) (reference: 1). The paper leaves the scale open; it
    matters when the encoder's outputs are much shorter than sqrt(dim) (see docs/design.md, "codebook scale").
    ``impl``: "naive" builds the (positions x N) logits; "tiled" computes the same values and
    gradients in code_tile x pos_tile blocks (memory independent of N); "auto" = tiled from
    ``TILED_MIN_CODES`` codes on. The quantizer always runs in float32, also under autocast.
    """

    def __init__(self, num_codes: int, dim: int, cfg: IBQConfig | None = None, **options: Any) -> None:
        """``cfg`` holds the options (``IBQConfig``); keyword ``options`` replace single fields of it."""
        super().__init__()
        self.cfg = cfg = _options(IBQConfig, cfg, options)
        self.num_codes, self.dim = num_codes, dim
        self.beta, self.beta_on_codebook = cfg.beta, cfg.beta_on_codebook
        self.quant_weight, self.entropy_weight = cfg.quant_weight, cfg.entropy_weight
        self.entropy_temperature, self.entropy_eps = cfg.entropy_temperature, cfg.entropy_eps
        self.sample_entropy_weight, self.batch_entropy_weight = cfg.sample_entropy_weight, cfg.batch_entropy_weight
        self.impl, self.code_tile, self.pos_tile = cfg.impl, cfg.code_tile, cfg.pos_tile
        self.embedding = nn.Embedding(num_codes, dim)  # N(0, 1) init, as the reference
        if cfg.init_std != 1.0:  # scaled rather than redrawn: the same seed gives the same codes' directions
            with torch.no_grad():
                self.embedding.weight.mul_(cfg.init_std)

    @property
    def tiled(self) -> bool:
        """Whether forward / encode_indices use the tiled kernel (resolves impl="auto")."""
        return self.impl == "tiled" or (self.impl == "auto" and self.num_codes >= TILED_MIN_CODES)

    def extra_repr(self) -> str:
        return f"num_codes={self.num_codes}, dim={self.dim}, impl={self.impl} (tiled={self.tiled})"

    def logits(self, z_flat: Tensor) -> Tensor:
        """Plain dot products between positions and codes, accumulated in float32."""
        with _no_autocast(z_flat):
            return _upcast(z_flat) @ _upcast(self.embedding.weight).t()

    def _naive(self, z_flat: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """z_q, E[idx], idx, sample entropy, batch entropy from the full (M, N) logits."""
        codebook = self.embedding.weight
        logits = self.logits(z_flat)
        soft = logits.softmax(-1)
        idx = logits.argmax(-1)
        hard_codes = codebook[idx]
        # Straight-through on the index distribution without building the one-hot:
        # onehot @ E == E[idx] + soft @ sg(E) - sg(soft @ E) in value and in every gradient.
        # E itself must be stop-gradient inside ``soft @ E``: the one-hot's *value* is hard, so the
        # codebook only gets hard^T g from z_q (plus what flows back through the logits).
        soft_codes = soft @ _upcast(codebook.detach())
        zq_flat = hard_codes + (soft_codes - soft_codes.detach()).to(hard_codes.dtype)
        sample_h, batch_h = entropy_loss_terms(logits, self.entropy_temperature, self.entropy_eps)
        return zq_flat, hard_codes, idx, sample_h, batch_h

    def _tiled(self, z_flat: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        codebook = self.embedding.weight
        # Under no_grad (evaluation) the sweeps skip what only backward needs.
        need_grad = torch.is_grad_enabled() and (z_flat.requires_grad or codebook.requires_grad)
        zq_flat, hard_codes, sample_h, batch_h, idx = _TiledIBQ.apply(
            z_flat, codebook, self.entropy_temperature, self.code_tile, self.pos_tile, need_grad, self.entropy_eps)
        return zq_flat, hard_codes, idx, sample_h, batch_h

    def forward(self, z: Tensor) -> QuantizerOutput:
        with _no_autocast(z):
            z_flat = _flatten(z)
            zq_flat, hard_codes, idx, sample_h, batch_h = (self._tiled if self.tiled else self._naive)(z_flat)

            z32, zq32, hard32 = _upcast(z_flat), _upcast(zq_flat), _upcast(hard_codes)
            st = F.mse_loss(zq32, z32)
            commitment = F.mse_loss(hard32.detach(), z32)
            codebook_term = F.mse_loss(hard32, z32.detach())
            if self.beta_on_codebook:
                quant = st + commitment + self.beta * codebook_term
            else:
                quant = st + self.beta * commitment + codebook_term
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
        """Token ids (B, h, w) for inference: argmax of the logits (tiled over codes when ``tiled``)."""
        z_flat = _flatten(z)
        if self.tiled:
            with _no_autocast(z):
                idx = tiled_argmax(z_flat, self.embedding.weight, self.code_tile, self.pos_tile)
        else:
            idx = self.logits(z_flat).argmax(-1)
        return idx.reshape(z.shape[0], z.shape[2], z.shape[3])

    def lookup(self, indices: Tensor) -> Tensor:
        """Token ids (B, h, w) -> quantized latents (B, D, h, w) for decoding."""
        return self.embedding(indices).permute(0, 3, 1, 2)

    def codebook_parameters(self) -> Iterator[nn.Parameter]:
        yield self.embedding.weight


class VectorQuantizer(nn.Module):
    """Plain VQ baseline: nearest code by L2 distance, straight-through on the latent.

    loss = mean((E[idx] - sg(z))^2) + beta * mean((sg(E[idx]) - z)^2). Only selected codes get
    gradient, which is exactly what IBQ changes; keeping both behind one interface makes the
    comparison a config switch.

    ``l2_norm=True`` is LlamaGen's VQ: latents and codes are l2-normalised (in training and inference)
    before the nearest-code search, the losses and the straight-through estimator, so z_q and
    ``lookup`` return unit-length codes.
    """

    def __init__(self, num_codes: int, dim: int, cfg: VQConfig | None = None, **options: Any) -> None:
        super().__init__()
        self.cfg = cfg = _options(VQConfig, cfg, options)
        beta, quant_weight, l2_norm = cfg.beta, cfg.quant_weight, cfg.l2_norm
        self.num_codes, self.dim = num_codes, dim
        self.beta, self.quant_weight, self.l2_norm = beta, quant_weight, bool(l2_norm)
        self.embedding = nn.Embedding(num_codes, dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / num_codes, 1.0 / num_codes)
        if self.l2_norm:
            with torch.no_grad():
                self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))

    def codes(self) -> Tensor:
        """The codebook as used: l2-normalised rows with ``l2_norm``."""
        return F.normalize(self.embedding.weight, dim=-1) if self.l2_norm else self.embedding.weight

    @staticmethod
    def _nearest(z_flat: Tensor, codes: Tensor) -> Tensor:
        """argmin_n |z - E_n|^2, the distance summed as the reference implementations do."""
        e, z32 = codes.float(), z_flat.float()
        dist = z32.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1)[None] - 2 * (z32 @ e.t())
        return dist.argmin(-1)

    def forward(self, z: Tensor) -> QuantizerOutput:
        z_flat = _flatten(z)
        codes = self.codes()
        if self.l2_norm:
            z_flat = F.normalize(z_flat, dim=-1)
        idx = self._nearest(z_flat.detach(), codes.detach())
        hard = codes[idx]
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
        z_flat = F.normalize(_flatten(z), dim=-1) if self.l2_norm else _flatten(z)
        return self._nearest(z_flat, self.codes()).reshape(z.shape[0], z.shape[2], z.shape[3])

    def lookup(self, indices: Tensor) -> Tensor:
        return self.codes()[indices].permute(0, 3, 1, 2)

    def codebook_parameters(self) -> Iterator[nn.Parameter]:
        yield self.embedding.weight


# name -> (module, its options dataclass)
QUANTIZERS: dict[str, tuple[type[nn.Module], type]] = {"ibq": (IBQuantizer, IBQConfig),
                                                       "vq": (VectorQuantizer, VQConfig)}


def quantizer_config(kind: str, args: Any = None) -> IBQConfig | VQConfig:
    """The options of quantizer ``kind`` from ``quantizer_args``; an unknown kind, an option the quantizer does not
    take or a bad value is a ``ConfigError`` naming the key."""
    if kind not in QUANTIZERS:
        raise ConfigError(f"tokenizer.model.quantizer must be one of {', '.join(sorted(QUANTIZERS))}, got {kind!r}")
    options = QUANTIZERS[kind][1]
    try:
        return build_strict(options, args, QUANTIZER_ARGS)
    except ConfigError as err:
        if "unknown option" not in str(err):
            raise
        raise ConfigError(f"quantizer {kind!r}: {err} (to switch quantizer, replace its arguments: "
                          f"{QUANTIZER_ARGS}=null '{QUANTIZER_ARGS}={{...}}')") from None


def build_quantizer(kind: str, num_codes: int, dim: int, args: Any = None) -> Quantizer:
    """Quantizer by config name; an argument the chosen quantizer does not take is an error, not dropped."""
    options = quantizer_config(kind, args)
    return QUANTIZERS[kind][0](num_codes, dim, options)
