"""The vision tower's host cost per forward on this CPU, with and without PerfOptions.tower_rope_tables: how many
aten ops launch work (views left out: on a GPU each of the others is a kernel launch, ~5-10 us of host time plus
Python and dispatch) and the host time of a tiny-model forward (tiny shapes: the time is the host's, not the
arithmetic's). The H100's multimodal step is host-bound (bench/RESULTS.md, issue 27): what this counts is what it
waits for. A proxy measured on the CPU; the GPU step time is for the device bench (`--variants towerrope=mcore`).

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
            "_reshape_alias", "unbind"}


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


def measure(model, pixels, grid, forwards: int) -> dict:
    with torch.no_grad():
        model(pixels, grid)  # warm-up
        counter = OpCounter()
        with counter:
            model(pixels, grid)
        times = []
        for _ in range(forwards):
            began = time.perf_counter()
            model(pixels, grid)
            times.append(time.perf_counter() - began)
    return {"launching_ops": sum(counter.ops.values()), "ops": counter.ops,
            "ms_median": 1e3 * statistics.median(times), "ms_spread": 1e3 * (max(times) - min(times))}


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
    rows = {}
    for name, tables in (("mcore's RoPE (angles, per layer)", False), ("RoPE tables (tower_rope_tables)", True)):
        apply_options(model, PerfOptions(tower_rope_tables=tables))
        rows[name] = measure(model, pixels, grid, args.forwards)
    base, ours = rows.values()
    print(f"vision tower, tiny config ({layers} layers), grids {args.grids}, {args.forwards} forwards, 1 thread")
    print(f"| variant | launching ops per forward | per layer | host ms per forward (median) | spread ms |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, r in rows.items():
        print(f"| {name} | {r['launching_ops']} | {r['launching_ops'] / layers:.1f} | {r['ms_median']:.2f} | "
              f"{r['ms_spread']:.2f} |")
    print(f"tables / mcore: ops {ours['launching_ops'] / base['launching_ops']:.3f}x, host time "
          f"{ours['ms_median'] / base['ms_median']:.3f}x")
    gone = base["ops"] - ours["ops"]
    print("ops removed:", dict(gone), " added:", dict(ours["ops"] - base["ops"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
