"""Official checkpoints -> ours (pipelines/convert.py): tiny state dicts built to the official key layout and shapes
(no official code here), converted, loaded strictly, and compared with forwards written by hand from the source
weights following the official modules' arithmetic."""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from generator.sampling import generate
from pipelines.checkpoint import load_model, weights_hash
from pipelines.convert import (
    IBQ_ADALN_ORDER,
    ConversionError,
    UnsafeCheckpointError,
    _generator_spec,
    convert,
    convert_ibq_ar,
    load_checkpoint_file,
    permute_chunks,
)
from pipelines.errors import ConfigError
from pipelines.generate import load_pipeline
from tests.conftest import ROOT
from tests.test_llama import generator_spec
from tokenizer.model import load_tokenizer

G = torch.Generator().manual_seed(0)


def rand(*shape, scale=0.2):
    return torch.randn(*shape, generator=G) * scale


# ----------------------------------------------------------------------------- official-layout state dicts

def _conv(sd, key, c_out, c_in, k):
    sd[f"{key}.weight"], sd[f"{key}.bias"] = rand(c_out, c_in, k, k, scale=1 / math.sqrt(c_in * k * k)), rand(c_out)


def _norm(sd, key, c):
    sd[f"{key}.weight"], sd[f"{key}.bias"] = 1 + rand(c), rand(c)


def _res(sd, key, c_in, c_out):
    _norm(sd, f"{key}.norm1", c_in)
    _conv(sd, f"{key}.conv1", c_out, c_in, 3)
    _norm(sd, f"{key}.norm2", c_out)
    _conv(sd, f"{key}.conv2", c_out, c_out, 3)
    if c_in != c_out:
        _conv(sd, f"{key}.nin_shortcut", c_out, c_in, 1)


def _attn(sd, key, c):
    _norm(sd, f"{key}.norm", c)
    for name in ("q", "k", "v", "proj_out"):
        _conv(sd, f"{key}.{name}", c, c, 1)


def official_tokenizer_sd(layout="ibq", ch=32, mult=(1, 2), blocks=1, z=32, embed=8, codes=16):
    """Encoder/decoder/quantizer keys as SEED-Voken's taming-style model (layout="ibq") or LlamaGen's VQ."""
    sd, levels = {}, len(mult)
    attn_level = [i == levels - 1 for i in range(levels)]
    down, res_name = ("down", "block") if layout == "ibq" else ("conv_blocks", "res")
    _conv(sd, "encoder.conv_in", ch, 3, 3)
    c = ch
    for i in range(levels):
        for j in range(blocks):
            _res(sd, f"encoder.{down}.{i}.{res_name}.{j}", c, ch * mult[i])
            c = ch * mult[i]
            if attn_level[i]:
                _attn(sd, f"encoder.{down}.{i}.attn.{j}", c)
        if i < levels - 1:
            _conv(sd, f"encoder.{down}.{i}.downsample.conv", c, c, 3)
    mid = ("mid.block_1", "mid.attn_1", "mid.block_2") if layout == "ibq" else ("mid.0", "mid.1", "mid.2")
    for part in ("encoder", "decoder"):
        cm = ch * mult[-1]
        _res(sd, f"{part}.{mid[0]}", cm, cm)
        _attn(sd, f"{part}.{mid[1]}", cm)
        _res(sd, f"{part}.{mid[2]}", cm, cm)
    _norm(sd, "encoder.norm_out", c)
    _conv(sd, "encoder.conv_out", z, c, 3)
    _conv(sd, "decoder.conv_in", ch * mult[-1], z, 3)
    c = ch * mult[-1]
    for k, i in enumerate(reversed(range(levels))):  # IBQ stores level i at up[i]; LlamaGen in run order
        key = f"decoder.up.{i}" if layout == "ibq" else f"decoder.conv_blocks.{k}"
        for j in range(blocks + 1):
            _res(sd, f"{key}.{res_name}.{j}", c, ch * mult[i])
            c = ch * mult[i]
            if attn_level[i]:
                _attn(sd, f"{key}.attn.{j}", c)
        if i > 0:
            _conv(sd, f"{key}.upsample.conv", c, c, 3)
    _norm(sd, "decoder.norm_out", c)
    _conv(sd, "decoder.conv_out", 3, c, 3)
    sd["quantize.embedding.weight"] = rand(codes, embed, scale=1.0)
    _conv(sd, "quant_conv", embed, z, 1)
    _conv(sd, "post_quant_conv", z, embed, 1)
    return sd


