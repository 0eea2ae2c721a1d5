"""Train the class-conditional AR generator (stage two) on token shards. One script for one CPU, one GPU,
or many under `accelerate launch`.

    python -m pipelines.train.ar                                          # CPU demo: tiny model, runs/tokens_demo
    python -m pipelines.train.ar train.max_steps=4000 resume=true
    accelerate launch --multi_gpu --num_processes 8 -m pipelines.train.ar generator=B \
        shards=runs/tokens_imagenet run_dir=runs/ar_B train.batch_size=96 train.epochs=300 train.lr=3e-4 \
        train.warmup_steps=5000 train.ema_decay=null
    # XL / XXL: shard parameters with FSDP through an accelerate config (see README, "Stage two"):
    accelerate launch --config_file fsdp.yaml -m pipelines.train.ar generator=XXL ...

The vocabulary size, token grid and classes come from the shard manifest; the saved ``config.yaml``
records them with the tokenizer's weights hash and path, so sampling can refuse a different tokenizer.
The run directory holds ``model.safetensors`` (EMA weights when EMA is on) + ``config.yaml``, the
resumable ``train_state/``, ``metrics.jsonl`` and TensorBoard events. ``_train`` reads top to bottom: model,
data, resume, then the loop; a step is forward, ``next_token_loss``, backward, clip, optimizer step, EMA, then
logs, validation and checkpoint when due. Checkpointing, exact resume, the lr hook and the run-directory rules
are shared with the tokenizer trainer: ``pipelines/train/loop.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from omegaconf import DictConfig, OmegaConf

from generator.llama import GPTConfig, LlamaGPT, next_token_loss
from pipelines.checkpoint import CONFIG_FILE, has_train_state, load_config
from pipelines.cli import entry_point
from pipelines.data import EpochBatchSampler, collate_tokens, make_loader, save_class_index
from pipelines.ema import EMA
from pipelines.errors import ConfigError
from pipelines.progress import progress_bar
from pipelines.run_log import RunLogger
from pipelines.schemas import check_ar_run
from pipelines.tokens.shards import ShardManifest, TokenShardDataset
from pipelines.train.init_from import SOURCE_KEY, InitSource, check_source_tokenizer, init_generator
from pipelines.train.loop import Checkpointer, Progress, TrainOutcome, Window, due, lr_setter, start_run, train_batches


def lr_factor(step: int, warmup_steps: int, max_steps: int, final_ratio: float = 0.0) -> float:
    """Linear warm-up over ``warmup_steps``, then linear decay to ``final_ratio`` at ``max_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(max_steps - warmup_steps, 1)
    return 1.0 - (1.0 - final_ratio) * min(1.0, (step - warmup_steps) / span)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices (linear and embedding weights) only; none on norms' gains and biases."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def resolve_mixed_precision(name: str) -> str:
    """``auto`` = bf16 on a GPU, full precision on CPU."""
    if name == "auto":
        return "bf16" if torch.cuda.is_available() else "no"
    return name


def model_config(cfg: DictConfig, manifest: ShardManifest, saved: dict[str, Any] | None = None) -> GPTConfig:
    """The generator config with vocabulary, classes and grid taken from the shard manifest.

    ``saved`` (resuming: the run's own ``config.yaml``) is the architecture the run was built with."""
    spec = saved["generator"]["model"] if saved else OmegaConf.to_container(cfg.generator.model, resolve=True)
    spec = {k: v for k, v in spec.items() if k not in ("vocab_size", "num_classes", "grid")}
    return GPTConfig.from_dict({**spec, "vocab_size": manifest.num_codes, "num_classes": manifest.num_classes,
                                "grid": list(manifest.grid)})


@torch.no_grad()
def evaluate_loss(model: LlamaGPT, dataset: TokenShardDataset, batch_size: int, device: torch.device,
                  max_items: int | None = None) -> float:
    """Mean next-token cross-entropy (nats) on variant 0 of the first ``max_items`` items, labels kept."""
    was_training = model.training
    model.eval()
    n = len(dataset) if max_items is None else min(len(dataset), max_items)
    total, count = 0.0, 0
    for start in range(0, n, batch_size):
        items = [dataset[i] for i in range(start, min(n, start + batch_size))]
        tokens = torch.stack([t for t, _ in items]).to(device)
        labels = torch.tensor([y for _, y in items], device=device)
        total += next_token_loss(model(tokens, labels), tokens, reduction="sum").item()
        count += tokens.numel()
    model.train(was_training)
    return total / max(count, 1)


