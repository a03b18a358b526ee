"""Where the time of a 30B-shape MoE step goes: torch.profiler over bench/moe_layer.py's builds (one GPU).

    python bench/profile_moe.py [--seq 4096] [--out DIR]
Prints, per variant, the top CUDA kernels by total time and the step's CPU-side top ops.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
import moe_layer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    from omni_model.runtime.parallel import init_parallel

    init_parallel()
    ids = torch.randint(0, moe_layer.VOCAB, (1, args.seq), device="cuda")
    pos = torch.arange(args.seq, device="cuda").view(1, 1, -1).expand(3, 1, -1)
    variants = {
        "ours": (lambda: moe_layer.build_ours(dense=False, sequential=False), moe_layer.step_ours),
        "dense": (lambda: moe_layer.build_ours(dense=True, sequential=False), moe_layer.step_ours),
        "transformers": (moe_layer.build_hf, moe_layer.step_hf),
    }
    for name, (build, step) in variants.items():
        model = build()
        for _ in range(3):
            step(model, ids, pos)
            model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step(model, ids, pos)
                model.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70)
        cpu = prof.key_averages().table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=70)
        text = f"===== {name}: top CUDA ops (3 steps)\n{table}\n===== {name}: top CPU ops\n{cpu}\n"
        print(text[:6000], flush=True)
        Path(args.out, f"profile_{name}.txt").write_text(text)
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
