"""Train an IBQ tokenizer (stage one). One script for one CPU, one GPU, or many under `accelerate launch`.

    python -m pipelines.train.tokenizer                                  # CPU demo (= make train-tokenizer)
    accelerate launch --multi_gpu --num_processes 8 -m pipelines.train.tokenizer \
        +experiment=imagenet_256 data.root=/data/imagenet

``_train`` reads top to bottom: models and optimizers, data, resume, then the loop. Each step updates the
discriminator first (once the GAN is on), then the autoencoder, then the EMA; then logs, saves a
reconstruction grid and checkpoints when due. At the end the EMA model is evaluated on the val split (PSNR,
SSIM, codebook utilisation and perplexity: ``eval.json``). The run directory holds the checkpoint (EMA weights
in ``model.safetensors`` + ``config.yaml``), the resumable ``train_state/``, ``metrics.jsonl``, TensorBoard
events and reconstruction grids. Checkpointing, exact resume, the lr hook and the run-directory rules are
shared with the AR trainer: ``pipelines/train/loop.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.utils import set_seed
from omegaconf import DictConfig, OmegaConf

from pipelines.cli import entry_point, require_int
from pipelines.data import EpochBatchSampler, ImageFolderDataset, collate_images, make_loader, save_class_index
from pipelines.ema import EMA
from pipelines.eval.recon import evaluate_reconstruction
from pipelines.images import save_rows
from pipelines.progress import progress_bar
from pipelines.run_log import RunLogger
from pipelines.schemas import check_tokenizer_run
from pipelines.train.init_from import (
    SOURCE_KEY,
    InitSource,
    init_tokenizer,
    source_discriminator,
    tokenizer_config,
)
from pipelines.train.loop import (
    Checkpointer,
    Progress,
    TrainOutcome,
    Window,
    broadcast_buffers,
    due,
    lr_setter,
    start_run,
    train_batches,
)
from pipelines.util import atomic_write_text, evenly_spaced
from tokenizer.discriminator import PatchDiscriminator
from tokenizer.losses import LossConfig, TokenizerLoss
from tokenizer.model import ImageTokenizer, TokenizerConfig
from tokenizer.perceptual import build_perceptual
from tokenizer.quantizer import code_counts


def lr_factor(step: int, warmup_steps: int, milestones_steps: list[int], decay: float) -> float:
    """Linear warm-up, then multiply by ``decay`` at each milestone passed."""
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    return warm * decay ** sum(step >= m for m in milestones_steps)


def step_without_scale_update(accelerator: Accelerator, optimizer: AcceleratedOptimizer) -> None:
    """Step the discriminator's optimizer; under fp16 leave the loss scale's update to the autoencoder's step.

    Accelerate's prepared optimizer calls ``scaler.step`` and then ``scaler.update`` in every ``step()``, so two
    optimizers sharing the one scaler would update it twice a step (the scale grows twice as fast, and an
    overflow in the discriminator backs it off before the autoencoder's backward). torch's recipe for several
    optimizers is one ``scaler.step`` each (each skipped on its own inf/NaN gradients) and one ``update``
    after the last: here ``scaler.step`` only, and ``opt_ae.step()`` makes the update, seeing both inf checks.
    """
    if accelerator.scaler is None:
        optimizer.step()
    elif accelerator.sync_gradients:  # as AcceleratedOptimizer.step: no step inside an accumulation window
        accelerator.scaler.step(optimizer.optimizer)


def check_options(cfg: DictConfig) -> None:
    """The tokenizer's own options (the shared ones: ``pipelines.train.loop.check_train_options``)."""
    require_int(cfg, "image_every", 1)
    require_int(cfg, "eval_max_images", 1, optional=True)
    check_tokenizer_run(cfg)  # every other key, the model and loss dataclasses built strictly (pipelines/schemas.py)


def train(cfg: DictConfig) -> TrainOutcome:
    """Run (or resume) training as configured: options checked, then the run directory claimed (locked, no
    clobbering: ``pipelines.train.loop.claim_run_dir``), then training."""
    t = cfg.train
    return start_run(cfg, lambda: Accelerator(mixed_precision=t.mixed_precision,
                                              gradient_accumulation_steps=t.grad_accum, cpu=t.cpu), _train,
                     check_options)


def _train(cfg: DictConfig, accelerator: Accelerator) -> TrainOutcome:
    t, d = cfg.train, cfg.data
    set_seed(cfg.seed)
    run_dir, is_main = Path(cfg.run_dir), accelerator.is_main_process
    config = OmegaConf.to_container(cfg, resolve=True)
    # init_from: a new run from another tokenizer's weights and architecture (pipelines/train/init_from.py).
    source = InitSource.read(cfg.init_from, "tokenizer") if cfg.init_from else None
    source_disc = source_discriminator(source) if source is not None else None
    replaced = tokenizer_config(config, source, source_disc) if source is not None else []

    # Models, loss, optimizers (the codebook may have its own lr multiplier).
    model_cfg = TokenizerConfig.from_dict(config["tokenizer"]["model"])
    loss_cfg = LossConfig.from_dict(config["tokenizer"]["loss"])
    perceptual = build_perceptual(loss_cfg.perceptual, loss_cfg.vgg_weights) if loss_cfg.perceptual_weight > 0 \
        else None
    model = ImageTokenizer(model_cfg)
    disc = PatchDiscriminator(base_channels=loss_cfg.disc_channels, num_layers=loss_cfg.disc_layers)
    if source is not None:  # before the EMA copies the weights
        config[SOURCE_KEY] = init_tokenizer(model, disc, source, source_disc, d.resolution, is_main, replaced)
    criterion = TokenizerLoss(loss_cfg, perceptual).to(accelerator.device)
    ema = EMA(model, t.ema_decay)
    ema.model.to(accelerator.device)
    codebook = list(model.quantizer.codebook_parameters())
    rest = [p for p in model.parameters() if all(p is not c for c in codebook)]
    opt_ae = torch.optim.Adam([{"params": rest, "lr_mult": 1.0},
                               {"params": codebook, "lr_mult": t.codebook_lr_mult}],
                              lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    opt_d = torch.optim.Adam(disc.parameters(), lr=t.disc_lr, betas=tuple(t.betas), weight_decay=t.weight_decay)

    # Data: our own sampler shards batches across processes and makes resume exact.
    train_set = ImageFolderDataset(d.root, d.train_split, d.resolution, d.on_corrupt, seed=cfg.seed)
    val_set = ImageFolderDataset(d.root, d.val_split, d.resolution, d.on_corrupt, seed=cfg.seed)
    preview = collate_images([val_set[i] for i in evenly_spaced(len(val_set), 8)])[0]  # spread over the classes
    sampler = EpochBatchSampler(len(train_set), t.batch_size, accelerator.process_index,
                                accelerator.num_processes, seed=cfg.seed)
    loader = make_loader(train_set, sampler, d.num_workers)
    progress = Progress.plan(sampler, t.grad_accum, t.epochs, t.max_steps)
    milestones = [int(e * progress.steps_per_epoch) for e in t.lr_milestones]
    set_lr = lr_setter([(opt_ae, t.lr), (opt_d, t.disc_lr)],
                       lambda step: lr_factor(step, t.warmup_steps, milestones, t.lr_decay))

    raw_model, raw_disc = model, disc  # the plain modules: state dicts without DDP's or torch.compile's prefixes
    if t.compile:  # the whole autoencoder; the quantizer's code search runs eagerly inside it (graph breaks)
        model = torch.compile(model)
    model, disc, opt_ae, opt_d = accelerator.prepare(model, disc, opt_ae, opt_d)

    # Resume: weights, EMA, LeCam averages, optimizers, step and RNG from train_state/.
    checkpointer = Checkpointer(accelerator, run_dir, config)
    state = checkpointer.resume(progress) if cfg.resume else None
    if state is not None:
        raw_model.load_state_dict(state["model"])
        raw_disc.load_state_dict(state["disc"])
        ema.load_state_dict(state["ema"])
        criterion.load_state_dict(state["criterion"], strict=False)
        opt_ae.load_state_dict(state["opt_ae"])
        opt_d.load_state_dict(state["opt_d"])

    logger = RunLogger(run_dir, enabled=is_main, tensorboard=cfg.tensorboard, start_step=progress.step)
    if is_main:  # config.yaml is written with each checkpoint, beside the weights it describes
        save_class_index(train_set.classes, run_dir / "class_index.json")
        n_params = sum(p.numel() for p in raw_model.parameters())
        print(f"tokenizer {n_params / 1e6:.1f}M params | {len(train_set)} train images | "
              f"{progress.steps_per_epoch} steps/epoch | {progress.max_steps} steps | {accelerator.num_processes} "
              f"process(es) on {accelerator.device} | run dir {run_dir}")

    num_codes, last = model_cfg.num_codes, progress.max_steps
    window, window_counts = Window(), torch.zeros(num_codes, device=accelerator.device)
    with progress_bar(last, "train tokenizer", unit="step", initial=progress.step, enabled=is_main) as bar:
        for x, _ in train_batches(loader, sampler, progress, t.grad_accum, last):
            if x.shape[0] == 0:  # every image of the batch was skipped as corrupt
                continue
            lr = set_lr(progress.step)
            x = x.to(accelerator.device, non_blocking=True)
            with accelerator.accumulate(model, disc):
                with accelerator.autocast():
                    recon, q = model(x)
                terms: dict[str, torch.Tensor] = {}
                logits_fake = None
                if criterion.gan_active(progress.step):
                    # 1. Discriminator step on real vs detached reconstructions (logit means over processes).
                    with accelerator.autocast():
                        logits_real, logits_fake_d = disc(x, recon.detach())
                    means = accelerator.reduce(torch.stack([logits_real.detach().float().mean(),
                                                            logits_fake_d.detach().float().mean()]), "mean")
                    d_loss, d_terms = criterion.discriminator_loss(logits_real, logits_fake_d, means[0], means[1])
                    accelerator.backward(d_loss)
                    step_without_scale_update(accelerator, opt_d)
                    opt_d.zero_grad(set_to_none=True)
                    terms |= d_terms
                    # Generator side: the plain module (not DDP) with frozen weights, so gradients reach the
                    # reconstruction only and the discriminator's reducer is not involved.
                    raw_disc.requires_grad_(False)
                    with accelerator.autocast():
                        logits_fake = raw_disc(recon)
                    raw_disc.requires_grad_(True)
                # 2. Autoencoder step: reconstruction, perceptual, quantizer and (once on) GAN losses.
                ae_loss, ae_terms = criterion.autoencoder_loss(
                    x, recon, q, progress.step, logits_fake, last_layer=raw_model.decoder.last_layer)
                accelerator.backward(ae_loss)
                if accelerator.sync_gradients and t.max_grad_norm:
                    # opt_ae's gradients only: Accelerate's clip_grad_norm_ unscales every optimizer's, and
                    # opt_d's were already unscaled and stepped this step (fp16: a RuntimeError).
                    accelerator.unscale_gradients(opt_ae)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), t.max_grad_norm)
                opt_ae.step()  # fp16: scaler.step, then the step's one scaler.update (both optimizers' inf checks)
                opt_ae.zero_grad(set_to_none=True)
            window_counts.add_(code_counts(q.indices, num_codes))  # no host sync (not bincount)
            window.add({**terms, **ae_terms, **q.stats})
            if not accelerator.sync_gradients:  # inside a gradient-accumulation window
                continue

            # 3. One optimizer step done: EMA, then logs, a reconstruction grid and a checkpoint when due.
            progress.advance()
            bar.update()
            step = progress.step
            ema.update(raw_model)
            if due(step, cfg.log_every, last):
                counts = accelerator.reduce(window_counts, "sum")
                avg = {k: v for k, v in window.means(accelerator).items() if k not in ("seconds", "micro_batches")}
                avg |= {"utilisation_window": float((counts > 0).float().mean()), "lr": lr, "epoch": progress.epoch}
                logger.log(step, avg)
                bar.set(loss=avg["total"])
                window_counts.zero_()
            if is_main and due(step, cfg.image_every, last):
                with torch.no_grad():
                    rec, _ = ema.model(preview.to(accelerator.device))
                save_rows([preview, rec], run_dir / "images" / f"recon_{step:07d}.png")
            if due(step, cfg.ckpt_every, last):
                broadcast_buffers(accelerator, raw_disc)
                checkpointer.save(progress, lambda: {
                    "model": raw_model.state_dict(), "disc": raw_disc.state_dict(), "ema": ema.state_dict(),
                    "criterion": criterion.lecam_state(), "opt_ae": opt_ae.state_dict(),
                    "opt_d": opt_d.state_dict()}, ema.state_dict())
    broadcast_buffers(accelerator, raw_disc)

    # Evaluation of the EMA model on the val split (any dataset; demo recognition: tools/fid.py mode=demo).
    result: dict[str, Any] = {}
    if is_main and cfg.eval_at_end:
        result = evaluate_reconstruction(ema.model, val_set, batch_size=max(t.batch_size, 32),
                                         device=accelerator.device, max_images=cfg.eval_max_images)
        result["step"] = progress.step
        atomic_write_text(run_dir / "eval.json", json.dumps(result, indent=1))
        print(f"[eval] {d.val_split} split, EMA weights: PSNR {result['psnr']:.2f} dB | SSIM {result['ssim']:.3f} | "
              f"codebook utilisation {result['utilisation']:.1%} ({result['codes_used']}/{num_codes} codes) | "
              f"perplexity {result['perplexity']:.1f} | {result['images']} images -> {run_dir}/eval.json")
        print(f"checkpoint: {run_dir}/model.safetensors + config.yaml")
    logger.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainOutcome(raw_model, ema.model, progress.step, result, discriminator=raw_disc)


main = entry_point("train_tokenizer", train)


if __name__ == "__main__":
    main()
