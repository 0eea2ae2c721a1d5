"""Sampling image tokens from a LlamaGPT: KV cache, classifier-free guidance, temperature, top-k, top-p.

With a KV cache the class token is prefilled once and every later step feeds one token. Without it
(``use_cache=False``) every step recomputes the whole prefix; the two give the same tokens (tested),
so the slow path is the reference for the fast one.

Classifier-free guidance runs the conditional and the null-class batch together (one doubled batch)
and mixes logits as ``u + s * (c - u)``. ``cfg_schedule="linear"`` ramps the scale from 1 at the first
token to ``cfg_scale`` at the last.

``compiled=True`` runs every step after the class token through ``torch.compile``d
``LlamaGPT.decode_step``: fixed shapes (the position is a tensor, attention reads the whole static cache
under a mask), so one graph serves every step; on CUDA it is replayed as a CUDA graph
(``mode="reduce-overhead"``). The compiled step and its caches (one per batch size) are kept per model,
so only the first call of a batch size compiles. Guidance and sampling stay eager: the draws are the
eager path's. Inductor may round float32 sums differently from eager (logits agree to ~1e-5), so the
tokens are the same unless a draw falls that close to a boundary; the tests check equality.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

from generator.llama import KVCache, LlamaGPT
from pipelines.errors import ConfigError  # a leaf module: the error class only

CFG_SCHEDULES = ("constant", "linear")


def cfg_scale_at(step: int, num_steps: int, cfg_scale: float, schedule: str) -> float:
    """Guidance scale for token ``step`` of ``num_steps``."""
    if schedule == "constant":
        return cfg_scale
    if schedule == "linear":
        return 1.0 + (cfg_scale - 1.0) * step / max(num_steps - 1, 1)
    raise ConfigError(f"cfg_schedule must be one of {', '.join(CFG_SCHEDULES)}, got {schedule!r}")


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Set logits outside the top-k and outside the smallest nucleus of mass >= top_p to -inf (keeps >= 1)."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum - sorted_logits.softmax(-1) >= top_p  # mass before this token already reaches top_p
        remove[..., 0] = False
        logits = logits.masked_fill(torch.zeros_like(remove).scatter(-1, order, remove), float("-inf"))
    return logits


def sample_token(logits: Tensor, temperature: float, top_k: int, top_p: float,
                 generator: torch.Generator | list[torch.Generator] | None) -> Tensor:
    """One token per row from (B, V) logits; temperature 0 means greedy (argmax).

    ``generator`` may be one generator for the batch or a list with one per row: then row i draws one uniform
    number from its own generator per token (inverse CDF), so a sample does not depend on its batch."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
    if not isinstance(generator, list | tuple):
        return torch.multinomial(probs, 1, generator=generator)[:, 0]
    u = torch.stack([torch.rand((), generator=g, device=probs.device, dtype=probs.dtype) for g in generator])
    cdf = probs.cumsum(-1)
    return (cdf < u[:, None] * cdf[:, -1:]).sum(-1).clamp_max(probs.shape[-1] - 1)


def _decode_step(model: LlamaGPT, tokens: Tensor, conditioning: list[Tensor | None], cache: list[KVCache],
                 pos: Tensor) -> Tensor:
    return model.decode_step(tokens, conditioning, cache, pos)


