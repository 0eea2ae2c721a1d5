"""The IBQ quantizer against docs/design.md ("The IBQ quantizer"), term by term, and the VQ baseline's contrast."""
import math

import pytest
import torch
import torch.nn.functional as F

from tokenizer.quantizer import QUANTIZERS, IBQuantizer, Quantizer, VectorQuantizer, build_quantizer, codebook_stats


def _latents(b=2, d=8, h=3, w=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, h, w, generator=g)


def _naive_ibq(z, codebook, beta, entropy_w, temp, eps=1e-5):
    """The textbook formulation with an explicit one-hot, used as the reference (batch entropy in the
    official code's form -sum(p log(p + eps)))."""
    zf = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    logits = zf @ codebook.t()
    soft = logits.softmax(-1)
    idx = logits.argmax(-1)
    hard = F.one_hot(idx, codebook.shape[0]).float()
    onehot = hard - soft.detach() + soft
    zq = onehot @ codebook
    quant = (
        ((zq - zf) ** 2).mean()
        + ((codebook[idx].detach() - zf) ** 2).mean()
        + beta * ((codebook[idx] - zf.detach()) ** 2).mean()
    )
    p = (logits / temp).softmax(-1)
    sample_h = -(p * torch.log(p)).sum(-1).mean()
    pbar = p.mean(0)
    batch_h = -(pbar * torch.log(pbar + eps)).sum()
    return zq, idx, quant + entropy_w * (sample_h - batch_h)


def test_forward_equals_hard_lookup():
    q = IBQuantizer(num_codes=64, dim=8)
    z = _latents()
    out = q(z)
    zf = z.permute(0, 2, 3, 1).reshape(-1, 8)
    idx = (zf @ q.embedding.weight.t()).argmax(-1)
    expected = q.embedding.weight[idx].reshape(2, 3, 3, 8).permute(0, 3, 1, 2)
    assert torch.equal(out.z_q, expected)
    assert torch.equal(out.indices.reshape(-1), idx)
    assert torch.equal(q.lookup(out.indices), expected)
    assert torch.equal(q.encode_indices(z), out.indices)


def test_unselected_codes_get_gradient_ibq_but_not_vq():
    z = _latents()
    ibq = IBQuantizer(num_codes=64, dim=8)
    out = ibq(z)
    (out.z_q.square().sum() + out.loss).backward()
    unused = torch.ones(64, dtype=torch.bool)
    unused[out.indices.unique()] = False
    assert unused.sum() > 40
    grad_norm = ibq.embedding.weight.grad.norm(dim=1)
    assert (grad_norm[unused] > 0).all(), "IBQ must send gradient to every code"

    # Same question through z_q alone: gradient reaches unselected codes via the softmax.
    ibq.embedding.weight.grad = None
    ibq(z).z_q.sum().backward()
    assert (ibq.embedding.weight.grad.norm(dim=1)[unused] > 0).all()

    vq = VectorQuantizer(num_codes=64, dim=8)
    out = vq(z)
    (out.z_q.square().sum() + out.loss).backward()
    unused = torch.ones(64, dtype=torch.bool)
    unused[out.indices.unique()] = False
    assert unused.any()
    assert (vq.embedding.weight.grad[unused] == 0).all()
    assert (vq.embedding.weight.grad[~unused].norm(dim=1) > 0).all()


def test_matches_naive_one_hot_formulation_values_and_gradients():
    torch.manual_seed(0)
    q = IBQuantizer(num_codes=32, dim=8, entropy_temperature=0.5)
    z = _latents().requires_grad_(True)
    out = q(z)
    target = torch.randn_like(out.z_q)
    ((out.z_q - target) ** 2).sum().add(out.loss).backward()
    g_z, g_e = z.grad.clone(), q.embedding.weight.grad.clone()

    z2 = z.detach().clone().requires_grad_(True)
    e2 = q.embedding.weight.detach().clone().requires_grad_(True)
    zq_naive, idx_naive, loss_naive = _naive_ibq(z2, e2, beta=0.25, entropy_w=0.05, temp=0.5)
    zq_naive = zq_naive.reshape(2, 3, 3, 8).permute(0, 3, 1, 2)
    ((zq_naive - target) ** 2).sum().add(loss_naive).backward()

    assert torch.equal(out.indices.reshape(-1), idx_naive)
    torch.testing.assert_close(out.z_q, zq_naive, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.loss, loss_naive, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g_z, z2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_e, e2.grad, rtol=1e-5, atol=1e-6)


