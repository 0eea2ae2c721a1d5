"""One command that measures a GPU with no dataset: training, sampling, quantizer and extraction throughput.

    make gpu-check                                   # = python bench/gpu_check.py (the first CUDA device)
    python bench/gpu_check.py steps=50 ar_batch=32 out=runs/gpu_check.json
    python bench/gpu_check.py device=cpu small=true  # tiny sizes on CPU: what the test suite runs

Rows (each in its own try: one failing, e.g. out of memory, is reported in its row and the rest go on):

- ``tokenizer``: ``+experiment=imagenet_256`` (256 px, 16,384 codes, reference widths), ``steps`` training steps
  (discriminator + autoencoder, as ``pipelines.train.tokenizer``) under bf16 autocast: s/step, images/s.
- ``ar_eager`` / ``ar_compiled``: ``generator=B`` on 16x16 tokens of 16,384 codes, ``steps`` AdamW steps under
  bf16 autocast, plain and ``torch.compile``d: tokens/s and MFU = ``LlamaGPT.flops_per_token`` x tokens/s /
  the device's dense bf16 peak (``PEAK_BF16_TFLOPS``, looked up by name).
- ``sample_eager`` / ``sample_compiled``: ``generate`` with AR-B (bf16 weights), batch ``sample_batch``, CFG
  (doubled batch): tokens/s, images/s; the compiled row uses ``generate(..., compiled=True)``
  (static KV cache, one compiled decode step; CUDA graphs on a GPU).
- ``quantizer_naive`` / ``quantizer_tiled``: IBQ at 2^18 codes x 256 dims, 4,096 positions, forward + backward.
- ``extract``: ``pipelines.tokens.extract`` of procedural 256 px PNGs with a random-weight 16,384-code tokenizer
  (bf16 encoder), images/s including PNG decoding.
- ``ddp``: two processes, AR-B under DistributedDataParallel (NCCL) when two GPUs are visible; skipped
  otherwise (on ``device=cpu``, ``cpu_ddp=true`` runs it over gloo: the code path without a GPU).

``small=true`` compiles with ``compile_backend=eager`` (TorchDynamo capture only: Inductor's C++ build takes minutes
on a small CPU); otherwise with Inductor.

Time: ``torch.cuda.synchronize`` around every timed region; warm-up steps (``warmup``) are not timed. Memory: the
peak above what the row held before its timed steps' setup (``bench/memory.py``): ``torch.cuda.max_memory_allocated``
on CUDA, VmHWM (peak RSS) on CPU. The table is printed and written as JSON to ``out``.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import os
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.memory import peak, reset_peak, sync  # noqa: E402
from generator.llama import GPTConfig, LlamaGPT, next_token_loss  # noqa: E402
from pipelines.cli import load_config  # noqa: E402

# Dense bf16 tensor-core peaks (TFLOPS, no sparsity) by a substring of torch.cuda.get_device_name(); first match wins.
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0),
    ("A100", 312.0), ("L40S", 362.0), ("A10G", 70.0), ("L4", 121.0),
]
ROWS = ("tokenizer", "ar_eager", "ar_compiled", "sample_eager", "sample_compiled", "quantizer_naive",
        "quantizer_tiled", "extract", "ddp")
DEFAULTS = {"device": "auto", "small": False, "steps": None, "warmup": 2, "tok_batch": None, "ar_batch": None,
            "sample_batch": None, "cfg_scale": 2.25, "rows": list(ROWS), "out": "runs/gpu_check.json",
            "threads": None, "compile_backend": None, "cpu_ddp": False}
# small=true: sizes that make every row a few seconds on one CPU core (the test suite runs it).
SMALL_TOKENIZER = ["data.resolution=32", "tokenizer.model.base_channels=16", "tokenizer.model.channel_mult=[1,1,1]",
                   "tokenizer.model.attn_resolutions=[]", "tokenizer.model.z_channels=16",
                   "tokenizer.model.embed_dim=16", "tokenizer.model.num_codes=64", "tokenizer.loss.disc_channels=16",
                   "tokenizer.loss.disc_layers=2"]
SMALL_GENERATOR = {"dim": 64, "n_layer": 2, "n_head": 2, "ffn_multiple_of": 16}


def peak_tflops(device: torch.device) -> tuple[str, float | None]:
    """The device's name and dense bf16 peak (TFLOPS), None when unknown (CPU, or a GPU not in the table)."""
    if device.type != "cuda":
        return "CPU", None
    name = torch.cuda.get_device_name(device)
    return name, next((tf for key, tf in PEAK_BF16_TFLOPS if key in name), None)


