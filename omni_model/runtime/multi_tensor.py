"""Megatron-Core's multi-tensor kernels without TE or Apex, as torch `_foreach` ops instead of its Python fallbacks.

Without TE/Apex, mcore (0.16 to 0.19) binds two pure-Python fallbacks (megatron/core/utils.py) into its optimizer
modules:
- `local_multi_tensor_l2_norm` (the grad norm for clipping and the logs): `torch.tensor([norm, norm, ...])` over every
  parameter's norm reads each one back to the host. On the H200 that was 790 `cudaStreamSynchronize` per step of the
  4-layer 30B-A3B thinker (102 ms of a 376 ms text step spent waiting, bench/RESULTS.md);
- `local_multi_tensor_scale` (clipping, and mcore's param/grad copies): `dst.copy_(src * scale)` per tensor, a
  temporary and two kernels for each.
The replacements compute the same values with no host read (`_foreach_norm` of the list, then the norm of those
norms; `_foreach_mul` + `_foreach_copy_`), one launch per group of tensors instead of per tensor. Applied by
`runtime.parallel.init_parallel`, on CPU and GPU alike (tests/test_multi_tensor.py compares them with mcore's).
"""

from __future__ import annotations

import torch

_MODULES = ("megatron.core.optimizer.clip_grads", "megatron.core.optimizer.optimizer")


def l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """amp_C.multi_tensor_l2norm's contract: -> (the l2 norm of all tensors of `tensor_lists` as a [1] fp32 tensor on
    their device, None). Per-tensor norms are not asked for by mcore's callers."""
    assert not per_tensor, "per-tensor norms are not implemented (mcore's fallback has none either)"
    tensors = [t for tensors in tensor_lists for t in tensors]
    if not tensors:
        return torch.zeros(1, dtype=torch.float), None
    norms = torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float32))  # bf16 tensors: summed in fp32
    return torch.linalg.vector_norm(norms).reshape(1), None


def scale(chunk_size, noop_flag, tensor_lists, factor):
    """amp_C.multi_tensor_scale's contract: tensor_lists = [sources, destinations]; dst = src * factor (cast to dst's
    dtype), the same values as mcore's `dst.copy_(src * factor)`."""
    sources, destinations = tensor_lists
    if not sources:
        return
    if factor != 1.0 and all(s is d and d.dtype == torch.float32 for s, d in zip(sources, destinations)):
        # in place (clipping scales the fp32 main grads themselves): one pass, no temporary as large as all the grads.
        # fp32 only: the in-place foreach op rounds a Python scalar to a bf16 tensor's dtype first (mcore does not)
        torch._foreach_mul_(destinations, factor)
        return
    scaled = sources if factor == 1.0 else torch._foreach_mul(sources, factor)
    torch._foreach_copy_(destinations, scaled)


def apply() -> None:
    """Bind the two functions where mcore bound its fallbacks (only where it did: TE/Apex kernels are kept)."""
    import importlib

    from megatron.core import utils

    for name in _MODULES:
        module = importlib.import_module(name)
        if getattr(module, "l2_norm_impl", None) is utils.local_multi_tensor_l2_norm:
            module.l2_norm_impl = l2_norm
        if getattr(module, "multi_tensor_scale_impl", None) is utils.local_multi_tensor_scale:
            module.multi_tensor_scale_impl = scale
