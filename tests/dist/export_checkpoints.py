"""Convert several HF checkpoints at one parallel layout (one torchrun launch for all), for the export round trip.

    torchrun --nproc_per_node 2 tests/dist/export_checkpoints.py --tp 2 --ep 2 --dtype bf16 HF OUT [HF OUT ...]

Each pair goes through the convert stage's own `convert_checkpoint` (OUT/checkpoint is the torch_dist dir).
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("tp", "pp", "ep", "etp"):
        parser.add_argument(f"--{name}", type=int, default=1)
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("pairs", nargs="+", help="HF_DIR OUT_DIR, repeated")
    args = parser.parse_args()
    from omni_model.convert import convert_checkpoint
    from omni_model.runtime.parallel import destroy_parallel, init_parallel

    torch.set_num_threads(1)
    init_parallel(tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp)
    try:
        for hf_dir, out_dir in zip(args.pairs[::2], args.pairs[1::2]):
            convert_checkpoint(hf_dir, out_dir, dtype=args.dtype, log=lambda _: None)
    finally:
        destroy_parallel()


if __name__ == "__main__":
    main()
