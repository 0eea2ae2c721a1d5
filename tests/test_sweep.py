"""Guidance / temperature sweeps (tools/fid.py cfg=[...]): options, same seeds per point, CSV/JSON/PNG, resume."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.errors import ConfigError
from pipelines.eval import fid
from pipelines.eval.metrics import save_images_npz
from pipelines.eval.modes import Extractors, generate_samples
from pipelines.eval.sweep import (
    METRICS_FILE,
    SAMPLES_FILE,
    SETTINGS_FILE,
    best_index,
    point_name,
    run_sweep,
    sweep_points,
)
from tests.conftest import ar_cfg, tool_config


@pytest.fixture(scope="module")
def ar_run(token_shards, tmp_path_factory) -> Path:
    from pipelines.train.ar import train

    run_dir = tmp_path_factory.mktemp("ar") / "run"
    train(ar_cfg(token_shards, run_dir, ["train.max_steps=20", "ckpt_every=20"]))
    return run_dir


def test_cfg_and_temperature_take_a_number_or_a_list():
    for ok in (["cfg=[1.0,1.5,2.0]"], ["temperature=[0.8,1.0]", "mode=demo"], ["cfg=2.0"], ["cfg=[1,2]",
                                                                                              "temperature=[1.0]"]):
        fid.check_options(tool_config("fid", ["mode=gen", *ok] if "mode=demo" not in ok else ok))
    for bad, message in ((["cfg=[]"], "cfg must be a number in [0, inf), null, or a non-empty list"),
                         (["cfg=[1.0,-1]"], "cfg must be a number in [0, inf), null, or a non-empty list"),
                         (["temperature=[1.0,0]"], "temperature must be a number in (0, inf), null, or a non-empty"),
                         (["cfg=[1.0,x]"], "cfg must be"), (["cfg=-1"], "cfg must be a number in [0, inf) or null"),
                         (["cfg=[1.0,2.0]", "mode=recon"], "a list for cfg or temperature runs a sweep, which needs "
                                                           "mode=gen or mode=demo"),
                         (["cfg_schedule=[constant]"], "cfg_schedule must be one of"),
                         (["sweep_dir=[1]"], "sweep_dir must be a non-empty string")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            fid.check_options(tool_config("fid", ["mode=gen", *bad] if "mode=recon" not in bad else bad))


def test_points_are_every_combination_in_order():
    cfg = tool_config("fid", ["cfg=[1.0,2.0]", "temperature=[0.9,1.1]"])
    points = sweep_points(cfg)
    assert points == [{"cfg": 1.0, "temperature": 0.9}, {"cfg": 1.0, "temperature": 1.1},
                      {"cfg": 2.0, "temperature": 0.9}, {"cfg": 2.0, "temperature": 1.1}]
    assert [point_name(p) for p in sweep_points(tool_config("fid", ["cfg=[1,2.5]"]))] == [
        "cfg1_temperaturerun", "cfg2.5_temperaturerun"]
    assert best_index([{"fid": 5.0, "fd_demo": 1.0}, {"fid": 3.0, "fd_demo": 9.0}]) == (1, "fid")
    assert best_index([{"fid": None, "fd_demo": 4.0}, {"fid": None, "fd_demo": 2.0}]) == (1, "fd_demo")
    assert best_index([{"fid": None, "fd_demo": None}]) == (None, None)


class FakeEvaluation:
    """Stands in for the Inception metrics (no weights in tests): the real sampler draws the images; the "FID" is
    a number computed from them, so rows differ exactly when the samples do."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []

    def gen(self, cfg, device):
        assert Path(cfg.sweep_dir) == Path(cfg.save_samples).parent  # the point's JSON goes to its own folder
        generated = generate_samples(cfg, Extractors(), keep_images=True, shard=False)
        save_images_npz(cfg.save_samples, generated.images, generated.labels)
        self.calls.append(("gen", {"cfg": cfg.cfg, "temperature": cfg.temperature, "seed": cfg.seed}))
        return self._record(generated.images.numpy(), generated.sampling)

    def samples(self, cfg, device):
        self.calls.append(("samples", {"samples": cfg.samples}))
        with np.load(cfg.samples) as npz:
            return self._record(npz["arr_0"], {})

    @staticmethod
    def _record(images: np.ndarray, sampling: dict) -> dict:
        mean = float(images.astype(np.float64).mean())
        return {"metrics": {"num_samples": len(images), "fid": mean, "precision": 0.5, "recall": mean / 255},
                "sampling": sampling}

    def modes(self) -> dict:
        return {"gen": self.gen, "samples": self.samples}


