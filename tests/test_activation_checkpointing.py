"""Activation checkpointing of the AR blocks: the same gradients, only in the training forward, wired to the config."""

from __future__ import annotations

import pytest
import torch
import torch.utils.checkpoint

from generator.llama import GPTConfig, LlamaGPT, next_token_loss
from generator.sampling import generate
from pipelines.train.ar import train
from tests.conftest import ar_cfg


def small_gpt(**kw) -> LlamaGPT:
    torch.manual_seed(0)
    return LlamaGPT(GPTConfig(vocab_size=48, num_classes=4, grid=(4, 4), dim=32, n_layer=3, n_head=2,
                              ffn_hidden=64, **kw))


def grads(model: LlamaGPT, tokens: torch.Tensor, labels: torch.Tensor, seed: int = 1) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout / label-dropout draws in both runs
    next_token_loss(model(tokens, labels), tokens).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _nonzero_head(model: LlamaGPT) -> None:
    """The head starts at zero, which would leave every other gradient zero as well."""
    with torch.no_grad():
        model.output.weight.normal_(0, 0.02)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_same_gradients_with_and_without(dropout):
    """Float32 on the CPU: recomputation gives bitwise the same gradients; with dropout on, ``checkpoint`` replays
    the saved RNG state, so the recomputed masks are the forward's."""
    model = small_gpt(token_dropout=dropout, resid_dropout=dropout, ffn_dropout=dropout, attn_dropout=dropout,
                      class_dropout=0.5 if dropout else 0.0).train()
    _nonzero_head(model)
    tokens, labels = torch.randint(0, 48, (4, 16)), torch.tensor([0, 1, 2, 3])
    plain = grads(model, tokens, labels)
    model.set_activation_checkpointing(True)
    checkpointed = grads(model, tokens, labels)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        assert torch.equal(plain[name], checkpointed[name]), name
    assert any(g.abs().sum() > 0 for n, g in plain.items() if n.startswith("layers.0."))


def _count_checkpoint_calls(monkeypatch) -> list[int]:
    calls = []
    real = torch.utils.checkpoint.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        assert kwargs.get("use_reentrant") is False
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    return calls


def test_only_the_training_forward_is_checkpointed(monkeypatch):
    calls = _count_checkpoint_calls(monkeypatch)
    model = small_gpt().set_activation_checkpointing(True)
    tokens, labels = torch.randint(0, 48, (2, 16)), torch.tensor([0, 1])
    model.train()
    model(tokens, labels)
    assert len(calls) == model.cfg.n_layer  # one per block
    calls.clear()
    with torch.no_grad():  # e.g. validation loss under no_grad with the model left in train mode
        model(tokens, labels)
    model.eval()
    model(tokens, labels)
    assert not calls


def test_sampling_is_unaffected(monkeypatch):
    """The KV-cache sampler (eval mode, no_grad, cache) never checkpoints and draws the same tokens."""
    model = small_gpt()
    _nonzero_head(model)
    labels = torch.tensor([0, 3])
    plain = generate(model, labels, cfg_scale=2.0, top_k=8, generator=torch.Generator().manual_seed(0))
    calls = _count_checkpoint_calls(monkeypatch)
    model.train().set_activation_checkpointing(True)
    again = generate(model, labels, cfg_scale=2.0, top_k=8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(plain, again) and not calls
    assert model.training and model.activation_checkpointing  # both restored / kept


def test_not_part_of_the_architecture():
    """The flag changes neither the config nor the state dict, so checkpoints load either way."""
    a, b = small_gpt(), small_gpt().set_activation_checkpointing(True)
    assert a.cfg == b.cfg and a.state_dict().keys() == b.state_dict().keys()
    assert "activation_checkpointing" not in GPTConfig().to_dict()


def test_trainer_option(token_shards, tmp_path, monkeypatch):
    """``train.activation_checkpointing=true`` reaches the model the AR trainer trains (off by default)."""
    calls = _count_checkpoint_calls(monkeypatch)
    out = train(ar_cfg(token_shards, tmp_path / "on", ["train.max_steps=2", "train.activation_checkpointing=true"]))
    assert out.model.activation_checkpointing and len(calls) == 2 * out.model.cfg.n_layer
    calls.clear()
    out = train(ar_cfg(token_shards, tmp_path / "off", ["train.max_steps=2"]))
    assert not out.model.activation_checkpointing and not calls
