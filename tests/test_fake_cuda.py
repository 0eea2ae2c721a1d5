"""Every CUDA code path run without a GPU: models on a *fake* CUDA device (``FakeTensorMode``).

A fake tensor has a device, a shape and a dtype but no data, and the mode checks devices exactly as CUDA kernels
do: a CPU tensor (other than a 0-dim scalar) meeting a CUDA one raises ``FakeTensorDeviceMismatchError``. The
default device stays the CPU, so a tensor the code makes without ``device=`` is a CPU tensor and fails the test,
just as it would fail the first GPU run. Parameters are made real on the CPU, then replaced by fake copies on the
fake device (what ``module.to(device)`` does; ``.to`` itself cannot swap a parameter for a fake tensor).

What cannot run under the fake mode, and how it is covered instead:

* backward over fake CUDA tensors: the autograd engine asks the CUDA driver for the device's primary context
  ("hasPrimaryContext expects a valid device index") on a machine without one. Every backward (and
  ``torch.autograd.grad``: the adaptive GAN weight) therefore runs over fake tensors on the ``meta`` device,
  where a CPU tensor raises the same mismatch error; forward, loss and inference run on fake CUDA.
  With a GPU present, backward runs on fake CUDA too (``FAKE_RUNS``).
* ``torch.Generator(device="cuda")`` needs the driver, so the per-sample generators of ``pipelines.generate``
  (``sample_generators``) cannot be made; ``generate`` runs with ``generator=None`` (``torch.multinomial``)
  on fake CUDA and the per-row inverse-CDF draw is checked on the CPU (``test_per_row_generators_on_cpu``).
* nothing else. The mode has no ``ShapeEnv``, so an op whose output size or value depends on the data (``.item()``,
  ``bincount``, boolean indexing, ``nonzero``: on a GPU each one waits for the device) raises
  ``DynamicOutputShapeException`` / ``DataDependentOutputException``: every path here is free of host syncs.
  The one place that reads values back by design, the loss window's log step (``Window.means``), runs in a mode
  with a ``ShapeEnv``, where such values become symbols (``test_loss_window_reads_back_at_log_time``).
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensorDeviceMismatchError,
    FakeTensorMode,
)
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from generator.llama import HEAD_NORMS, ROPE_CLS, GPTConfig, LlamaGPT, next_token_loss
from generator.sampling import generate, sample_token
from pipelines.ema import EMA
from pipelines.eval.inception import InceptionFeatures, _fidelity_skeleton
from pipelines.eval.modes import LazyInception
from pipelines.images import to_uint8
from pipelines.tokens.extract import _tokenize
from pipelines.train.loop import Window, lr_setter
from tokenizer.discriminator import PatchDiscriminator
from tokenizer.losses import LossConfig, TokenizerLoss
from tokenizer.model import ImageTokenizer, TokenizerConfig
from tokenizer.perceptual import build_perceptual
from tokenizer.quantizer import code_counts

# (device, backward): forward paths on fake CUDA; backward on fake meta, and on fake CUDA where a GPU is present.
FAKE_RUNS = [("cuda", False), ("meta", True)] + ([("cuda", True)] if torch.cuda.is_available() else [])


class FakeDevice:
    """A fake-tensor mode whose tensors claim to live on ``device``; ``with fake:`` enters the mode."""

    def __init__(self, device: str, backward: bool = False, host_reads: bool = False) -> None:
        self.device, self.backward = torch.device(device), backward
        # Without a ShapeEnv every data-dependent op (a host sync on a GPU) raises; with one it gives symbols.
        self.mode = FakeTensorMode(shape_env=ShapeEnv()) if host_reads else FakeTensorMode()

    def __enter__(self) -> FakeDevice:
        self.mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.mode.__exit__(*exc)

    def tensor(self, real: Tensor) -> Tensor:
        """A fake copy of a real CPU tensor on the fake device (static shapes: sizes stay plain ints)."""
        with self.mode:
            return self.mode.from_tensor(real, static_shapes=True).to(self.device)

    def place(self, module: nn.Module) -> nn.Module:
        """``module.to(device)``: every parameter and buffer replaced by a fake copy (shared ones stay shared)."""
        memo: dict[int, Tensor] = {}

        def convert(t: Tensor) -> Tensor:
            if id(t) not in memo:
                fake = self.tensor(t.detach())
                memo[id(t)] = nn.Parameter(fake, t.requires_grad) if isinstance(t, nn.Parameter) else fake
            return memo[id(t)]

        for mod in module.modules():
            for table in (mod._parameters, mod._buffers):
                for name, t in list(table.items()):
                    if t is not None:
                        table[name] = convert(t)
        return module

    def randn(self, *shape: int) -> Tensor:
        return self.tensor(torch.randn(*shape))

    def randint(self, high: int, *shape: int) -> Tensor:
        return self.tensor(torch.randint(high, shape))


@contextlib.contextmanager
def cuda_autocast(dtype: torch.dtype = torch.bfloat16) -> Iterator[None]:
    """``torch.autocast("cuda")`` switches itself off without a CUDA device; this sets the same state directly
    (fake tensors honour it), so mixed-precision paths run as on a GPU."""
    prev = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", dtype)
    torch.autocast_increment_nesting()
    try:
        yield
    finally:
        if torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()
        torch.set_autocast_enabled("cuda", prev[0])
        torch.set_autocast_dtype("cuda", prev[1])


def on(device: torch.device, *tensors: Tensor) -> bool:
    return all(t.device.type == device.type for t in tensors)


def backward_and_check(fake: FakeDevice, loss: Tensor, params: list[nn.Parameter]) -> None:
    """Backward, then every parameter has a gradient of its own shape on the fake device."""
    loss.backward()
    missing = [tuple(p.shape) for p in params if p.grad is None]
    assert not missing, f"no gradient for parameters of shapes {missing}"
    assert all(on(fake.device, p.grad) and p.grad.shape == p.shape for p in params)


@pytest.fixture(autouse=True)
def _cpu_default_device() -> Iterator[None]:
    # The whole point: a tensor made without device= inside the code must be a CPU tensor.
    assert torch.get_default_device().type == "cpu"
    yield


@pytest.fixture(params=FAKE_RUNS, ids=lambda r: f"{r[0]}-{'backward' if r[1] else 'forward'}")
def fake(request) -> FakeDevice:
    """Fake CUDA up to the loss, then fake meta with backward (see the module docstring)."""
    return FakeDevice(*request.param)


# ----------------------------------------------------------------------------------------------- the harness


class _MakesCpuTensor(nn.Module):
    """The bug the harness exists to catch: a tensor made inside forward without a device."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x) + torch.arange(4)


