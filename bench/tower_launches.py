"""The vision tower's host cost per forward on this CPU, for the launch-cutting changes of issue 27 one after
the other: how many aten ops launch work (views and allocations left out: on a GPU each of the others is a kernel
launch, ~5-10 us of host time plus Python and dispatch) and the host time of a tiny-model forward (tiny shapes: the
time is the host's, not the arithmetic's). The H100's multimodal step is host-bound (bench/RESULTS.md, issue 27):
what this counts is what it waits for. A proxy measured on the CPU; the GPU step time is for the device bench.

Rows (each adds one change to the row before):
  mcore's RoPE, bias after the matmul    the towers before session 14 (`--variants towerrope=mcore` on the GPU)
  RoPE tables                            PerfOptions.tower_rope_tables (rope.RotaryTables)
  bias inside the matmul                 PerfOptions.bias_in_matmul: the bias mcore hands back (skip_bias_add) added
                                         by the GEMM

    python bench/tower_launches.py                       # tiny config, an image + a 2-frame video, 200 forwards
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# ops that only re-describe memory (no kernel on a GPU)
VIEW_OPS = {"view", "_unsafe_view", "t", "transpose", "slice", "unsqueeze", "squeeze", "alias", "split",
            "split_with_sizes", "chunk", "expand", "permute", "as_strided", "select", "detach", "reshape",
            "_reshape_alias", "unbind", "empty", "empty_strided"}


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in VIEW_OPS:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def vision_inputs(config: dict, grids: list) -> tuple[torch.Tensor, torch.Tensor]:
    v = config["thinker_config"]["vision_config"]
    width = v.get("in_channels", 3) * v["temporal_patch_size"] * v["patch_size"] ** 2
    grid = torch.tensor(grids)
    return torch.randn(int(grid.prod(-1).sum()), width), grid


def count_ops(model, pixels, grid) -> collections.Counter:
    with torch.no_grad():
        model(pixels, grid)  # warm-up
        counter = OpCounter()
        with counter:
            model(pixels, grid)
    return counter.ops


def time_forwards(model, pixels, grid, forwards: int) -> list:
    with torch.no_grad():
        times = []
        for _ in range(forwards):
            began = time.perf_counter()
            model(pixels, grid)
            times.append(time.perf_counter() - began)
    return times


def main() -> int:
    import json

    from omni_model.model.options import PerfOptions, apply_options
    from omni_model.model.vision import VisionEncoder
    from omni_model.runtime.parallel import init_parallel
    from omni_model.tiny import write_tiny_checkpoint

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--forwards", type=int, default=200)
    ap.add_argument("--grids", default="[[1, 8, 8], [2, 8, 12]]", help="[t, h, w] per image / video (JSON)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    hf_dir = write_tiny_checkpoint(Path(tempfile.mkdtemp()) / "hf", seed=0)
    config = json.loads((hf_dir / "config.json").read_text())
    init_parallel()
    model = VisionEncoder(config).eval()
    pixels, grid = vision_inputs(config, json.loads(args.grids))
    layers = len(model.decoder.layers)
    variants = {"mcore's RoPE, bias after the matmul": (False, False), "RoPE tables": (True, False),
                "RoPE tables, bias inside the matmul": (True, True)}
    ops, times = {}, {name: [] for name in variants}
    # round-robin blocks of 10 forwards: a busy box's drift falls on every variant alike
    for block in range(-1, args.forwards // 10):
        for name, (tables, fold) in variants.items():
            apply_options(model, PerfOptions(tower_rope_tables=tables, bias_in_matmul=fold))
            if block < 0:
                ops[name] = count_ops(model, pixels, grid)
            else:
                times[name] += time_forwards(model, pixels, grid, 10)
    rows = {name: {"launching_ops": sum(ops[name].values()), "ops": ops[name],
                   "ms_median": 1e3 * statistics.median(t), "ms_spread": 1e3 * (max(t) - min(t))}
            for name, t in times.items()}
    print(f"vision tower, tiny config ({layers} layers), grids {args.grids}, {args.forwards} forwards, 1 thread")
    print("| variant | launching ops per forward | per layer | host ms per forward (median) | spread ms |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, r in rows.items():
        print(f"| {name} | {r['launching_ops']} | {r['launching_ops'] / layers:.1f} | {r['ms_median']:.2f} | "
              f"{r['ms_spread']:.2f} |")
    names = list(rows)
    for before, after in zip(names, names[1:]):
        b, a = rows[before], rows[after]
        print(f"{after} / {before}: ops {a['launching_ops'] / b['launching_ops']:.3f}x, host time "
              f"{a['ms_median'] / b['ms_median']:.3f}x; removed {dict(b['ops'] - a['ops'])}, added "
              f"{dict(a['ops'] - b['ops'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
