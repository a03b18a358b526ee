"""Where the checkpoints of a run are, as every stage reads it.

`results/train/latest` is one line: the path of the last COMPLETE checkpoint, relative to the train dir
(`iter_0000020`, or `../model/mcore/checkpoint` when `train.iters` is 0 and the converted weights are the result).
Every checkpoint dir is a Megatron-Core `dist_checkpointing` (torch_dist) dir whose model tensors are saved under the
thinker's own `sharded_state_dict()` keys (no extra prefix), so one loader reads the converted checkpoint and every
training checkpoint, at any layout.
"""

from __future__ import annotations

import os
from pathlib import Path

LATEST = "latest"


def write_latest(train_dir: Path, checkpoint_dir: Path) -> None:
    """Point `latest` at `checkpoint_dir` atomically (a reader never sees a half-written name)."""
    train_dir = Path(train_dir)
    relative = os.path.relpath(Path(checkpoint_dir).resolve(), train_dir.resolve())
    tmp = train_dir / (LATEST + ".tmp")
    tmp.write_text(relative + "\n")
    os.replace(tmp, train_dir / LATEST)


def read_latest(train_dir: Path) -> Path:
    """The checkpoint dir `latest` names; a clear error when it is missing or names nothing."""
    train_dir = Path(train_dir)
    pointer = train_dir / LATEST
    if not pointer.exists():
        raise FileNotFoundError(f"{pointer} does not exist: no finished training run in {train_dir}")
    target = (train_dir / pointer.read_text().strip()).resolve()
    if not (target / "metadata.json").exists():
        raise FileNotFoundError(f"{pointer} names {target}, which is not a complete dist checkpoint")
    return target
