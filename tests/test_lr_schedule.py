"""The LR each training step uses (omni_model.train.build.build_scheduler over mcore's OptimizerParamScheduler), against
the schedule written out: linear warmup lr * k / warmup for steps k = 1..warmup, then cosine to min_lr at the last
step. Issue 26 finding 9: step 1 trained at LR 0 (mcore's init_lr at num_steps 0), a wasted step."""

from __future__ import annotations

import pytest
import torch

from omni_model.train.build import build_scheduler
from train_helpers import scheduled_lr

TRAIN = dict(iters=10, lr=2e-3, min_lr=2e-4, lr_warmup_iters=3, lr_decay_style="cosine", weight_decay=0.0)


def lrs_of_steps(train: dict, mult: float = 0.5) -> list[tuple[float, float]]:
    """(LR, LR of a group with max/min LR x mult, as train.lr_mult_* sets them) each step trains at, stepping the
    scheduler after each update as the training loop does."""
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.SGD([{"params": params[:1]}, {"params": params[1:], "max_lr": train["lr"] * mult,
                                                          "min_lr": train["min_lr"] * mult}], lr=1.0)
    scheduler = build_scheduler(optimizer, train)
    seen = []
    for _ in range(train["iters"]):
        seen.append(tuple(group["lr"] for group in optimizer.param_groups))
        optimizer.step()
        scheduler.step(increment=1)
    return seen


@pytest.mark.parametrize("warmup", [0, 1, 3])
def test_every_step_trains_at_the_scheduled_lr_from_step_one(warmup):
    train = dict(TRAIN, lr_warmup_iters=warmup)
    seen = lrs_of_steps(train)
    print([f"{lr:.3e}" for lr, _ in seen])
    for step, (lr, scaled) in enumerate(seen, start=1):
        assert lr == pytest.approx(scheduled_lr(step, train), rel=1e-12), step
        assert scaled == pytest.approx(scheduled_lr(step, train, mult=0.5), rel=1e-12), step
    assert seen[0][0] > 0 and seen[-1][0] == pytest.approx(train["min_lr"])
