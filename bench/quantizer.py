"""IBQ quantizer, naive vs tiled: peak memory and time of one forward + backward.

    python bench/quantizer.py                          # CPU: N = 2^14, 2^16, 2^18, D = 256, 4 x 16 x 16 positions
    python bench/quantizer.py device=cuda              # on a GPU
    python bench/quantizer.py log2_codes=[14] runs=5 mem_cap_gb=4 code_tile=16384

Every (N, impl) pair runs in its own subprocess so that peaks do not mix. Memory is the peak above
what the process holds after setup (module, codebook, z): on CUDA torch.cuda.max_memory_allocated,
on CPU the peak RSS (VmHWM, reset after setup through /proc/self/clear_refs). Both variants pay for
the codebook gradient (N x D floats) inside that peak. Time is the median of ``runs`` forward +
backward steps after ``warmup``. A naive run whose estimated peak exceeds ``mem_cap_gb`` (default:
80% of the free memory) is not started, and a run that dies or reports out-of-memory says so in its row.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from tokenizer.quantizer import IBQuantizer

DEFAULTS = {"log2_codes": [14, 16, 18], "dim": 256, "batch": 4, "grid": 16, "device": "cpu", "threads": 1,
            "runs": 3, "warmup": 1, "mem_cap_gb": None, "code_tile": None, "pos_tile": None, "seed": 0,
            "worker": None, "log2_n": None}
NAIVE_COPIES = 7  # the naive step holds about this many (positions x N) float32 tensors at its peak


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def worker(opts) -> dict:
    """One variant, one N: setup, reset the peak, warm up, time ``runs`` steps, report the peak."""
    torch.set_num_threads(opts.threads)
    device = torch.device(opts.device)
    n, m = 2**opts.log2_n, opts.batch * opts.grid * opts.grid
    tiles = {k: opts[k] for k in ("code_tile", "pos_tile") if opts[k] is not None}
    torch.manual_seed(opts.seed)
    q = IBQuantizer(n, opts.dim, impl=opts.worker, **tiles).to(device)
    z = torch.randn(opts.batch, opts.dim, opts.grid, opts.grid, device=device).requires_grad_(True)
    weight = torch.randn(opts.batch, opts.dim, opts.grid, opts.grid, device=device) / m
    cuda = device.type == "cuda"
    prime = q(z[:1, :, :1, :1])  # loads the BLAS / autograd code paths, so the baseline excludes them
    ((prime.z_q * weight[:1, :, :1, :1]).sum() + prime.loss).backward()
    del prime
    q.embedding.weight.grad, z.grad = None, None  # the peak below includes the codebook gradient
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        exact = _reset_peak_rss()
        base = _rss_mb("VmRSS")

    def step() -> float:
        q.embedding.weight.grad, z.grad = None, None
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = q(z)
        ((out.z_q * weight).sum() + out.loss).backward()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    try:
        for _ in range(opts.warmup):
            step()
        times = [step() for _ in range(opts.runs)]
    except torch.OutOfMemoryError:
        return {"error": "out of memory"}
    except RuntimeError as err:  # CPU allocation failure
        if "alloc" in str(err).lower() or "memory" in str(err).lower():
            return {"error": "out of memory"}
        raise
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else _rss_mb("VmHWM") - base
    return {"peak_mb": peak, "time_s": statistics.median(times), "times": times, "m": m,
            "peak_exact": cuda or exact, "tiled": q.tiled}


def run_variant(opts, impl: str, log2_n: int) -> dict:
    args = [f"{k}={v}" for k, v in OmegaConf.to_container(opts).items()
            if k not in ("worker", "log2_n", "log2_codes") and v is not None]
    cmd = [sys.executable, __file__, f"worker={impl}", f"log2_n={log2_n}", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    if proc.returncode < 0:
        return {"error": f"killed by signal {-proc.returncode} (out of memory?)"}
    return {"error": f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:] or ''}"}


def free_memory_gb(device: str) -> float:
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info()
        return free / 2**30
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("inf")


def describe(device: str, threads: int) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    name = platform.processor() or "CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name}, {os.cpu_count()} cores, {threads} torch thread(s)"


def fmt_ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.3f}" if a is not None and b else "-"


def main() -> None:
    opts = OmegaConf.merge(DEFAULTS, OmegaConf.from_cli(sys.argv[1:]))
    if opts.worker is not None:
        print("RESULT " + json.dumps(worker(opts)), flush=True)
        return
    m = opts.batch * opts.grid * opts.grid
    cap = opts.mem_cap_gb if opts.mem_cap_gb is not None else 0.8 * free_memory_gb(opts.device)
    print(f"IBQ quantizer forward+backward | {describe(opts.device, opts.threads)} | torch {torch.__version__}")
    print(f"positions {m} (batch {opts.batch} x {opts.grid}x{opts.grid}), D = {opts.dim}, "
          f"median of {opts.runs} after {opts.warmup} warm-up, naive memory cap {cap:.1f} GB")
    tiles = IBQuantizer(1, 1, **{k: opts[k] for k in ("code_tile", "pos_tile") if opts[k] is not None})
    print(f"tiled: code_tile {tiles.code_tile}, pos_tile {tiles.pos_tile}\n")
    header = ("| N | naive peak MB | tiled peak MB | memory tiled/naive | naive s | tiled s | time tiled/naive |")
    print(header)
    print("|" + "---|" * header.count(" | ") + "---|")
    for log2_n in opts.log2_codes:
        n = 2**log2_n
        need_gb = NAIVE_COPIES * m * n * 4 / 2**30
        if need_gb > cap:
            naive = {"error": f"not run: needs ~{need_gb:.1f} GB > cap {cap:.1f} GB"}
        else:
            naive = run_variant(opts, "naive", log2_n)
        tiled = run_variant(opts, "tiled", log2_n)
        cells = [f"2^{log2_n} = {n:,}"]
        for res in (naive, tiled):
            cells.append(res["error"] if "error" in res else f"{res['peak_mb']:.0f}")
        cells.append(fmt_ratio(tiled.get("peak_mb"), naive.get("peak_mb")))
        for res in (naive, tiled):
            cells.append("-" if "error" in res else f"{res['time_s']:.2f}")
        cells.append(fmt_ratio(tiled.get("time_s"), naive.get("time_s")))
        print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