def test_sweep_writes_rows_and_resumes(ar_run, tmp_path, monkeypatch):
    fake = FakeEvaluation()
    out = tmp_path / "sweep"
    args = ["mode=gen", f"ar={ar_run}", "ref=unused", "cfg=[1.0,3.0,1.0]", "temperature=1.0", "per_class=2",
            "classes=[0,1]", "batch_size=4", "device=cpu", "seed=3", f"sweep_dir={out}"]
    monkeypatch.setattr(fid, "MODES", {**fid.MODES, **fake.modes()})
    summary = fid.evaluate(tool_config("fid", args))  # through the entry point's dispatch

    # cfg=1.0 twice is one folder: evaluated once, then found done
    assert [c for c in fake.calls] == [("gen", {"cfg": 1.0, "temperature": 1.0, "seed": 3}),
                                       ("gen", {"cfg": 3.0, "temperature": 1.0, "seed": 3})]
    folders = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert folders == ["cfg1_temperature1", "cfg3_temperature1"]
    with np.load(out / "cfg1_temperature1" / SAMPLES_FILE) as a, np.load(out / "cfg3_temperature1" / SAMPLES_FILE) as b:
        assert a["arr_0"].shape == b["arr_0"].shape == (4, 32, 32, 3)
        assert a["arr_1"].tolist() == b["arr_1"].tolist() == [0, 0, 1, 1]
        assert not np.array_equal(a["arr_0"], b["arr_0"])  # the guidance changed the samples ...
        same_seed = generate_samples(tool_config("fid", [*args[:-1], "cfg=1.0"]), Extractors(), True, shard=False)
        assert np.array_equal(a["arr_0"], same_seed.images.numpy())  # ... and the seeds are the plain run's

    with (out / "sweep.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["cfg"] for r in rows] == ["1.0", "3.0", "1.0"] and rows[0]["fid"] == rows[2]["fid"] != rows[1]["fid"]
    assert list(rows[0]) == ["cfg", "temperature", "num_samples", "fid", "inception_score", "precision", "recall",
                             "fd_demo", "sample_accuracy", "best"]
    best = min(range(3), key=lambda i: float(rows[i]["fid"]))
    assert [r["best"] for r in rows] == ["1" if i == best else "0" for i in range(3)]
    assert rows[0]["inception_score"] == "" and rows[0]["num_samples"] == "4"
    saved = json.loads((out / "sweep.json").read_text())
    assert saved == json.loads(json.dumps(summary)) and saved["best"] == best and saved["best_by"] == "fid"
    assert saved["rows"][1]["fid"] == pytest.approx(float(rows[1]["fid"]))
    with Image.open(out / "sweep.png") as im:
        assert im.format == "PNG" and im.size[0] > 2 * im.size[1]
    point = json.loads((out / "cfg3_temperature1" / METRICS_FILE).read_text())
    assert point["point"] == {"cfg": 3.0, "temperature": 1.0} and point["sampling"]["cfg"] == 3.0

    # resume: nothing is recomputed; a point whose metrics are missing is evaluated from its samples only
    fake.calls.clear()
    (out / "cfg3_temperature1" / METRICS_FILE).unlink()
    again = run_sweep(tool_config("fid", args), torch.device("cpu"), fake.modes())
    assert fake.calls == [("samples", {"samples": str(out / "cfg3_temperature1" / SAMPLES_FILE)})]
    assert [r["fid"] for r in again["rows"]] == pytest.approx([r["fid"] for r in summary["rows"]])
    fake.calls.clear()
    run_sweep(tool_config("fid", [*args, "cfg=[1.0,2.0]"]), torch.device("cpu"), fake.modes())
    assert fake.calls == [("gen", {"cfg": 2.0, "temperature": 1.0, "seed": 3})]  # only the new point
    fake.calls.clear()
    run_sweep(tool_config("fid", [*args, "cfg=[1.0]", "seed=4"]), torch.device("cpu"), fake.modes())
    assert fake.calls == [("gen", {"cfg": 1.0, "temperature": 1.0, "seed": 4})]  # other settings: made again
    assert json.loads((out / "cfg1_temperature1" / SETTINGS_FILE).read_text())["seed"] == 4


def test_a_sweep_needs_an_ar_run():
    with pytest.raises(ConfigError, match="needs ar="):
        run_sweep(tool_config("fid", ["mode=gen", "cfg=[1.0,2.0]"]), torch.device("cpu"), {})