def test_soft_term_without_codebook_stopgrad_would_differ():
    """Guards the subtle bug docs/design.md warns about: soft @ E without sg(E) changes E's gradient."""
    torch.manual_seed(1)
    q = IBQuantizer(num_codes=16, dim=4)
    z = _latents(d=4)
    q(z).z_q.sum().backward()
    good = q.embedding.weight.grad.clone()

    e = q.embedding.weight.detach().clone().requires_grad_(True)
    zf = z.permute(0, 2, 3, 1).reshape(-1, 4)
    logits = zf @ e.t()
    soft = logits.softmax(-1)
    wrong = e[logits.argmax(-1)] + soft @ e - (soft @ e).detach()
    wrong.sum().backward()
    assert not torch.allclose(good, e.grad)


def test_loss_terms_equal_hand_computation():
    # One position, two codes in 2-D: everything can be written out by hand.
    q = IBQuantizer(num_codes=2, dim=2, beta=0.25, entropy_temperature=1.0, entropy_eps=0.0)  # exact entropy
    with torch.no_grad():
        q.embedding.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    z = torch.tensor([0.5, 0.2]).reshape(1, 2, 1, 1)
    out = q(z)
    # logits (0.5, 0.2) -> code 0 = (1, 0); z_q == (1, 0)
    sq_err = ((1 - 0.5) ** 2 + (0 - 0.2) ** 2) / 2
    assert math.isclose(out.terms["quant_st"].item(), sq_err, rel_tol=1e-6)
    assert math.isclose(out.terms["commitment"].item(), sq_err, rel_tol=1e-6)
    assert math.isclose(out.terms["codebook"].item(), sq_err, rel_tol=1e-6)
    assert math.isclose(out.terms["quant"].item(), sq_err * 2.25, rel_tol=1e-6)
    p0 = math.exp(0.5) / (math.exp(0.5) + math.exp(0.2))
    h = -(p0 * math.log(p0) + (1 - p0) * math.log(1 - p0))
    # one position: the batch average equals the sample, so the entropy loss is h - h = 0
    assert math.isclose(out.terms["sample_entropy"].item(), h, rel_tol=1e-6)
    assert math.isclose(out.terms["batch_entropy"].item(), h, rel_tol=1e-6)
    assert abs(out.terms["entropy"].item()) < 1e-6
    assert math.isclose(out.loss.item(), sq_err * 2.25, rel_tol=1e-6)

    # beta on the commitment term (the paper's equation) instead
    q.beta_on_codebook = False
    assert math.isclose(q(z).terms["quant"].item(), sq_err * 2.25, rel_tol=1e-6)
    q.beta = 0.5
    assert math.isclose(q(z).terms["quant"].item(), sq_err * 2.5, rel_tol=1e-6)


def test_entropy_loss_two_positions_by_hand():
    q = IBQuantizer(num_codes=2, dim=2, entropy_temperature=0.5, entropy_eps=0.0)  # exact entropy
    with torch.no_grad():
        q.embedding.weight.copy_(torch.eye(2))
    z = torch.tensor([[0.3, 0.1], [0.0, 0.4]]).t().reshape(1, 2, 1, 2)  # two positions
    out = q(z)

    def softmax2(a, b):
        ea, eb = math.exp(a / 0.5), math.exp(b / 0.5)
        return ea / (ea + eb), eb / (ea + eb)

    p1, p2 = softmax2(0.3, 0.1), softmax2(0.0, 0.4)

    def h(p):
        return -sum(x * math.log(x) for x in p)

    sample = (h(p1) + h(p2)) / 2
    batch = h(((p1[0] + p2[0]) / 2, (p1[1] + p2[1]) / 2))
    assert math.isclose(out.terms["sample_entropy"].item(), sample, rel_tol=1e-5)
    assert math.isclose(out.terms["batch_entropy"].item(), batch, rel_tol=1e-5)
    assert math.isclose(out.terms["entropy"].item(), sample - batch, rel_tol=1e-5)


def test_uniform_usage_lowers_entropy_loss():
    q = IBQuantizer(num_codes=4, dim=4, entropy_temperature=0.1)
    with torch.no_grad():
        q.embedding.weight.copy_(torch.eye(4))
    spread = torch.eye(4).reshape(1, 4, 2, 2) * 3  # each position picks a different code
    collapsed = torch.zeros(1, 4, 2, 2)
    collapsed[:, 0] = 3  # every position picks code 0
    assert q(spread).terms["entropy"] < q(collapsed).terms["entropy"]
    assert q(spread).stats["usage"] == 1.0 and q(collapsed).stats["usage"] == 0.25


def test_codebook_stats():
    stats = codebook_stats(torch.tensor([0, 0, 1, 1]), num_codes=8)
    assert stats["usage"].item() == 2 / 8
    assert math.isclose(stats["perplexity"].item(), 2.0, rel_tol=1e-6)


