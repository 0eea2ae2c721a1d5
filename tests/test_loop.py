"""The shared training skeleton: step / epoch bookkeeping with the mid-epoch skip, and the lr hook."""

import pytest
import torch

from pipelines.data import EpochBatchSampler
from pipelines.train.loop import Progress, lr_setter, train_batches


def test_progress_rolls_over_epochs_and_skips_seen_batches_on_resume():
    sampler = EpochBatchSampler(num_items=10, batch_size=2)  # 5 batches per epoch
    progress = Progress.plan(sampler, grad_accum=2, epochs=None, max_steps=7)
    assert (progress.steps_per_epoch, progress.max_steps) == (2, 7)
    assert Progress.plan(sampler, grad_accum=1, epochs=3, max_steps=0).max_steps == 15
    ends = [progress.advance() for _ in range(3)]
    assert ends == [False, True, False] and progress.state_dict() == {"step": 3, "epoch": 1, "batch_in_epoch": 1}

    resumed = Progress.plan(sampler, grad_accum=2, epochs=None, max_steps=7)
    resumed.load_state_dict(progress.state_dict())
    resumed.begin_epoch(sampler, grad_accum=2)
    full = EpochBatchSampler(num_items=10, batch_size=2)
    full.set_epoch(1)
    assert list(sampler) == list(full)[2:]  # one optimizer step = 2 batches already seen in epoch 1


def test_lr_setter_scales_every_group_by_its_multiplier():
    w, e = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([{"params": [w]}, {"params": [e], "lr_mult": 0.5}], lr=1.0)
    opt_d = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    set_lr = lr_setter([(opt, 2.0), (opt_d, 4.0)], lambda step: 0.1 * step)
    assert set_lr(3) == pytest.approx(0.6)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.6, 0.3])
    assert opt_d.param_groups[0]["lr"] == pytest.approx(1.2)


def test_train_batches_end_each_epoch_on_its_last_full_window_and_resume_mid_epoch():
    def run(progress: Progress, end_step: int) -> list[tuple[int, list[int]]]:
        sampler = EpochBatchSampler(num_items=10, batch_size=2)  # 5 batches, 2 steps of 2
        seen = []
        # The sampler stands in for the DataLoader over it (same batches, same epoch / skip state).
        for batch in train_batches(sampler, sampler, progress, grad_accum=2, end_step=end_step):
            seen.append((progress.epoch, batch))
            if len(seen) % 2 == 0:  # an accumulation window closed: one optimizer step
                progress.advance()
        return seen

    full = run(Progress(steps_per_epoch=2, max_steps=5), end_step=5)
    assert [e for e, _ in full] == [0] * 4 + [1] * 4 + [2] * 2  # the fifth batch of each epoch is dropped
    epoch0 = EpochBatchSampler(num_items=10, batch_size=2)
    epoch0.set_epoch(0)
    assert [b for e, b in full if e == 0] == list(epoch0)[:4]  # the epoch's seeded order, its last batch dropped
    resumed = Progress(steps_per_epoch=2, max_steps=5)
    resumed.load_state_dict({"step": 3, "epoch": 1, "batch_in_epoch": 1})
    assert run(resumed, end_step=5) == full[6:]  # the rest of epoch 1, then epoch 2
