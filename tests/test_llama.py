"""Stage-two model: reference sizes, causality, 2D RoPE, label dropout, KV cache."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from generator.llama import GPTConfig, LlamaGPT, apply_rope, rope_2d
from tests.conftest import compose_config

REFERENCE_PARAMS = {"B": 342e6, "L": 649e6, "XL": 1.1e9, "XXL": 2.1e9}


def generator_spec(name: str) -> dict:
    """conf/generator/<name>.yaml composed as training composes it (over its schema: GPTConfig's defaults)."""
    return OmegaConf.to_container(compose_config("train_ar", [f"generator={name}"]).generator)


def random_model(seed: int = 0, **overrides) -> LlamaGPT:
    """A tiny model whose zero-initialised head and near-zero gates are randomised, so outputs depend on inputs."""
    args = dict(vocab_size=32, num_classes=5, grid=(3, 4), dim=32, n_layer=2, n_head=4, ffn_multiple_of=16,
                token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0, class_dropout=0.0)
    torch.manual_seed(seed)
    model = LlamaGPT(GPTConfig(**{**args, **overrides}))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model.eval()


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAMS))
def test_reference_configs_match_published_parameter_counts(name):
    spec = generator_spec(name)
    cfg = GPTConfig.from_dict({**spec["model"], "vocab_size": 16384, "num_classes": 1000, "grid": [16, 16]})
    with torch.device("meta"):  # no memory: the XXL model would need 8 GB
        model = LlamaGPT(cfg)
    n = model.num_params()
    assert abs(n / REFERENCE_PARAMS[name] - 1) < 0.05, f"{name}: {n / 1e6:.1f}M vs {REFERENCE_PARAMS[name] / 1e6:.0f}M"
    assert cfg.hidden_dim % 256 == 0 and cfg.hidden_dim >= 8 * cfg.dim / 3 > cfg.hidden_dim - 256
    assert not any(n.endswith("bias") for n, _ in model.named_parameters() if "adaln" not in n)


def test_fresh_model_predicts_uniform_and_trains_all_parts():
    model = LlamaGPT(GPTConfig(vocab_size=32, num_classes=5, grid=(2, 3), dim=32, n_layer=2, n_head=4,
                               ffn_multiple_of=16))
    tokens, labels = torch.randint(0, 32, (4, 6)), torch.tensor([0, 1, 2, 5])  # 5 = null class
    loss = model.loss(tokens, labels)
    assert loss.item() == pytest.approx(torch.log(torch.tensor(32.0)).item(), abs=1e-5)  # zero head
    loss.backward()
    assert model.output.weight.grad.abs().sum() > 0


def test_causal_logits_ignore_later_tokens():
    model = random_model()
    tokens, labels = torch.randint(0, 32, (2, 12)), torch.tensor([1, 3])
    base = model(tokens, labels)
    for t in (0, 5, 11):
        changed = tokens.clone()
        changed[:, t:] = (changed[:, t:] + 7) % 32
        out = model(changed, labels)
        torch.testing.assert_close(out[:, :t + 1], base[:, :t + 1], rtol=0, atol=1e-6)
        if t < 11:  # the next position does see the change
            assert not torch.allclose(out[:, t + 1], base[:, t + 1], atol=1e-4)