def test_vq_baseline_nearest_neighbour_and_loss():
    vq = VectorQuantizer(num_codes=3, dim=2, beta=0.25)
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [-1.0, 2.0]]))
    z = torch.tensor([0.9, 0.8]).reshape(1, 2, 1, 1)
    out = vq(z)
    assert out.indices.item() == 1
    torch.testing.assert_close(out.z_q.reshape(2), torch.tensor([1.0, 1.0]))
    err = ((0.1**2) + (0.2**2)) / 2
    assert math.isclose(out.loss.item(), err * 1.25, rel_tol=1e-5)


def test_build_quantizer_rejects_unknown_kind():
    assert isinstance(build_quantizer("vq", 4, 2), VectorQuantizer)
    try:
        build_quantizer("fsq", 4, 2)
    except ValueError as err:
        assert "fsq" in str(err) and "ibq" in str(err)
    else:
        raise AssertionError("unknown quantizer accepted")


def test_vq_l2_norm_is_llamagen_recipe():
    """l2_norm=True: nearest code by cosine, unit-length z_q / lookup, losses on the normalised vectors; trains."""
    torch.manual_seed(0)
    q = VectorQuantizer(num_codes=16, dim=4, l2_norm=True)
    with torch.no_grad():
        q.embedding.weight.mul_(torch.rand(16, 1) * 5 + 0.1)  # rows of any length: only the direction counts
    z = _latents(d=4).requires_grad_(True)
    out = q(z)
    codes = F.normalize(q.embedding.weight, dim=-1)
    zf = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, 4), dim=-1)
    assert torch.equal(out.indices.reshape(-1), (zf @ codes.t()).argmax(-1))
    assert torch.equal(q.encode_indices(z), out.indices)
    torch.testing.assert_close(out.z_q.norm(dim=1), torch.ones(2, 3, 3))
    torch.testing.assert_close(q.lookup(out.indices), out.z_q)
    sq = ((codes[out.indices.reshape(-1)] - zf) ** 2).mean()
    torch.testing.assert_close(out.terms["codebook"], sq)
    torch.testing.assert_close(out.loss, sq * 1.25)
    out.loss.backward()
    assert z.grad.abs().sum() > 0 and q.embedding.weight.grad.abs().sum() > 0
    assert not VectorQuantizer(4, 2).l2_norm  # off by default (the plain VQ baseline)


def test_tokenizer_config_selects_llamagen_vq():
    from tokenizer.model import ImageTokenizer, TokenizerConfig

    cfg = TokenizerConfig(resolution=16, base_channels=32, channel_mult=(1, 2), enc_res_blocks=1, dec_res_blocks=1,
                          attn_resolutions=(), z_channels=8, embed_dim=8, num_codes=16, quantizer="vq",
                          quantizer_args={"beta": 0.25, "l2_norm": True})
    assert ImageTokenizer(cfg).quantizer.l2_norm
    ibq_args = {"beta": 0.25, "entropy_eps": 1e-5, "entropy_temperature": 0.01}
    ibq = ImageTokenizer(TokenizerConfig(**{**cfg.__dict__, "quantizer": "ibq", "quantizer_args": ibq_args})).quantizer
    assert ibq.entropy_eps == 1e-5
    with pytest.raises(ValueError, match="l2_norm"):  # each quantizer takes its own arguments only
        build_quantizer("ibq", 16, 8, {"l2_norm": True})
    with pytest.raises(ValueError, match="entropy_eps"):
        build_quantizer("vq", 16, 8, {"entropy_eps": 1e-5})


def test_build_quantizer_rejects_unknown_arguments():
    with pytest.raises(ValueError, match="entropy_weight"):
        build_quantizer("vq", 4, 2, {"beta": 0.25, "entropy_weight": 0.05})  # an IBQ-only argument


def test_quantizers_follow_the_protocol():
    for kind in QUANTIZERS:
        q = build_quantizer(kind, 8, 4)
        assert isinstance(q, Quantizer) and q.num_codes == 8
        z = torch.randn(2, 4, 3, 3)
        out = q(z)
        assert out.z_q.shape == z.shape and out.indices.shape == (2, 3, 3)
        assert torch.equal(q.encode_indices(z), out.indices)
        assert q.lookup(out.indices).shape == z.shape
        assert [p.shape for p in q.codebook_parameters()] == [(8, 4)]


def test_ibq_codebook_init_std_scales_the_reference_draw():
    torch.manual_seed(0)
    ref = IBQuantizer(64, 16)
    torch.manual_seed(0)
    scaled = IBQuantizer(64, 16, init_std=0.25)
    torch.testing.assert_close(scaled.embedding.weight, 0.25 * ref.embedding.weight)
    with pytest.raises(ValueError, match="init_std"):
        IBQuantizer(64, 16, init_std=0)
