"""Train the demo classifier (or reuse the cached one) and print its validation accuracy.

    python tools/demo_classifier.py data=data/demo out=runs/demo_classifier

See pipelines/demo_classifier.py: a small CNN trained on the demo train split, the judge of per-class
recognition accuracy and the feature extractor of ``fd_demo`` in ``tools/fid.py mode=demo``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from pipelines.cli import user_errors_exit  # noqa: E402
from pipelines.demo_classifier import ClassifierConfig, load_or_train  # noqa: E402


@hydra.main(config_path="../conf/eval", config_name="demo_classifier", version_base=None)
@user_errors_exit
def main(cfg: DictConfig) -> None:
    ccfg = ClassifierConfig(resolution=cfg.resolution, epochs=cfg.epochs, seed=cfg.seed)
    model, summary = load_or_train(cfg.data, cfg.out, ccfg, retrain=cfg.retrain)
    how = "cached" if summary["cached"] else f"trained in {summary['train_seconds']} s"
    print(f"demo classifier ({how}) -> {cfg.out}: val accuracy {summary['val_accuracy']:.2%} "
          f"on {summary['val_images']} images")


if __name__ == "__main__":
    main()