class CompiledDecoder:
    """One model's compiled decode step and its static KV caches, one per batch size, reused by later calls
    (the same cache tensors keep the compiled graph's guards, and CUDA graphs' addresses, valid)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        mode = "reduce-overhead" if device.type == "cuda" else None  # CUDA graphs need CUDA; CPU: default mode
        self.step = torch.compile(_decode_step, dynamic=False, mode=mode)
        self.caches: dict[tuple[int, torch.dtype], list[KVCache]] = {}

    def cache(self, model: LlamaGPT, batch: int) -> list[KVCache]:
        """The static cache for ``batch`` rows, zeroed (made, and marked as a static address, on first use)."""
        key = (batch, model.tok_embeddings.weight.dtype)
        cache = self.caches.get(key)
        if cache is None:
            cache = self.caches[key] = model.new_cache(batch)
            for layer in cache:
                for t in (layer.k, layer.v):
                    torch._dynamo.mark_static_address(t)
        for layer in cache:
            layer.k.zero_()
            layer.v.zero_()
        return cache


_DECODERS: weakref.WeakKeyDictionary[LlamaGPT, CompiledDecoder] = weakref.WeakKeyDictionary()


def compiled_decoder(model: LlamaGPT) -> CompiledDecoder:
    """The model's ``CompiledDecoder``, made on first use or when the model moved to another device (compilation
    itself happens at the first step)."""
    device = model.tok_embeddings.weight.device
    decoder = _DECODERS.get(model)
    if decoder is None or decoder.device != device:
        decoder = _DECODERS[model] = CompiledDecoder(device)
    return decoder


@torch.no_grad()
def generate(model: LlamaGPT, labels: Tensor, cfg_scale: float = 1.0, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, cfg_schedule: str = "constant",
             generator: torch.Generator | list[torch.Generator] | None = None,
             use_cache: bool = True, compiled: bool = False) -> Tensor:
    """Sample (B, h*w) token ids for class ``labels`` (B,).

    Guidance (the doubled batch) is used when ``cfg_scale != 1`` or the schedule is not constant.
    ``generator`` seeds the draws (on the model's device; one for the batch or one per row, see
    ``sample_token``); the same seed gives the same tokens with and without the cache, and ``compiled``
    (a compiled fixed-shape decode step, see the module docstring; needs the cache).
    """
    cfg_scale_at(0, 1, cfg_scale, cfg_schedule)  # validates the schedule name
    if compiled and not use_cache:
        raise ConfigError("compile=true needs use_cache=true (the compiled step decodes into the KV cache)")
    was_training = model.training
    model.eval()
    device = model.tok_embeddings.weight.device
    labels = labels.to(device)
    B, L = labels.shape[0], model.cfg.block_size
    guided = cfg_scale != 1.0 or cfg_schedule != "constant"
    run_labels = torch.cat([labels, torch.full_like(labels, model.null_class)]) if guided else labels
    out = torch.empty(B, L, dtype=torch.long, device=device)
    cache = model.new_cache(run_labels.shape[0]) if use_cache and not compiled else None
    if compiled:
        decoder = compiled_decoder(model)
        cache = decoder.cache(model, run_labels.shape[0])
        positions = [torch.full((1,), t, dtype=torch.long, device=device) for t in range(L)]  # one tensor per step
        conditioning = model.conditioning(run_labels)  # the AdaLN projections, once for all steps

    for t in range(L):
        if cache is None:
            prefix = torch.cat([out[:, :t], out[:, :1]], dim=1)  # the last column is a dummy the model ignores
            prefix = torch.cat([prefix, prefix]) if guided else prefix
            logits = model(prefix, run_labels)[:, t]
        elif t == 0:
            logits = model(None, run_labels, cache=cache, start_pos=0)[:, 0]  # prefill: eager, also when compiled
        elif compiled:
            prev = out[:, t - 1:t].clone()  # contiguous, no storage offset: the same input layout at every step
            logits = decoder.step(model, torch.cat([prev, prev]) if guided else prev, conditioning, cache,
                                  positions[t])
        else:
            prev = out[:, t - 1:t]
            logits = model(torch.cat([prev, prev]) if guided else prev, run_labels, cache=cache, start_pos=t)[:, 0]
        if guided:
            cond, uncond = logits.chunk(2)
            logits = uncond + cfg_scale_at(t, L, cfg_scale, cfg_schedule) * (cond - uncond)
        out[:, t] = sample_token(logits, temperature, top_k, top_p, generator)
    model.train(was_training)
    return out
