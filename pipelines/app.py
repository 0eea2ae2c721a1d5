"""A web page to try a model: class-conditional samples and tokenizer reconstructions (Gradio).

    python tools/app.py                                  # the demo run (runs/ar_demo) on http://127.0.0.1:7860
    python tools/app.py ckpt=runs/ar_B device=cuda port=8080

Generate draws with the project's one sampling recipe (``pipelines.generate``: the run's recipe for the page's
starting values, the ``(seed, class, index)`` seeding rule) and lays the samples out as ``tools/sample.py``'s
``grid.png`` (``pipelines.sample.class_grid``), so a page's grid for seed S, classes C and n per class is that
command's ``grid.png`` pixel for pixel. Reconstruct centre-crops an upload to the tokenizer's resolution as
``tools/reconstruct.py`` does (``pipelines.reconstruct.load_for_tokenizer`` / ``round_trip``).

Input the user can fix on the page (no class picked, a file that is not an image) is one message there
(``gr.Error``); an unexpected failure is one message too, its traceback in the server's log only. A missing or
mismatched checkpoint stops the start with the usual one ``error:`` line. Gradio is the optional extra ``[app]``
(``make install`` installs it); only ``build_page`` and ``serve`` import it, so the rest runs without it.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from generator.llama import LlamaGPT
from generator.sampling import CFG_SCHEDULES
from pipelines.cli import entry_point, error_line, require_bool, require_checkpoint, require_int, require_text
from pipelines.data import CorruptImageError
from pipelines.errors import ConfigError, UserError
from pipelines.generate import (
    SAMPLING_KEYS,
    check_sampling_options,
    iter_images,
    load_run_or_demo,
    resolve_classes,
    sample_plan,
    sampling_recipe,
)
from pipelines.images import psnr, to_uint8
from pipelines.reconstruct import load_for_tokenizer, round_trip
from pipelines.sample import class_grid
from tokenizer.model import ImageTokenizer

log = logging.getLogger(__name__)

TOKEN_COLOURMAP = "turbo"  # code id 0 .. K-1 -> blue .. red on the token map
PAGE_CLASSES = 4  # classes selected when the page opens (the first ones)
PAGE_COUNT = 4  # samples per class when the page opens
ONE_AT_A_TIME = "model"  # both tabs queue for the one loaded model (the sampler's KV cache is not shared)
# Pictures fill their frame's width (a 32 px tokenizer's samples are tiny at their own size); token maps and small
# images stay crisp when enlarged.
PAGE_CSS = """
#grid .image-frame, #original .image-frame, #reconstruction .image-frame, #tokens .image-frame { width: 100%; }
#grid img, #original img, #reconstruction img, #tokens img { width: 100%; height: auto; max-height: 60vh;
  object-fit: contain; }
#original img, #reconstruction img, #tokens img { image-rendering: pixelated; }
"""


@dataclass
class Loaded:
    """What the page serves: the generator, its tokenizer and the settings fixed at start-up."""

    model: LlamaGPT
    tokenizer: ImageTokenizer
    config: dict[str, Any]
    ckpt: str
    names: list[str]  # class names in id order (ids as text when the run recorded none)
    recipe: dict[str, Any]  # the run's sampling recipe: the page's starting values
    device: torch.device
    compile: bool
    batch_size: int
    max_images: int


def check_options(cfg: DictConfig) -> None:
    for key in ("ckpt", "tokenizer"):
        require_checkpoint(cfg, key, optional=True)
    require_checkpoint(cfg, "demo_ckpt")
    for key in ("host", "device"):
        require_text(cfg, key)
    port = cfg.port
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigError(f"port must be an integer in [1, 65535], got {port!r}")
    for key in ("batch_size", "max_images", "max_upload_mb"):
        require_int(cfg, key, 1)
    require_bool(cfg, "compile")


def load_app(cfg: DictConfig) -> Loaded:
    """The checkpoint named by ``cfg`` (the demo run without ``ckpt=``), loaded once for every visitor."""
    check_options(cfg)
    ckpt, model, tokenizer, config, device = load_run_or_demo(cfg)
    names = [str(n) for n in config.get("classes") or range(model.cfg.num_classes)]
    recipe = sampling_recipe(dict.fromkeys(SAMPLING_KEYS), config)
    return Loaded(model, tokenizer, config, str(ckpt), names, recipe, device, cfg.compile, cfg.batch_size,
                  cfg.max_images)


def _whole(value: Any, key: str) -> int:
    """A page's number field as an int (a browser may send 3.0); anything else is a UserError naming the field."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key} must be a whole number, got {value!r}")
    return value


