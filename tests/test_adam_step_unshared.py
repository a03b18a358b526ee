"""After a resume every parameter's Adam `step` must count optimizer steps, not parameter updates: mcore 0.16.1's
DistributedOptimizer (torch Adam) restores one `step` tensor shared by all parameter states, and torch's Adam
increments it in place once per parameter (the H200 resume drifted from the uninterrupted run by 1.9e-3)."""

import torch

from omni_model.train.checkpointing import unshare_adam_steps


def _restored_like_mcore(params):
    """A torch AdamW loaded the way mcore's DistributedOptimizer.load_state_dict loads it (one shared step)."""
    source = torch.optim.AdamW(params, lr=1e-3)
    for p in params:
        p.grad = torch.ones_like(p)
    source.step()
    saved = source.state_dict()
    shared = torch.tensor(5.0)
    for state in saved["state"].values():
        state["step"] = shared
    restored = torch.optim.AdamW(params, lr=1e-3)
    restored.load_state_dict(saved)
    return restored


def _one_step(optimizer, params):
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    return [optimizer.state[p]["step"].item() for p in params]


def test_shared_step_is_the_bug():
    params = [torch.nn.Parameter(torch.zeros(3)) for _ in range(4)]
    assert _one_step(_restored_like_mcore(params), params) == [9.0] * 4  # 5 + one increment per parameter


def test_unshared_steps_count_optimizer_steps():
    params = [torch.nn.Parameter(torch.zeros(3)) for _ in range(4)]
    optimizer = _restored_like_mcore(params)
    unshare_adam_steps(optimizer)
    assert _one_step(optimizer, params) == [6.0] * 4