def train(cfg: DictConfig) -> TrainOutcome:
    """Run (or resume) training as configured: options checked, then the run directory claimed (locked, no
    clobbering: ``pipelines.train.loop.claim_run_dir``), then training."""
    t = cfg.train
    return start_run(cfg, lambda: Accelerator(mixed_precision=resolve_mixed_precision(t.mixed_precision),
                                              gradient_accumulation_steps=t.grad_accum, cpu=t.cpu), _train,
                     check_ar_run)  # every key but the shared ones (pipelines/schemas.py)


def _train(cfg: DictConfig, accelerator: Accelerator) -> TrainOutcome:
    t = cfg.train
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    set_seed(cfg.seed)
    run_dir = Path(cfg.run_dir)

    # A resumed run must keep reading tokens of the tokenizer it started with, and keeps the model it built.
    saved = load_config(run_dir) if cfg.resume and (run_dir / CONFIG_FILE).exists() else None
    train_set = TokenShardDataset(cfg.shards, variant=cfg.data.variant, seed=cfg.seed, verify=cfg.data.verify,
                                  expect_tokenizer_hash=saved.get("tokenizer_hash") if saved else None)
    manifest = train_set.manifest
    resuming = saved is not None and has_train_state(run_dir)
    # init_from: a new run from another generator's weights (its architecture; pipelines/train/init_from.py).
    source = InitSource.read(cfg.init_from, "generator") if cfg.init_from else None
    if source is not None:
        check_source_tokenizer(source, manifest, cfg.shards)
    gpt_cfg = model_config(cfg, manifest, saved if resuming else source.config if source else None)
    if resuming and gpt_cfg != (given := model_config(cfg, manifest)) and accelerator.is_main_process:
        changed = sorted(k for k, v in gpt_cfg.to_dict().items() if given.to_dict()[k] != v)
        print(f"resuming {run_dir}: the model is the run's own (config.yaml); generator.model keys {changed} "
              "of the current config are not applied")
    config = OmegaConf.to_container(cfg, resolve=True)
    config["generator"]["model"] = gpt_cfg.to_dict()
    config |= {"tokenizer_hash": manifest.tokenizer_hash, "tokenizer_dir": manifest.tokenizer_path,
               "classes": list(manifest.classes), "shards": str(cfg.shards)}
    config["train"]["mixed_precision"] = accelerator.mixed_precision

    if fsdp and cfg.val_shards:
        raise ConfigError("val_shards with FSDP is not supported yet (validation runs on the main process only); "
                         "set val_shards=null")
    if fsdp and t.ema_decay:
        raise ConfigError("train.ema_decay with FSDP is not supported (the EMA would hold a full copy per process); "
                         "set train.ema_decay=null")
    model = LlamaGPT(gpt_cfg)
    if source is not None:  # before the EMA copies the weights
        config[SOURCE_KEY] = init_generator(model, source, manifest.classes, accelerator.is_main_process,
                                            OmegaConf.to_container(cfg.generator.model, resolve=True))
    model.set_activation_checkpointing(t.activation_checkpointing)  # training forward only; not the architecture
    raw_model = model
    n_params = model.num_params()  # before any FSDP sharding
    # Same initial weights everywhere (seeded above); from here each process draws its own dropout and
    # label-dropout masks, as LlamaGen does (seed + rank). Resume restores each process's RNG state.
    set_seed(cfg.seed + accelerator.process_index)
    ema = EMA(model, t.ema_decay) if t.ema_decay else None
    if ema is not None:
        ema.model.to(accelerator.device)
    optimizer = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=tuple(t.betas),
                                  fused=torch.cuda.is_available() and not t.cpu)

    sampler = EpochBatchSampler(len(train_set), t.batch_size, accelerator.process_index,
                                accelerator.num_processes, seed=cfg.seed)
    loader = make_loader(train_set, sampler, cfg.data.num_workers, collate_tokens)
    # Each new DataLoader iterator draws a seed; from its own generator, not the global RNG that dropout and
    # label dropout use, or a resumed run (which starts a fresh iterator mid-epoch) would drift by one draw.
    loader.generator = torch.Generator().manual_seed(cfg.seed)
    progress = Progress.plan(sampler, t.grad_accum, t.epochs, t.max_steps)
    max_steps = progress.max_steps
    end_step = min(max_steps, t.stop_at_step) if t.stop_at_step else max_steps  # the schedule still uses max_steps
    set_lr = lr_setter([(optimizer, t.lr)], lambda step: lr_factor(step, t.warmup_steps, max_steps, t.final_lr_ratio))

    if t.compile:
        model = torch.compile(model)
    model, optimizer = accelerator.prepare(model, optimizer)

    checkpointer = Checkpointer(accelerator, run_dir, config, fsdp=fsdp)
    state = checkpointer.resume(progress) if cfg.resume else None
    if state is not None:
        raw_model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.load_state_dict(state["ema"])

    val_set = None
    if cfg.val_shards:
        val_set = TokenShardDataset(cfg.val_shards, variant="center", verify=cfg.data.verify,
                                    expect_tokenizer_hash=manifest.tokenizer_hash)

    logger = RunLogger(run_dir, enabled=accelerator.is_main_process, tensorboard=cfg.tensorboard,
                       start_step=progress.step)
    tokens_per_step = t.batch_size * t.grad_accum * accelerator.num_processes * gpt_cfg.block_size
    if accelerator.is_main_process:  # config.yaml is written with each checkpoint, beside the weights it describes
        save_class_index(manifest.classes, run_dir / "class_index.json")
        print(f"generator {cfg.generator.name}: {n_params / 1e6:.2f}M params "
              f"({gpt_cfg.n_layer} layers, width {gpt_cfg.dim}) | {len(train_set)} images x "
              f"{len(train_set.variants)} variants, {gpt_cfg.grid[0]}x{gpt_cfg.grid[1]} tokens of "
              f"{gpt_cfg.vocab_size} codes, {gpt_cfg.num_classes} classes | {progress.steps_per_epoch} steps/epoch | "
              f"{max_steps} steps | {accelerator.num_processes} process(es) on {accelerator.device}, "
              f"{accelerator.mixed_precision} precision | tokenizer {manifest.tokenizer_hash} | run dir {run_dir}")

    window, metrics = Window(), {}
    model.train()
    with progress_bar(end_step, "train ar", unit="step", initial=progress.step,
                      enabled=accelerator.is_main_process) as bar:
        for batch in train_batches(loader, sampler, progress, t.grad_accum, end_step):
            lr = set_lr(progress.step)
            tokens, labels = (b.to(accelerator.device, non_blocking=True) for b in batch)
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    logits = model(tokens, labels)  # through the DDP / FSDP wrapper, so gradients are synchronised
                loss = next_token_loss(logits, tokens)
                accelerator.backward(loss)
                if accelerator.sync_gradients and t.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            window.add({"loss": loss})
            if not accelerator.sync_gradients:  # inside a gradient-accumulation window
                continue

            # One optimizer step done: EMA, then logs, validation and a checkpoint when due.
            progress.advance()
            bar.update()
            step = progress.step
            if ema is not None:
                ema.update(raw_model)
            if due(step, cfg.log_every, end_step):
                w = window.means(accelerator)
                steps_in_window = w["micro_batches"] // t.grad_accum
                metrics = {"loss": w["loss"], "lr": lr, "epoch": progress.epoch,
                           "tokens_per_s": tokens_per_step * steps_in_window / max(w["seconds"], 1e-9)}
                logger.log(step, metrics)
                bar.set(loss=metrics["loss"])
            if due(step, cfg.ckpt_every, end_step):
                if val_set is not None and accelerator.is_main_process:
                    eval_model = ema.model if ema is not None else raw_model
                    metrics["val_loss"] = evaluate_loss(eval_model, val_set, t.batch_size, accelerator.device,
                                                        cfg.val_max_items)
                    logger.log(step, {"val_loss": metrics["val_loss"]})
                if ema is not None:
                    weights = ema.state_dict()
                else:  # FSDP gathers the full weights on every process; otherwise the plain module has them
                    weights = accelerator.get_state_dict(model) if fsdp else raw_model.state_dict()
                checkpointer.save(progress, lambda: {
                    "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                    "ema": ema.state_dict() if ema is not None else None}, weights)
    if accelerator.is_main_process:
        print(f"checkpoint: {run_dir}/model.safetensors + config.yaml (tokenizer {manifest.tokenizer_hash}); "
              f"sample with: python tools/sample.py ckpt={run_dir} class=0")
    logger.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainOutcome(raw_model, ema.model if ema is not None else None, progress.step, metrics)


main = entry_point("train_ar", train)


if __name__ == "__main__":
    main()