def generate_grid(app: Loaded, classes: Sequence[str], cfg: float, cfg_schedule: str, temperature: float,
                  top_k: int, top_p: float, seed: int, count: int) -> tuple[np.ndarray, str]:
    """(uint8 grid (H, W, 3), one row per class; the time it took) for the page's Generate button.

    Class names (or ids as text) as ``tools/sample.py class=[...]`` takes them; the same settings there give the
    same images."""
    if not classes:
        raise UserError("pick at least one class")
    ids = list(dict.fromkeys(resolve_classes(list(classes), app.config)))  # one row per class, in the order picked
    seed, count, top_k = _whole(seed, "seed"), _whole(count, "count"), _whole(top_k, "top_k")
    if seed < 0:
        raise ConfigError(f"seed must be >= 0, got {seed}")
    if not 1 <= count * len(ids) <= app.max_images:
        raise ConfigError(f"{count} x {len(ids)} class(es) = {count * len(ids)} images; this page draws 1 to "
                          f"{app.max_images} at a time (max_images)")
    given = {"cfg": cfg, "cfg_schedule": cfg_schedule, "temperature": temperature, "top_k": top_k, "top_p": top_p}
    check_sampling_options(given, optional=False)
    recipe = sampling_recipe(given, app.config)
    labels, indices = sample_plan(ids, count)
    shown: dict[int, list[torch.Tensor]] = {c: [] for c in ids}
    start = time.perf_counter()
    for chunk, images in iter_images(app.model, app.tokenizer, labels, indices, recipe, seed, app.batch_size,
                                     progress=False, compiled=app.compile):
        for c, img in zip(chunk.tolist(), images, strict=True):
            shown[c].append(img)
    seconds = time.perf_counter() - start
    n = len(labels)
    where = f"{app.device.type}{', compiled step' if app.compile else ''}"
    timing = f"{n} image{'s' if n > 1 else ''} in {seconds:.2f} s: {seconds / n * 1000:.0f} ms per image ({where})"
    return class_grid(shown, ids).numpy(), timing


def token_map(ids: torch.Tensor, num_codes: int, scale: int = 1) -> np.ndarray:
    """The (h, w) token ids as a uint8 (h*scale, w*scale, 3) picture: code 0 .. K-1 along the colour map."""
    from matplotlib import colormaps

    values = ids.detach().cpu().double().numpy() / max(num_codes - 1, 1)
    rgb = (colormaps[TOKEN_COLOURMAP](values)[..., :3] * 255).round().astype(np.uint8)
    return rgb.repeat(scale, axis=0).repeat(scale, axis=1)


