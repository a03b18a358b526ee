"""The error measurements of tests/test_fused_kernels.py: model.fused_kernels against independent references. Run as a
script under `TRITON_INTERPRET=1` (Triton's interpreter must be on before triton is first imported, so the CPU checks
run in a process of their own): prints one JSON object of the relative errors of every case.

    TRITON_INTERPRET=1 python tests/fused_kernel_checks.py
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# hidden rows (4 per tile), head rows (64 per tile), and sizes that fill neither a tile's rows nor its columns
NORM_SHAPES = [(7, 2048), (3, 11, 128), (70, 200), (1, 96)]
SWIGLU_SHAPES = [(37, 48), (5, 100), (130, 768)]
# [tokens, batch, heads, head_dim]: the LLM's (packed: batch 1), a batch of 2 rows, more heads than a tile's rows
ROTARY_SHAPES = [(37, 1, 4, 128), (5, 2, 3, 64), (9, 1, 40, 128)]


def _relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.float() - expected.float()).abs().max() / expected.float().abs().max().clamp_min(1e-30)).item()


def _hf_rms_norm(weight: torch.Tensor, eps: float):
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeThinkerTextRMSNorm

    norm = Qwen3OmniMoeThinkerTextRMSNorm(weight.shape[0], eps=eps).to(weight.device, weight.dtype)
    with torch.no_grad():
        norm.weight.copy_(weight)
    return norm


def _mcore_weighted_swiglu(fc1_output: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """TEGroupedMLP's activation without bias_activation_fusion (mcore 0.19.2, experts.py bias_act_func's last
    branch): glu(x) = silu(gate) * up, times the probs [rows, 1], cast back to the input dtype."""
    gate, up = torch.chunk(fc1_output, 2, dim=-1)
    out = torch.nn.functional.silu(gate) * up
    return (out * probs.unsqueeze(-1)).to(out.dtype)


def _norm_errors(kernels, shape, dtype, device="cpu", seed=0) -> tuple[float, float, float]:
    """(output, input grad, weight grad) relative errors of kernels.rms_norm against HF's RMSNorm."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = (torch.randn(shape, generator=g, device=device) * 3).to(dtype).requires_grad_()
    weight = (1 + 0.2 * torch.randn(shape[-1], generator=g, device=device)).to(dtype)
    dy = torch.randn(shape, generator=g, device=device).to(dtype)
    fused_weight = weight.clone().requires_grad_()
    out = kernels.rms_norm(x, fused_weight, 1e-6)
    out.backward(dy)
    dx, x.grad = x.grad, None
    reference = _hf_rms_norm(weight, 1e-6)
    expected = reference(x)
    expected.backward(dy)
    assert out.dtype == expected.dtype and out.shape == expected.shape
    return _relative(out, expected), _relative(dx, x.grad), _relative(fused_weight.grad, reference.weight.grad)


def _swiglu_errors(kernels, rows, columns, dtype, device="cpu", seed=0) -> tuple[float, float, float]:
    """(output, fc1 grad, probs grad) relative errors of kernels.swiglu_with_probs against mcore's activation."""
    g = torch.Generator(device=device).manual_seed(seed)
    fc1 = (torch.randn(rows, 2 * columns, generator=g, device=device) * 2).to(dtype).requires_grad_()
    probs = torch.rand(rows, generator=g, device=device).requires_grad_()
    dout = torch.randn(rows, columns, generator=g, device=device).to(dtype)
    out = kernels.swiglu_with_probs(fc1, probs)
    out.backward(dout)
    dfc1, dprobs = fc1.grad, probs.grad
    fc1.grad = probs.grad = None
    expected = _mcore_weighted_swiglu(fc1, probs)
    expected.backward(dout)
    assert out.dtype == expected.dtype and out.shape == expected.shape and dprobs.dtype == probs.dtype
    return _relative(out, expected), _relative(dfc1, fc1.grad), _relative(dprobs, probs.grad)


