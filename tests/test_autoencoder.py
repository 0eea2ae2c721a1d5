"""Encoder/decoder options: GroupNorm groups (narrow models keep colour), no normalisation, border padding."""

import pytest
import torch
from torch import nn

from tokenizer.autoencoder import group_norm
from tokenizer.model import ImageTokenizer, TokenizerConfig

DEMO = dict(resolution=32, base_channels=32, channel_mult=(1, 2), enc_res_blocks=1, dec_res_blocks=1,
            attn_resolutions=(), z_channels=8, embed_dim=8, num_codes=16)


def _flat_colour_features(channels: int, seed: int) -> torch.Tensor:
    """A feature map that is constant over space (what a flat colour gives), different per channel."""
    values = torch.randn(1, channels, 1, 1, generator=torch.Generator().manual_seed(seed))
    return values.expand(1, channels, 8, 8).contiguous()


def test_flat_colour_survives_the_decoders_last_norm():
    for norm_group_channels, survives in ((4, True), (1, False)):
        model = ImageTokenizer(TokenizerConfig(**DEMO, norm_group_channels=norm_group_channels))
        norm = model.decoder.norm_out
        assert norm.num_channels == 32 and norm.num_groups == 32 // norm_group_channels
        a, b = (norm(_flat_colour_features(32, s)) for s in (0, 1))
        # One channel per group (instance norm) maps every flat input to the same output: the colour is gone.
        assert (not torch.allclose(a, b, atol=1e-2)) == survives


def test_reference_widths_keep_32_groups():
    model = ImageTokenizer(TokenizerConfig(resolution=64, channel_mult=(1, 2), enc_res_blocks=1, dec_res_blocks=1,
                                         attn_resolutions=(), z_channels=8, embed_dim=8, num_codes=16))
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and all(m.num_groups == 32 for m in norms)  # base 128: >= 4 channels per group already


def test_group_count_divides_channels_and_a_config_without_the_key_takes_the_default():
    assert group_norm(48, 4).num_groups == 12 and group_norm(40, 4).num_groups == 10
    assert group_norm(2, 4).num_groups == 1
    assert group_norm(16, 1).num_groups == 16 and group_norm(512, 4).num_groups == 32
    spec = {k: list(v) if isinstance(v, tuple) else v for k, v in DEMO.items() if k != "norm_group_channels"}
    assert TokenizerConfig.from_dict(spec).norm_group_channels == 4  # the one default, no pre-release shim
    assert TokenizerConfig.from_dict({**spec, "norm_group_channels": 1}).norm_group_channels == 1


def test_shallow_layout_without_blocks_and_its_limits():
    shallow = dict(DEMO, channel_mult=(1, 1), enc_res_blocks=0, dec_res_blocks=0, mid_block=False)
    model = ImageTokenizer(TokenizerConfig(**shallow))
    assert len(model.encoder.mid) == 0 and len(model.decoder.mid) == 0
    rec, _ = model(torch.zeros(2, 3, 32, 32))
    assert rec.shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="res_blocks"):
        TokenizerConfig(**dict(shallow, channel_mult=(1, 2)))


def test_norm_none_has_no_normalisation_and_keeps_a_flat_colours_scale():
    model = ImageTokenizer(TokenizerConfig(**DEMO, norm="none"))
    assert not [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    grouped = ImageTokenizer(TokenizerConfig(**DEMO))
    assert [m for m in grouped.modules() if isinstance(m, nn.GroupNorm)]
    x = _flat_colour_features(32, 0)
    # GroupNorm maps a flat input and its double to the same output; without it the scale (contrast) survives.
    assert torch.allclose(grouped.decoder.norm_out(x), grouped.decoder.norm_out(2 * x), atol=1e-4)
    assert not torch.allclose(model.decoder.norm_out(x), model.decoder.norm_out(2 * x))
    with pytest.raises(ValueError, match="tokenizer.model.norm must be one of group, none"):
        TokenizerConfig(**DEMO, norm="batch")


def _spread(t: torch.Tensor) -> float:
    """Largest spatial deviation of a feature map from its per-channel mean: 0 = constant over the image."""
    return float((t - t.mean((2, 3), keepdim=True)).abs().max())


@pytest.mark.parametrize("padding", ["replicate", "reflect"])
def test_padding_modes_give_no_border_frame_on_a_flat_image(padding):
    layout = dict(DEMO, channel_mult=(1, 1, 1), enc_res_blocks=1, dec_res_blocks=1, norm="none")
    torch.manual_seed(0)
    zeros = ImageTokenizer(TokenizerConfig(**layout)).eval()
    torch.manual_seed(0)
    edged = ImageTokenizer(TokenizerConfig(**layout, padding=padding)).eval()
    assert edged.state_dict().keys() == zeros.state_dict().keys()  # a padding mode adds no weights
    edged.load_state_dict(zeros.state_dict())  # the same weights: only the border differs
    flat = torch.tensor([0.6, -0.4, 0.2]).view(1, 3, 1, 1).expand(1, 3, 32, 32)
    with torch.no_grad():
        # Zero padding reads the border as mid-grey: the latents and the reconstruction of a flat image get a frame.
        assert _spread(zeros.encoder(flat)) > 1e-3 and _spread(zeros.decoder(zeros.encoder(flat))) > 1e-3
        # Replicated / reflected edges: a flat image stays flat through every conv, downsampling and upsampling.
        assert _spread(edged.encoder(flat)) < 1e-5 and _spread(edged.decoder(edged.encoder(flat))) < 1e-5
    with pytest.raises(ValueError, match="tokenizer.model.padding must be one of zeros, replicate, reflect"):
        TokenizerConfig(**DEMO, padding="circular")