# ----------------------------------------------------------------------------------------------- models

def tokenizer_config(opts: DictConfig, root: str = "unused") -> DictConfig:
    """The composed ``+experiment=imagenet_256`` run config (tiny widths with ``small``)."""
    perceptual = "none" if opts.small or not _has_stlpips() else "stlpips_vgg"
    extra = [f"tokenizer.loss.perceptual={perceptual}"] + (["tokenizer.loss.perceptual_weight=0"]
                                                          if perceptual == "none" else [])
    return load_config("train_tokenizer", ["+experiment=imagenet_256", f"data.root={root}", *extra,
                                           *(SMALL_TOKENIZER if opts.small else [])])


def _has_stlpips() -> bool:
    import importlib.util

    return importlib.util.find_spec("stlpips_pytorch") is not None


def ar_config(opts: DictConfig) -> GPTConfig:
    """``generator=B`` at 16x16 tokens of 16,384 codes, 1,000 classes (or the small stand-in)."""
    spec = OmegaConf.to_container(load_config("train_ar", ["generator=B"]).generator.model, resolve=True)
    spec |= {"vocab_size": 16384, "num_classes": 1000, "grid": [16, 16]}
    if opts.small:
        spec |= {**SMALL_GENERATOR, "vocab_size": 64, "num_classes": 10, "grid": [4, 4]}
    return GPTConfig.from_dict(spec)


def procedural_images(n: int, size: int) -> torch.Tensor:
    """(n, 3, size, size) in [-1, 1]: the demo dataset's procedural shapes, made in memory."""
    import numpy as np

    from pipelines.demo_data import render_image

    rng = np.random.default_rng(0)
    imgs = [np.asarray(render_image(i % 10, rng, size), dtype=np.float32) for i in range(n)]
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2) / 127.5 - 1


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=torch.bfloat16)


def timed_steps(step: Callable[[], Any], device: torch.device, warmup: int, steps: int) -> tuple[float, float]:
    """(seconds per step, peak MiB above the memory held after warm-up) of ``steps`` calls of ``step``."""
    for _ in range(warmup):
        step()
    gc.collect()
    base = reset_peak(device)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - t0) / steps, peak(device) - base


def held_mib(device: torch.device) -> float:
    """What the row holds right now (weights, optimizer state, ...), MiB; CPU: the resident set."""
    return reset_peak(device)


# ----------------------------------------------------------------------------------------------- rows

