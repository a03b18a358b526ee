"""RMSNorm that works with sequence parallelism (mcore's torch norm refuses SP; MoE with TP>1 requires SP).

Numerics follow HF's `Qwen3OmniMoeThinkerTextRMSNorm` exactly: normalise in fp32, cast back to the input dtype,
then multiply by the weight. With SP the norm is token-wise, so each rank normalises its own sequence shard; the
weight is replicated and tagged `sequence_parallel=True` so that mcore all-reduces its gradient over the TP group
(`finalize_model_grads`).
"""

from __future__ import annotations

import torch
from torch import nn

from . import fused_kernels


class RMSNorm(nn.Module):
    """Drop-in for mcore's norm slot: `RMSNorm(config=..., hidden_size=..., eps=...)`."""

    def __init__(self, config=None, hidden_size: int = None, eps: float = 1e-6, **_unused):
        super().__init__()
        self.config = config
        dtype = getattr(config, "params_dtype", torch.float32) if config is not None else torch.float32
        # None = the default / `with torch.device(...)` context (meta-device instantiation works)
        device = None if config is None or getattr(config, "use_cpu_initialization", True) else torch.cuda.current_device()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype, device=device))
        self.eps = eps
        # Replicated weight fed by sequence-sharded activations: its grad is a partial sum per TP rank.
        setattr(self.weight, "sequence_parallel", bool(getattr(config, "sequence_parallel", False)))
        self.fused = True  # PerfOptions.fused_rms_norm (apply_options sets it)

    def use_options(self, options) -> None:
        self.fused = options.fused_rms_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and x.is_cuda and x.dtype == self.weight.dtype and fused_kernels.available():
            return fused_kernels.rms_norm(x, self.weight, self.eps)
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"
