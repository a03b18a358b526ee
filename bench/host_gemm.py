"""Host time of one bf16 GEMM launch at the towers' shapes, with and without its bias, per cuBLAS backend (GPU only).

The multimodal training step is host-bound: its profile lists `aten::mm` at ~110 us and `aten::addmm` at ~285 us of
self CPU time per call (under the profiler), against ~10 us for an elementwise launch. This measures the launch cost
without the profiler: the GPU is kept busy by `torch.cuda._sleep`, so each call only enqueues, and the host time of N
calls is taken with `time.perf_counter`. Rows: `F.linear` without bias (`mm`), with bias (`addmm`, cuBLASLt's bias
epilogue), `mm` then `add_` (the bias after the GEMM), each under torch's default BLAS backend and under the ones
`torch.backends.cuda.preferred_blas_library` offers. GPU time per call from CUDA events after the queue drains.

    python bench/host_gemm.py --json /tmp/host_gemm.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

# (name, rows M, in K, out N): the vision tower (hidden 1152, MLP 4304) and audio tower (1280, 5120) of 30B-A3B at
# a micro-batch's patch / frame counts; the rows change from batch to batch, so three row counts each
SHAPES = [(f"{tower} {what} M={m}", m, k, n)
          for tower, dims in (("vision", ((1152, 3456, "qkv"), (1152, 4304, "fc1"), (4304, 1152, "fc2"))),
                              ("audio", ((1280, 3840, "qkv"), (1280, 5120, "fc1"))))
          for k, n, what in dims
          for m in (1777, 6400, 12001)]


def host_us_per_call(fn, calls: int) -> float:
    torch.cuda.synchronize()
    torch.cuda._sleep(1_000_000 * calls)  # ~0.6 ms of GPU time a call: busy well past the enqueueing
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def gpu_us_per_call(fn, calls: int) -> float:
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    begin.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return begin.elapsed_time(end) / calls * 1e3


def measure(backend: str, calls: int, repeats: int) -> list[dict]:
    if backend != "default":
        torch.backends.cuda.preferred_blas_library(backend)
    rows = []
    for name, m, k, n in SHAPES:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        forms = {"mm": lambda: F.linear(x, w), "addmm": lambda: F.linear(x, w, b),
                 "mm+add_": lambda: F.linear(x, w).add_(b)}
        for form, fn in forms.items():
            for _ in range(3):
                fn()
            host = [host_us_per_call(fn, calls) for _ in range(repeats)]
            rows.append({"backend": backend, "shape": name, "form": form, "host_us": statistics.median(host),
                         "host_us_spread": max(host) - min(host), "gpu_us": gpu_us_per_call(fn, calls)})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--backends", default="default,cublaslt,cublas")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    default_backend = str(torch.backends.cuda.preferred_blas_library())
    rows = []
    for backend in args.backends.split(","):
        rows += measure(backend, args.calls, args.repeats)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, default BLAS backend {default_backend}")
    print(f"| backend | shape | form | host us/call | spread | GPU us/call |\n| --- | --- | --- | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['backend']} | {r['shape']} | {r['form']} | {r['host_us']:.1f} | {r['host_us_spread']:.1f} "
              f"| {r['gpu_us']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"card": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "default_backend": default_backend, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