def row_tokenizer(opts: DictConfig, device: torch.device) -> dict[str, Any]:
    from tokenizer.discriminator import PatchDiscriminator
    from tokenizer.losses import LossConfig, TokenizerLoss
    from tokenizer.model import ImageTokenizer, TokenizerConfig
    from tokenizer.perceptual import build_perceptual

    config = OmegaConf.to_container(tokenizer_config(opts), resolve=True)
    model_cfg = TokenizerConfig.from_dict(config["tokenizer"]["model"])
    loss_cfg = LossConfig.from_dict(config["tokenizer"]["loss"])
    before = held_mib(device)
    model = ImageTokenizer(model_cfg).to(device).train()
    disc = PatchDiscriminator(base_channels=loss_cfg.disc_channels, num_layers=loss_cfg.disc_layers).to(device)
    perceptual = build_perceptual(loss_cfg.perceptual, loss_cfg.vgg_weights) if loss_cfg.perceptual_weight > 0 \
        else None
    criterion = TokenizerLoss(loss_cfg, perceptual).to(device)
    opt_ae = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(disc.parameters(), lr=1e-4, betas=(0.5, 0.9))
    batch = opts.tok_batch or (2 if opts.small else 4)
    x = procedural_images(batch, model_cfg.resolution).to(device)
    state = {"step": 0}

    def step() -> None:  # pipelines/train/tokenizer.py's step, without logging, EMA and checkpoints
        with autocast(device):
            recon, q = model(x)
            logits_real, logits_fake_d = disc(x, recon.detach())
        d_loss, _ = criterion.discriminator_loss(logits_real, logits_fake_d, logits_real.detach().float().mean(),
                                                 logits_fake_d.detach().float().mean())
        d_loss.backward()
        opt_d.step()
        opt_d.zero_grad(set_to_none=True)
        disc.requires_grad_(False)
        with autocast(device):
            logits_fake = disc(recon)
        disc.requires_grad_(True)
        loss, _ = criterion.autoencoder_loss(x, recon, q, state["step"], logits_fake,
                                             last_layer=model.decoder.last_layer)
        loss.backward()
        opt_ae.step()
        opt_ae.zero_grad(set_to_none=True)
        state["step"] += 1

    seconds, step_peak = timed_steps(step, device, opts.warmup, opts.steps)
    return {"s_per_step": seconds, "images_per_s": batch / seconds, "batch": batch,
            "peak_mib": held_mib(device) - before + step_peak, "step_peak_mib": step_peak,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "num_codes": model_cfg.num_codes,
            "resolution": model_cfg.resolution, "perceptual": loss_cfg.perceptual, "precision": "bf16 autocast"}


def row_ar(opts: DictConfig, device: torch.device, compiled: bool) -> dict[str, Any]:
    torch.manual_seed(0)
    before = held_mib(device)
    model = LlamaGPT(ar_config(opts)).to(device).train()
    cfg = model.cfg
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.05,
                                  fused=device.type == "cuda")
    forward = torch.compile(model, backend=opts.compile_backend) if compiled else model
    batch = opts.ar_batch or (4 if opts.small else 64)
    tokens = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), device=device)
    labels = torch.randint(0, cfg.num_classes, (batch,), device=device)

    def step() -> None:  # pipelines/train/ar.py's step
        with autocast(device):
            logits = forward(tokens, labels)
        next_token_loss(logits, tokens).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds, step_peak = timed_steps(step, device, opts.warmup, opts.steps)
    tokens_per_s = batch * cfg.block_size / seconds
    name, tflops = peak_tflops(device)
    flops = model.flops_per_token()
    achieved = flops * tokens_per_s / 1e12
    return {"tokens_per_s": tokens_per_s, "s_per_step": seconds, "batch": batch, "params_m": model.num_params() / 1e6,
            "flops_per_token": flops, "achieved_tflops": achieved, "peak_tflops": tflops,
            "mfu": achieved / tflops if tflops else None, "peak_mib": held_mib(device) - before + step_peak,
            "step_peak_mib": step_peak, "precision": "bf16 autocast",
            "compiled": opts.compile_backend if compiled else False}