def reconstruct_upload(app: Loaded, path: str | Path | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """(the image as the tokenizer sees it, its reconstruction, the token map, a PSNR line) of an uploaded file.
    A file that is not a decodable image is a ``CorruptImageError`` naming the file."""
    if path is None:
        raise UserError("upload an image first")
    res = app.tokenizer.cfg.resolution
    try:
        x = load_for_tokenizer(path, res).unsqueeze(0).to(app.device)
    except CorruptImageError as err:  # name the upload as the visitor knows it, not by the server's temp path
        name = Path(path).name
        reason = str(err.__cause__ or err).replace(str(path), name)
        raise CorruptImageError(f"{name} is not an image this page can read ({reason})") from err
    ids, rec = round_trip(app.tokenizer, x)
    h, w = ids.shape[1:]
    num_codes = app.tokenizer.cfg.num_codes
    text = (f"PSNR {float(psnr(x, rec)[0]):.2f} dB | {h} x {w} tokens, {len(ids.unique())} distinct of "
            f"{num_codes} codes | {res} x {res} px")
    return (to_uint8(x)[0].numpy(), to_uint8(rec)[0].numpy(), token_map(ids[0], num_codes, max(1, res // h)), text)


def on_page(fn: Callable) -> Callable:
    """A page callback whose every failure is one message on the page (``gr.Error``), never a traceback there;
    an unexpected one is logged with its traceback on the server."""
    import gradio as gr

    @functools.wraps(fn)
    def wrapper(*args: Any) -> Any:
        try:
            return fn(*args)
        except (UserError, OSError) as err:
            raise gr.Error(error_line(err), print_exception=False) from None
        except Exception as err:  # a bug, not the visitor's input: the message says where the details are
            log.exception("page callback %s failed", getattr(getattr(fn, "func", fn), "__name__", fn))
            raise gr.Error(f"internal error ({type(err).__name__}: {error_line(err)}); the server's log has the "
                           "details", print_exception=False) from None

    return wrapper


def build_page(app: Loaded):
    """The page: a Generate tab (classes, guidance, sampling, seed, count -> grid + time) and a Reconstruct tab
    (upload -> the cropped image, its reconstruction, the token map, PSNR)."""
    import gradio as gr

    r = app.recipe
    title = f"IBQ + AR: {Path(app.ckpt).name}"
    with gr.Blocks(title=title, analytics_enabled=False) as page:
        gr.Markdown(f"### {title}\n{len(app.names)} classes, {'x'.join(map(str, app.model.cfg.grid))} tokens of "
                    f"{app.model.cfg.vocab_size} codes, {app.tokenizer.cfg.resolution} px, on {app.device}")
        with gr.Tab("Generate", id="generate"):
            with gr.Row():
                with gr.Column(scale=1):
                    classes = gr.Dropdown(app.names, value=app.names[:PAGE_CLASSES], multiselect=True,
                                          label="classes", elem_id="classes")
                    cfg = gr.Slider(0, max(10.0, r["cfg"]), value=r["cfg"], step=0.1, label="guidance scale",
                                    info="1 = no guidance", elem_id="cfg")
                    schedule = gr.Radio(list(CFG_SCHEDULES), value=r["cfg_schedule"], label="guidance schedule",
                                        elem_id="cfg_schedule")
                    temperature = gr.Slider(0.05, max(2.0, r["temperature"]), value=r["temperature"], step=0.05,
                                            label="temperature", elem_id="temperature")
                    with gr.Row():
                        top_k = gr.Number(r["top_k"], precision=0, minimum=0, label="top-k (0 = off)",
                                          elem_id="top_k")
                        top_p = gr.Slider(min(0.05, r["top_p"]), 1.0, value=r["top_p"], step=0.01,
                                          label="top-p (1 = off)", elem_id="top_p")
                    with gr.Row():
                        seed = gr.Number(0, precision=0, minimum=0, label="seed", elem_id="seed")
                        count = gr.Slider(1, app.max_images, value=min(PAGE_COUNT, app.max_images), step=1,
                                          label="images per class", elem_id="count")
                    run = gr.Button("Generate", variant="primary", elem_id="generate_button")
                with gr.Column(scale=2):
                    grid = gr.Image(label="samples (one row per class)", type="numpy", format="png",
                                    interactive=False, elem_id="grid")
                    timing = gr.Markdown(elem_id="time")
            run.click(on_page(functools.partial(generate_grid, app)),
                      [classes, cfg, schedule, temperature, top_k, top_p, seed, count], [grid, timing],
                      concurrency_id=ONE_AT_A_TIME)
        with gr.Tab("Reconstruct", id="reconstruct"):
            upload = gr.File(label="an image (PNG, JPEG, ...)", type="filepath", elem_id="upload")
            with gr.Row():
                shown = [gr.Image(label=label, type="numpy", format="png", interactive=False, elem_id=eid)
                         for label, eid in (("input (resized, centre-cropped)", "original"),
                                            ("reconstruction", "reconstruction"),
                                            (f"token ids ({TOKEN_COLOURMAP}: 0 blue .. "
                                             f"{app.tokenizer.cfg.num_codes - 1} red)", "tokens"))]
            score = gr.Markdown(elem_id="psnr")
            upload.upload(on_page(functools.partial(reconstruct_upload, app)), [upload], [*shown, score],
                          concurrency_id=ONE_AT_A_TIME)
    return page


def serve(cfg: DictConfig) -> None:
    """Load the checkpoint, then serve the page until Ctrl-C (a bad checkpoint stops here, before any serving)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home: the page works offline
    app = load_app(cfg)
    try:
        import gradio  # noqa: F401
    except ImportError as err:
        raise UserError("the web page needs gradio: pip install -e '.[app]' (make install installs it)") from err
    page = build_page(app)
    try:
        page.queue(default_concurrency_limit=1).launch(
            server_name=cfg.host, server_port=cfg.port, max_file_size=f"{cfg.max_upload_mb}mb", ssr_mode=False,
            show_error=False, footer_links=[], quiet=True, css=PAGE_CSS, prevent_thread_lock=True)
    except OSError as err:  # Gradio's message names its own environment variable; say it with this tool's key
        raise UserError(f"cannot serve on {cfg.host}:{cfg.port}: the port is taken or the address is not this "
                        "machine's; choose another with port=<n> / host=<address>") from err
    print(f"serving {app.ckpt} on http://{cfg.host}:{cfg.port} (Ctrl-C stops)", flush=True)
    page.block_thread()


main = entry_point("app", serve, tool=True)


if __name__ == "__main__":
    main()
