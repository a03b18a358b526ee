"""Write converted torch_dist checkpoints at a parallel layout, for the export round-trip tests.

    torchrun --nproc_per_node 2 tests/dist/export_checkpoints.py --tp 2 --ep 2 HF_DIR CKPT_DIR [HF_DIR CKPT_DIR ...]
    (or, in-process at tp1: write_checkpoint(hf_dir, ckpt_dir))

Each rank builds its part of the thinker, fills it from the HF safetensors through the mapping table and all ranks
save one `dist_checkpointing` checkpoint of the thinker's sharded state dict (what the convert stage writes).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def write_checkpoint(hf_dir: Path, ckpt_dir: Path) -> Path:
    """This rank's thinker from `hf_dir`, saved (collectively) to `ckpt_dir`. Needs init_parallel first."""
    from megatron.core import dist_checkpointing

    from omni_model.convert.mapping import load_hf_into_model
    from omni_model.model.thinker import build_thinker

    thinker = build_thinker(json.loads((Path(hf_dir) / "config.json").read_text()), use_te=False)
    load_hf_into_model(thinker, hf_dir, prefix="")
    Path(ckpt_dir).mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(thinker.sharded_state_dict(), str(ckpt_dir))
    return Path(ckpt_dir)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--ep", type=int, default=1)
    parser.add_argument("pairs", nargs="+", help="HF_DIR CKPT_DIR, repeated")
    args = parser.parse_args()
    from omni_model.runtime.parallel import destroy_parallel, init_parallel

    torch.set_num_threads(1)
    init_parallel(tp=args.tp, ep=args.ep)
    for hf_dir, ckpt_dir in zip(args.pairs[::2], args.pairs[1::2]):
        write_checkpoint(Path(hf_dir), Path(ckpt_dir))
    destroy_parallel()


if __name__ == "__main__":
    main()