def row_sample(opts: DictConfig, device: torch.device, compiled: bool) -> dict[str, Any]:
    from generator.sampling import generate

    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = LlamaGPT(ar_config(opts)).to(device=device, dtype=dtype).eval()
    with torch.no_grad():
        model.output.weight.normal_(0, 0.02)  # non-degenerate logits
    batch = opts.sample_batch or (4 if opts.small else 64)
    labels = torch.arange(batch, device=device) % model.cfg.num_classes
    def run() -> None:  # compiled: static KV cache + one compiled decode step (the first call compiles: warm-up)
        generate(model, labels, cfg_scale=opts.cfg_scale, temperature=1.0,
                 generator=torch.Generator(device).manual_seed(0), compiled=compiled)

    seconds, step_peak = timed_steps(run, device, 1, 1 if opts.small else 2)
    return {"tokens_per_s": batch * model.cfg.block_size / seconds, "images_per_s": batch / seconds,
            "s_per_batch": seconds, "batch": batch, "cfg_scale": opts.cfg_scale, "peak_mib": step_peak,
            "dtype": str(dtype).removeprefix("torch."), "compiled": compiled}


def row_quantizer(opts: DictConfig, device: torch.device, impl: str) -> dict[str, Any]:
    from tokenizer.quantizer import IBQuantizer

    n, dim, side, batch = (2**10, 16, 4, 4) if opts.small else (2**18, 256, 32, 4)  # 4 x 32 x 32 = 4,096 positions
    torch.manual_seed(0)
    q = IBQuantizer(n, dim, impl=impl).to(device)
    z = torch.randn(batch, dim, side, side, device=device, requires_grad=True)
    weight = torch.randn_like(z)

    def step() -> None:
        q.embedding.weight.grad, z.grad = None, None
        out = q(z)
        ((out.z_q * weight).sum() + out.loss).backward()

    seconds, step_peak = timed_steps(step, device, 1, 3)
    return {"s_per_step": seconds, "peak_mib": step_peak, "codes": n, "dim": dim, "positions": batch * side * side,
            "tiled": bool(q.tiled)}


def row_extract(opts: DictConfig, device: torch.device) -> dict[str, Any]:
    from accelerate.state import AcceleratorState

    from pipelines.checkpoint import save_model
    from pipelines.demo_data import make_demo_dataset
    from pipelines.tokens.extract import extract
    from tokenizer.model import ImageTokenizer, TokenizerConfig

    config = OmegaConf.to_container(tokenizer_config(opts), resolve=True)
    model_cfg = TokenizerConfig.from_dict(config["tokenizer"]["model"])
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        torch.manual_seed(0)
        save_model(tmp / "tok", ImageTokenizer(model_cfg).state_dict(),
                   {"tokenizer": {"model": model_cfg.to_dict()}, "data": {"resolution": model_cfg.resolution}})
        per_class = 1 if opts.small else 26
        data = make_demo_dataset(tmp / "images", seed=0, train_per_class=per_class, val_per_class=1,
                                 size=model_cfg.resolution)
        cuda = device.type == "cuda"
        workers = 0 if opts.small else min(8, os.cpu_count() or 1)
        cfg = load_config("extract_tokens", [
            f"tokenizer_ckpt={tmp / 'tok'}", f"data.root={data}", f"out_dir={tmp / 'tokens'}", "shard_size=1000",
            f"batch_size={8 if opts.small else 64}", f"data.num_workers={workers}", f"cpu={not cuda}",
            f"mixed_precision={'bf16' if cuda else 'no'}"])
        AcceleratorState._reset_state(reset_partial_state=True)  # the device chosen here, not by an earlier row
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            result = extract(cfg)
        AcceleratorState._reset_state(reset_partial_state=True)
    return {"images_per_s": result["stats"]["images_per_s"], "images": result["num_images"],
            "variants": len(result["variants"]), "num_codes": model_cfg.num_codes,
            "resolution": model_cfg.resolution, "workers": workers, "batch": cfg.batch_size,
            "precision": "bf16 encoder" if cuda else "fp32"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, opts_yaml: str, port: int, out: str) -> None:
    """One of two processes: AR-B (small: the stand-in) under DDP, ``steps`` timed AdamW steps; rank 0 reports."""
    import torch.distributed as dist

    opts = OmegaConf.create(opts_yaml)
    cuda = opts.device != "cpu"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    try:
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(LlamaGPT(ar_config(opts)).to(device).train(),
                                                          device_ids=[rank] if cuda else None)
        cfg = model.module.cfg
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=cuda)
        batch = opts.ar_batch or (4 if opts.small else 64)
        tokens = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), device=device)
        labels = torch.randint(0, cfg.num_classes, (batch,), device=device)

        def step() -> None:
            with autocast(device):
                logits = model(tokens, labels)
            next_token_loss(logits, tokens).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        seconds, step_peak = timed_steps(step, device, opts.warmup, opts.steps)
        if rank == 0:
            Path(out).write_text(json.dumps({"tokens_per_s": 2 * batch * cfg.block_size / seconds,
                                             "s_per_step": seconds, "batch_per_process": batch,
                                             "step_peak_mib": step_peak, "backend": "nccl" if cuda else "gloo"}))
    finally:
        dist.destroy_process_group()


