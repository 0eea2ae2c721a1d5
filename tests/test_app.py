"""The web page (tools/app.py): its callbacks as plain functions, and the served page in headless Chromium.

The browser test starts ``tools/app.py`` on a free port of 127.0.0.1 with a tiny untrained checkpoint and drives
Debian's chromium through chromedriver (bench/app_screenshot.py's helpers); it skips, naming the apt command,
where chromium is not installed (.ci/run installs it).
"""

from __future__ import annotations

import functools
import os
import re
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench.app_screenshot import (
    browser,
    browser_missing,
    click_generate,
    error_messages,
    image_size,
    make_tiny_runs,
    running_app,
    upload,
    wait_for,
)
from pipelines.app import check_options, generate_grid, load_app, on_page, reconstruct_upload, serve, token_map
from pipelines.cli import user_errors_exit
from pipelines.data import CorruptImageError
from pipelines.errors import ConfigError, MissingCheckpointError, UserError
from pipelines.generate import UnknownClassError
from pipelines.reconstruct import reconstruct
from pipelines.sample import sample
from tests.conftest import tool_config

RES, PAD = 32, 2  # the tiny tokenizer's resolution; make_grid's padding


def grid_size(rows: int, cols: int) -> tuple[int, int]:
    """(width, height) of a grid.png of rows x cols tiny samples."""
    return cols * (RES + PAD) + PAD, rows * (RES + PAD) + PAD


@pytest.fixture(scope="module")
def tiny_ar(tmp_path_factory) -> Path:
    return make_tiny_runs(tmp_path_factory.mktemp("app_runs"))


@pytest.fixture(scope="module")
def app(tiny_ar):
    return load_app(tool_config("app", [f"ckpt={tiny_ar}", "device=cpu", "max_images=12"]))


def settings(app, **given) -> dict:
    """The page's values when it opens (the run's recipe, seed 0), with ``given`` changed."""
    r = app.recipe
    return {"classes": app.names[:1], "cfg": r["cfg"], "cfg_schedule": r["cfg_schedule"],
            "temperature": r["temperature"], "top_k": r["top_k"], "top_p": r["top_p"], "seed": 0, "count": 2,
            **given}


def test_the_page_starts_from_the_runs_recipe_and_names(app, tiny_ar):
    assert app.recipe == {"cfg": 2.0, "cfg_schedule": "constant", "temperature": 1.0, "top_k": 0, "top_p": 1.0}
    assert app.names[0] == "00_red_circle" and len(app.names) == 10 and app.ckpt == str(tiny_ar)


def test_generate_gives_tools_sample_grid_pixel_for_pixel(app, tiny_ar, tmp_path):
    picked = ["02_blue_triangle", "00_red_circle"]
    grid, timing = generate_grid(app, **settings(app, classes=picked, seed=3, count=3, top_k=5, cfg_schedule="linear"))
    assert grid.dtype == np.uint8 and grid.shape == (*grid_size(2, 3)[::-1], 3)
    assert re.fullmatch(r"6 images in \d+\.\d\d s: \d+ ms per image \(cpu\)", timing), timing
    sample(tool_config("sample", [f"ckpt={tiny_ar}", "class=[02_blue_triangle,00_red_circle]", "n=3", "seed=3",
                                  "top_k=5", "cfg_schedule=linear", "device=cpu", f"out={tmp_path}",
                                  "save_png=false"]))
    assert np.array_equal(grid, np.asarray(Image.open(tmp_path / "grid.png").convert("RGB")))
    # Another seed draws other images; the same seed again the same ones.
    assert not np.array_equal(grid, generate_grid(app, **settings(app, classes=picked, seed=4, count=3, top_k=5,
                                                                  cfg_schedule="linear"))[0])


def test_bad_page_input_is_one_user_message(app):
    import gradio as gr

    with pytest.raises(UnknownClassError, match="unknown class 'unicorn'; the generator knows 10 classes"):
        generate_grid(app, **settings(app, classes=["unicorn"]))
    page_generate = on_page(lambda *a: generate_grid(app, *a))
    with pytest.raises(gr.Error) as err:
        page_generate(*settings(app, classes=["unicorn"]).values())
    assert str(err.value.message).startswith("unknown class 'unicorn'") and "\n" not in err.value.message
    for given, message in (({"classes": []}, "pick at least one class"),
                           ({"count": 13}, "13 x 1 class(es) = 13 images; this page draws 1 to 12 at a time"),
                           ({"temperature": 0}, "temperature must be a number in (0, inf)"),
                           ({"top_k": 2.5}, "top_k must be a whole number, got 2.5"),
                           ({"seed": -1}, "seed must be >= 0")):
        with pytest.raises(UserError, match=re.escape(message)):
            generate_grid(app, **settings(app, **given))
    # A bug (not the visitor's input) is one message too, pointing at the server's log.
    with pytest.raises(gr.Error, match=r"internal error \(ZeroDivisionError: division by zero\); the server's log"):
        on_page(functools.partial(lambda app: 1 / 0, app))()