@pytest.mark.parametrize("device", ["cuda", "meta"])
def test_harness_catches_a_cpu_tensor_inside_forward(device):
    fake = FakeDevice(device)
    model = fake.place(_MakesCpuTensor())
    with fake:
        x = fake.randn(2, 4)
        assert model.lin(x).device.type == device
        with pytest.raises(FakeTensorDeviceMismatchError):
            model(x)


def test_harness_catches_a_host_sync():
    fake = FakeDevice("cuda")
    with fake:
        ids = fake.randint(8, 10)
        with pytest.raises(DynamicOutputShapeException):
            torch.bincount(ids, minlength=8)
        with pytest.raises(DataDependentOutputException):
            ids.sum().item()
        assert code_counts(ids, 8).shape == (8,)  # what the codebook statistics use instead of bincount


def test_code_counts_equal_bincount():
    ids = torch.randint(0, 50, (4, 6, 7))
    assert torch.equal(code_counts(ids, 64), torch.bincount(ids.reshape(-1), minlength=64).float())


# ----------------------------------------------------------------------------------------------- tokenizer

POSITIONS = 2 * 8 * 8  # batch 2 of 16x16 images at downsample 2

QUANTIZERS = {
    "ibq_naive": ("ibq", 32, {"impl": "naive"}),
    # 40 codes in tiles of 16 (16, 16, 8: a ragged last tile); positions split in tiles of 48 (48, 48, 32), so
    # the separate sweep for c runs; the fused variant holds every position in one tile.
    "ibq_tiled": ("ibq", 40, {"impl": "tiled", "code_tile": 16, "pos_tile": 48}),
    "ibq_tiled_fused": ("ibq", 40, {"impl": "tiled", "code_tile": 16, "pos_tile": POSITIONS}),
    "vq": ("vq", 32, {}),
    "vq_l2": ("vq", 32, {"l2_norm": True}),
}