def row_ddp(opts: DictConfig, device: torch.device) -> dict[str, Any]:
    if device.type == "cuda" and torch.cuda.device_count() < 2:
        return {"skipped": f"needs two GPUs, {torch.cuda.device_count()} visible"}
    if device.type == "cpu" and not opts.cpu_ddp:
        return {"skipped": "no GPUs (cpu_ddp=true runs it on two CPU processes over gloo)"}
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ddp.json"
        mp.spawn(_ddp_worker, args=(OmegaConf.to_yaml(opts), _free_port(), str(out)), nprocs=2, join=True)
        return {"processes": 2, **json.loads(out.read_text())}


RUNNERS: dict[str, Callable[[DictConfig, torch.device], dict[str, Any]]] = {
    "tokenizer": row_tokenizer,
    "ar_eager": lambda o, d: row_ar(o, d, compiled=False),
    "ar_compiled": lambda o, d: row_ar(o, d, compiled=True),
    "sample_eager": lambda o, d: row_sample(o, d, compiled=False),
    "sample_compiled": lambda o, d: row_sample(o, d, compiled=True),
    "quantizer_naive": lambda o, d: row_quantizer(o, d, "naive"),
    "quantizer_tiled": lambda o, d: row_quantizer(o, d, "tiled"),
    "extract": row_extract,
    "ddp": row_ddp,
}


def run_row(name: str, opts: DictConfig, device: torch.device) -> dict[str, Any]:
    """One row; any failure (out of memory included) becomes ``{"error": ...}`` and memory is released."""
    t0 = time.perf_counter()
    try:
        result = RUNNERS[name](opts, device)
    except Exception as err:  # noqa: BLE001 - a row's failure must not stop the others
        oom = isinstance(err, torch.OutOfMemoryError)
        result = {"error": "out of memory" if oom else f"{type(err).__name__}: {err}".splitlines()[0][:300],
                  "traceback": traceback.format_exc()[-2000:]}
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    result["wall_s"] = time.perf_counter() - t0
    return result


# ----------------------------------------------------------------------------------------------- report

def _fmt(v: Any, spec: str = ".3g") -> str:
    return "-" if v is None else format(v, spec)


def _mem(mib: float) -> str:
    return f"{mib / 1024:.2f} GiB" if mib >= 1024 else f"{mib:.0f} MiB"


