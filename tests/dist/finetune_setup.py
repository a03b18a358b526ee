"""What the finetune tests start from, built like the pipeline builds it: a torch_dist checkpoint of the tiny model
(build_thinker + load_hf_into_model + dist_checkpointing.save, as convert writes it) and a small Energon shard set of
the generated demo set (the shards stage's own write_shards).

    python tests/dist/finetune_setup.py checkpoint HF_DIR OUT_DIR     # in a subprocess: keeps pytest free of dist
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
_DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE", "GROUP_RANK")


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def make_checkpoint(hf_dir: Path, out_dir: Path) -> Path:
    """The converted checkpoint of the tiny model (tp1), written in a subprocess."""
    out_dir = Path(out_dir)
    subprocess.run([sys.executable, __file__, "checkpoint", str(hf_dir), str(out_dir)], check=True, cwd=REPO,
                   env=clean_env(), timeout=300)
    return out_dir


def _write_checkpoint(hf_dir: str, out_dir: str) -> None:
    import torch
    from megatron.core import dist_checkpointing

    from omni_model.convert.mapping import load_hf_into_model
    from omni_model.model.thinker import build_thinker
    from omni_model.runtime.parallel import destroy_parallel, init_parallel

    torch.set_num_threads(1)
    init_parallel()
    thinker = build_thinker(hf_dir, use_te=False)
    load_hf_into_model(thinker, hf_dir, prefix="")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(thinker.sharded_state_dict(), out_dir)
    destroy_parallel()


def make_shards(hf_dir: Path, root: Path, n_samples: int = 24, seed: int = 3, max_seq_len: int = 2048,
                val_fraction: float = 0.2) -> Path:
    """Shards of the generated demo set's good samples (the deliberately bad ones are left out: the data stages'
    tests cover them)."""
    from omni_model.data.demo import generate_demo
    from omni_model.data.formats import load_raw
    from omni_model.data.shards import write_shards

    root = Path(root)
    records, _, _ = load_raw(generate_demo(root / "raw", n_samples, seed=seed))
    good = [r for r in records if not r["id"].startswith("bad-")]
    processed = root / "processed.jsonl"
    processed.write_text("".join(json.dumps(r) + "\n" for r in good))
    write_shards(processed, root / "shards", hf_dir, max_samples=8, max_bytes=1 << 22, val_fraction=val_fraction,
                 seed=0, max_seq_len=max_seq_len, input_count=len(good))
    return root / "shards"


def checkpoint_tensors(checkpoint: Path, scratch: Path) -> dict:
    """Every tensor of a torch_dist checkpoint as a full (unsharded) tensor, by its checkpoint key (model keys, and
    optimizer.state.<exp_avg|exp_avg_sq>.<model key>), read with torch.distributed.checkpoint without a process
    group."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    scratch = Path(scratch)
    dcp_to_torch_save(str(checkpoint), str(scratch))
    loaded = torch.load(scratch, weights_only=False)
    scratch.unlink()
    return {key: value for key, value in loaded.items() if isinstance(value, torch.Tensor)}


def settings_dict(hf_dir: Path, checkpoint: Path, shards: Path, train_dir: Path, max_seq_len: int = 2048,
                  **train) -> dict:
    return {"hf_dir": str(hf_dir), "init_checkpoint": str(checkpoint), "shards": str(shards),
            "train_dir": str(train_dir), "use_te": False, "data": {"max_seq_len": max_seq_len},
            "train": train, "parallel": {}}


if __name__ == "__main__":
    if sys.argv[1] == "checkpoint":
        _write_checkpoint(sys.argv[2], sys.argv[3])
