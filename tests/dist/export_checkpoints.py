"""Convert HF checkpoints at parallel layouts (one torchrun launch for all of them), for the export round trip.

    torchrun --nproc_per_node 2 tests/dist/export_checkpoints.py --dtype bf16 tp=2,ep=2 HF OUT [LAYOUT HF OUT ...]

Each triple goes through the convert stage's own `convert_checkpoint` at that layout (OUT/checkpoint is the torch_dist
dir); the layout is re-initialised between triples (same ranks, new model-parallel groups).
"""

from __future__ import annotations

import argparse

import torch


def parse_layout(text: str) -> dict:
    """'tp=2,ep=2' -> {'tp': 2, 'ep': 2}"""
    return {key: int(value) for key, value in (part.split("=") for part in text.split(","))}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("triples", nargs="+", help="LAYOUT HF_DIR OUT_DIR, repeated")
    args = parser.parse_args()
    from omni_model.convert import convert_checkpoint
    from omni_model.runtime.parallel import destroy_parallel, init_parallel

    torch.set_num_threads(1)
    try:
        for layout, hf_dir, out_dir in zip(args.triples[::3], args.triples[1::3], args.triples[2::3]):
            init_parallel(**parse_layout(layout))
            convert_checkpoint(hf_dir, out_dir, dtype=args.dtype, log=lambda _: None)
    finally:
        destroy_parallel()


if __name__ == "__main__":
    main()