def summary(name: str, r: dict[str, Any]) -> tuple[str, str]:
    """(result, memory) cells of a row."""
    if "error" in r:
        return f"ERROR: {r['error']}", "-"
    if "skipped" in r:
        return f"skipped: {r['skipped']}", "-"
    mem = _mem(r["peak_mib"]) if "peak_mib" in r else f"{_mem(r.get('step_peak_mib', 0))} (step)"
    if name == "tokenizer":
        return (f"{r['s_per_step']:.3f} s/step, {r['images_per_s']:.1f} images/s (batch {r['batch']}, "
                f"{r['params_m']:.1f}M params, {r['num_codes']} codes, {r['resolution']} px, perceptual "
                f"{r['perceptual']})", mem)
    if name.startswith("ar_"):
        mfu = f"MFU {r['mfu']:.1%}" if r["mfu"] is not None else "MFU n/a (peak unknown)"
        how = f", compiled ({r['compiled']})" if r["compiled"] else ""
        return (f"{r['tokens_per_s']:,.0f} tokens/s, {r['achieved_tflops']:.3g} TFLOPS, {mfu} (batch {r['batch']}, "
                f"{r['params_m']:.1f}M params{how})", mem)
    if name.startswith("sample_"):
        return (f"{r['tokens_per_s']:,.0f} tokens/s, {r['images_per_s']:.1f} images/s (batch {r['batch']}, CFG "
                f"{r['cfg_scale']}, {r['dtype']})", mem)
    if name.startswith("quantizer_"):
        return (f"{r['s_per_step'] * 1e3:.1f} ms fwd+bwd ({r['codes']:,} codes x {r['dim']}, {r['positions']:,} "
                f"positions)", mem)
    if name == "extract":
        return (f"{r['images_per_s']:.1f} images/s ({r['images']} images x {r['variants']} views, "
                f"{r['num_codes']} codes, {r['resolution']} px, {r['precision']})", "-")
    if name == "ddp":
        return (f"{r['tokens_per_s']:,.0f} tokens/s over 2 processes ({r['backend']}, batch {r['batch_per_process']}"
                "/process)", mem)
    return json.dumps(r), "-"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    opts = OmegaConf.merge(DEFAULTS, OmegaConf.from_cli(list(sys.argv[1:] if argv is None else argv)))
    if opts.device == "auto":
        opts.device = "cuda" if torch.cuda.is_available() else "cpu"
    if opts.steps is None:
        opts.steps = 2 if opts.small else 20
    if opts.small:
        opts.warmup = min(opts.warmup, 1)
    if opts.compile_backend is None:
        opts.compile_backend = "eager" if opts.small else "inductor"
    unknown = sorted(set(opts.rows) - set(ROWS))
    if unknown:
        raise SystemExit(f"error: rows {unknown} unknown; valid rows: {', '.join(ROWS)}")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    device = torch.device(opts.device)
    name, tflops = peak_tflops(device)
    header = {"device": name, "peak_bf16_tflops": tflops, "torch": torch.__version__, "cuda": torch.version.cuda,
              "gpus_visible": torch.cuda.device_count() if torch.cuda.is_available() else 0, "small": opts.small,
              "steps": opts.steps, "warmup": opts.warmup,
              "mfu_formula": "MFU = flops_per_token x tokens/s / peak; flops_per_token = 6 N_tok + 12 n_layer T d + "
                             "6 N_cond / T (N_tok: weights used at every position, T = h*w positions, d = width, "
                             "N_cond: AdaLN projections, once per sequence; attention not discounted for the causal "
                             "mask)"}
    print(f"gpu-check | {name} | torch {torch.__version__} (CUDA {torch.version.cuda}) | small={opts.small} | "
          f"{opts.steps} timed steps after {opts.warmup} warm-up", flush=True)
    rows: dict[str, dict[str, Any]] = {}
    for row in opts.rows:
        rows[row] = run_row(row, opts, device)
        result, mem = summary(row, rows[row])
        print(f"  {row:<16} {result} | peak {mem} | {rows[row]['wall_s']:.0f} s", flush=True)
    report = {**header, "rows": rows}
    print("\n| row | result | peak memory |\n|---|---|---|")
    for row, r in rows.items():
        result, mem = summary(row, r)
        print(f"| {row} | {result} | {mem} |")
    print(f"\n{header['mfu_formula']}; peak {_fmt(tflops)} TFLOPS bf16 dense for {name}")
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"written: {out}")
    return report


if __name__ == "__main__":
    main()