def _rotary_errors(kernels, shape, dtype, device="cpu", seed=0) -> tuple[float, float]:
    """(output, input grad) relative errors of kernels.rotary on rope.RotaryTables against mcore's unfused RoPE on
    the same angles (megatron.core.models.common.embeddings.rope_utils._apply_rotary_pos_emb_bshd)."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    from omni_model.model.rope import RotaryTables

    g = torch.Generator(device=device).manual_seed(seed)
    tokens, batch, _, dim = shape
    angles = torch.rand(tokens, batch, 1, dim, generator=g, device=device) * 50
    x = torch.randn(shape, generator=g, device=device).to(dtype).requires_grad_()
    dy = torch.randn(shape, generator=g, device=device).to(dtype)
    tables = RotaryTables.from_angles(angles, dtype)
    out = kernels.rotary(x, tables.cos, tables.sin_signed)
    out.backward(dy)
    dx, x.grad = x.grad, None
    expected = _apply_rotary_pos_emb_bshd(x, angles)
    expected.backward(dy)
    assert out.dtype == expected.dtype and out.shape == expected.shape
    return _relative(out, expected), _relative(dx, x.grad)


def _edges(kernels) -> dict:
    """An empty micro-batch (no token routed to this rank's experts, no rows to normalise) and probs given as a
    [rows, 1] column: shapes of the outputs and gradients."""
    empty = torch.zeros(0, 64, requires_grad=True)
    normed = kernels.rms_norm(empty, torch.ones(64, requires_grad=True), 1e-6)
    normed.sum().backward()
    fc1 = torch.randn(6, 32, requires_grad=True)
    column = torch.rand(6, 1, requires_grad=True)
    kernels.swiglu_with_probs(fc1, column).sum().backward()
    flat = column.detach().reshape(6).requires_grad_()
    kernels.swiglu_with_probs(fc1, flat).sum().backward()
    return {"empty_norm": list(normed.shape), "empty_norm_grad": list(empty.grad.shape),
            "column_probs_grad": list(column.grad.shape),
            "column_equals_flat": bool(torch.equal(column.grad.reshape(6), flat.grad))}


def _mutants(kernels) -> dict:
    """Errors of two wrong kernels, which the checks must catch: a norm whose mean runs over one column fewer, and a
    SwiGLU gradient that ignores the routing prob."""
    real = kernels._rms_norm_forward

    class ShortMean:
        def __getitem__(self, grid):
            return lambda x, w, y, rstd, rows, columns, eps, **meta: real[grid](x, w, y, rstd, rows, columns - 1, eps,
                                                                                 **meta)

    kernels._rms_norm_forward = ShortMean()
    try:
        short_mean = _norm_errors(kernels, (7, 64), torch.float32)[0]
    finally:
        kernels._rms_norm_forward = real
    fc1 = torch.randn(5, 32, requires_grad=True)
    grads = []
    for prob in (0.5, 1.0):
        kernels.swiglu_with_probs(fc1, torch.full((5,), prob)).sum().backward()
        grads.append(fc1.grad.clone())
        fc1.grad = None
    return {"short_mean": short_mean, "prob_scales_grad": _relative(grads[0] * 2, grads[1])}


def main() -> None:
    from omni_model.model import fused_kernels as kernels

    out = {"norm": {}, "swiglu": {}, "rotary": {}}
    for dtype in (torch.float32, torch.bfloat16):
        for shape in NORM_SHAPES:
            out["norm"][f"{shape} {dtype}"] = _norm_errors(kernels, shape, dtype)
        for shape in SWIGLU_SHAPES:
            out["swiglu"][f"{shape} {dtype}"] = _swiglu_errors(kernels, *shape, dtype)
        for shape in ROTARY_SHAPES:
            out["rotary"][f"{shape} {dtype}"] = _rotary_errors(kernels, shape, dtype)
        kernels.NORM_BACKWARD_PROGRAMS = 3  # several tiles per backward program: its loop and weight-grad sum
        out["norm"][f"(70, 200) on 3 programs {dtype}"] = _norm_errors(kernels, (70, 200), dtype)
        kernels.NORM_BACKWARD_PROGRAMS = 512
    out["edges"] = _edges(kernels)
    out["mutants"] = _mutants(kernels)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