def test_2d_rope_scores_depend_only_on_grid_offsets():
    model = random_model(grid=(4, 5))
    h, w = model.cfg.grid
    L = h * w
    x = torch.randn(1, 1, model.cfg.dim).expand(1, L, -1)  # same content at every position
    q, k, _ = model.layers[0].attention.qkv(x, model.rope[:L])
    scores = (q[0] @ k[0].transpose(-1, -2))  # (H, L, L); sequence position s >= 1 is grid cell s - 1
    by_offset: dict[tuple[int, int], list[torch.Tensor]] = {}
    for i in range(1, L):
        for j in range(1, L):
            (ri, ci), (rj, cj) = divmod(i - 1, w), divmod(j - 1, w)
            by_offset.setdefault((ri - rj, ci - cj), []).append(scores[:, i, j])
    for offset, vals in by_offset.items():
        torch.testing.assert_close(torch.stack(vals), vals[0].expand(len(vals), -1), rtol=1e-4, atol=1e-4,
                                   msg=f"offset {offset}")
    # Row and column offsets are told apart, and the class token (position 0) is not rotated.
    assert not torch.allclose(by_offset[(1, 0)][0], by_offset[(0, 1)][0], atol=1e-3)
    assert not torch.allclose(by_offset[(0, 1)][0], by_offset[(0, 2)][0], atol=1e-3)
    table = rope_2d((4, 5), model.cfg.head_dim)
    assert table.shape == (21, model.cfg.head_dim // 2, 2)
    torch.testing.assert_close(apply_rope(q[:, :, :1], table[:1]), q[:, :, :1])


def test_label_dropout_replaces_labels_with_the_null_class():
    model = random_model(class_dropout=1.0)
    tokens, labels = torch.randint(0, 32, (3, 12)), torch.tensor([0, 2, 4])
    null = torch.full_like(labels, model.null_class)
    with torch.no_grad():
        expected = model(tokens, null)       # eval: no dropout
        model.train()
        dropped = model(tokens, labels)      # train: every label dropped
        assert torch.equal(model.drop_labels(labels), null)
    torch.testing.assert_close(dropped, expected)
    model = random_model(class_dropout=0.3).train()
    torch.manual_seed(0)
    out = model.drop_labels(torch.zeros(10000, dtype=torch.long))
    assert set(out.unique().tolist()) == {0, model.null_class}
    assert abs((out == model.null_class).float().mean().item() - 0.3) < 0.02


def test_kv_cache_logits_equal_full_recomputation():
    model = random_model()
    tokens, labels = torch.randint(0, 32, (2, 12)), torch.tensor([4, 0])
    full = model(tokens, labels)
    cache = model.new_cache(2)
    steps = [model(None, labels, cache=cache, start_pos=0)[:, 0]]
    for t in range(1, 12):
        steps.append(model(tokens[:, t - 1:t], labels, cache=cache, start_pos=t)[:, 0])
    torch.testing.assert_close(torch.stack(steps, 1), full, rtol=1e-5, atol=1e-5)
    # Chunks of several tokens after a prefix (causal mask inside the chunk) agree too.
    cache = model.new_cache(2)
    first = model(tokens[:, :4], labels, cache=cache, start_pos=0)      # class + t0..t3 -> predicts t0..t4
    rest = model(tokens[:, 4:11], labels, cache=cache, start_pos=5)     # t4..t10 -> predicts t5..t11
    torch.testing.assert_close(torch.cat([first, rest], 1), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="exceeds block size"):
        model(tokens[:, :2], labels, cache=cache, start_pos=11)


@pytest.mark.parametrize("overrides", [{}, dict(adaln=False, head_norm="rms"), dict(head_norm="adaln")])
def test_fixed_shape_decode_step_equals_cached_forward(overrides):
    """decode_step (position as a tensor, whole cache under a mask, AdaLN computed once) = the sliced-cache path."""
    model = random_model(**overrides)
    tokens, labels = torch.randint(0, 32, (3, 12)), torch.tensor([4, 0, 2])
    with torch.no_grad():
        sliced, cache = model.new_cache(3), model.new_cache(3)
        expected = [model(None, labels, cache=sliced, start_pos=0)[:, 0]]
        steps = [model(None, labels, cache=cache, start_pos=0)[:, 0]]
        cond = model.conditioning(labels)
        assert len(cond) == model.cfg.n_layer + 1
        for t in range(1, 12):
            expected.append(model(tokens[:, t - 1:t], labels, cache=sliced, start_pos=t)[:, 0])
            steps.append(model.decode_step(tokens[:, t - 1:t], cond, cache, torch.tensor([t])))
    torch.testing.assert_close(torch.stack(steps, 1), torch.stack(expected, 1), rtol=1e-5, atol=1e-5)
    assert cache[0].k[:, :, 11].abs().sum() > 0  # every position written in place


OFFICIAL_IBQ_PARAMS = {"B": 342_994_944, "L": 649_640_960, "XL": 1_076_103_168, "XXL": 2_063_331_840}
LLAMAGEN_PARAMS = {"B": 111e6, "L": 343e6, "XL": 775e6, "XXL": 1.4e9, "3B": 3.1e9}  # LlamaGen's rounded figures


@pytest.mark.parametrize("name", sorted(OFFICIAL_IBQ_PARAMS))
def test_reference_configs_are_the_official_ibq_architecture(name):
    spec = generator_spec(name)
    cfg = GPTConfig.from_dict({**spec["model"], "vocab_size": 16384, "num_classes": 1000, "grid": [16, 16]})
    assert (cfg.head_norm, cfg.rope_cls, cfg.adaln) == ("adaln_rms", "zero", True)
    with torch.device("meta"):
        assert LlamaGPT(cfg).num_params() == OFFICIAL_IBQ_PARAMS[name]  # exactly the official count


@pytest.mark.parametrize("name", sorted(LLAMAGEN_PARAMS))
def test_llamagen_configs(name):
    spec = generator_spec(f"llamagen_{name}")
    cfg = GPTConfig.from_dict({**spec["model"], "vocab_size": 16384, "num_classes": 1000, "grid": [24, 24]})
    assert (cfg.head_norm, cfg.rope_cls, cfg.adaln) == ("rms", "zero", False)
    with torch.device("meta"):
        n = LlamaGPT(cfg).num_params()
    assert abs(n / LLAMAGEN_PARAMS[name] - 1) < 0.01, n


def test_head_norm_and_class_rope_options():
    x = torch.randn(2, 5, 32)
    cond = torch.randn(2, 32)
    for kind, params in (("adaln", ["adaln.1.weight", "adaln.1.bias"]),
                         ("adaln_rms", ["norm.weight", "adaln.1.weight", "adaln.1.bias"]),
                         ("rms", ["norm.weight"])):
        model = random_model(head_norm=kind)
        head = model.final_norm
        assert sorted(n for n, _ in head.named_parameters()) == sorted(params)
        with torch.no_grad():
            for p in head.parameters():
                p.normal_()
            out = head(x, cond)
            if kind == "rms":
                ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * head.norm.weight
            else:
                shift, scale = head.adaln(cond).chunk(2, -1)
                if kind == "adaln":
                    normed = torch.nn.functional.layer_norm(x, (32,), eps=1e-6)
                else:
                    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * head.norm.weight
                ref = normed * (1 + scale[:, None]) + shift[:, None]
        torch.testing.assert_close(out, ref)

    # rope_cls: the class token's queries and keys are zero with "zero", untouched with "identity"
    for cls, zero in (("zero", True), ("identity", False)):
        model = random_model(rope_cls=cls)
        h = model.class_embedding(torch.tensor([1, 2]))[:, None]
        q, k, _ = model.layers[0].attention.qkv(h, model.rope[:1])
        assert (q.abs().max() == 0) == zero and (k.abs().max() == 0) == zero
        assert torch.equal(model.rope[1:], rope_2d((3, 4), 8)[1:])  # image positions unchanged
        tokens, labels = torch.randint(0, 32, (2, 12)), torch.tensor([1, 3])
        cache = model.new_cache(2)
        steps = [model(None, labels, cache=cache, start_pos=0)[:, 0]]
        steps += [model(tokens[:, t - 1:t], labels, cache=cache, start_pos=t)[:, 0] for t in range(1, 12)]
        torch.testing.assert_close(torch.stack(steps, 1), model(tokens, labels), rtol=1e-5, atol=1e-5)

    with pytest.raises(ValueError, match="head_norm"):
        GPTConfig(head_norm="layer")
    with pytest.raises(ValueError, match="rope_cls"):
        GPTConfig(rope_cls="one")


def test_config_defaults_are_the_official_ibq_choices():
    """GPTConfig is the one home of the defaults: a config that leaves head_norm / rope_cls out is IBQ's model."""
    cfg = GPTConfig.from_dict({"vocab_size": 32, "num_classes": 5, "grid": [3, 4], "dim": 32, "n_layer": 2,
                               "n_head": 4, "ffn_multiple_of": 16})
    assert (cfg.head_norm, cfg.rope_cls, cfg.adaln) == ("adaln_rms", "zero", True)
    assert "final_norm.norm.weight" in LlamaGPT(cfg).state_dict()


def test_config_from_dict_refuses_unknown_keys():
    assert GPTConfig.from_dict({"dim": 64, "n_layer": 1, "n_head": 4, "grid": [2, 2]}).grid == (2, 2)
    with pytest.raises(ValueError, match="n_layers"):
        GPTConfig.from_dict({"n_layers": 2})
