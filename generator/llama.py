"""Class-conditional Llama-style transformer over an image's token grid (stage two), in one file.

Sequence layout (``L = h * w`` image tokens in raster order)::

    position   0        1      2            L-1
    input      [class]  t_0    t_1    ...   t_{L-2}
    predicts   t_0      t_1    t_2    ...   t_{L-1}

The class embedding is the prefix token and also conditions every block through AdaLN
(shift / scale / gate from SiLU -> Linear(d -> 6d)) and the output norm (``head_norm``: adaptive LayerNorm,
IBQ's adaptive RMSNorm, or LlamaGen's plain RMSNorm).
Label ``num_classes`` is the "null" class used for classifier-free guidance; in training labels are
replaced by it with probability ``class_dropout``. Positions use 2D rotary embeddings: half of each
head's channels rotate with the token's grid row, the other half with its column; the class token
is not rotated (``rope_cls=identity``) or, as in the official IBQ / LlamaGen models, its query and key are
zeroed (``rope_cls=zero``); attention scores between image tokens depend only on grid offsets.

Llama parts: RMSNorm, SwiGLU, no biases (the AdaLN projections keep DiT's bias), weights N(0, 0.02)
as LlamaGen, zero-initialised output head, gates of the per-block AdaLN start near zero (VAR/DiT).
Inference uses a preallocated KV cache (``new_cache`` + ``forward(..., cache=, start_pos=)``), and
``decode_step`` feeds one token at a position given as a tensor with every shape fixed, so that
``torch.compile`` builds one graph for all steps (``generator.sampling``, ``compile=True``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
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

# Norm before the output head:
#   adaln     - LayerNorm without affine (eps 1e-6), then x (1 + scale) + shift from the class embedding (VAR);
#   adaln_rms - RMSNorm with a learned weight (eps 1e-5), then x (1 + scale) + shift (IBQ's official model);
#   rms       - RMSNorm with a learned weight, nothing class-dependent (LlamaGen).
HEAD_NORMS = ("adaln", "adaln_rms", "rms")
# Rotary row of the class token: identity (angle 0: left as it is) or zero (cos = sin = 0: its query and key
# become zero, as in the LlamaGen / IBQ tables, so every position gives the class token the score 0).
ROPE_CLS = ("identity", "zero")


MODEL_KEY = "generator.model"  # where the architecture sits in a run's config
MANIFEST_KEYS = ("vocab_size", "num_classes", "grid")  # set from the token shards, not from conf/generator


@dataclass
class GPTConfig:
    """Architecture of one generator. Defaults are the official IBQ / LlamaGen-B choices: the one home of these
    values; conf/generator/*.yaml extend this schema (``pipelines.schemas``) and state only what differs."""

    vocab_size: int = 16384
    num_classes: int = 1000
    grid: tuple[int, int] = (16, 16)       # token grid (h, w); block_size = h * w
    dim: int = 1024
    n_layer: int = 16
    n_head: int = 16
    ffn_multiple_of: int = 256             # SwiGLU hidden = 8/3 * dim rounded up to this multiple
    ffn_hidden: int | None = None          # explicit SwiGLU hidden width (overrides the rule above)
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    class_dropout: float = 0.1             # label -> null class with this probability (training, for CFG)
    token_dropout: float = 0.1             # dropout on input embeddings (LlamaGen)
    resid_dropout: float = 0.1             # after the attention output projection
    ffn_dropout: float = 0.1               # after the SwiGLU output projection
    attn_dropout: float = 0.0
    adaln: bool = True                     # per-block AdaLN from the class embedding
    adaln_gate_init: float = 1e-3          # scale of the gate rows' initial weights (near-zero gates)
    init_std: float = 0.02
    head_norm: str = "adaln_rms"           # norm before the head: see HEAD_NORMS (IBQ's official model)
    rope_cls: str = "zero"                 # class token's rotary row: see ROPE_CLS (IBQ / LlamaGen)

    def __post_init__(self) -> None:
        v = fields_of(self, MODEL_KEY)
        for name in ("vocab_size", "num_classes", "dim", "n_layer", "n_head", "ffn_multiple_of"):
            require_int(v, f"{MODEL_KEY}.{name}", 1)
        require_int(v, f"{MODEL_KEY}.ffn_hidden", 1, optional=True)
        require_int_list(v, f"{MODEL_KEY}.grid", 1, length=2)
        for name in ("norm_eps", "rope_base", "init_std"):
            require_number(v, f"{MODEL_KEY}.{name}", 0, low_open=True)
        for name in ("class_dropout", "token_dropout", "resid_dropout", "ffn_dropout", "attn_dropout"):
            require_number(v, f"{MODEL_KEY}.{name}", 0, 1)
        require_number(v, f"{MODEL_KEY}.adaln_gate_init", 0)
        require_bool(v, f"{MODEL_KEY}.adaln")
        require_choice(v, f"{MODEL_KEY}.head_norm", HEAD_NORMS)
        require_choice(v, f"{MODEL_KEY}.rope_cls", ROPE_CLS)
        self.grid = tuple(int(g) for g in self.grid)  # type: ignore[assignment]
        if self.dim % self.n_head or (self.dim // self.n_head) % 4:
            raise ConfigError(f"{MODEL_KEY}.dim {self.dim} / {MODEL_KEY}.n_head {self.n_head} must give a whole head "
                              "size divisible by 4 (2D RoPE rotates pairs in two halves), e.g. dim = 64 * n_head")

    @property
    def block_size(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def hidden_dim(self) -> int:
        if self.ffn_hidden:
            return self.ffn_hidden
        m = self.ffn_multiple_of
        return m * math.ceil(8 * self.dim / 3 / m)

    @classmethod
    def from_dict(cls, d: Any) -> GPTConfig:
        """Build from a (Hydra) dict; an unknown key is a ``ConfigError`` naming it."""
        return build_strict(cls, d, MODEL_KEY)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["grid"] = list(self.grid)
        return d


# ----------------------------------------------------------------------------------------------- rope

def rope_2d(grid: tuple[int, int], head_dim: int, base: float = 10000.0, cls: str = "identity") -> Tensor:
    """(1 + h*w, head_dim/2, 2) cos/sin table: row 0 = class token (see ``ROPE_CLS``), then the grid in raster order.

    Channel pairs [0, head_dim/4) rotate with the row index, [head_dim/4, head_dim/2) with the column.
    """
    h, w = grid
    quarter = head_dim // 4
    freqs = 1.0 / base ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows = torch.arange(h, dtype=torch.float64)[:, None, None] * freqs           # (h, 1, q)
    cols = torch.arange(w, dtype=torch.float64)[None, :, None] * freqs           # (1, w, q)
    angles = torch.cat([rows.expand(h, w, quarter), cols.expand(h, w, quarter)], dim=-1).reshape(h * w, -1)
    angles = torch.cat([torch.zeros(1, 2 * quarter, dtype=torch.float64), angles])  # class token: angle 0
    table = torch.stack([angles.cos(), angles.sin()], dim=-1).float()
    if cls == "zero":
        table[0] = 0.0
    return table


def apply_rope(x: Tensor, table: Tensor) -> Tensor:
    """Rotate consecutive channel pairs of x (B, H, T, hd) by the table rows (T, hd/2, 2)."""
    xp = x.float().reshape(*x.shape[:-1], -1, 2)
    cos, sin = table[..., 0], table[..., 1]
    out = torch.stack([xp[..., 0] * cos - xp[..., 1] * sin, xp[..., 1] * cos + xp[..., 0] * sin], dim=-1)
    return out.flatten(-2).type_as(x)


# ----------------------------------------------------------------------------------------------- blocks

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class KVCache:
    """Preallocated keys/values (B, H, max_len, hd) of one layer; ``update`` writes a chunk, returns the prefix."""

    def __init__(self, batch: int, n_head: int, max_len: int, head_dim: int, device, dtype) -> None:
        self.k = torch.zeros(batch, n_head, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)

    def update(self, start: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]

    def update_at(self, pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write one step at ``pos`` (a (1,) tensor) and return the whole cache: shapes that do not change with
        the position, so a compiled decode step is traced once (the slots after ``pos`` are masked out)."""
        self.k.index_copy_(2, pos, k)
        self.v.index_copy_(2, pos, v)
        return self.k, self.v


def decode_attention(q: Tensor, k: Tensor, v: Tensor, keep: Tensor) -> Tensor:
    """Attention of one query per row (B, H, 1, hd) over the whole cache (B, H, max_len, hd), the slots where
    ``keep`` (max_len,) is False masked out. Written as two batched matmuls and a softmax that inductor fuses:
    CPU ``scaled_dot_product_attention`` costs about a millisecond per call for a single query."""
    scores = (q @ k.transpose(-2, -1)).float() * q.shape[-1] ** -0.5
    weights = scores.masked_fill(~keep, float("-inf")).softmax(-1)
    return weights.type_as(v) @ v


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.wqkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.attn_dropout = cfg.attn_dropout
        self.resid_dropout = nn.Dropout(cfg.resid_dropout)

    def qkv(self, x: Tensor, rope: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Rotated queries and keys and the values, each (B, H, T, hd)."""
        B, T, _ = x.shape
        q, k, v = self.wqkv(x).view(B, T, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        return apply_rope(q, rope), apply_rope(k, rope), v

    def forward(self, x: Tensor, rope: Tensor, cache: KVCache | None = None, start_pos: int | Tensor = 0) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x, rope)
        if isinstance(start_pos, Tensor):  # fixed-shape decoding (decode_step): every slot up to the position
            k, v = cache.update_at(start_pos, k, v)
            y = decode_attention(q, k, v, torch.arange(k.shape[2], device=x.device) <= start_pos)
            return self.resid_dropout(self.wo(y.transpose(1, 2).reshape(B, T, C)))
        mask, causal = None, True
        if cache is not None:
            k, v = cache.update(start_pos, k, v)
            if start_pos > 0:  # queries at start_pos.. see every cached key up to their own position
                causal = False
                if T > 1:
                    pos_q = torch.arange(start_pos, start_pos + T, device=x.device)
                    mask = pos_q[:, None] >= torch.arange(k.shape[2], device=x.device)[None, :]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and T > 1,
                                           dropout_p=self.attn_dropout if self.training else 0.0)
        return self.resid_dropout(self.wo(y.transpose(1, 2).reshape(B, T, C)))


class SwiGLU(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        hidden = cfg.hidden_dim
        self.w1 = nn.Linear(cfg.dim, hidden, bias=False)  # gate
        self.w3 = nn.Linear(cfg.dim, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, cfg.dim, bias=False)  # down
        self.dropout = nn.Dropout(cfg.ffn_dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class Block(nn.Module):
    """Pre-norm Llama block; with AdaLN the class embedding shifts/scales both norms and gates both branches."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = SwiGLU(cfg)
        self.adaln = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, 6 * cfg.dim)) if cfg.adaln else None

    def forward(self, x: Tensor, cond: Tensor | None, rope: Tensor, cache: KVCache | None = None,
                start_pos: int | Tensor = 0, modulation: Tensor | None = None) -> Tensor:
        """``modulation``: ``self.adaln(cond)`` computed beforehand (decoding: once per image, not per token)."""
        if self.adaln is None:
            x = x + self.attention(self.attention_norm(x), rope, cache, start_pos)
            return x + self.feed_forward(self.ffn_norm(x))
        mod = self.adaln(cond) if modulation is None else modulation
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = mod.chunk(6, dim=-1)
        x = x + gate_a[:, None] * self.attention(modulate(self.attention_norm(x), shift_a, scale_a), rope,
                                                  cache, start_pos)
        return x + gate_f[:, None] * self.feed_forward(modulate(self.ffn_norm(x), shift_f, scale_f))


class HeadNorm(nn.Module):
    """The norm before the output projection (``cfg.head_norm``): shifted and scaled by the class embedding
    for ``adaln`` / ``adaln_rms``, a plain RMSNorm for ``rms``."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        if cfg.head_norm == "adaln":
            self.norm: nn.Module = nn.LayerNorm(cfg.dim, eps=1e-6, elementwise_affine=False)
        else:  # IBQ's head RMSNorm keeps its own default eps (1e-5); LlamaGen's uses the model's norm_eps
            self.norm = RMSNorm(cfg.dim, 1e-5 if cfg.head_norm == "adaln_rms" else cfg.norm_eps)
        self.adaln = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, 2 * cfg.dim)) if cfg.head_norm != "rms" else None

    def forward(self, x: Tensor, cond: Tensor | None, modulation: Tensor | None = None) -> Tensor:
        if self.adaln is None:
            return self.norm(x)
        shift, scale = (self.adaln(cond) if modulation is None else modulation).chunk(2, dim=-1)
        return modulate(self.norm(x), shift, scale)


# ----------------------------------------------------------------------------------------------- model

class LlamaGPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.class_embedding = nn.Embedding(cfg.num_classes + 1, cfg.dim)  # last row = null class (CFG)
        self.token_dropout = nn.Dropout(cfg.token_dropout)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.final_norm = HeadNorm(cfg)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.register_buffer("rope", rope_2d(cfg.grid, cfg.head_dim, cfg.rope_base, cfg.rope_cls),
                             persistent=False)
        self.activation_checkpointing = False  # see set_activation_checkpointing; not part of the architecture
        self.reset_parameters()

    def set_activation_checkpointing(self, enabled: bool = True) -> LlamaGPT:
        """Recompute each block's activations in backward instead of keeping them (training memory for compute).

        Only the training forward (``self.training``, grad enabled, no KV cache) is wrapped; the values and
        gradients are unchanged (dropout masks are replayed: ``checkpoint`` restores the RNG state).
        """
        self.activation_checkpointing = bool(enabled)
        return self

    @property
    def null_class(self) -> int:
        return self.cfg.num_classes

    def reset_parameters(self) -> None:
        """LlamaGen's init (Linear/Embedding N(0, init_std), biases 0), zero head, near-zero AdaLN gates."""
        std = self.cfg.init_std
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=std)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
        d = self.cfg.dim
        with torch.no_grad():
            for block in self.layers:
                if block.adaln is not None:  # rows: shift_a, scale_a, gate_a, shift_f, scale_f, gate_f
                    w = block.adaln[1].weight
                    w[2 * d:3 * d].mul_(self.cfg.adaln_gate_init)
                    w[5 * d:6 * d].mul_(self.cfg.adaln_gate_init)
        nn.init.zeros_(self.output.weight)

    def drop_labels(self, labels: Tensor) -> Tensor:
        """In training, replace each label by the null class with probability ``class_dropout``."""
        if not self.training or self.cfg.class_dropout <= 0:
            return labels
        drop = torch.rand(labels.shape, device=labels.device) < self.cfg.class_dropout
        return torch.where(drop, torch.full_like(labels, self.null_class), labels)

    def new_cache(self, batch: int, device=None, dtype=None) -> list[KVCache]:
        """Empty per-layer KV caches for one image (class token + L-1 tokens) per batch row."""
        p = self.tok_embeddings.weight
        return [KVCache(batch, self.cfg.n_head, self.cfg.block_size, self.cfg.head_dim,
                        device or p.device, dtype or p.dtype) for _ in self.layers]

    def forward(self, tokens: Tensor | None, labels: Tensor, cache: list[KVCache] | None = None,
                start_pos: int = 0) -> Tensor:
        """Next-token logits (B, T, vocab) in float32.

        Training / full recomputation (``cache is None``): ``tokens`` (B, T <= L) are the first T image tokens;
        the input is [class, t_0 .. t_{T-2}] and ``logits[:, i]`` predicts ``t_i``.
        Cached decoding: ``start_pos == 0`` feeds the class token alone (``tokens`` may be None) and returns
        the logits for t_0; ``start_pos = p > 0`` feeds ``tokens`` (B, T) as image tokens t_{p-1}.. and returns
        the logits for t_p...
        """
        labels = self.drop_labels(labels)
        cond = self.class_embedding(labels)                                    # (B, d)
        if cache is None:
            if start_pos != 0:
                raise ValueError("start_pos needs a KV cache")
            x = cond[:, None]
            if tokens is not None and tokens.shape[1] > 1:
                x = torch.cat([x, self.tok_embeddings(tokens[:, :-1])], dim=1)
        elif start_pos == 0:
            x = cond[:, None] if tokens is None else torch.cat([cond[:, None], self.tok_embeddings(tokens)], 1)
        else:
            x = self.tok_embeddings(tokens)
        T = x.shape[1]
        if start_pos + T > self.cfg.block_size:
            raise ValueError(f"sequence of {start_pos + T} positions exceeds block size {self.cfg.block_size}")
        rope = self.rope[start_pos:start_pos + T]
        h = self.token_dropout(x)
        checkpointed = self.activation_checkpointing and self.training and cache is None and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            if checkpointed:
                h = torch.utils.checkpoint.checkpoint(layer, h, cond, rope, use_reentrant=False)
            else:
                h = layer(h, cond, rope, None if cache is None else cache[i], start_pos)
        return self.output(self.final_norm(h, cond)).float()

    def conditioning(self, labels: Tensor) -> list[Tensor | None]:
        """The class-dependent AdaLN projections of every block and of the head norm (None where there is none):
        they do not change from token to token, so decoding computes them once (a third of a block's work)."""
        cond = self.class_embedding(labels)
        return [None if m.adaln is None else m.adaln(cond) for m in (*self.layers, self.final_norm)]

    def decode_step(self, tokens: Tensor, conditioning: list[Tensor | None], cache: list[KVCache],
                    pos: Tensor) -> Tensor:
        """Logits (B, vocab) for t_p from the image tokens t_{p-1} (B, 1) at position ``pos`` = p > 0, a (1,) long
        tensor, after the prefill ``forward(None, labels, cache=cache)`` filled position 0; ``conditioning`` is
        ``self.conditioning(labels)``.

        The same computation as ``forward(tokens, labels, cache=cache, start_pos=p)`` (eval mode), but every
        shape is fixed: the position indexes the cache and the rotary table, and attention reads the whole cache
        under a mask, so one ``torch.compile`` graph serves every step.
        """
        h = self.tok_embeddings(tokens)
        rope = self.rope.index_select(0, pos)
        for layer, layer_cache, mod in zip(self.layers, cache, conditioning, strict=False):
            h = layer(h, None, rope, layer_cache, pos, modulation=mod)
        return self.output(self.final_norm(h, None, conditioning[-1])).float()[:, 0]

    def loss(self, tokens: Tensor, labels: Tensor) -> Tensor:
        """Mean next-token cross-entropy over all L positions (labels dropped to null as configured)."""
        return next_token_loss(self(tokens, labels), tokens)

    def flops_per_token(self, training: bool = True) -> float:
        """Matmul FLOPs per position of a full-length sequence (T = ``block_size``), the count MFU is quoted in.

        Forward: ``2 * N_tok + 4 * n_layer * T * dim + 2 * N_cond / T``, where ``N_tok`` are the weights applied
        at every position (attention and SwiGLU projections, output head), ``4 * n_layer * T * dim`` is QK^T and
        attention x V over the whole sequence (PaLM's convention: the causal mask is not discounted) and
        ``N_cond`` the AdaLN projections, which run once per sequence. Training (``training=True``) is 3x the
        forward (backward = 2 matmuls per forward one): ``6 N_tok + 12 L T d + 6 N_cond / T``. Embedding lookups,
        norms, softmax and other elementwise work are not counted."""
        cfg = self.cfg
        per_token = [self.output.weight.numel()]
        per_sequence = []
        for block in self.layers:
            per_token += [p.numel() for p in (*block.attention.parameters(), *block.feed_forward.parameters())]
            if block.adaln is not None:
                per_sequence.append(block.adaln[1].weight.numel())
        if self.final_norm.adaln is not None:
            per_sequence.append(self.final_norm.adaln[1].weight.numel())
        T = cfg.block_size
        forward = 2 * sum(per_token) + 4 * cfg.n_layer * T * cfg.dim + 2 * sum(per_sequence) / T
        return 3 * forward if training else forward

    def num_params(self, embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if not embeddings:
            n -= self.tok_embeddings.weight.numel() + self.class_embedding.weight.numel()
        return n


def next_token_loss(logits: Tensor, tokens: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy of ``forward``'s logits (B, L, V) against the tokens (B, L), in float32. ``LlamaGPT.loss``
    uses it; a trainer whose model is wrapped (DDP, FSDP, compile) calls the wrapper's forward, then this."""
    return F.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten(), reduction=reduction)


def load_generator(directory, device: str | torch.device = "cpu") -> tuple[LlamaGPT, dict[str, Any]]:
    """A LlamaGPT in eval mode and its run config, from ``model.safetensors`` + ``config.yaml`` of an AR run."""
    from pipelines.checkpoint import MissingCheckpointError, load_model  # file I/O only (no model code)

    state, config = load_model(directory)
    if "generator" not in config or "model" not in config["generator"] or "tokenizer_hash" not in config:
        raise MissingCheckpointError(f"{directory} is not an AR generator checkpoint (its config.yaml has no "
                                     "generator.model / tokenizer_hash; was it written by pipelines.train.ar?)")
    model = LlamaGPT(GPTConfig.from_dict(config["generator"]["model"]))
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), config
