"""Run under `accelerate launch`: train the AR generator, then each process dumps its final weights for comparison."""

import os
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.train_ar import train  # noqa: E402

with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
    cfg = compose(config_name="train_ar", overrides=sys.argv[1:])
torch.set_num_threads(1)
out = train(cfg)
dump = Path(os.environ["DUMP_DIR"])
dump.mkdir(parents=True, exist_ok=True)
rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
torch.save({"world": world, "model": out.model.state_dict(), "ema": out.ema_model.state_dict()},
           dump / f"rank{rank}.pt")
