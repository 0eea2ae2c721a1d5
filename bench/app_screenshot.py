"""A screenshot of the web page (tools/app.py) in headless Chromium, after one Generate click.

    python bench/app_screenshot.py                       # a tiny untrained model made on the fly -> docs/app.png
    python bench/app_screenshot.py ckpt=runs/ar_demo device=auto out=docs/app.png width=1280 height=860

Starts ``tools/app.py`` on a free local port, opens it in Debian's ``chromium`` through ``chromedriver``
(selenium; ``apt-get install -y chromium chromium-driver``; nothing is downloaded), clicks Generate, waits for
the grid and saves a PNG. tests/test_app.py drives the page with the same helpers.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
APT_INSTALL = "apt-get install -y chromium chromium-driver"
DEFAULTS = {"ckpt": None, "out": str(ROOT / "docs" / "app.png"), "width": 1280, "height": 860, "device": "cpu"}


def browser_missing() -> str | None:
    """Why no headless browser can run here (None when one can)."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    if missing:
        return f"{' and '.join(missing)} not installed (Debian: {APT_INSTALL})"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "the selenium package is not installed (the [dev] extra: pip install -e '.[dev]')"
    return None


def make_tiny_runs(directory: str | Path) -> Path:
    """An untrained tiny tokenizer (32 px -> 8x8 tokens of 64 codes) and AR generator over the demo's 10 class
    names, saved as the trainers save them; returns the AR run directory (its config names the tokenizer)."""
    import torch

    from generator.llama import GPTConfig, LlamaGPT
    from pipelines.checkpoint import save_model, weights_hash
    from pipelines.demo_data import CLASSES, class_folder
    from tokenizer.model import ImageTokenizer, TokenizerConfig

    directory = Path(directory)
    torch.manual_seed(0)
    tcfg = TokenizerConfig(resolution=32, base_channels=16, channel_mult=(1, 1, 1), attn_resolutions=(),
                           z_channels=16, embed_dim=16, num_codes=64)
    tok = directory / "tokenizer"
    save_model(tok, ImageTokenizer(tcfg).state_dict(), {"tokenizer": {"model": tcfg.to_dict()}})
    gcfg = GPTConfig(vocab_size=64, num_classes=len(CLASSES), grid=(8, 8), dim=32, n_layer=1, n_head=2,
                     ffn_multiple_of=16)
    ar = directory / "ar"
    save_model(ar, LlamaGPT(gcfg).state_dict(),
               {"generator": {"model": gcfg.to_dict(), "sample": {"cfg_scale": 2.0, "temperature": 1.0}},
                "classes": [class_folder(i) for i in range(len(CLASSES))],
                "tokenizer_hash": weights_hash(tok), "tokenizer_dir": str(tok)})
    return ar


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_app(ckpt: str | Path | None, *overrides: str, timeout: float = 180.0) -> Iterator[str]:
    """``tools/app.py`` in a child process on a free port of 127.0.0.1; yields its URL once it answers, and stops it
    on exit. A start that fails raises with the child's output."""
    port = free_port()
    args = [sys.executable, str(ROOT / "tools" / "app.py"), f"port={port}", "host=127.0.0.1", *overrides]
    if ckpt is not None:
        args.append(f"ckpt={ckpt}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(":"),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "GRADIO_ANALYTICS_ENABLED": "False"}
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"tools/app.py exited with {proc.returncode}:\n{log.read()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"tools/app.py did not answer on {url} within {timeout:.0f} s")
            time.sleep(0.25)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@contextlib.contextmanager
def browser(width: int = 1280, height: int = 860):
    """Debian's chromium, headless, through its chromedriver (selenium; no driver or browser download)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-extensions", "--hide-scrollbars",
                 f"--window-size={width},{height}"):
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_for(driver, condition, timeout: float = 120.0, what: str = "the page"):
    """``condition(driver)``'s first truthy value, polled until ``timeout``."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(condition, f"timed out waiting for {what}")


def image_size(driver, elem_id: str) -> tuple[int, int] | None:
    """(width, height) in pixels of the picture shown by the gr.Image with ``elem_id``, once it has loaded."""
    size = driver.execute_script(
        "const img = document.querySelector(`#${arguments[0]} img`);"
        "return img && img.complete && img.naturalWidth ? [img.naturalWidth, img.naturalHeight] : null;", elem_id)
    return tuple(size) if size else None


def click_generate(driver, timeout: float = 120.0) -> tuple[tuple[int, int], str]:
    """Click Generate; the grid's pixel size and the time text once both are shown."""
    from selenium.webdriver.common.by import By

    wait_for(driver, lambda d: d.find_element(By.ID, "generate_button"), timeout, "the Generate button").click()
    size = wait_for(driver, lambda d: image_size(d, "grid"), timeout, "the sample grid")
    text = wait_for(driver, lambda d: d.find_element(By.ID, "time").text.strip(), timeout, "the time text")
    return size, text


def upload(driver, path: str | Path, timeout: float = 60.0) -> None:
    """Open the Reconstruct tab and upload ``path`` as a visitor would (the file input of its upload box)."""
    from selenium.webdriver.common.by import By

    tab = wait_for(driver, lambda d: [t for t in d.find_elements(By.CSS_SELECTOR, "button[role=tab]")
                                      if t.text.strip() == "Reconstruct"], timeout, "the Reconstruct tab")[0]
    tab.click()
    box = wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#upload input[type=file]"), timeout,
                   "the upload box")[0]
    box.send_keys(str(Path(path).resolve()))


def error_messages(driver) -> list[str]:
    """The texts of the error messages (gr.Error toasts) shown on the page."""
    from selenium.webdriver.common.by import By

    return [e.text for e in driver.find_elements(By.CSS_SELECTOR, "[data-testid=toast-text]") if e.text.strip()]


def main(argv: list[str]) -> Path:
    from omegaconf import OmegaConf

    opts = OmegaConf.merge(OmegaConf.create(DEFAULTS), OmegaConf.from_dotlist(argv))
    unknown = set(opts) - set(DEFAULTS)
    if unknown:
        raise SystemExit(f"unknown option(s) {', '.join(sorted(unknown))}; takes {', '.join(DEFAULTS)}")
    reason = browser_missing()
    if reason:
        raise SystemExit(f"no headless browser: {reason}")
    out = Path(opts.out).resolve()  # both relative to the current directory, as in every tool
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(opts.ckpt).resolve() if opts.ckpt else make_tiny_runs(tmp)
        with running_app(ckpt, f"device={opts.device}") as url, browser(opts.width, opts.height) as driver:
            driver.get(url)
            size, timing = click_generate(driver)
            page_height = driver.execute_script("return document.documentElement.scrollHeight;")
            driver.set_window_size(opts.width, max(opts.height, page_height + 150))  # the whole page, no scrolling
            driver.execute_script("window.scrollTo(0, 0);")
            time.sleep(0.5)  # let the image settle in its frame
            png = driver.get_screenshot_as_png()
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.open(io.BytesIO(png)).save(out, optimize=True)  # smaller than the browser's PNG, same pixels
    print(f"grid {size[0]} x {size[1]} px, {timing} -> {out}")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
