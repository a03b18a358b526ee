"""Every CUDA-only spot of megatron-core (0.19) that we patch to run on a CPU-only torch with gloo. ONE module,
applied only when no GPU is present (`apply()` is a no-op when CUDA is available, and idempotent).

See shared/notes/mcore-on-cpu.md for the measured list. Each patch says what it replaces and why; each is a seam
("cpu.*") in omni_model/compat/seams.py, checked against the installed upstream.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from ..compat.registry import replace_upstream  # the seams (omni_model.compat.seams, "cpu.*") see upstream's code

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

    replace_upstream(mrandom, "_get_cuda_rng_state", _get_state)
    replace_upstream(mrandom, "_set_cuda_rng_state", _set_state)

    def _add(self, name, seed):
        # mcore's add() marks the tracker initialised first; without it is_initialized() stays False and
        # TE-style consumers skip the tracker (no real fork of the model-parallel / expert streams)
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"cuda rng state {name} already exists")
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    replace_upstream(mrandom.CudaRNGStatesTracker, "add", _add)
    # fork() warns when the CPU generator moved inside a forked region; on CPU the forked stream IS the CPU
    # generator, so that is the intended effect, not a leak: drop that one message.
    logging.getLogger(mrandom.__name__).addFilter(
        lambda record: "CPU RNG state changed within GPU RNG context" not in record.getMessage())
    torch.cuda.manual_seed = lambda *a, **k: None  # type: ignore[assignment]
    torch.cuda.manual_seed_all = lambda *a, **k: None  # type: ignore[assignment]

    # 4. gloo's all_to_all_single rejects tensor split sizes: pass lists.
    _orig_a2a = torch.distributed.all_to_all_single

    def _a2a(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
        def as_list(x):
            if x is None:
                return None
            if isinstance(x, torch.Tensor):
                return [int(v) for v in x.tolist()]
            return [int(v) for v in x]

        return _orig_a2a(output, input, as_list(output_split_sizes), as_list(input_split_sizes), group, async_op)

    replace_upstream(torch.distributed, "all_to_all_single", _a2a)

    # 5. `.cuda()` calls on CPU tensors (schedules, clip_grads, optimizer, dispatchers): identity on CPU.
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[assignment]

    # 6. literal device="cuda" allocations inside mcore (schedules, p2p, FP32Optimizer loss scale, clip_grads,
    #    DDP, dispatchers): those modules see a `torch` whose tensor factories route device="cuda" to CPU. Only
    #    mcore's module globals are touched, never torch itself (a global factory patch broke transformers' init).
    _install_torch_proxy()

    # 7. pin_memory needs an accelerator: identity.
    torch.Tensor.pin_memory = lambda self, *a, **k: self  # type: ignore[assignment]

    # 8. clip_grad_by_total_norm_fp32 asserts `torch.cuda.FloatTensor` grads: the same in-place scaling for fp32 CPU
    #    grads (the optimizer module imported the name, so both bindings are replaced).
    from megatron.core.optimizer import clip_grads, optimizer as mcore_optimizer

    def _clip_by_total_norm(parameters, max_norm, total_norm, use_decoupled_grad=False):
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        attr = "decoupled_grad" if use_decoupled_grad else "grad"
        grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
        for grad in grads:
            assert grad.dtype == torch.float32, f"fp32 grads expected, got {grad.dtype}"
        clip_coeff = max_norm / (total_norm + 1.0e-6)
        if clip_coeff < 1.0:
            torch._foreach_mul_(grads, clip_coeff)

    replace_upstream(clip_grads, "clip_grad_by_total_norm_fp32", _clip_by_total_norm)
    mcore_optimizer.clip_grad_by_total_norm_fp32 = _clip_by_total_norm

    _APPLIED = True
    return True


_FACTORIES = (
    "tensor", "zeros", "ones", "empty", "full", "arange", "zeros_like", "ones_like", "empty_like",
    "full_like", "randn", "rand", "randint", "as_tensor",
)
_MCORE_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.pipeline_parallel.utils",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.transformer.moe.token_dispatcher",
    "megatron.core.transformer.moe.moe_utils",
    "megatron.core.transformer.moe.router",
    "megatron.core.transformer.moe.moe_layer",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.cross_entropy",
    "megatron.core.tensor_parallel.random",
    "megatron.core.utils",
    "megatron.core.models.common.embeddings.rope_utils",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.rerun_state_machine",
)


def _cpu_device(dev):
    if dev is None:
        return None
    if isinstance(dev, int) and not isinstance(dev, bool):
        return torch.device("cpu")
    if (isinstance(dev, str) and dev.startswith("cuda")) or (isinstance(dev, torch.device) and dev.type == "cuda"):
        return torch.device("cpu")
    return dev


class _TorchProxy:
    """`torch` as seen by the patched mcore modules: device='cuda' factories -> CPU; everything else is torch."""

    def __init__(self, real):
        self._real = real
        for name in _FACTORIES:

            def make(name):
                def f(*a, **k):
                    if "device" in k:
                        k["device"] = _cpu_device(k["device"])
                    return getattr(real, name)(*a, **k)  # looked up per call: wrappers of torch's own stay seen

                return f

            setattr(self, name, make(name))

    def __getattr__(self, name):
        return getattr(self._real, name)


def _install_torch_proxy() -> None:
    import importlib

    proxy = _TorchProxy(torch)
    for mod_name in _MCORE_MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except Exception:
            continue
        if getattr(mod, "torch", None) is torch:
            mod.torch = proxy
