"""`make gpu-check` (bench/gpu_check.py) runs on CPU at tiny sizes, so it cannot rot before a GPU runs it; the
MFU it reports rests on ``LlamaGPT.flops_per_token``, checked here against a FLOP counter."""

from __future__ import annotations

import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from bench import gpu_check
from generator.llama import GPTConfig, LlamaGPT, next_token_loss


def test_cpu_small_run_writes_every_row(tmp_path, capsys):
    out = tmp_path / "gpu_check.json"
    report = gpu_check.main(["device=cpu", "small=true", f"out={out}"])
    saved = json.loads(out.read_text())
    assert saved["rows"].keys() == set(gpu_check.ROWS) == report["rows"].keys()
    rows = saved["rows"]
    assert not [name for name, r in rows.items() if "error" in r], {n: r.get("traceback") for n, r in rows.items()}
    for name in ("tokenizer", "ar_eager", "ar_compiled", "quantizer_naive", "quantizer_tiled"):
        assert rows[name]["s_per_step"] > 0, name
    assert rows["tokenizer"]["images_per_s"] > 0 and rows["extract"]["images_per_s"] > 0
    assert rows["ar_eager"]["flops_per_token"] == rows["ar_compiled"]["flops_per_token"] > 0
    assert rows["ar_eager"]["mfu"] is None  # no peak for a CPU
    assert rows["quantizer_tiled"]["tiled"] and not rows["quantizer_naive"]["tiled"]
    assert rows["sample_eager"]["images_per_s"] > 0
    assert "tokens_per_s" in rows["sample_compiled"] or "not available" in rows["sample_compiled"]["skipped"]
    assert "skipped" in rows["ddp"]
    printed = capsys.readouterr().out
    for name in gpu_check.ROWS:
        assert f"| {name} |" in printed


def test_a_failing_row_is_reported_and_the_others_run(tmp_path, monkeypatch):
    def out_of_memory(opts, device):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 30.00 GiB")

    monkeypatch.setitem(gpu_check.RUNNERS, "quantizer_naive", out_of_memory)
    report = gpu_check.main(["device=cpu", "small=true", f"out={tmp_path / 'r.json'}",
                             "rows=[quantizer_naive,quantizer_tiled]"])
    assert report["rows"]["quantizer_naive"]["error"] == "out of memory"
    assert report["rows"]["quantizer_tiled"]["s_per_step"] > 0


def test_unknown_row_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="valid rows"):
        gpu_check.main(["device=cpu", "small=true", "rows=[quantiser]", f"out={tmp_path / 'r.json'}"])


@pytest.mark.parametrize("name, tflops", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                                          ("NVIDIA H200", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0),
                                          ("Some Future GPU", None)])
def test_peak_flops_from_the_device_name(monkeypatch, name, tflops):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert gpu_check.peak_tflops(torch.device("cuda")) == (name, tflops)


@pytest.mark.parametrize("adaln, head_norm", [(True, "adaln_rms"), (False, "rms"), (True, "adaln")])
def test_flops_per_token_equals_the_counted_matmuls(adaln, head_norm):
    """6 N + attention: the FLOP counter sees every matmul of forward + backward once SDPA runs as matmuls."""
    model = LlamaGPT(GPTConfig(vocab_size=96, num_classes=10, grid=(4, 6), dim=64, n_layer=3, n_head=4,
                               ffn_multiple_of=16, adaln=adaln, head_norm=head_norm))
    tokens, labels = torch.randint(0, 96, (3, 24)), torch.randint(0, 10, (3,))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        next_token_loss(model(tokens, labels), tokens).backward()
    assert model.flops_per_token() * tokens.numel() == pytest.approx(counter.get_total_flops(), rel=1e-9)
    assert model.flops_per_token(training=False) * 3 == model.flops_per_token()