def test_reconstruct_crops_to_the_tokenizer_and_maps_tokens(app, tiny_ar, tmp_path):
    photo = tmp_path / "wide.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 80, 3), dtype=np.uint8)).save(photo)
    original, rec, tokens, text = reconstruct_upload(app, str(photo))
    assert original.shape == rec.shape == tokens.shape == (RES, RES, 3)
    assert re.fullmatch(r"PSNR \d+\.\d\d dB \| 8 x 8 tokens, \d+ distinct of 64 codes \| 32 x 32 px", text), text
    # tools/reconstruct.py on the same file: the same reconstruction and PSNR.
    out = reconstruct(tool_config("reconstruct", [f"tokenizer={tiny_ar.parent / 'tokenizer'}", f"input={photo}",
                                                  f"out={tmp_path / 'rec'}", "device=cpu"]))
    assert np.array_equal(rec, np.asarray(Image.open(tmp_path / "rec" / f"{tmp_path.name}_wide.png")))
    assert text.startswith(f"PSNR {out['psnr']:.2f} dB")
    # Each token is a 4 x 4 block of one colour; code 0 and code 63 are the colour map's ends.
    assert (tokens[::4, ::4].repeat(4, 0).repeat(4, 1) == tokens).all()
    ends = token_map(torch.tensor([[0, 63]]), 64)
    assert ends.shape == (1, 2, 3) and ends[0, 0, 2] > ends[0, 0, 0] and ends[0, 1, 0] > ends[0, 1, 2]
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image\n")
    with pytest.raises(CorruptImageError, match=r"^notes\.txt is not an image this page can read \(cannot identify"):
        reconstruct_upload(app, str(notes))


def test_options_are_checked_and_a_missing_checkpoint_is_one_line(tmp_path, capsys):
    for bad, message in ((["port=70000"], "port must be an integer in [1, 65535]"),
                         (["port=0"], "port must be an integer in [1, 65535]"),
                         (["max_images=0"], "max_images must be an integer >= 1"),
                         (["host=[1]"], "host must be a non-empty string")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            check_options(tool_config("app", bad))
    cfg = tool_config("app", [f"ckpt={tmp_path / 'nothing'}", "device=cpu"])
    with pytest.raises(MissingCheckpointError):
        load_app(cfg)
    with pytest.raises(SystemExit) as done:
        user_errors_exit(serve)(cfg)
    err = capsys.readouterr().err.strip().splitlines()
    assert done.value.code == 2 and len(err) == 1 and err[0].startswith("error: checkpoint directory not found")


def test_a_taken_port_is_one_line(tiny_ar):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UserError, match=f"cannot serve on 127.0.0.1:{port}: the port is taken"):
            serve(tool_config("app", [f"ckpt={tiny_ar}", "device=cpu", f"port={port}"]))


def test_without_ckpt_the_demo_run_is_served(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)  # no runs/ar_demo here
    with pytest.raises(MissingCheckpointError, match="runs/ar_demo"):
        load_app(tool_config("app", ["device=cpu"]))
    assert "no ckpt= given: using the demo run runs/ar_demo" in capsys.readouterr().out


@pytest.mark.slow
def test_the_page_in_a_browser(tiny_ar, tmp_path):
    """Start tools/app.py, click Generate in headless Chromium, upload an image, then a text file: one error
    message."""
    reason = browser_missing()
    if reason and os.environ.get("IBQ_REQUIRE_BROWSER") == "1":  # .ci/run sets it once chromium is installed
        pytest.fail(f"IBQ_REQUIRE_BROWSER=1 but no headless browser: {reason}")
    if reason:  # a machine without Debian's chromium (the reason names the apt command); CI requires it (above)
        pytest.skip(f"no headless browser: {reason}")
    from selenium.webdriver.common.by import By

    notes = tmp_path / "notes.txt"
    notes.write_text("not an image\n")
    with running_app(tiny_ar, "device=cpu") as url, browser() as driver:
        driver.get(url)
        size, timing = click_generate(driver)
        assert size == grid_size(4, 4)  # the page opens on the first 4 classes x 4 images
        assert re.fullmatch(r"16 images in \d+\.\d\d s: \d+ ms per image \(cpu\)", timing), timing
        assert not error_messages(driver)
        photo = tmp_path / "photo.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(photo)
        upload(driver, photo)
        assert wait_for(driver, lambda d: image_size(d, "reconstruction"), 60, "the reconstruction") == (RES, RES)
        assert image_size(driver, "tokens") == (RES, RES)
        assert wait_for(driver, lambda d: d.find_element(By.ID, "psnr").text, 60, "the PSNR").startswith("PSNR ")
        driver.find_element(By.CSS_SELECTOR, "#upload button[aria-label=Clear]").click()
        upload(driver, notes)
        messages = wait_for(driver, error_messages, 60, "the error message")
        assert len(messages) == 1, messages
        assert messages[0].startswith("notes.txt is not an image this page can read"), messages
        assert "Traceback" not in driver.page_source and "/tmp/" not in messages[0]