def tiny_tokenizer(quantizer: str = "ibq", num_codes: int = 32, args: dict | None = None,
                   resolution: int = 16) -> ImageTokenizer:
    torch.manual_seed(0)
    return ImageTokenizer(TokenizerConfig(
        resolution=resolution, base_channels=8, channel_mult=(1, 2), enc_res_blocks=1, dec_res_blocks=1,
        attn_resolutions=(resolution // 2,), z_channels=8, embed_dim=4, num_codes=num_codes, quantizer=quantizer,
        quantizer_args=dict(args or {})))


@pytest.mark.parametrize("variant", list(QUANTIZERS))
def test_tokenizer_training_forward_and_backward(fake, variant):
    kind, num_codes, args = QUANTIZERS[variant]
    model = fake.place(tiny_tokenizer(kind, num_codes, args))
    with fake:
        x = fake.randn(2, 3, 16, 16)
        recon, q = model(x)
        assert recon.shape == x.shape and q.indices.shape == (2, 8, 8)
        assert on(fake.device, recon, q.z_q, q.indices, q.loss, *q.terms.values(), *q.stats.values())
        assert q.indices.dtype == torch.long and q.loss.dtype == torch.float32
        loss = (x - recon).abs().mean() + q.loss
        if fake.backward:
            backward_and_check(fake, loss, list(model.parameters()))


@pytest.mark.parametrize("variant", list(QUANTIZERS))
def test_tokenizer_inference_paths(variant):
    fake = FakeDevice("cuda")
    kind, num_codes, args = QUANTIZERS[variant]
    model = fake.place(tiny_tokenizer(kind, num_codes, args)).eval()
    with fake, torch.no_grad():
        ids = model.tokenize(fake.randn(2, 3, 16, 16))
        images = model.decode_tokens(ids)
        assert ids.shape == (2, 8, 8) and ids.dtype == torch.long and images.shape == (2, 3, 16, 16)
        assert on(fake.device, ids, images)
        _, q = model(fake.randn(2, 3, 16, 16))  # evaluation forward (the tiled kernel skips backward's sweeps)
        assert on(fake.device, q.z_q, q.loss)


def test_tokenizer_under_bf16_autocast():
    """The trainers' ``accelerator.autocast()`` on a GPU: the quantizer still computes in float32."""
    fake = FakeDevice("cuda")
    model = fake.place(tiny_tokenizer("ibq", 40, {"impl": "tiled", "code_tile": 16}))
    with fake, cuda_autocast():
        x = fake.randn(2, 3, 16, 16)
        assert model.encoder(x).dtype == torch.bfloat16  # autocast is on
        recon, q = model(x)
        assert q.loss.dtype == q.z_q.dtype == torch.float32 and on(fake.device, recon, q.loss)


def test_tokenizer_losses_and_their_backward(fake):
    """One tokenizer training step as ``pipelines/train/tokenizer.py`` takes it: discriminator hinge + LeCAM,
    then L1 + ST-LPIPS + quantizer + generator GAN loss with the adaptive weight (``torch.autograd.grad``,
    so fake CUDA uses a fixed weight and the meta run the adaptive one)."""
    backward = fake.backward
    model = fake.place(tiny_tokenizer("ibq", 40, {"impl": "tiled", "code_tile": 16}, resolution=32))
    disc = fake.place(PatchDiscriminator(base_channels=8, num_layers=2))
    cfg = LossConfig(perceptual="stlpips_vgg", gen_weight=None if backward else 0.1, lecam_weight=0.05)
    criterion = fake.place(TokenizerLoss(cfg, build_perceptual("stlpips_vgg")))
    with fake:
        x = fake.randn(2, 3, 32, 32)
        recon, q = model(x)
        logits_real, logits_fake_d = disc(x, recon.detach())
        means = torch.stack([logits_real.detach().float().mean(), logits_fake_d.detach().float().mean()])
        d_loss, d_terms = criterion.discriminator_loss(logits_real, logits_fake_d, means[0], means[1])
        assert {"d_hinge", "lecam", "d_total"} <= set(d_terms)
        assert on(fake.device, d_loss, *d_terms.values(), criterion.lecam_ema_real, criterion.lecam_ema_fake)
        if backward:
            backward_and_check(fake, d_loss, list(disc.parameters()))
        disc.requires_grad_(False)
        logits_fake = disc(recon)
        disc.requires_grad_(True)
        ae_loss, ae_terms = criterion.autoencoder_loss(x, recon, q, step=0, logits_fake=logits_fake,
                                                       last_layer=model.decoder.last_layer)
        assert {"l1", "perceptual", "g_loss", "g_weight", "q_quant", "q_entropy", "nll", "total"} <= set(ae_terms)
        assert on(fake.device, ae_loss, *ae_terms.values()) and ae_loss.dtype == torch.float32
        if backward:
            backward_and_check(fake, ae_loss, list(model.parameters()))


# ----------------------------------------------------------------------------------------------- generator


def tiny_gpt(head_norm: str = "adaln", rope_cls: str = "identity", **kw) -> LlamaGPT:
    torch.manual_seed(0)
    return LlamaGPT(GPTConfig(vocab_size=40, num_classes=5, grid=(3, 4), dim=32, n_layer=2, n_head=2,
                              ffn_hidden=48, head_norm=head_norm, rope_cls=rope_cls, **kw))


@pytest.mark.parametrize(("head_norm", "rope_cls", "checkpointing"), [
    *((h, r, False) for h in HEAD_NORMS for r in ROPE_CLS),
    ("adaln", "zero", True),  # activation checkpointing: recomputation in backward under the fake mode
])
def test_generator_training_step(fake, head_norm, rope_cls, checkpointing):
    """Training forward (dropouts and label dropout on) + ``next_token_loss`` + backward."""
    model = fake.place(tiny_gpt(head_norm, rope_cls)).train()
    model.set_activation_checkpointing(checkpointing)
    with fake:
        tokens, labels = fake.randint(40, 3, 12), fake.randint(5, 3)
        logits = model(tokens, labels)
        assert logits.shape == (3, 12, 40) and logits.dtype == torch.float32 and on(fake.device, logits)
        loss = next_token_loss(logits, tokens)
        if fake.backward:
            backward_and_check(fake, loss, list(model.parameters()))


def test_generator_under_bf16_autocast():
    """The AR trainer's ``accelerator.autocast()`` on a GPU: logits and loss stay float32."""
    fake = FakeDevice("cuda")
    model = fake.place(tiny_gpt()).train()
    with fake:
        tokens, labels = fake.randint(40, 3, 12), fake.randint(5, 3)
        with cuda_autocast():
            assert model.output(model.tok_embeddings(tokens)).dtype == torch.bfloat16  # autocast is on
            logits = model(tokens, labels)
        assert logits.dtype == torch.float32 and next_token_loss(logits, tokens).dtype == torch.float32


@pytest.mark.parametrize(("opts", "use_cache"), [
    ({"cfg_scale": 2.0, "temperature": 0.9, "top_k": 5, "top_p": 0.8}, True),
    ({"cfg_scale": 3.0, "cfg_schedule": "linear", "temperature": 1.0}, True),
    ({"cfg_scale": 1.0, "temperature": 0.0}, True),  # greedy, no guidance
    ({"cfg_scale": 2.0, "temperature": 0.9, "top_k": 5, "top_p": 0.8}, False),  # full recomputation per token
])
def test_sampler(opts, use_cache):
    fake = FakeDevice("cuda")
    model = fake.place(tiny_gpt("adaln_rms", "zero"))
    model.set_activation_checkpointing(True)  # must not touch sampling
    with fake:
        out = generate(model, fake.randint(5, 3), use_cache=use_cache, **opts)
        assert out.shape == (3, 12) and out.dtype == torch.long and on(fake.device, out)
    assert model.training  # restored


def test_sampling_pipeline_to_uint8_images():
    """What ``pipelines.generate.iter_images`` does per batch: CPU labels moved by ``generate``, tokens decoded on
    the device, uint8 images back on the CPU. ``iter_images`` itself cannot run under the fake mode: its class-id
    check (``len`` of a masked selection) is host logic on data the fake mode does not have, and its per-sample
    CUDA generators need a driver; the batch generator (None) stands in for them."""
    fake = FakeDevice("cuda")
    gpt = fake.place(tiny_gpt())
    torch.manual_seed(0)
    tok = fake.place(ImageTokenizer(TokenizerConfig(
        resolution=8, base_channels=8, channel_mult=(1, 1), enc_res_blocks=1, dec_res_blocks=1,
        attn_resolutions=(), z_channels=8, embed_dim=4, num_codes=40))).eval()
    with fake:
        labels = fake.mode.from_tensor(torch.tensor([0, 1, 4]))  # a CPU tensor, as ``sample_plan`` makes them
        tokens = generate(gpt, labels, cfg_scale=2.0, cfg_schedule="linear", top_k=4)
        with torch.no_grad():
            images = to_uint8(tok.decode_tokens(tokens.view(-1, *gpt.cfg.grid)))
    assert images.shape == (3, 6, 8, 3)  # 3x4 tokens at downsample 2
    assert images.dtype == torch.uint8 and images.device.type == "cpu"


def test_per_row_generators_on_cpu():
    """The per-row inverse-CDF draw (one generator per sample), which fake CUDA cannot run (see the module
    docstring): a row's tokens depend on its own generator only, and stay inside its top-k."""
    logits = torch.randn(3, 40)

    def draws(rows: list[int], seeds: list[int]) -> Tensor:
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        return torch.stack([sample_token(logits[rows], 1.0, 5, 1.0, gens) for _ in range(20)])

    together, alone = draws([0, 1, 2], [1, 2, 3]), draws([1], [2])
    assert together.dtype == torch.long and torch.equal(together[:, 1], alone[:, 0])
    allowed = torch.topk(logits, 5).indices
    assert all(torch.isin(together[:, i], allowed[i]).all() for i in range(3))


# ----------------------------------------------------------------------------------------------- trainer steps


def test_trainer_step_pieces(fake):
    """What both trainers do after backward: clip, optimizer step (Adam / AdamW, foreach or fused), lr hook,
    EMA update, and adding to the loss window (sums stay on the device): no host sync in any of them."""
    model = tiny_gpt().train()
    ema = EMA(model, 0.9)  # as the trainers do: EMA of the CPU model, then both moved to the device
    fake.place(model), fake.place(ema.model)
    fused = fake.device.type == "cuda"  # the AR trainer's fused AdamW (GPU only)
    opt = torch.optim.AdamW(model.parameters(), lr=1.0, fused=fused)
    opt_d = torch.optim.Adam(model.parameters(), lr=1.0)
    set_lr = lr_setter([(opt, 1e-3), (opt_d, 2e-3)], lambda step: 0.5)
    window = Window()
    with fake:
        tokens, labels = fake.randint(40, 2, 12), fake.randint(5, 2)
        loss = next_token_loss(model(tokens, labels), tokens)
        if fake.backward:
            loss.backward()
        else:  # no backward on fake CUDA without a driver: gradients of the right device and shape
            for p in model.parameters():
                p.grad = torch.zeros_like(p)
        assert set_lr(3) == 5e-4 and opt_d.param_groups[0]["lr"] == 1e-3
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(model)
        window.add({"loss": loss, "norm": norm})
        window.add({"loss": loss, "norm": norm})
        assert on(fake.device, norm, *window.sums.values(), *ema.model.parameters())


def test_loss_window_reads_back_at_log_time():
    """``Window.means``: the means are stacked on the accelerator's device, reduced, and read back once."""
    fake = FakeDevice("cuda", host_reads=True)
    window = Window()
    reduced = []
    accelerator = types.SimpleNamespace(device=fake.device, reduce=lambda t, op: reduced.append(t) or t)
    with fake:
        for _ in range(3):
            window.add({"loss": fake.randn(()), "l1": fake.randn(()).half()})
        means = window.means(accelerator)
    assert len(reduced) == 1 and on(fake.device, reduced[0]) and reduced[0].dtype == torch.float32
    assert {"loss", "l1", "seconds"} <= set(means) and means["micro_batches"] == 3.0


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_extraction_forward(mixed_precision):
    """``pipelines.tokens.extract._tokenize``: the encoder under the accelerator's autocast, ids in float32."""
    fake = FakeDevice("cuda")
    model = fake.place(tiny_tokenizer("ibq", 40, {"impl": "tiled", "code_tile": 16})).eval()
    accelerator = types.SimpleNamespace(
        mixed_precision=mixed_precision, autocast=cuda_autocast)
    with fake:
        ids = _tokenize(model, fake.randn(4, 3, 16, 16), accelerator)
        assert ids.shape == (4, 8, 8) and ids.dtype == torch.long and on(fake.device, ids)


def test_inception_feature_path(tmp_path):
    """tools/fid.py's Inception (torch-fidelity's network, random weights here) on fake CUDA: uint8 CPU batch in
    (``LazyInception.__call__`` moves it), pool features and logits computed on the device, then kept on the CPU
    (so the batches of a long evaluation do not pile up in GPU memory)."""
    weights = tmp_path / "random_inception.pth"
    torch.manual_seed(0)
    torch.save(_fidelity_skeleton().state_dict(), weights)
    fake = FakeDevice("cuda")
    net = fake.place(InceptionFeatures(weights).eval())
    assert net.has_logits
    features = LazyInception(types.SimpleNamespace(weights=str(weights), batch_size=2), fake.device)
    features.__dict__["inception"] = net  # the cached_property, already built on the device
    with fake:
        batch = fake.mode.from_tensor(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
        pool, logits = net(batch.to(fake.device))
        assert on(fake.device, pool, logits)
        out = features(batch)
        assert out.inception_pool.shape == (2, 2048) and out.inception_logits.shape == (2, 1008)
        assert out.inception_pool.device.type == "cpu" and out.inception_pool.dtype == torch.float32

