"""Token extraction throughput and shard size for the demo tokenizer, on this machine's CPU (and GPU if any).

    python bench/extract_tokens.py                      # 512 demo train images per row
    python bench/extract_tokens.py max_images=3000 batch_size=128

Uses runs/tokenizer_demo when it is trained, else the same architecture with random weights (speed does
not depend on the weights), and data/demo when present, else a generated copy. Each row is one full
``extract`` run (PNG decoding in DataLoader workers, resize/crop, tokenization, shard writing, sha256)
into a fresh directory; "model only" times the tokenizer forward alone on the already-decoded batch.
Other ``key=value`` arguments are passed to conf/extract_tokens.yaml.
"""

from __future__ import annotations

import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

import torch
from accelerate.state import AcceleratorState
from hydra import compose, initialize_config_dir

from pipelines.checkpoint import MODEL_FILE, save_model
from pipelines.demo_data import make_demo_dataset
from pipelines.tokens.extract import extract
from pipelines.tokens.shards import TokenShardDataset
from tokenizer.model import ImageTokenizer, TokenizerConfig, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def compose_cfg(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return compose(config_name=name, overrides=overrides)


def demo_tokenizer(tmp: Path) -> tuple[Path, str]:
    trained = ROOT / "runs" / "tokenizer_demo"
    if (trained / MODEL_FILE).exists():
        return trained, "runs/tokenizer_demo (trained)"
    cfg = compose_cfg("train_tokenizer", [])
    model_cfg = TokenizerConfig.from_dict(dict(cfg.tokenizer.model))
    torch.manual_seed(0)
    save_model(tmp / "tok", ImageTokenizer(model_cfg).state_dict(),
               {"tokenizer": {"model": model_cfg.to_dict()}, "data": {"resolution": model_cfg.resolution}})
    return tmp / "tok", "demo architecture, random weights"


def model_only_rate(tok: Path, device: str, batch: int, dtype: torch.dtype | None) -> float:
    model = load_tokenizer(tok, device)
    r = model.cfg.resolution
    x = torch.rand(batch, 3, r, r, device=device) * 2 - 1
    with torch.inference_mode(), torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
        model.tokenize(x)
        if device == "cuda":
            torch.cuda.synchronize()
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < 2.0:
            model.tokenize(x)
            n += batch
        if device == "cuda":
            torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def main() -> None:
    user = sys.argv[1:]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        tok, tok_desc = demo_tokenizer(tmp)
        data = ROOT / "data" / "demo"
        if not (data / "demo_meta.json").exists():
            data = make_demo_dataset(tmp / "demo", seed=0, train_per_class=60, val_per_class=1, size=64)
        rows = [("cpu", "no", ["cpu=true"])]
        if torch.cuda.is_available():
            rows += [("cuda", "no", []), ("cuda", "bf16", ["mixed_precision=bf16"])]
        print(f"tokenizer: {tok_desc} | data: {data} | torch threads {torch.get_num_threads()}"
              + (f" | GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
        print(f"{'device':6} {'precision':9} {'batch':>5} {'workers':>7} {'variants':>8} {'images':>6} "
              f"{'images/s':>9} {'model only img/s':>16} {'bytes/image':>11} {'same tokens as fp32':>19}")
        reference = None
        for device, precision, extra in rows:
            out = tmp / f"tokens_{device}_{precision}"
            overrides = [f"tokenizer_ckpt={tok}", f"data.root={data}", f"out_dir={out}", "max_images=512",
                         "shard_size=256", "num_workers=2", *extra, *user]
            cfg = compose_cfg("extract_tokens", overrides)
            AcceleratorState._reset_state(reset_partial_state=True)  # each row picks its own device/precision
            with contextlib.redirect_stdout(io.StringIO()):
                result = extract(cfg)
            ds = TokenShardDataset(out, variant="center")
            tokens = torch.stack([ds[i][0] for i in range(len(ds))])
            same = "-"
            if reference is None:
                reference = tokens
            else:
                same = f"{(tokens == reference).float().mean().item():.2%}"
            amp = torch.bfloat16 if precision == "bf16" else None
            views = len(result["variants"])
            model_rate = model_only_rate(tok, device, cfg.batch_size * views, amp) / views
            print(f"{device:6} {precision:9} {cfg.batch_size:>5} {cfg.num_workers:>7} {views:>8} "
                  f"{result['num_images']:>6} {result['stats']['images_per_s']:>9.1f} {model_rate:>16.1f} "
                  f"{result['stats']['bytes'] / result['num_images']:>11.0f} {same:>19}")


if __name__ == "__main__":
    main()
