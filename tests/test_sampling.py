"""Sampling: KV cache == recomputation == compiled decode step, classifier-free guidance, top-k / top-p, seeds."""

from __future__ import annotations

import pytest
import torch

from generator.sampling import cfg_scale_at, compiled_decoder, filter_logits, generate
from tests.test_llama import random_model


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("opts", [
    dict(temperature=0.0),                                            # greedy
    dict(temperature=1.0),
    dict(temperature=1.3, top_k=5, top_p=0.9),
    dict(temperature=1.0, cfg_scale=3.0),
    dict(temperature=0.0, cfg_scale=2.0, cfg_schedule="linear"),
])
def test_kv_cache_sampling_equals_full_recomputation(opts):
    model = random_model()
    labels = torch.tensor([0, 1, 2, 3, 4, 1])
    fast = generate(model, labels, generator=seeded(7), use_cache=True, **opts)
    slow = generate(model, labels, generator=seeded(7), use_cache=False, **opts)
    assert fast.shape == (6, 12) and fast.dtype == torch.long
    assert torch.equal(fast, slow)
    assert len(fast.unique()) > 3  # not a degenerate constant sequence


def test_seed_reproduces_and_changes_samples():
    model = random_model()
    labels = torch.tensor([2, 2, 3])
    a, b = generate(model, labels, generator=seeded(1)), generate(model, labels, generator=seeded(1))
    c = generate(model, labels, generator=seeded(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])  # rows of one batch draw independently


def test_cfg_scale_one_equals_conditional_and_zero_equals_null_class():
    model = random_model()
    labels = torch.tensor([0, 3, 4, 1])
    plain = generate(model, labels, generator=seeded(3))
    # The doubled (conditional + null) batch is used with a linear schedule; at scale 1 every step is plain.
    doubled = generate(model, labels, cfg_scale=1.0, cfg_schedule="linear", generator=seeded(3))
    assert torch.equal(plain, doubled)
    # Scale 0 keeps only the unconditional half: the same as sampling the null class directly.
    uncond = generate(model, labels, cfg_scale=0.0, generator=seeded(3))
    null = generate(model, torch.full_like(labels, model.null_class), generator=seeded(3))
    assert torch.equal(uncond, null) and not torch.equal(uncond, plain)
    # Stronger guidance moves samples away from the plain conditional ones.
    assert not torch.equal(generate(model, labels, cfg_scale=4.0, generator=seeded(3)), plain)


def test_guidance_formula_on_the_logits():
    model = random_model()
    labels = torch.tensor([1, 2])
    with torch.no_grad():
        cond = model(None, labels, cache=model.new_cache(2))[:, 0]
        uncond = model(None, torch.full_like(labels, 5), cache=model.new_cache(2))[:, 0]
    s = 2.5
    expected_first = (uncond + s * (cond - uncond)).argmax(-1)
    tokens = generate(model, labels, cfg_scale=s, temperature=0.0)
    assert torch.equal(tokens[:, 0], expected_first)


def test_cfg_schedule_values():
    assert cfg_scale_at(0, 10, 3.0, "constant") == 3.0
    assert cfg_scale_at(0, 10, 3.0, "linear") == 1.0 and cfg_scale_at(9, 10, 3.0, "linear") == 3.0
    assert cfg_scale_at(3, 7, 4.0, "linear") == pytest.approx(2.5)
    with pytest.raises(ValueError, match="cfg_schedule"):
        generate(random_model(), torch.tensor([0]), cfg_schedule="cosine")


def test_top_k_and_top_p_filters():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = lambda out: torch.isfinite(out)[0].tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)) == [True, True, False, False]
    assert kept(filter_logits(logits, top_p=0.7)) == [True, True, False, False]
    assert kept(filter_logits(logits, top_p=0.85)) == [True, True, True, False]
    assert kept(filter_logits(logits, top_p=0.1)) == [True, False, False, False]  # always keeps one
    shuffled = logits[:, [2, 0, 3, 1]]
    assert kept(filter_logits(shuffled, top_p=0.7)) == [False, True, False, True]
    model = random_model()
    labels = torch.tensor([0, 1, 2])
    assert torch.equal(generate(model, labels, top_k=1, generator=seeded(0)),
                       generate(model, labels, temperature=0.0))


@pytest.fixture(scope="module")
def compiled_model():
    """One model for the compiled tests: its decode step compiles once (6 rows: 6 labels, or 3 with guidance)."""
    return random_model(seed=3)


COMPILED_CASES = [
    dict(temperature=0.0),                                            # greedy
    dict(temperature=1.0),                                            # one generator for the batch
    dict(temperature=1.0, per_row=True),                              # the tools' per-sample generators
    dict(temperature=1.3, top_k=5, top_p=0.9, per_row=True),
    dict(temperature=1.0, cfg_scale=3.0, per_row=True),               # guidance: doubled batch of 3 -> 6 rows
    dict(temperature=0.0, cfg_scale=2.0, cfg_schedule="linear"),
]


def generators(n: int, per_row: bool) -> torch.Generator | list[torch.Generator]:
    return [seeded(i) for i in range(n)] if per_row else seeded(7)


@pytest.mark.slow
def test_compiled_sampling_gives_the_eager_tokens_and_compiles_once(compiled_model):
    from torch._dynamo.utils import counters

    model = compiled_model
    graphs = None
    for opts in COMPILED_CASES:
        opts = dict(opts)
        per_row = opts.pop("per_row", False)
        labels = torch.tensor([0, 1, 2, 3, 4, 1]) if "cfg_scale" not in opts else torch.tensor([2, 0, 4])
        eager = generate(model, labels, generator=generators(len(labels), per_row), **opts)
        fast = generate(model, labels, generator=generators(len(labels), per_row), compiled=True, **opts)
        assert torch.equal(fast, eager), opts
        assert len(fast.unique()) > 3
        if graphs is None:  # compiled by the first call; every later call (same rows) reuses the graph
            graphs = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs
    decoder = compiled_decoder(model)
    assert decoder is compiled_decoder(model) and list(decoder.caches) == [(6, torch.float32)]


def test_compiled_sampling_needs_the_cache():
    with pytest.raises(ValueError, match="compile=true needs use_cache=true"):
        generate(random_model(), torch.tensor([0]), use_cache=False, compiled=True)
