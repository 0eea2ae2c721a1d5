"""Token shards: round trip, process-count independence, determinism, resume, integrity, mismatch, dtypes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from pipelines.checkpoint import save_model, weights_hash
from pipelines.data import CorruptImageError, DatasetNotFoundError, ImageFolderDataset, load_rgb
from pipelines.errors import UserError
from pipelines.tokens.extract import extract, token_variant_names, token_views
from pipelines.tokens.shards import (
    ShardIntegrityError,
    ShardManifest,
    ShardMismatchError,
    TokenShardDataset,
    token_dtype,
)
from tests.conftest import ROOT, compose_config
from tokenizer.model import ImageTokenizer, TokenizerConfig, load_tokenizer

SHARD = 16  # the 60 demo train images -> shards of 16, 16, 16, 12


def make_tokenizer(directory: Path, num_codes: int) -> Path:
    """A randomly initialised tiny tokenizer saved as a checkpoint (tokens need no training to be checked)."""
    torch.manual_seed(0)
    cfg = TokenizerConfig(resolution=32, base_channels=16, channel_mult=(1, 2, 2), enc_res_blocks=1,
                          dec_res_blocks=1, attn_resolutions=(), z_channels=16, embed_dim=16, num_codes=num_codes)
    save_model(directory, ImageTokenizer(cfg).state_dict(), {"tokenizer": {"model": cfg.to_dict()},
                                                           "data": {"resolution": 32}})
    return directory


def overrides(tok: Path, root: Path, out: Path, *extra: str) -> list[str]:
    return [f"tokenizer_ckpt={tok}", f"data.root={root}", f"out_dir={out}", f"shard_size={SHARD}", "batch_size=6",
            "num_workers=0", "cpu=true", *extra]


def run(tok: Path, root: Path, out: Path, *extra: str) -> dict | None:
    torch.set_num_threads(1)
    return extract(compose_config("extract_tokens", overrides(tok, root, out, *extra)))


def files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("shard_*.safetensors")) + [out / "manifest.json"]}


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Path:
    return make_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer", num_codes=64)


@pytest.fixture(scope="module")
def shards(tok, demo_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tokens") / "tokens"
    result = run(tok, demo_root, out)
    assert result is not None and result["stats"]["shards_written"] == 4
    return out


def test_round_trip_equals_tokenizer_and_decodes(tok, shards, demo_root):
    model = load_tokenizer(tok)
    ds = TokenShardDataset(shards, expect_num_codes=64, expect_grid=(8, 8), expect_tokenizer_hash=weights_hash(tok))
    m = ds.manifest
    assert len(ds) == m.num_images == 60 and m.num_classes == 10 and m.variants == ["center", "center_hflip"]
    assert m.tokenizer_hash == weights_hash(tok) and m.grid == [8, 8] and m.dtype == "uint16"
    assert [s["count"] for s in m.shards] == [16, 16, 16, 12] and m.num_tokens == 60 * 2 * 64
    assert m.classes == ImageFolderDataset(demo_root, "train", 32).classes

    # Shard k holds source images [k*S, (k+1)*S) in order, stored as uint16 (n, V, h, w).
    for k, entry in enumerate(m.shards):
        arrays = load_file(str(shards / entry["file"]))
        assert arrays["tokens"].dtype == np.uint16 and arrays["tokens"].shape == (entry["count"], 2, 8, 8)
        assert arrays["indices"].tolist() == list(range(k * SHARD, min(60, (k + 1) * SHARD)))

    images = ImageFolderDataset(demo_root, "train", 32)  # int index = centre crop, the tokenizer's eval view
    x = torch.stack([images[i][0] for i in range(60)])
    with torch.no_grad():
        expected = model.tokenize(x)
        expected_flip = model.tokenize(torch.flip(x, dims=[-1]))
    got = torch.stack([ds[i][0] for i in range(60)])
    assert got.dtype == torch.long and got.shape == (60, 64)
    assert torch.equal(got.view(60, 8, 8), expected)
    assert len(expected.unique()) > 3  # the check is not vacuous
    flipped = TokenShardDataset(shards, variant="center_hflip", verify=False)
    assert torch.equal(torch.stack([flipped[i][0] for i in range(60)]).view(60, 8, 8), expected_flip)
    assert [ds[i][1] for i in range(60)] == [images.samples[i][1] for i in range(60)] == ds.labels.tolist()
    with torch.no_grad():
        assert torch.equal(model.decode_tokens(got[:4].view(4, 8, 8)), model.decode_tokens(expected[:4]))

    # (index, epoch): a random stored variant, a pure function of (seed, epoch, index).
    picks = {e: [ds[(i, e)][0] for i in range(8)] for e in range(6)}
    again = [ds[(i, 3)][0] for i in range(8)]
    assert all(torch.equal(a, b) for a, b in zip(picks[3], again, strict=True))
    chosen = {int(torch.equal(picks[e][i], got[i])) for e in range(6) for i in range(8)
              if not torch.equal(got[i], flipped[i][0])}
    assert chosen == {0, 1}  # both variants get drawn


@pytest.mark.slow
def test_two_processes_give_the_same_shards_as_one(tok, shards, demo_root, tmp_path):
    out = tmp_path / "tokens2"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # `--cpu` would start ONE process (accelerate's simple launcher); `--multi_gpu` + cpu=true gives 2 on gloo.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", "29531", "-m", "pipelines.tokens.extract", *overrides(tok, demo_root, out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "over 2 process(es)" in proc.stdout
    assert files(out) == files(shards)  # same tokens, order, shard boundaries and manifest bytes
    assert not list(out.glob(".*.tmp"))


def test_rerun_is_byte_identical_and_resume_completes(tok, shards, demo_root, tmp_path):
    run(tok, demo_root, tmp_path / "again")
    assert files(tmp_path / "again") == files(shards)

    out = tmp_path / "resumed"
    assert run(tok, demo_root, out, "stop_after_shards=2") is None  # "killed" after 2 shards
    assert sorted(p.name for p in out.glob("shard_*")) == ["shard_00000.safetensors", "shard_00001.safetensors"]
    assert not (out / "manifest.json").exists()
    with pytest.raises(DatasetNotFoundError, match="manifest.json missing"):
        TokenShardDataset(out)
    first = {p.name: p.stat().st_mtime_ns for p in out.glob("shard_*")}
    result = run(tok, demo_root, out)
    assert result["stats"]["shards_written"] == 2 and result["stats"]["shards_resumed"] == 2
    assert {p: (out / p).stat().st_mtime_ns for p in first} == first  # finished shards were not redone
    assert files(out) == files(shards)


def test_altered_or_truncated_shard_is_named(shards, tok, demo_root, tmp_path):
    out = tmp_path / "tokens"
    shutil.copytree(shards, out)
    TokenShardDataset(out)  # intact copy verifies
    altered = out / "shard_00001.safetensors"
    data = bytearray(altered.read_bytes())
    data[-4] ^= 0x01  # low byte of the last token id: still a valid id, only the checksum can tell
    altered.write_bytes(bytes(data))
    with pytest.raises(ShardIntegrityError, match="shard_00001.safetensors fails its checksum"):
        TokenShardDataset(out)
    truncated = out / "shard_00002.safetensors"
    truncated.write_bytes(truncated.read_bytes()[:-10])
    with pytest.raises(ShardIntegrityError, match="shard_00002.safetensors is truncated"):
        TokenShardDataset(out, verify=False)  # size is checked even without hashing
    # Re-running the extraction rebuilds exactly the damaged shards.
    result = run(tok, demo_root, out)
    assert result["stats"]["shards_written"] == 2 and files(out) == files(shards)


def test_manifest_layout_disagreement_is_named(shards, tmp_path):
    """A shard whose arrays disagree with the manifest (dtype or length) is refused even without hashing."""
    out = tmp_path / "tokens"
    shutil.copytree(shards, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["dtype"] = "int32"  # the shards hold uint16
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardIntegrityError, match="shard_00000.safetensors holds tokens as"):
        TokenShardDataset(out, verify=False)
    manifest["dtype"] = "uint16"
    manifest["shards"][1]["count"] += 1  # labels / tokens of shard 1 are now one short of the manifest
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardIntegrityError, match="shard_00001.safetensors holds tokens"):
        TokenShardDataset(out, verify=False)


def test_manifest_round_trips_and_validates(shards):
    text = (shards / "manifest.json").read_text()
    manifest = ShardManifest.from_json(text)
    assert manifest.to_json() == text and manifest.num_shards == len(manifest.shards) == 4
    broken = json.loads(text) | {"num_classes": 3}
    with pytest.raises(ShardIntegrityError, match="10 classes but num_classes is 3"):
        ShardManifest.from_json(json.dumps(broken))
    with pytest.raises(ShardMismatchError, match="format"):
        ShardManifest.from_json(json.dumps(json.loads(text) | {"format": "other/1"}))


def test_mismatched_tokenizer_is_refused_naming_both_values(shards, tok, demo_root, tmp_path):
    with pytest.raises(ShardMismatchError, match="num_codes is 64 in the shards .* but 16384 is expected"):
        TokenShardDataset(shards, expect_num_codes=16384)
    with pytest.raises(ShardMismatchError, match=r"grid is \[8, 8\] .* but \[16, 16\] is expected"):
        TokenShardDataset(shards, expect_grid=(16, 16))
    with pytest.raises(ShardMismatchError, match=f"tokenizer_hash is {weights_hash(tok)} .* but 0123abcd"):
        TokenShardDataset(shards, expect_tokenizer_hash="0123abcd")
    # Resuming into a directory made with other settings is refused, naming what changed.
    out = tmp_path / "tokens"
    shutil.copytree(shards, out)
    with pytest.raises(ShardMismatchError, match=r"variants: \['center', 'center_hflip'\] -> \['center'\]"):
        run(tok, demo_root, out, "variants.flip=false")
    assert issubclass(ShardMismatchError, UserError) and issubclass(ShardIntegrityError, UserError)  # CLI: exit 2


def test_large_codebook_uses_int32(demo_root, tmp_path):
    assert token_dtype(1024) == token_dtype(1 << 16) == np.uint16 and token_dtype((1 << 16) + 1) == np.int32
    tok = make_tokenizer(tmp_path / "tok", num_codes=1 << 18)
    root = tmp_path / "data"  # one image per class keeps the 2^18-way code search quick
    for d in sorted((demo_root / "train").iterdir()):
        (root / "train" / d.name).mkdir(parents=True)
        shutil.copy(sorted(d.iterdir())[0], root / "train" / d.name)
    out = tmp_path / "tokens"
    result = run(tok, root, out, "shard_size=4", "batch_size=2", "variants.flip=false")
    assert result["dtype"] == "int32" and result["num_codes"] == 1 << 18 and result["num_shards"] == 3
    ds = TokenShardDataset(out, expect_num_codes=1 << 18)
    assert load_file(str(out / "shard_00000.safetensors"))["tokens"].dtype == np.int32
    images = ImageFolderDataset(root, "train", 32)
    with torch.no_grad():
        expected = load_tokenizer(tok).tokenize(torch.stack([images[i][0] for i in range(10)]))
    got = torch.stack([ds[i][0] for i in range(10)]).view(-1, 8, 8)
    assert torch.equal(got, expected) and int(got.max()) >= 1 << 16  # ids that uint16 could not hold


def test_views_and_corrupt_images(tok, demo_root, tmp_path):
    img = load_rgb(str(next((demo_root / "train").rglob("*.png"))))
    views = token_views(img, 32, flip=True, ten_crop=True)
    names = token_variant_names(flip=True, ten_crop=True)
    assert views.shape == (12, 3, 32, 32) and len(names) == 12 and names[:2] == ["center", "center_hflip"]
    assert torch.equal(views[1], torch.flip(views[0], dims=[-1]))
    tl_of_flip, tr = names.index("tencrop_top_left_hflip"), names.index("tencrop_top_right")
    assert torch.equal(views[tl_of_flip], torch.flip(views[tr], dims=[-1]))
    assert not torch.equal(views[names.index("tencrop_center")], views[0])  # from the 1.1x resize

    root = tmp_path / "data"
    shutil.copytree(demo_root / "train", root / "train")
    bad = root / "train" / "00_red_circle" / "00002_broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    with pytest.warns(UserWarning, match="00002_broken.png"):
        result = run(tok, root, tmp_path / "skip", "data.on_corrupt=skip")
    assert result["skipped"] == [{"index": 3, "path": str(bad)}]  # sorted after 00002.png
    assert result["num_images"] == 60 and [s["count"] for s in result["shards"]] == [15, 16, 16, 13]
    ds = TokenShardDataset(tmp_path / "skip")
    assert ds.manifest.shards[1]["start"] == SHARD  # boundaries stay on source indices
    with pytest.raises(CorruptImageError, match="00002_broken.png"):
        run(tok, root, tmp_path / "error", "data.on_corrupt=error")
    assert json.loads((tmp_path / "skip" / "manifest.json").read_text())["num_images"] == 60