def official_gpt_sd(layout="ibq", dim=32, n_layer=2, vocab=16, classes=10, hidden=96):
    sd = {}
    tok, cls, blk = (("tok_emb", "class_emb.embedding_table", "blocks") if layout == "ibq"
                     else ("tok_embeddings", "cls_embedding.embedding_table", "layers"))
    sd[f"{tok}.weight"], sd[f"{cls}.weight"] = rand(vocab, dim, scale=1.0), rand(classes + 1, dim, scale=1.0)
    for i in range(n_layer):
        b = f"{blk}.{i}"
        sd[f"{b}.attention.wqkv.weight"], sd[f"{b}.attention.wo.weight"] = rand(3 * dim, dim), rand(dim, dim)
        sd[f"{b}.feed_forward.w1.weight"], sd[f"{b}.feed_forward.w3.weight"] = rand(hidden, dim), rand(hidden, dim)
        sd[f"{b}.feed_forward.w2.weight"] = rand(dim, hidden)
        sd[f"{b}.attention_norm.weight"], sd[f"{b}.ffn_norm.weight"] = 1 + rand(dim), 1 + rand(dim)
        if layout == "ibq":
            sd[f"{b}.ada_lin.1.weight"], sd[f"{b}.ada_lin.1.bias"] = rand(6 * dim, dim), rand(6 * dim)
    if layout == "ibq":
        sd["head_nm.rmsnorm.weight"] = 1 + rand(dim)
        sd["head_nm.ada_lin.1.weight"], sd["head_nm.ada_lin.1.bias"] = rand(2 * dim, dim), rand(2 * dim)
        sd["head.weight"] = rand(vocab, dim, scale=1.0)
    else:
        sd["norm.weight"], sd["output.weight"] = 1 + rand(dim), rand(vocab, dim, scale=1.0)
    return sd


# ----------------------------------------------------------------------------- forwards by hand (official arithmetic)

def _gn(x, sd, key):
    return F.group_norm(x, 32, sd[f"{key}.weight"], sd[f"{key}.bias"], eps=1e-6)


def _c(x, sd, key, pad, stride=1):
    return F.conv2d(x, sd[f"{key}.weight"], sd[f"{key}.bias"], padding=pad, stride=stride)


def hand_res(x, sd, key):
    h = _c(F.silu(_gn(x, sd, f"{key}.norm1")), sd, f"{key}.conv1", 1)
    h = _c(F.silu(_gn(h, sd, f"{key}.norm2")), sd, f"{key}.conv2", 1)
    return (_c(x, sd, f"{key}.nin_shortcut", 0) if f"{key}.nin_shortcut.weight" in sd else x) + h


def hand_attn(x, sd, key):
    b, c, hh, ww = x.shape
    h = _gn(x, sd, f"{key}.norm")
    q, k, v = (_c(h, sd, f"{key}.{n}", 0).reshape(b, c, hh * ww) for n in "qkv")
    w = torch.softmax(torch.bmm(q.permute(0, 2, 1), k) * c ** -0.5, dim=2)
    out = torch.bmm(v, w.permute(0, 2, 1)).reshape(b, c, hh, ww)
    return x + _c(out, sd, f"{key}.proj_out", 0)


def hand_tokenizer(sd, x, layout="ibq", levels=2, blocks=1):
    """Encoder -> quant_conv -> quantizer (IBQ: argmax of z.E; LlamaGen: l2-normalised nearest) -> decoder."""
    down, res_name = ("down", "block") if layout == "ibq" else ("conv_blocks", "res")
    mid = ("mid.block_1", "mid.attn_1", "mid.block_2") if layout == "ibq" else ("mid.0", "mid.1", "mid.2")
    h = _c(x, sd, "encoder.conv_in", 1)
    for i in range(levels):
        for j in range(blocks):
            h = hand_res(h, sd, f"encoder.{down}.{i}.{res_name}.{j}")
            if f"encoder.{down}.{i}.attn.{j}.q.weight" in sd:
                h = hand_attn(h, sd, f"encoder.{down}.{i}.attn.{j}")
        if i < levels - 1:
            h = _c(F.pad(h, (0, 1, 0, 1)), sd, f"encoder.{down}.{i}.downsample.conv", 0, stride=2)
    h = hand_res(h, sd, f"encoder.{mid[0]}")
    h = hand_attn(h, sd, f"encoder.{mid[1]}")
    h = hand_res(h, sd, f"encoder.{mid[2]}")
    z = _c(F.silu(_gn(h, sd, "encoder.norm_out")), sd, "encoder.conv_out", 1)
    z = _c(z, sd, "quant_conv", 0)
    codes = sd["quantize.embedding.weight"]
    zf = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    if layout == "ibq":
        idx = (zf @ codes.t()).argmax(-1)
    else:
        zf, codes = F.normalize(zf, dim=-1), F.normalize(codes, dim=-1)
        idx = ((zf ** 2).sum(1, keepdim=True) + (codes ** 2).sum(1) - 2 * zf @ codes.t()).argmin(-1)
    zq = codes[idx].reshape(z.shape[0], z.shape[2], z.shape[3], -1).permute(0, 3, 1, 2)
    h = _c(_c(zq, sd, "post_quant_conv", 0), sd, "decoder.conv_in", 1)
    h = hand_res(h, sd, f"decoder.{mid[0]}")
    h = hand_attn(h, sd, f"decoder.{mid[1]}")
    h = hand_res(h, sd, f"decoder.{mid[2]}")
    for k, i in enumerate(reversed(range(levels))):
        key = f"decoder.up.{i}" if layout == "ibq" else f"decoder.conv_blocks.{k}"
        for j in range(blocks + 1):
            h = hand_res(h, sd, f"{key}.{res_name}.{j}")
            if f"{key}.attn.{j}.q.weight" in sd:
                h = hand_attn(h, sd, f"{key}.attn.{j}")
        if i > 0:
            h = _c(F.interpolate(h, scale_factor=2.0, mode="nearest"), sd, f"{key}.upsample.conv", 1)
    rec = _c(F.silu(_gn(h, sd, "decoder.norm_out")), sd, "decoder.conv_out", 1)
    return idx.reshape(z.shape[0], z.shape[2], z.shape[3]), rec


