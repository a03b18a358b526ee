"""Where a training step makes the host wait for the GPU, found on CPU: every op that reads a device value back
(`.item()`, `bool(tensor)`, `.tolist()`, `.cpu()`, `.numpy()`) or whose output shape depends on the data (`nonzero`,
boolean-mask indexing, `masked_select`, `unique`, `repeat_interleave` without `output_size`, `bincount`), counted by
the source line that asked for it.

On CUDA each of these blocks the host until the queued kernels have run, so the next layer's kernels are launched late
and the GPU idles. The H200 profile of a multimodal step showed 7,078 `cudaStreamSynchronize` calls; this finds them
without a GPU (the tiny model has the same code paths; counts per layer are the same, layers fewer).

    python bench/host_syncs.py --shards results/data/shards            # one multimodal + one text step, tiny model
    python bench/host_syncs.py --shards results/data/shards --top 40
    python bench/host_syncs.py --shards results/data/shards --frozen-towers   # as train_throughput.py's rows train
    python bench/host_syncs.py --shards results/data/shards --frozen-towers --variant towers=per-micro-batch

The towers are trained by default (they run in every micro-batch's forward); --frozen-towers freezes them, as the
throughput bench's rows do by default, and they then run once per step over all micro-batches' media
(PerfOptions.step_tower_forward).

The counter treats every tensor as if it lived on the device: a line reading a tensor that training keeps on the host
(the batch's grid sizes before they are moved) is listed too; the `where` column says which code asked.
"""

from __future__ import annotations

import argparse
import collections
import sys
import traceback
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

aten = torch.ops.aten
# ops whose result the host must read (a scalar) or whose output size depends on the values (the host reads a count)
SYNCING_OPS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
               aten.repeat_interleave.Tensor, aten.bincount.default, aten._unique2.default,
               aten.unique_consecutive.default, aten.unique_dim.default, aten.equal.default}
READBACK_METHODS = {"tolist", "numpy", "cpu"}
OUR_CODE = ("omni_model", "megatron", "transformers", "bench")
# what a CPU run does and a GPU run does not: the per-sequence attention loop (CUDA takes the varlen kernel) and torch
# Adam's host-side step counters (the GPU run's fused Adam keeps them on the device)
CPU_ONLY = ("packed_attention", "_looped_attention", "step_with_ready_grads")
LAYER_FILE = "megatron/core/transformer/transformer_layer.py"  # every LLM, vision and audio layer is one of these


def _where() -> tuple[str, bool]:
    """(the innermost frame in the model/training code (not torch itself, not this file), whether the call came from
    inside a transformer layer's forward)."""
    stack = traceback.extract_stack()[:-3]
    in_layer = any(frame.filename.endswith(LAYER_FILE) for frame in stack)
    for frame in reversed(stack):
        name = frame.filename
        if name.endswith("host_syncs.py") or "/torch/" in name:
            continue
        if any(f"/{part}/" in name for part in OUR_CODE):
            short = name.split("site-packages/")[-1].replace(str(REPO) + "/", "")
            return f"{short}:{frame.lineno} {frame.name}", in_layer
    return "?", in_layer


def _tensor_elements(data) -> int:
    if isinstance(data, torch.Tensor):
        return 1
    if isinstance(data, (list, tuple)):
        return sum(_tensor_elements(item) for item in data)
    return 0


class HostSyncCounter:
    """Context manager: counts syncing ops by the line that asked (`self.by_line`); `self.in_layers` the ones asked
    from inside a transformer layer (per layer and micro-batch: what scales with depth), CPU-only paths left out."""

    def __init__(self):
        self.by_line: collections.Counter = collections.Counter()
        self.in_layers: collections.Counter = collections.Counter()
        counter = self

        class Dispatch(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if func in SYNCING_OPS and not (func is aten.repeat_interleave.Tensor and kwargs.get("output_size")):
                    counter.add()
                elif func is aten.index.Tensor and any(i is not None and i.dtype == torch.bool for i in args[1]):
                    counter.add()
                return func(*args, **kwargs)

        class Function(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                if getattr(func, "__name__", "") in READBACK_METHODS and args and isinstance(args[0], torch.Tensor):
                    counter.add()
                return func(*args, **(kwargs or {}))

        real_tensor = torch.tensor

        def tensor(data, *args, **kwargs):  # torch.tensor([t0, t1, ...]) reads every element back (in C++, unseen above)
            if _tensor_elements(data):
                counter.add(_tensor_elements(data))
            return real_tensor(data, *args, **kwargs)

        self._tensor = (real_tensor, tensor)

        self._modes = (Function(), Dispatch())

    def add(self, n: int = 1) -> None:
        where, in_layer = _where()
        self.by_line[where] += n
        if in_layer and where.split()[-1] not in CPU_ONLY:
            self.in_layers[where] += n

    def __enter__(self):
        torch.tensor = self._tensor[1]
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc):
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        torch.tensor = self._tensor[0]

    @property
    def total(self) -> int:
        return sum(self.by_line.values())


def main() -> int:
    from train_throughput import build_ours_step, encode_batches, write_hf_dir

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shards", required=True)
    ap.add_argument("--layers", type=int, default=3, help="LLM layers (the tiny model's 3 deepstack layers need 3)")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--kinds", default="mm,text")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--work", default="/tmp/host_syncs")
    ap.add_argument("--frozen-towers", action="store_true", help="freeze the vision and audio towers (they then run "
                    "once per step: PerfOptions.step_tower_forward)")
    ap.add_argument("--variant", default="base", help="ours' variant, as train_throughput.py --variants names one "
                    "(e.g. towers=per-micro-batch)")
    args = ap.parse_args()

    work = Path(args.work)
    hf_dir = write_hf_dir(work, tiny=True, layers=args.layers)
    for kind in args.kinds.split(","):
        batches = encode_batches(hf_dir, Path(args.shards), kind, 4, args.seq_len, 64, 0)
        spec = {"variant": args.variant, "device": "cpu", "warmup": 1, "steps": 1, "global_batch": 2, "micro_batch": 1,
                "seq_len": args.seq_len, "work": str(work / kind), "hf_dir": str(hf_dir), "profile": "",
                "train_towers": not args.frozen_towers}
        step = build_ours_step(spec, batches, peak=1.0)
        step()  # the first step builds optimizer state and caches: count a steady one
        with HostSyncCounter() as syncs:
            step()
        cpu_only = {w: n for w, n in syncs.by_line.items() if w.split()[-1] in CPU_ONLY}
        on_gpu = {w: n for w, n in syncs.by_line.items() if w not in cpu_only}
        print(f"\n{kind}: {sum(on_gpu.values())} host syncs on the GPU path in one step of {spec['global_batch']} "
              f"rows, {args.layers} LLM layers (+ {sum(cpu_only.values())} on CPU-only paths)")
        for where, n in sorted(on_gpu.items(), key=lambda item: -item[1])[:args.top]:
            print(f"{n:7d}  {where}")
        for where, n in cpu_only.items():
            print(f"{n:7d}  {where}   (CPU only)")
        print(f"inside transformer layers (GPU path): {sum(syncs.in_layers.values())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
