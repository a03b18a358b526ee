"""The torch Adam(W) instances inside a Megatron-Core optimizer: what build (fused Adam, the folded grad scale) and
checkpointing (the per-parameter step counters after a load) both reach into."""

from __future__ import annotations

import torch


def torch_adams(optimizer) -> list:
    """The torch Adam(W) instances inside an mcore optimizer (chained per param dtype, or one), or the optimizer
    itself when it is one."""
    inner = [getattr(leaf, "optimizer", leaf) for leaf in getattr(optimizer, "chained_optimizers", [optimizer])]
    return [adam for adam in inner if isinstance(adam, (torch.optim.Adam, torch.optim.AdamW))]
