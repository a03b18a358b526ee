"""Every CUDA-only spot of megatron-core 0.16.1 that we patch to run on a CPU-only torch with gloo. ONE module,
applied only when no GPU is present (`apply()` is a no-op when CUDA is available, and idempotent).

See shared/notes/mcore-on-cpu.md for the measured list. Each patch says what it replaces and why.
"""

from __future__ import annotations

import contextlib

import torch

_APPLIED = False


class _NoOpStream:
    """Stand-in for torch.cuda.Stream / Event on CPU (the alltoall dispatcher overlaps comms on side streams)."""

    def __init__(self, *a, **k):
        pass

    def synchronize(self):
        pass

    def wait_stream(self, *a, **k):
        pass

    def wait_event(self, *a, **k):
        pass

    def record_event(self, *a, **k):
        return _NoOpStream()

    def record(self, *a, **k):
        pass

    def query(self):
        return True

    def wait(self, *a, **k):
        pass

    def record_stream(self, *a, **k):
        pass


def apply(force: bool = False) -> bool:
    """Apply the CPU patches (only without CUDA unless force). Returns True if patches are active."""
    global _APPLIED
    if _APPLIED:
        return True
    if torch.cuda.is_available() and not force:
        return False

    # 1. "current device" must resolve to CPU: GlobalMemoryBuffer, DDP buffers, RoPE, and many
    #    `device=torch.cuda.current_device()` allocations.
    torch.cuda.current_device = lambda: torch.device("cpu")  # type: ignore[assignment]
    torch.cuda.current_stream = lambda *a, **k: _NoOpStream()  # type: ignore[assignment]
    torch.cuda.default_stream = lambda *a, **k: _NoOpStream()  # type: ignore[assignment]
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]

    # 2. Streams/events of the alltoall dispatcher and others: no-op objects.
    torch.cuda.Stream = _NoOpStream  # type: ignore[assignment,misc]
    torch.cuda.Event = _NoOpStream  # type: ignore[assignment,misc]
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()  # type: ignore[assignment]

    # 3. RNG tracker backed by the CPU generator (model_parallel_cuda_manual_seed, tracker.fork in SP / dropout).
    from megatron.core.tensor_parallel import random as mrandom

    def _get_state(clone: bool = False, graph_safe: bool = False, **_):
        return torch.get_rng_state()

    def _set_state(new_state, device=-1, graph_safe: bool = False, **_):
        torch.set_rng_state(new_state)

    mrandom._get_cuda_rng_state = _get_state
    mrandom._set_cuda_rng_state = _set_state

    def _add(self, name, seed):
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"cuda rng state {name} already exists")
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    mrandom.CudaRNGStatesTracker.add = _add
    torch.cuda.manual_seed = lambda *a, **k: None  # type: ignore[assignment]
    torch.cuda.manual_seed_all = lambda *a, **k: None  # type: ignore[assignment]

    # 4. moe_utils references `te_general_gemm` without TE (NameError): define it as absent.
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None

    # 5. gloo's all_to_all_single rejects tensor split sizes: pass lists.
    _orig_a2a = torch.distributed.all_to_all_single

    def _a2a(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
        def as_list(x):
            if x is None:
                return None
            if isinstance(x, torch.Tensor):
                return [int(v) for v in x.tolist()]
            return [int(v) for v in x]

        return _orig_a2a(output, input, as_list(output_split_sizes), as_list(input_split_sizes), group, async_op)

    torch.distributed.all_to_all_single = _a2a

    # 6. `.cuda()` calls on CPU tensors (schedules, clip_grads, optimizer, dispatchers): identity on CPU.
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[assignment]

    # 7. literal device="cuda" allocations (schedules, FP32Optimizer loss scale, clip_grads): route to CPU.
    _patch_literal_cuda_factories()

    # 8. pin_memory needs an accelerator: identity.
    torch.Tensor.pin_memory = lambda self, *a, **k: self  # type: ignore[assignment]

    _APPLIED = True
    return True


def _patch_literal_cuda_factories() -> None:
    """torch.tensor/zeros/ones/empty/full/arange(..., device='cuda'...) -> CPU. Applies to every caller, which is
    intended: on a CPU-only torch no call with device='cuda' can succeed anyway."""

    def fix_device(kwargs):
        dev = kwargs.get("device")
        if dev is not None:
            d = str(dev)
            if d.startswith("cuda") or (isinstance(dev, int)):
                kwargs["device"] = "cpu"
        return kwargs

    for name in ("tensor", "zeros", "ones", "empty", "full", "arange", "zeros_like", "ones_like", "empty_like", "randn", "rand", "randint"):
        orig = getattr(torch, name)

        def make(orig):
            def f(*a, **k):
                return orig(*a, **fix_device(k))

            f.__wrapped__ = orig
            return f

        setattr(torch, name, make(orig))

    _orig_to = torch.Tensor.to

    def _to(self, *a, **k):
        if a and (isinstance(a[0], str) and a[0].startswith("cuda") or isinstance(a[0], torch.device) and a[0].type == "cuda" or isinstance(a[0], int) and not isinstance(a[0], bool)):
            a = ("cpu",) + a[1:]
        fix_device(k)
        return _orig_to(self, *a, **k)

    torch.Tensor.to = _to