def _rms(x, w, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def official_rope(side, head_dim, base=10000.0):
    """The official 2D table, float32 as they compute it; the class row all zeros (cos = sin = 0)."""
    half = head_dim // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2)[: half // 2].float() / half))
    f = torch.outer(torch.arange(side), freqs)
    grid = torch.cat([f[:, None, :].expand(-1, side, -1), f[None, :, :].expand(side, -1, -1)], dim=-1)
    table = torch.stack([grid.cos(), grid.sin()], dim=-1).flatten(0, 1)
    return torch.cat([torch.zeros(1, head_dim // 2, 2), table])


def _rotate(x, table):  # x (B, T, H, hd)
    xs = x.reshape(*x.shape[:-1], -1, 2)
    t = table[None, : x.shape[1], None]
    return torch.stack([xs[..., 0] * t[..., 0] - xs[..., 1] * t[..., 1],
                        xs[..., 1] * t[..., 0] + xs[..., 0] * t[..., 1]], -1).flatten(3)


def hand_gpt_logits(sd, tokens, labels, layout, n_head, side):
    """Teacher-forced logits (B, L, V) of the official IBQ / LlamaGen transformer, written out by hand."""
    tok, cls, blk = (("tok_emb", "class_emb.embedding_table", "blocks") if layout == "ibq"
                     else ("tok_embeddings", "cls_embedding.embedding_table", "layers"))
    cond = sd[f"{cls}.weight"][labels]
    x = torch.cat([cond[:, None], sd[f"{tok}.weight"][tokens[:, :-1]]], 1)
    B, T, d = x.shape
    table = official_rope(side, d // n_head)
    n_layer = len({k.split(".")[1] for k in sd if k.startswith(blk + ".")})

    def w(i, name):
        return sd[f"{blk}.{i}.{name}"]

    for i in range(n_layer):
        if layout == "ibq":
            ada = (F.silu(cond) @ w(i, "ada_lin.1.weight").t() + w(i, "ada_lin.1.bias")).view(B, 1, 6, d)
            g1, g2, s1, s2, t1, t2 = ada.unbind(2)
        h = _rms(x, w(i, "attention_norm.weight"))
        if layout == "ibq":
            h = h * (s1 + 1) + t1
        q, k, v = (h @ w(i, "attention.wqkv.weight").t()).split(d, -1)
        q, k, v = (t.view(B, T, n_head, d // n_head) for t in (q, k, v))
        q, k = _rotate(q, table), _rotate(k, table)
        att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        a = att.transpose(1, 2).reshape(B, T, d) @ w(i, "attention.wo.weight").t()
        x = x + (a * g1 if layout == "ibq" else a)
        h = _rms(x, w(i, "ffn_norm.weight"))
        if layout == "ibq":
            h = h * (s2 + 1) + t2
        f = (F.silu(h @ w(i, "feed_forward.w1.weight").t()) * (h @ w(i, "feed_forward.w3.weight").t())) \
            @ w(i, "feed_forward.w2.weight").t()
        x = x + (f * g2 if layout == "ibq" else f)
    if layout == "ibq":
        scale, shift = (F.silu(cond) @ sd["head_nm.ada_lin.1.weight"].t() + sd["head_nm.ada_lin.1.bias"]).view(
            B, 1, 2, d).unbind(2)
        return (_rms(x, sd["head_nm.rmsnorm.weight"]) * (scale + 1) + shift) @ sd["head.weight"].t()
    return _rms(x, sd["norm.weight"]) @ sd["output.weight"].t()


def hand_greedy(sd, labels, layout, n_head, side, cfg_scale, null):
    """Greedy CFG decoding by full recomputation: uncond + (cond - uncond) * cfg, argmax."""
    L = side * side
    out = torch.zeros(len(labels), L, dtype=torch.long)
    both = torch.cat([labels, torch.full_like(labels, null)])
    for t in range(L):
        prefix = torch.cat([out[:, :t], out[:, :1]], 1)
        logits = hand_gpt_logits(sd, torch.cat([prefix, prefix]), both, layout, n_head, side)[:, t]
        c, u = logits.chunk(2)
        out[:, t] = (u + (c - u) * cfg_scale).softmax(-1).argmax(-1)
    return out


# ----------------------------------------------------------------------------- fixtures: official files

def _official_yaml(path, resolution, ch=32, mult=(1, 2), blocks=1, z=32, embed=8, codes=16, ar=None,
                   lightning=False):
    """An official training YAML in taming's layout (model.target / model.params) or, with ``lightning``, in
    LightningCLI's (model.class_path / model.init_args, the layout of SEED-Voken's configs/IBQ/*.yaml)."""
    dd = {"double_z": False, "z_channels": z, "resolution": resolution, "in_channels": 3, "out_ch": 3, "ch": ch,
          "ch_mult": list(mult), "num_res_blocks": blocks, "attn_resolutions": [resolution // 2 ** (len(mult) - 1)],
          "dropout": 0.0}
    tok_args = {"ddconfig": dd, "n_embed": codes, "embed_dim": embed}
    tok = {"target": "src.IBQ.models.ibqgan.IBQ", "params": tok_args}
    if ar is None:
        model = {"class_path": tok["target"], "init_args": tok_args} if lightning else tok
    else:
        args = {"transformer_config": {"target": "src.IBQ.modules.transformer.llama.GPT", "params": ar},
                "first_stage_config": tok}
        name = "src.IBQ.models.cond_transformer_llama.Net2NetTransformer"
        model = {"class_path": name, "init_args": args} if lightning else {"target": name, "params": args}
    doc = {"seed_everything": True, "trainer": {"devices": 8}, "model": model} if lightning else {"model": model}
    OmegaConf.save(OmegaConf.create(doc), path)
    return path


@pytest.fixture
def lightning_module(monkeypatch):
    """A stand-in module named like Lightning's, so a pickle can carry its AttributeDict global."""
    mod = types.ModuleType("pytorch_lightning.utilities.parsing")

    class AttributeDict(dict):
        pass

    AttributeDict.__module__, AttributeDict.__qualname__ = mod.__name__, "AttributeDict"
    mod.AttributeDict = AttributeDict
    for parent in ("pytorch_lightning", "pytorch_lightning.utilities"):
        monkeypatch.setitem(sys.modules, parent, types.ModuleType(parent))
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    return AttributeDict


def _ema(sd):
    """LitEma's buffers: ``model_ema.<name without dots>`` (other values), its counters, the discriminator's too."""
    out = {"model_ema." + k.replace(".", ""): v + 0.05 * torch.randn_like(v) for k, v in sd.items()}
    out["model_ema.decay"], out["model_ema.num_updates"] = torch.tensor(0.999), torch.tensor(100)
    out["model_ema.lossdiscriminatormain0weight"] = rand(8, 3, 4, 4)
    return out


# ----------------------------------------------------------------------------- tests

def test_ibq_tokenizer_equals_official_math_and_uses_ema(tmp_path, lightning_module):
    sd = official_tokenizer_sd("ibq")
    loss = {"loss.discriminator.main.0.weight": rand(8, 3, 4, 4), "loss.perceptual_loss.lin0.model.1.weight":
            rand(1, 64, 1, 1)}
    ema = _ema(sd)
    src = tmp_path / "ibq_tok.ckpt"
    torch.save({"state_dict": {**sd, **loss, **ema}, "epoch": 3, "global_step": 99, "optimizer_states": [{}],
                "hyper_parameters": lightning_module(n_embed=16)}, src)
    yaml = _official_yaml(tmp_path / "ibq.yaml", resolution=16)
    x = torch.rand(2, 3, 16, 16, generator=G) * 2 - 1
    ema_sd = {k: ema["model_ema." + k.replace(".", "")] for k in sd}
    for flag, weights in ((True, ema_sd), (False, sd)):
        out = tmp_path / f"tok_{flag}"
        summary = convert("ibq-tok", src, out, config=str(yaml), ema=flag)
        assert ("EMA" in summary["weights"]) == flag
        tok = load_tokenizer(out)
        assert tok.cfg.grid == 8 and tok.cfg.attn_resolutions == (8,) and tok.cfg.dec_res_blocks == 2
        with torch.no_grad():
            idx, rec = hand_tokenizer(weights, x, "ibq")
            ours_idx = tok.tokenize(x)
            ours_rec = tok.decode_tokens(ours_idx)
        assert torch.equal(ours_idx, idx)
        torch.testing.assert_close(ours_rec, rec, rtol=1e-5, atol=1e-5)
        print(f"ibq-tok ema={flag}: token ids equal, reconstruction max |diff| {(ours_rec - rec).abs().max():.2e}")


def test_one_block_of_each_kind_by_hand(tmp_path):
    """Resblock with nin_shortcut, attention (fused qkv), downsample, upsample of the converted model vs by hand."""
    sd = official_tokenizer_sd("ibq")
    torch.save({"state_dict": sd}, tmp_path / "t.ckpt")
    convert("ibq-tok", tmp_path / "t.ckpt", tmp_path / "tok", config=str(_official_yaml(tmp_path / "c.yaml", 16)))
    tok = load_tokenizer(tmp_path / "tok")
    x = torch.randn(2, 32, 8, 8, generator=G)
    with torch.no_grad():
        torch.testing.assert_close(tok.encoder.levels[1][0](x), hand_res(x, sd, "encoder.down.1.block.0"),
                                   rtol=1e-5, atol=1e-5)  # 32 -> 64 channels: nin_shortcut -> skip
        x64 = torch.randn(2, 64, 8, 8, generator=G)
        torch.testing.assert_close(tok.encoder.levels[1][1](x64), hand_attn(x64, sd, "encoder.down.1.attn.0"),
                                   rtol=1e-5, atol=1e-5)
        down = _c(F.pad(x, (0, 1, 0, 1)), sd, "encoder.down.0.downsample.conv", 0, stride=2)
        torch.testing.assert_close(tok.encoder.downs[0](x), down, rtol=1e-5, atol=1e-5)
        # decoder: the official up[1] (level 1, lowest resolution) is our first level
        torch.testing.assert_close(tok.decoder.levels[0][2](x64), hand_res(x64, sd, "decoder.up.1.block.1"),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(tok.decoder.ups[0](x64), _c(F.interpolate(x64, scale_factor=2.0), sd,
                                                               "decoder.up.1.upsample.conv", 1), rtol=1e-5, atol=1e-5)


def test_adaln_rows_land_in_the_right_chunks():
    d = 4
    sd = official_gpt_sd("ibq", dim=d, n_layer=1, hidden=32)
    names = ("gate_a", "gate_f", "scale_a", "scale_f", "shift_a", "shift_f")  # official row order
    sd["blocks.0.ada_lin.1.weight"] = torch.cat([torch.full((d, d), float(i)) for i in range(6)])
    sd["blocks.0.ada_lin.1.bias"] = torch.cat([torch.full((d,), 10.0 + i) for i in range(6)])
    sd["head_nm.ada_lin.1.weight"] = torch.cat([torch.full((d, d), 100.0), torch.full((d, d), 200.0)])  # scale, shift
    sd["head_nm.ada_lin.1.bias"] = torch.zeros(2 * d)
    state, cfg, _ = convert_ibq_ar({f"transformer.{k}": v for k, v in sd.items()}, n_head=1)
    ours = dict(zip(("shift_a", "scale_a", "gate_a", "shift_f", "scale_f", "gate_f"),
                    state["layers.0.adaln.1.weight"].chunk(6), strict=True))
    for i, name in enumerate(names):
        assert torch.equal(ours[name], torch.full((d, d), float(i))), name
    assert torch.equal(state["layers.0.adaln.1.bias"].chunk(6)[2], torch.full((d,), 10.0))  # gate_a
    shift, scale = state["final_norm.adaln.1.weight"].chunk(2)
    assert shift.eq(200).all() and scale.eq(100).all()
    assert torch.equal(permute_chunks(torch.arange(6), IBQ_ADALN_ORDER), torch.tensor([4, 2, 0, 5, 3, 1]))


def _ibq_ar_file(tmp_path, lightning_module, embed_tokenizer=True):
    ar = official_gpt_sd("ibq", vocab=16, classes=10)
    tok = official_tokenizer_sd("ibq")
    sd = {f"transformer.{k}": v for k, v in ar.items()}
    if embed_tokenizer:
        sd |= {f"first_stage_model.{k}": v for k, v in tok.items()}
        sd["first_stage_model.loss.discriminator.main.0.weight"] = rand(8, 3, 4, 4)
    src = tmp_path / "ibq_ar.ckpt"
    torch.save({"state_dict": sd, "epoch": 1, "optimizer_states": [{"state": {0: {"exp_avg": rand(3)}}}],
                "hyper_parameters": lightning_module(learning_rate=1e-4)}, src)
    params = {"vocab_size": 16, "block_size": 16, "n_layer": 2, "n_head": 4, "n_embd": 32, "cond_dim": 32,
              "class_num": 10, "multiple_of": 32, "token_drop": 0.1}
    yaml = _official_yaml(tmp_path / "ibq_ar.yaml", resolution=8, ar=params)
    return src, yaml, ar, tok


def test_ibq_ar_logits_and_greedy_samples_equal_official_math(tmp_path, lightning_module):
    src, yaml, ar, _ = _ibq_ar_file(tmp_path, lightning_module)
    out = tmp_path / "ibq_ar"
    summary = convert("ibq-ar", src, out, config=str(yaml))
    assert summary["tokenizer"] == str(out / "tokenizer")
    model, tokenizer, config = load_pipeline(out)
    assert config["tokenizer_hash"] == weights_hash(out / "tokenizer")
    assert (model.cfg.head_norm, model.cfg.rope_cls, model.cfg.grid, model.cfg.n_head) == ("adaln_rms", "zero",
                                                                                         (4, 4), 4)
    assert tokenizer.cfg.grid == 4
    tokens, labels = torch.randint(0, 16, (3, 16), generator=G), torch.tensor([0, 4, 9])
    with torch.no_grad():
        ours, ref = model(tokens, labels), hand_gpt_logits(ar, tokens, labels, "ibq", 4, 4)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    print(f"ibq-ar: logits max |diff| {(ours - ref).abs().max():.2e} (|logits| up to {ref.abs().max():.1f})")
    greedy = generate(model, labels, cfg_scale=2.0, temperature=0.0)
    assert torch.equal(greedy, hand_greedy(ar, labels, "ibq", 4, 4, 2.0, null=10))


def test_ibq_ar_of_no_published_size_converts_with_its_lightning_cli_yaml(tmp_path, lightning_module):
    """SEED-Voken's YAMLs keep the model's arguments under model.init_args: n_head, block_size and the dropouts of
    a size outside the table come from there (without the YAML the heads are unknown)."""
    src, _, ar, _ = _ibq_ar_file(tmp_path, lightning_module)
    with pytest.raises(ConversionError, match="pass n_head="):
        convert("ibq-ar", src, tmp_path / "no_yaml")
    params = {"vocab_size": 16, "block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 32, "cond_dim": 32,
              "class_num": 10, "resid_dropout_p": 0.05, "ffn_dropout_p": 0.15, "token_drop": 0.2}
    yaml = _official_yaml(tmp_path / "lightning.yaml", resolution=8, ar=params, lightning=True)
    out = tmp_path / "ibq_ar"
    convert("ibq-ar", src, out, config=str(yaml))
    model, tokenizer, config = load_pipeline(out)
    gen = config["generator"]["model"]
    assert (model.cfg.n_head, model.cfg.grid, tokenizer.cfg.grid) == (2, (4, 4), 4)
    assert (gen["resid_dropout"], gen["ffn_dropout"], gen["token_dropout"]) == (0.05, 0.15, 0.2)
    tokens, labels = torch.randint(0, 16, (2, 16), generator=G), torch.tensor([1, 7])
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, labels), hand_gpt_logits(ar, tokens, labels, "ibq", 2, 4),
                                   rtol=1e-5, atol=1e-5)
    torch.save({"state_dict": official_tokenizer_sd("ibq")}, tmp_path / "tok.ckpt")
    tok_yaml = _official_yaml(tmp_path / "tok.yaml", resolution=16, codes=99, lightning=True)
    with pytest.raises(ConversionError, match="config= says n_embed=99"):  # init_args read for the tokenizer too
        convert("ibq-tok", tmp_path / "tok.ckpt", tmp_path / "tok", config=str(tok_yaml))
    tok_yaml = _official_yaml(tmp_path / "tok.yaml", resolution=24, lightning=True)
    convert("ibq-tok", tmp_path / "tok.ckpt", tmp_path / "tok", config=str(tok_yaml))
    assert load_tokenizer(tmp_path / "tok").cfg.resolution == 24


def test_config_yaml_without_model_arguments_is_refused(tmp_path, lightning_module):
    src, _, _, _ = _ibq_ar_file(tmp_path, lightning_module)
    for name, doc in (("flat.yaml", {"transformer_config": {"params": {"n_head": 2}}}),
                      ("other.yaml", {"model": {"class_path": "x.Y", "args": {"n_head": 2}}}),
                      ("list.yaml", [1, 2])):
        path = tmp_path / name
        OmegaConf.save(OmegaConf.create(doc), path)
        with pytest.raises(ConfigError) as info:
            convert("ibq-ar", src, tmp_path / "out", config=str(path))
        assert str(info.value) == (f"config={path} has neither model.params nor model.init_args (the model's "
                                   "arguments in SEED-Voken's training YAMLs); pass the official training YAML of "
                                   "the checkpoint")
        assert not (tmp_path / "out").exists()
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match=r"is not readable YAML"):
        convert("ibq-ar", src, tmp_path / "out", config=str(broken))


def test_llamagen_vq_and_gpt_equal_official_math(tmp_path):
    vq = official_tokenizer_sd("llamagen", blocks=2, embed=8, codes=16)
    vq["quantize.codebook_used"] = torch.zeros(65536)
    torch.save({"model": vq, "optimizer": {"state": {}}, "discriminator": {"w": rand(2)}, "steps": 5,
                "args": argparse.Namespace(image_size=16, vq_model="VQ-16")}, tmp_path / "vq.pt")
    convert("llamagen-vq", tmp_path / "vq.pt", tmp_path / "vq", image_size=8)
    tok = load_tokenizer(tmp_path / "vq")
    assert tok.cfg.quantizer == "vq" and tok.cfg.quantizer_args["l2_norm"] and tok.cfg.dec_res_blocks == 3
    x = torch.rand(2, 3, 16, 16, generator=G) * 2 - 1
    with torch.no_grad():
        idx, rec = hand_tokenizer(vq, x, "llamagen", blocks=2)
        ours_idx = tok.tokenize(x)
        ours_rec = tok.decode_tokens(ours_idx)
    assert torch.equal(ours_idx, idx)
    torch.testing.assert_close(ours_rec, rec, rtol=1e-5, atol=1e-5)
    print(f"llamagen-vq: token ids equal, reconstruction max |diff| {(ours_rec - rec).abs().max():.2e}")

    gpt = official_gpt_sd("llamagen", vocab=16, classes=10)
    torch.save(gpt, tmp_path / "gpt_fsdp.pt")  # FSDP-trained models are a raw state dict
    torch.save({"model": gpt, "steps": 3, "args": argparse.Namespace(gpt_model="GPT-tiny")}, tmp_path / "gpt.pt")
    for name in ("gpt_fsdp.pt", "gpt.pt"):
        out = tmp_path / f"ar_{name}"
        convert("llamagen-gpt", tmp_path / name, out, tokenizer=tmp_path / "vq", image_size=64, n_head=4)
        model, _, _ = load_pipeline(out)
        assert (model.cfg.head_norm, model.cfg.adaln, model.cfg.grid) == ("rms", False, (4, 4))
        tokens, labels = torch.randint(0, 16, (3, 16), generator=G), torch.tensor([1, 5, 10])  # 10 = null
        with torch.no_grad():
            ours, ref = model(tokens, labels), hand_gpt_logits(gpt, tokens, labels, "llamagen", 4, 4)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    print(f"llamagen-gpt: logits max |diff| {(ours - ref).abs().max():.2e} (|logits| up to {ref.abs().max():.1f})")
    labels = torch.tensor([2, 7])
    assert torch.equal(generate(model, labels, cfg_scale=1.5, temperature=0.0),
                       hand_greedy(gpt, labels, "llamagen", 4, 4, 1.5, null=10))


def test_strict_mapping_names_the_key(tmp_path):
    yaml = str(_official_yaml(tmp_path / "c.yaml", 16))

    def attempt(sd):
        torch.save({"state_dict": sd}, tmp_path / "x.ckpt")
        with pytest.raises(ConversionError) as err:
            convert("ibq-tok", tmp_path / "x.ckpt", tmp_path / "out", config=yaml)
        msg = str(err.value)
        assert len(msg.splitlines()) == 1
        return msg

    sd = official_tokenizer_sd("ibq")
    assert "encoder.extra.weight is not mapped" in attempt({**sd, "encoder.extra.weight": rand(2)})
    missing = dict(sd)
    del missing["decoder.up.0.block.1.conv2.bias"]
    assert "decoder.up.0.block.1.conv2.bias is missing" in attempt(missing)
    bad = {**sd, "post_quant_conv.bias": rand(7)}
    msg = attempt(bad)
    assert "post_quant_conv.bias" in msg and "(32,)" in msg and "(7,)" in msg
    wrong_yaml = _official_yaml(tmp_path / "w.yaml", 16, codes=99)
    torch.save({"state_dict": sd}, tmp_path / "x.ckpt")
    with pytest.raises(ConversionError, match="n_embed=99, the weights say 16"):
        convert("ibq-tok", tmp_path / "x.ckpt", tmp_path / "out", config=str(wrong_yaml))
    with pytest.raises(ConversionError, match="unknown source"):
        convert("vqgan", tmp_path / "x.ckpt", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written on failure


def test_pickle_with_an_unknown_global_is_refused_by_name(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"state_dict": {"a": torch.ones(1)}, "callback": Payload()}, tmp_path / "evil.ckpt")
    with pytest.raises(UnsafeCheckpointError) as err:
        load_checkpoint_file(tmp_path / "evil.ckpt")
    assert "needs the global print" in str(err.value) and len(str(err.value).splitlines()) == 1
    torch.save({"model": {"a": torch.ones(1)}, "args": argparse.Namespace(x=1), "when": argparse.ArgumentParser},
               tmp_path / "other.pt")
    with pytest.raises(UnsafeCheckpointError, match="argparse.ArgumentParser"):
        load_checkpoint_file(tmp_path / "other.pt")
    torch.save({"model": {"a": torch.ones(1)}, "args": argparse.Namespace(x=1)}, tmp_path / "ok.pt")
    loaded = load_checkpoint_file(tmp_path / "ok.pt")
    assert loaded["args"].x == 1 and not isinstance(loaded["args"], argparse.Namespace)  # an inert stand-in


@pytest.mark.slow
def test_the_three_commands_run_on_a_converted_checkpoint(tmp_path, lightning_module):
    src, yaml, _, _ = _ibq_ar_file(tmp_path, lightning_module)
    out = tmp_path / "ibq_ar_tiny"
    env = {"PYTHONPATH": str(ROOT)}
    run = lambda *args: subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,  # noqa
                                       env={**__import__("os").environ, **env}, timeout=300)
    done = run("tools/convert_checkpoint.py", "source=ibq-ar", f"src={src}", f"out={out}", f"config={yaml}")
    assert done.returncode == 0, done.stderr
    assert "converted ibq-ar" in done.stdout and "optimizer_states" in done.stdout
    assert (out / "model.safetensors").is_file() and (out / "tokenizer" / "model.safetensors").is_file()
    assert not list(out.rglob("*.pt")) and not list(out.rglob("*.ckpt"))
    done = run("tools/sample.py", f"ckpt={out}", "class=7", "n=2", "device=cpu", f"out={tmp_path / 'samples'}")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "samples" / "grid.png").is_file()
    _, config = load_model(out)
    assert config["converted_from"]["source"] == "ibq-ar"
    bad = run("tools/convert_checkpoint.py", "source=ibq-ar", f"src={tmp_path / 'missing.ckpt'}", f"out={out}")
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: source checkpoint not found")


def test_generator_spec_is_what_hydra_composes():
    """The converter reads conf/generator/<name>.yaml outside Hydra; its merge of the defaults list must agree."""
    names = sorted(p.stem for p in (ROOT / "conf" / "generator").glob("*.yaml") if not p.stem.startswith("_"))
    assert "llamagen_3B" in names and "tiny" in names
    for name in names:
        assert _generator_spec(name) == generator_spec(name), name


def test_output_directory_is_locked_and_never_silently_replaced(tmp_path):
    from pipelines.errors import DirectoryLockedError
    from pipelines.util import DirectoryLock

    torch.save({"state_dict": official_tokenizer_sd("ibq")}, tmp_path / "t.ckpt")
    args = ("ibq-tok", tmp_path / "t.ckpt", tmp_path / "tok")
    yaml = str(_official_yaml(tmp_path / "c.yaml", 16))
    convert(*args, config=yaml)
    before = (tmp_path / "tok" / "model.safetensors").read_bytes()
    with pytest.raises(ConversionError, match="already holds a checkpoint.*overwrite=true"):
        convert(*args, config=yaml)
    with DirectoryLock(tmp_path / "tok", "run directory").acquire():
        with pytest.raises(DirectoryLockedError, match="in use"):
            convert(*args, config=yaml, overwrite=True)
    assert (tmp_path / "tok" / "model.safetensors").read_bytes() == before
    convert(*args, config=yaml, overwrite=True)
    assert load_tokenizer(tmp_path / "tok").cfg.num_codes > 0
