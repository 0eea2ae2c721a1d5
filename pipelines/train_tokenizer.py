"""Train an IBQ tokenizer (stage one). One script for one CPU, one GPU, or many under `accelerate launch`.

    python -m pipelines.train_tokenizer                                  # CPU demo
    accelerate launch --multi_gpu --num_processes 8 -m pipelines.train_tokenizer \
        +experiment=imagenet_256 data.root=/data/imagenet

Each step updates the discriminator first (once the GAN is on), then the autoencoder, then the EMA.
The run directory holds the checkpoint (EMA weights in ``model.safetensors`` + ``config.yaml``), the
resumable ``train_state/``, ``metrics.jsonl``, TensorBoard events and reconstruction grids.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast, gather_object, set_seed
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from pipelines.checkpoint import (
    capture_rng,
    load_train_state,
    restore_rng,
    save_config,
    save_model,
    save_train_state,
)
from pipelines.cli import user_errors_exit
from pipelines.data import EpochBatchSampler, ImageFolderDataset, collate_images, make_loader, save_class_index
from pipelines.ema import EMA
from pipelines.images import save_rows
from pipelines.recon_eval import evaluate_reconstruction
from pipelines.run_log import RunLogger
from tokenizer.discriminator import PatchDiscriminator
from tokenizer.losses import LossConfig, TokenizerLoss
from tokenizer.model import IBQTokenizer, TokenizerConfig
from tokenizer.perceptual import build_perceptual


def lr_factor(step: int, warmup_steps: int, milestones_steps: list[int], decay: float) -> float:
    """Linear warm-up, then multiply by ``decay`` at each milestone passed."""
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    return warm * decay ** sum(step >= m for m in milestones_steps)


def _accumulate(window: dict[str, torch.Tensor], terms: dict[str, torch.Tensor]) -> None:
    """Sum detached terms on their device: no host sync per step (``.item()`` only when logging)."""
    for k, v in terms.items():
        v = v.detach().float()
        window[k] = window[k] + v if k in window else v


@dataclass
class TrainOutcome:
    """What a finished run leaves in memory (on every process): the final weights and the evaluation."""

    model: IBQTokenizer
    ema_model: IBQTokenizer
    discriminator: PatchDiscriminator
    step: int
    metrics: dict[str, Any] = field(default_factory=dict)  # main process only


def train(cfg: DictConfig) -> TrainOutcome:
    """Run (or resume) training as configured."""
    t = cfg.train
    accelerator = Accelerator(mixed_precision=t.mixed_precision, gradient_accumulation_steps=t.grad_accum,
                              cpu=t.cpu)
    set_seed(cfg.seed)
    run_dir = Path(cfg.run_dir)
    config = OmegaConf.to_container(cfg, resolve=True)

    # Models, loss, optimizers.
    model_cfg = TokenizerConfig.from_dict(config["tokenizer"]["model"])
    loss_cfg = LossConfig(**config["tokenizer"]["loss"])
    perceptual = build_perceptual(loss_cfg.perceptual, loss_cfg.vgg_weights) if loss_cfg.perceptual_weight > 0 \
        else None
    model = IBQTokenizer(model_cfg)
    disc = PatchDiscriminator(base_channels=loss_cfg.disc_channels, num_layers=loss_cfg.disc_layers)
    criterion = TokenizerLoss(loss_cfg, perceptual).to(accelerator.device)
    ema = EMA(model, t.ema_decay)
    ema.model.to(accelerator.device)
    codebook = [model.quantizer.embedding.weight]
    rest = [p for p in model.parameters() if p is not codebook[0]]
    opt_ae = torch.optim.Adam([{"params": rest, "lr_mult": 1.0},
                               {"params": codebook, "lr_mult": t.codebook_lr_mult}],
                              lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    opt_d = torch.optim.Adam(disc.parameters(), lr=t.disc_lr, betas=tuple(t.betas), weight_decay=t.weight_decay)

    # Data: our own sampler shards batches across processes and makes resume exact.
    d = cfg.data
    train_set = ImageFolderDataset(d.root, d.train_split, d.resolution, d.on_corrupt, seed=cfg.seed)
    sampler = EpochBatchSampler(len(train_set), t.batch_size, accelerator.process_index,
                                accelerator.num_processes, seed=cfg.seed)
    loader = make_loader(train_set, sampler, d.num_workers)
    steps_per_epoch = len(sampler) // t.grad_accum
    if steps_per_epoch == 0:
        raise ValueError(f"one epoch ({len(sampler)} batches) is shorter than grad_accum={t.grad_accum}")
    max_steps = t.epochs * steps_per_epoch if t.epochs else t.max_steps
    milestones = [int(e * steps_per_epoch) for e in t.lr_milestones]

    def set_lr(step: int) -> float:
        """The lr is a pure function of the step, so resuming needs no scheduler state."""
        factor = lr_factor(step, t.warmup_steps, milestones, t.lr_decay)
        for opt, base in ((opt_ae, t.lr), (opt_d, t.disc_lr)):
            for group in opt.param_groups:
                group["lr"] = base * factor * group.get("lr_mult", 1.0)
        return t.lr * factor

    model, disc, opt_ae, opt_d = accelerator.prepare(model, disc, opt_ae, opt_d)
    raw_model, raw_disc = accelerator.unwrap_model(model), accelerator.unwrap_model(disc)

    step, epoch, batch_in_epoch = 0, 0, 0
    state = load_train_state(run_dir) if cfg.resume else None
    if state is not None:
        raw_model.load_state_dict(state["model"])
        raw_disc.load_state_dict(state["disc"])
        ema.load_state_dict(state["ema"])
        criterion.load_state_dict(state["criterion"], strict=False)
        opt_ae.load_state_dict(state["opt_ae"])
        opt_d.load_state_dict(state["opt_d"])
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        restore_rng(state["rng"][accelerator.process_index])
    elif cfg.resume and accelerator.is_main_process:
        print(f"resume=true but {run_dir}/train_state does not exist yet: starting from scratch")

    logger = RunLogger(run_dir, enabled=accelerator.is_main_process, tensorboard=cfg.tensorboard)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir)
        save_class_index(train_set.classes, run_dir / "class_index.json")
        n_params = sum(p.numel() for p in raw_model.parameters())
        print(f"tokenizer {n_params / 1e6:.1f}M params | {len(train_set)} train images | "
              f"{steps_per_epoch} steps/epoch | {max_steps} steps | {accelerator.num_processes} process(es) "
              f"on {accelerator.device} | run dir {run_dir}")

    val_set = ImageFolderDataset(d.root, d.val_split, d.resolution, d.on_corrupt, seed=cfg.seed)
    preview_items = [val_set[i] for i in range(0, len(val_set), max(1, len(val_set) // 8))]
    preview = collate_images(preview_items[:8])[0]  # 8 val images spread over the classes

    def sync_disc_buffers() -> None:
        """BatchNorm running stats drift apart per process between DDP forwards (which re-broadcast
        rank 0's); align them the same way before saving or returning."""
        if accelerator.num_processes > 1:
            for b in raw_disc.buffers():
                b.copy_(broadcast(b, from_process=0))

    def checkpoint() -> None:
        sync_disc_buffers()
        rng = gather_object([capture_rng()])
        if accelerator.is_main_process:
            save_train_state(run_dir, {
                "model": raw_model.state_dict(), "disc": raw_disc.state_dict(), "ema": ema.state_dict(),
                "criterion": criterion.lecam_state(), "opt_ae": opt_ae.state_dict(), "opt_d": opt_d.state_dict(),
                "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "rng": rng,
            })
            save_model(run_dir, ema.state_dict(), config)
        accelerator.wait_for_everyone()

    num_codes = model_cfg.num_codes
    window_counts = torch.zeros(num_codes, device=accelerator.device)
    window_terms: dict[str, torch.Tensor] = {}
    window_n = 0
    progress = tqdm(total=max_steps, initial=step, disable=not accelerator.is_main_process,
                    desc="train tokenizer", dynamic_ncols=True)
    while step < max_steps:
        sampler.set_epoch(epoch, skip_batches=batch_in_epoch * t.grad_accum)
        for x, _ in loader:
            if x.shape[0] == 0:
                continue
            x = x.to(accelerator.device, non_blocking=True)
            current_lr = set_lr(step)
            gan_on = criterion.gan_active(step)
            with accelerator.accumulate(model, disc):
                with accelerator.autocast():
                    recon, q = model(x)
                terms: dict[str, torch.Tensor] = {}
                logits_fake = None
                if gan_on:
                    with accelerator.autocast():
                        logits_real, logits_fake_d = disc(x, recon.detach())
                    means = accelerator.reduce(torch.stack([logits_real.detach().float().mean(),
                                                            logits_fake_d.detach().float().mean()]), "mean")
                    d_loss, d_terms = criterion.discriminator_loss(logits_real, logits_fake_d, means[0], means[1])
                    accelerator.backward(d_loss)
                    opt_d.step()
                    opt_d.zero_grad(set_to_none=True)
                    terms.update(d_terms)
                    # Generator side: the plain module (not DDP) with frozen weights, so gradients reach
                    # the reconstruction only and the discriminator's reducer is not involved.
                    raw_disc.requires_grad_(False)
                    with accelerator.autocast():
                        logits_fake = raw_disc(recon)
                    raw_disc.requires_grad_(True)
                ae_loss, ae_terms = criterion.autoencoder_loss(
                    x, recon, q, step, logits_fake, last_layer=raw_model.decoder.last_layer)
                accelerator.backward(ae_loss)
                if accelerator.sync_gradients and t.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
                opt_ae.step()
                opt_ae.zero_grad(set_to_none=True)
                terms.update(ae_terms)

            window_counts += torch.bincount(q.indices.reshape(-1), minlength=num_codes)
            _accumulate(window_terms, {**terms, **q.stats})
            window_n += 1
            if not accelerator.sync_gradients:
                continue

            step += 1
            batch_in_epoch += 1
            epoch_done = batch_in_epoch == steps_per_epoch
            if epoch_done:
                epoch, batch_in_epoch = epoch + 1, 0
            ema.update(raw_model)
            progress.update(1)

            if step % cfg.log_every == 0 or step == max_steps:
                counts = accelerator.reduce(window_counts, "sum")
                names = sorted(window_terms)
                means = accelerator.reduce(
                    torch.stack([window_terms[k] / window_n for k in names]).to(accelerator.device), "mean")
                avg = dict(zip(names, means.tolist(), strict=True))
                avg["utilisation_window"] = float((counts > 0).float().mean())
                avg["lr"] = current_lr
                avg["epoch"] = epoch
                logger.log(step, avg)
                progress.set_postfix(l1=f"{avg.get('l1', math.nan):.4f}",
                                     util=f"{avg['utilisation_window']:.2f}")
                window_counts.zero_()
                window_terms, window_n = {}, 0
            if accelerator.is_main_process and (step % cfg.image_every == 0 or step == max_steps):
                with torch.no_grad():
                    rec, _ = ema.model(preview.to(accelerator.device))
                save_rows([preview, rec], run_dir / "images" / f"recon_{step:07d}.png")
            if step % cfg.ckpt_every == 0 or step == max_steps:
                checkpoint()
            if step >= max_steps or epoch_done:
                break
    progress.close()
    sync_disc_buffers()

    result: dict[str, Any] = {}
    if accelerator.is_main_process and cfg.eval_at_end:
        result = evaluate_reconstruction(ema.model, val_set, batch_size=max(t.batch_size, 32),
                                         device=accelerator.device, max_images=cfg.eval_max_images)
        result["step"] = step
        (run_dir / "eval.json").write_text(json.dumps(result, indent=1))
        print(f"[eval] {d.val_split} split, EMA weights: PSNR {result['psnr']:.2f} dB | "
              f"codebook utilisation {result['utilisation']:.1%} ({result['codes_used']}/{num_codes} codes) | "
              f"perplexity {result['perplexity']:.1f} | {result['images']} images")
        print(f"checkpoint: {run_dir}/model.safetensors + config.yaml")
    logger.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainOutcome(raw_model, ema.model, raw_disc, step, result)


@hydra.main(config_path="../conf", config_name="train_tokenizer", version_base=None)
@user_errors_exit
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
