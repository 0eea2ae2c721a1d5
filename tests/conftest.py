"""Shared fixtures: a tiny demo dataset made once per session, and Hydra configs for fast runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipelines.checkpoint import save_model
from pipelines.cli import load_config
from pipelines.demo_data import make_demo_dataset
from pipelines.tokens.extract import extract
from tokenizer.model import ImageTokenizer, TokenizerConfig

ROOT = Path(__file__).resolve().parents[1]

# A tokenizer small enough that a training step takes tens of milliseconds on one CPU core.
TINY_TOKENIZER = [
    "data.resolution=32",
    "data.num_workers=0",
    "tokenizer.model.base_channels=16",
    "tokenizer.model.channel_mult=[1,1,1]",
    "tokenizer.model.attn_resolutions=[]",
    "tokenizer.model.z_channels=16",
    "tokenizer.model.embed_dim=16",
    "tokenizer.model.num_codes=64",
    "tokenizer.loss.perceptual=none",
    "tokenizer.loss.perceptual_weight=0",
    "tokenizer.loss.disc_channels=16",
    "tokenizer.loss.disc_layers=2",
    "train.batch_size=8",
    "train.lr=1e-3",
    "train.disc_lr=1e-3",
    "train.ema_decay=0.9",
    "train.cpu=true",
    "tensorboard=false",
]


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo") / "demo"
    return make_demo_dataset(root, seed=0, train_per_class=6, val_per_class=2, size=32)


def compose_config(name: str, overrides: list[str]):
    """conf/<name>.yaml composed as the entry point composes it (schemas registered, errors as ConfigError)."""
    return load_config(name, overrides)


def tool_config(name: str, overrides: list[str]):
    """A per-tool config from conf/tools/ (its own search path, so `tokenizer=`, `data=` are plain keys)."""
    return load_config(name, overrides, tool=True)


@pytest.fixture
def tokenizer_cfg(demo_root, tmp_path):
    """Factory: the tiny training config for ``run_dir`` plus extra overrides."""

    def make(run_dir: Path | None = None, extra: list[str] = ()):
        run_dir = run_dir or tmp_path / "run"
        return compose_config("train_tokenizer", [f"data.root={demo_root}", f"run_dir={run_dir}",
                                                  *TINY_TOKENIZER, *extra])

    return make


TINY_GENERATOR = [
    "generator.model.dim=32",
    "generator.model.n_layer=2",
    "generator.model.n_head=2",
    "generator.model.ffn_multiple_of=16",
    "train.batch_size=8",
    "train.warmup_steps=5",
    "train.lr=3e-3",
    "train.cpu=true",
    "data.num_workers=0",
    "tensorboard=false",
    "log_every=5",
]


@pytest.fixture(scope="session")
def tiny_tokenizer(demo_root, tmp_path_factory) -> Path:
    """An untrained tiny tokenizer checkpoint (32 px -> 8x8 tokens, 64 codes): its tokens still follow the images."""
    cfg = compose_config("train_tokenizer", [f"data.root={demo_root}", *TINY_TOKENIZER])
    from omegaconf import OmegaConf

    config = OmegaConf.to_container(cfg, resolve=True)
    torch.manual_seed(0)
    model = ImageTokenizer(TokenizerConfig.from_dict(config["tokenizer"]["model"]))
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    save_model(out, model.state_dict(), config)
    return out


@pytest.fixture(scope="session")
def token_shards(demo_root, tiny_tokenizer, tmp_path_factory) -> Path:
    """Token shards of the tiny demo set (60 images x {centre, flip}) made by the real extractor."""
    out = tmp_path_factory.mktemp("shards") / "tokens"
    extract(compose_config("extract_tokens", [f"tokenizer_ckpt={tiny_tokenizer}", f"data.root={demo_root}",
                                              f"out_dir={out}", "data.num_workers=0", "cpu=true", "shard_size=25",
                                              "batch_size=16"]))
    return out


def ar_cfg(shards: Path, run_dir: Path, extra: list[str] = ()):
    return compose_config("train_ar", [f"shards={shards}", f"run_dir={run_dir}", *TINY_GENERATOR, *extra])


def launch_two_processes(pipeline: str, overrides: list[str], dump: Path, port: int) -> list[dict]:
    """Train with ``pipelines.<pipeline>`` in two CPU processes (DDP over gloo); each rank's final weights.

    `accelerate launch --cpu` starts a single process (its simple launcher); `--multi_gpu` uses torchrun,
    which with train.cpu=true gives two CPU processes.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DUMP_DIR": str(dump)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", str(port), str(ROOT / "tests" / "dist_train_check.py"), pipeline, *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(dump / f"rank{r}.pt") for r in range(2)]
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    return ranks


def assert_same_weights(ranks: list[dict], parts: tuple[str, ...]) -> None:
    for part in parts:
        for k in ranks[0][part]:
            assert torch.equal(ranks[0][part][k], ranks[1][part][k]), (part, k)
