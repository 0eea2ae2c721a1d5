"""Push a run's checkpoint to the Hugging Face Hub with a generated model card: ``tools/push_to_hub.py``.

    python tools/push_to_hub.py run=runs/tokenizer_demo repo=me/ibq-tokenizer-demo
    python tools/push_to_hub.py run=runs/ar_demo repo=me/ibq-ar-demo revision=v1 private=true

One commit (``HfApi.create_commit``, after ``create_repo(exist_ok=True)`` and, for a ``revision`` other than main,
``create_branch(exist_ok=True)``) holds ``model.safetensors``, ``config.yaml`` and ``README.md``, the model card:
architecture, parameter count, training steps, the metrics of the run's eval JSON files, its sample grid or
reconstruction image (uploaded under ``images/``) and how to load it (``hf://<repo>``). An AR run's tokenizer goes
along in ``tokenizer/`` (unless it already is an ``hf://`` spec; its weights hash is checked first) and the pushed
``config.yaml`` names it as ``hf://<repo>[@revision]/tokenizer``, so ``tools/sample.py ckpt=hf://<repo>`` needs
nothing else. ``train_state/`` is not pushed (a run on the Hub is for inference and ``init_from``, not resume). The
token is huggingface_hub's: ``HF_TOKEN``, or ``hf auth login`` once.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pipelines.checkpoint import (
    CONFIG_FILE,
    FSDP_STEP_FILE,
    MODEL_FILE,
    STATE_CHECKSUM,
    TRAIN_STATE_DIR,
    checkpoint_dir,
    load_config,
    weights_hash,
)
from pipelines.cli import entry_point, require_bool, require_checkpoint, require_text
from pipelines.errors import ConfigError, MissingCheckpointError, UserError
from pipelines.generate import check_tokenizer
from pipelines.hub import PREFIX, HubSpec, is_hub, parse_spec, pinned
from pipelines.run_log import METRICS_FILE

EVAL_FILES = ("eval.json", "demo_eval.json", "gen_eval.json", "recon_eval_*.json")  # in the run directory
# (card caption, file in the run directory (a glob: the last match), name under images/ in the repository)
IMAGES = (("samples, one row per class", "samples/grid.png", "samples_grid.png"),
          ("originals above, reconstructions below", "reconstruct/side_by_side.png", "reconstructions.png"),
          ("training preview: originals above, reconstructions below", "images/recon_*.png", "training_recon.png"))
TOKENIZER_SUBFOLDER = "tokenizer"


class PushError(UserError, OSError):
    """The Hub refused the push (no token, no write access, unreachable): one line saying what to do."""


@dataclass
class Upload:
    """What one commit holds: path in the repository -> local file or content."""

    files: dict[str, Path | bytes]
    kind: str          # "tokenizer" | "generator"
    load_spec: str     # hf://<repo>[@revision]: how to load it
    weights: str       # the weights hash (pipelines.checkpoint.weights_hash)


def check_options(cfg: DictConfig) -> None:
    require_text(cfg, "run")
    require_text(cfg, "repo")
    try:
        spec = parse_spec(f"{PREFIX}{cfg.repo}")
    except ConfigError:
        spec = None
    if spec is None or spec.revision or spec.path:
        raise ConfigError(f"repo must be owner/name on the Hub (a branch goes in revision=), got {cfg.repo!r}")
    for key in ("revision", "message"):
        require_text(cfg, key, optional=True)
    require_bool(cfg, "private")
    require_checkpoint(cfg, "tokenizer", optional=True)


# --------------------------------------------------------------------------------------------- the content

def checkpoint_kind(config: dict[str, Any], run: str | Path) -> str:
    if isinstance(config.get("generator"), dict) and "model" in config["generator"] and "tokenizer_hash" in config:
        return "generator"
    if isinstance(config.get("tokenizer"), dict) and "model" in config["tokenizer"]:
        return "tokenizer"
    raise MissingCheckpointError(f"run={run} is neither a tokenizer nor an AR generator checkpoint of this project "
                                 "(its config.yaml has no tokenizer.model / generator.model)")


def plan_upload(run: str | Path, repo: str, revision: str | None = None, tokenizer: str | None = None) -> Upload:
    """The files of the commit: checkpoint, card, images, and for an AR run its tokenizer (see the module doc)."""
    run, revision = Path(run), None if revision == "main" else revision
    if is_hub(str(run)) or not (run / MODEL_FILE).is_file():
        raise MissingCheckpointError(f"run={run} is not a local checkpoint directory ({MODEL_FILE} + {CONFIG_FILE})")
    config = load_config(run)
    kind = checkpoint_kind(config, run)
    files: dict[str, Path | bytes] = {MODEL_FILE: run / MODEL_FILE, CONFIG_FILE: run / CONFIG_FILE}
    tokenizer_note = None
    if kind == "generator":
        tok = tokenizer or config.get("tokenizer_dir")
        if not tok:
            raise MissingCheckpointError(f"{run}/{CONFIG_FILE} records no tokenizer_dir; pass tokenizer=<dir | hf://...>")
        check_tokenizer(tok, config)  # the weights hash the generator was trained with
        if is_hub(tok):
            recorded = pinned(tok)
        else:
            local = checkpoint_dir(tok)
            files |= {f"{TOKENIZER_SUBFOLDER}/{name}": local / name for name in (MODEL_FILE, CONFIG_FILE)}
            recorded = str(HubSpec(repo, revision, TOKENIZER_SUBFOLDER))
        tokenizer_note = (recorded, tok)
        files[CONFIG_FILE] = OmegaConf.to_yaml(OmegaConf.create({**config, "tokenizer_dir": recorded})).encode()
    images = {}
    for caption, pattern, name in IMAGES:
        found = sorted(run.glob(pattern))
        if found:
            files[f"images/{name}"] = found[-1]
            images[f"images/{name}"] = caption
    load_spec, weights = str(HubSpec(repo, revision, "")), weights_hash(run)
    files["README.md"] = model_card(run, config, kind, repo, load_spec, images, weights, tokenizer_note).encode()
    return Upload(files, kind, load_spec, weights)


def parameter_count(path: Path) -> int:
    """Weights in a safetensors file, read from its header (no tensor is loaded)."""
    from safetensors import safe_open

    total = 0
    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            n = 1
            for d in f.get_slice(key).get_shape():
                n *= d
            total += n
    return total


def training_steps(run: Path) -> int | None:
    """The step of the checkpoint: its ``train_state`` record (or the tokenizer's ``eval.json``, written at the end),
    else the last line of ``metrics.jsonl``."""
    for record in (run / TRAIN_STATE_DIR / STATE_CHECKSUM, run / TRAIN_STATE_DIR / FSDP_STEP_FILE, run / "eval.json"):
        try:
            return int(json.loads(record.read_text())["step"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    try:
        lines = [line for line in (run / METRICS_FILE).read_text().splitlines() if line.strip()]
        return int(json.loads(lines[-1])["step"]) if lines else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def eval_metrics(run: Path) -> list[tuple[str, str, Any]]:
    """(file, metric, value) from the run's eval JSON files: ``metrics`` of tools/fid.py's, the numbers of the
    tokenizer trainer's ``eval.json``."""
    rows = []
    for pattern in EVAL_FILES:
        for path in sorted(run.glob(pattern)):
            try:
                doc = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            values = doc.get("metrics") if isinstance(doc.get("metrics"), dict) else doc
            rows += [(path.name, k, v) for k, v in values.items()
                     if isinstance(v, int | float) and not isinstance(v, bool) and k != "step"]
    return rows


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _architecture(config: dict[str, Any], kind: str) -> list[tuple[str, Any]]:
    if kind == "tokenizer":
        from tokenizer.model import TokenizerConfig

        m = TokenizerConfig.from_dict(config["tokenizer"]["model"])
        return [("quantizer", m.quantizer), ("codebook size", m.num_codes), ("code dimension", m.embed_dim),
                ("resolution", f"{m.resolution} px -> {m.grid}x{m.grid} tokens (downsampling {m.downsample})"),
                ("channels", f"{m.base_channels} x {list(m.channel_mult)}"),
                ("res blocks (encoder / decoder)", f"{m.enc_res_blocks} / {m.dec_res_blocks}"),
                ("attention at", list(m.attn_resolutions) or "none"), ("norm", m.norm)]
    from generator.llama import GPTConfig

    g = GPTConfig.from_dict(config["generator"]["model"])
    return [("size", config["generator"].get("name", "custom")), ("layers / heads / width", f"{g.n_layer} / "
            f"{g.n_head} / {g.dim}"), ("vocabulary (tokenizer codes)", g.vocab_size), ("classes", g.num_classes),
            ("token grid", "x".join(map(str, g.grid))), ("head norm / class-token rotary", f"{g.head_norm} / "
            f"{g.rope_cls}"), ("tokenizer weights hash", config.get("tokenizer_hash"))]


def _training(run: Path, config: dict[str, Any], kind: str) -> list[tuple[str, Any]]:
    train = config.get("train") or {}
    data = (config.get("data") or {}).get("root") if kind == "tokenizer" else config.get("shards")
    rows = [("steps", training_steps(run)), ("batch size", train.get("batch_size")), ("learning rate", train.get("lr")),
            ("mixed precision", train.get("mixed_precision")), ("data", data)]
    if kind == "generator" and config.get("classes"):
        names = config["classes"]
        rows.append(("class names", ", ".join(map(str, names[:20])) + (" ..." if len(names) > 20 else "")))
    if isinstance(config.get("init_from_source"), dict):
        rows.append(("initialised from", config["init_from_source"].get("dir")))
    if isinstance(config.get("converted_from"), dict):
        c = config["converted_from"]
        rows.append(("converted from", f"{c.get('source')} {c.get('file')}"))
    return [(k, v) for k, v in rows if v is not None]


def _table(rows: list[tuple[str, Any]]) -> list[str]:
    return ["| | |", "|---|---|", *[f"| {k} | {_value(v)} |" for k, v in rows]]


def model_card(run: Path, config: dict[str, Any], kind: str, repo: str, load_spec: str, images: dict[str, str],
               weights: str, tokenizer: tuple[str, str] | None = None) -> str:
    """README.md of the repository: front matter for the Hub, then what the model is, its numbers and how to load it."""
    what = ("An IBQ image tokenizer (Index Backpropagation Quantization, arXiv 2412.02692)" if kind == "tokenizer"
            else "A class-conditional Llama-style autoregressive image generator over IBQ tokens")
    tags = ["ibq-ar", "ibq", "image-tokenizer" if kind == "tokenizer" else "image-generation"]
    origin = "converted from the official weights by" if config.get("converted_from") else "trained with"
    lines = ["---", "library_name: ibq-ar", "tags:", *[f"- {t}" for t in tags], "---", "",
             f"# {repo.split('/')[1]}", "", f"{what}, {origin} the ibq-ar toolkit.", "", "## Use", "",
             "With the ibq-ar repository checked out:", "", "```bash"]
    if kind == "tokenizer":
        lines += [f"python tools/reconstruct.py tokenizer={load_spec} input=<image | folder> out=recon",
                  f"python -m pipelines.tokens.extract tokenizer_ckpt={load_spec} data.root=<images> "
                  "out_dir=<token shards>", "```", "", "```python", "from tokenizer.model import load_tokenizer",
                  f'tok = load_tokenizer("{load_spec}")   # fetched into the Hugging Face cache',
                  "ids = tok.tokenize(images)             # (B, 3, H, W) in [-1, 1] -> (B, h, w)", "```"]
    else:
        lines += [f"python tools/sample.py ckpt={load_spec} class=0 n=8", f"python tools/fid.py mode=gen "
                  f"ar={load_spec} ref=<reference images | npz>", "```", "",
                  f"Its tokenizer: `{tokenizer[0]}` (recorded in config.yaml; sampling checks its weights hash)."
                  if tokenizer else ""]
    lines += ["", f"`hf://{repo}@<commit>` pins a commit; `HF_HUB_OFFLINE=1` uses the cached copy.", "",
              "## Model", "", *_table([*_architecture(config, kind), ("parameters", parameter_count(run / MODEL_FILE)),
                                       ("weights hash", weights)]),
              "", "## Training", "", *_table(_training(run, config, kind))]
    metrics = eval_metrics(run)
    if metrics:
        lines += ["", "## Metrics", "", "| file | metric | value |", "|---|---|---|",
                  *[f"| {f} | {k} | {_value(v)} |" for f, k, v in metrics]]
    if images:
        lines += ["", "## Images", ""] + [f"![{caption}]({path})\n\n*{caption}*\n" for path, caption in images.items()]
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------------------------- the push

@contextmanager
def _pushing(repo: str) -> Iterator[None]:
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    try:
        yield
    except OfflineModeIsEnabled as err:
        raise PushError(f"pushing to {repo} needs the network, and HF_HUB_OFFLINE=1 is set; unset it") from err
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        first = " ".join(str(err).split("\n\n")[0].split())
        fix = ("log in (`hf auth login`) or set HF_TOKEN to a token with write access to it"
               if status in (401, 403) else "see the Hub's message")
        raise PushError(f"push to {repo} on {constants.ENDPOINT} failed ({first}); {fix}") from err


def push(cfg: DictConfig) -> dict[str, Any]:
    check_options(cfg)
    upload = plan_upload(cfg.run, cfg.repo, cfg.revision, cfg.tokenizer)
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi()
    message = cfg.message or f"Upload {upload.kind} checkpoint (weights {upload.weights}) from {cfg.run}"
    with _pushing(cfg.repo):
        api.create_repo(cfg.repo, private=cfg.private, exist_ok=True)
        if cfg.revision and cfg.revision != "main":
            api.create_branch(cfg.repo, branch=cfg.revision, exist_ok=True)
        info = api.create_commit(cfg.repo, operations=[CommitOperationAdd(path_in_repo=p, path_or_fileobj=src)
                                                       for p, src in upload.files.items()],
                                 commit_message=message, revision=cfg.revision)
    pinned_spec = str(HubSpec(cfg.repo, info.oid, ""))
    print(f"pushed {cfg.run} ({upload.kind}; {', '.join(sorted(upload.files))}) -> {info.commit_url}\n"
          f"load it with {upload.load_spec} (this commit: {pinned_spec}), e.g. "
          + (f"python tools/sample.py ckpt={upload.load_spec}" if upload.kind == "generator"
             else f"python tools/reconstruct.py tokenizer={upload.load_spec} input=<images>"))
    return {"repo": cfg.repo, "revision": cfg.revision or "main", "commit": info.oid, "url": info.commit_url,
            "files": sorted(upload.files), "load": upload.load_spec, "pinned": pinned_spec}


main = entry_point("push_to_hub", push, tool=True)


if __name__ == "__main__":
    main()
