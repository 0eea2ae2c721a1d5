"""Run under `accelerate launch`: train with one of the training pipelines, then each process dumps its
final weights for comparison.

    accelerate launch ... tests/dist_train_check.py <train_tokenizer|train_ar> key=value ...
"""

import importlib
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

pipeline = sys.argv[1]
module = {"train_tokenizer": "pipelines.train.tokenizer", "train_ar": "pipelines.train.ar"}[pipeline]
train = importlib.import_module(module).train
load_config = importlib.import_module("pipelines.cli").load_config
cfg = load_config(pipeline, sys.argv[2:])
torch.set_num_threads(1)
out = train(cfg)
dump = Path(os.environ["DUMP_DIR"])
dump.mkdir(parents=True, exist_ok=True)
rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
modules = {"model": out.model, "ema": out.ema_model, "disc": getattr(out, "discriminator", None)}
torch.save({"world": world, **{k: m.state_dict() for k, m in modules.items() if m is not None}},
           dump / f"rank{rank}.pt")
