"""Interleaved multimodal RoPE (Qwen3-VL / Qwen3-Omni), in mcore's `rotary_pos_emb` format.

HF (`Qwen3OmniMoeThinkerTextRotaryEmbedding.recomposition_frequencies`): with head_dim/2 = F rotary frequencies and
`mrope_section = [t, h, w]` (t + h + w = F), frequency j takes its angle from the
  H axis if j % 3 == 1 and j < 3 * h,   W axis if j % 3 == 2 and j < 3 * w,   T axis otherwise,
and the F angles are duplicated (`cat(f, f)`) for rotate-half application. mcore's own `MultimodalRotaryEmbedding`
assigns contiguous sections (Qwen2-VL style), which is NOT this model's layout.

Output: angles `[S, B, 1, head_dim]` (fp32); mcore's `apply_rotary_pos_emb` takes cos/sin of them (non-interleaved
rotate-half, `config.rotary_interleaved=False`), both for [S,B] and packed THD inputs (THD uses per-token angles
when the angle tensor has one row per packed token, which it has here).

`RotaryTables` + `RotaryTableSelfAttention`: the same rotate-half RoPE from cos / signed-sin tables made once per
forward instead of mcore's per-layer, per-tensor work on the angles (the towers: PerfOptions.tower_rope_tables; the
language model: PerfOptions.llm_rope_tables), applied on CUDA by one Triton kernel each way
(fused_kernels.rotary, PerfOptions.fused_rope).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from megatron.core.transformer.attention import SelfAttention

from . import fused_kernels


def interleaved_axis_index(num_freqs: int, mrope_section) -> torch.Tensor:
    """Axis (0=T, 1=H, 2=W) of every rotary frequency, exactly as HF's recomposition."""
    t, h, w = (int(x) for x in mrope_section)
    assert t + h + w == num_freqs, f"mrope_section {mrope_section} must sum to head_dim/2 = {num_freqs}"
    axis = torch.zeros(num_freqs, dtype=torch.long)
    axis[1 : 3 * h : 3] = 1
    axis[2 : 3 * w : 3] = 2
    return axis


class InterleavedMRoPE(nn.Module):
    def __init__(self, head_dim: int, rope_theta: float, mrope_section, interleaved: bool = True):
        super().__init__()
        num_freqs = head_dim // 2
        inv_freq = 1.0 / (rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        if interleaved:
            axis = interleaved_axis_index(num_freqs, mrope_section)
        else:  # contiguous sections (Qwen2-VL style), kept for completeness
            axis = torch.cat([torch.full((int(n),), i, dtype=torch.long) for i, n in enumerate(mrope_section)])
        self.register_buffer("axis", axis, persistent=False)
        self.mrope_section = list(mrope_section)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        """position_ids: [3, B, S] (or [B, S] for text-only) -> angles [S, B, 1, head_dim] in fp32."""
        if position_ids.dim() == 2:
            position_ids = position_ids.unsqueeze(0).expand(3, -1, -1)
        inv_freq = self.inv_freq.to(position_ids.device)
        # Same op order as HF: position (float) * inv_freq, per axis, then pick the axis per frequency.
        freqs = position_ids[..., None].float() * inv_freq  # [3, B, S, F]
        axis = self.axis.to(position_ids.device)
        picked = torch.gather(freqs, 0, axis.view(1, 1, 1, -1).expand(1, *freqs.shape[1:])).squeeze(0)  # [B, S, F]
        emb = torch.cat((picked, picked), dim=-1)  # [B, S, D]
        return emb.transpose(0, 1).unsqueeze(2).contiguous()  # [S, B, 1, D]


@dataclasses.dataclass(frozen=True)
class RotaryTables:
    """Rotate-half RoPE as two tables computed once per forward, in the activations' dtype: `cos` and `sin_signed`
    (sin with the rotate-half sign folded into its first half), [s, b, 1, d] like the angles they come from.

    Why: mcore's `apply_rotary_pos_emb` takes the angles and, in every layer and for query and key apart, takes
    their cos and sin, scales and casts them, builds rotate-half from a negation and a concatenation, and
    concatenates an empty pass-through part: ~12 kernels a tensor. `apply` is 4 (x*cos + roll(x)*sin_signed) and gives
    the same values bit for bit: roll(x) by d/2 is cat(x2, x1), and x2 * -sin1 is exactly -x2 * sin1. With `fused`
    (PerfOptions.fused_rope) a CUDA tensor takes one Triton kernel instead, with the same roundings."""

    cos: torch.Tensor
    sin_signed: torch.Tensor
    fused: bool = False

    @classmethod
    def from_angles(cls, freqs: torch.Tensor, dtype: torch.dtype, fused: bool = False) -> "RotaryTables":
        half = freqs.shape[-1] // 2
        sin = torch.sin(freqs)
        return cls(torch.cos(freqs).to(dtype), torch.cat([-sin[..., :half], sin[..., half:]], dim=-1).to(dtype),
                   fused)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.cos.shape[-1]:
            raise ValueError(f"RoPE tables of width {self.cos.shape[-1]} for heads of {x.shape[-1]}: whole heads are "
                             "rotated")
        if self.fused and x.is_cuda and x.dtype == self.cos.dtype and fused_kernels.available():
            return fused_kernels.rotary(x, self.cos, self.sin_signed)
        cos, sin_signed = self.cos.to(x.dtype), self.sin_signed.to(x.dtype)  # as mcore's RoPE: in x's dtype
        return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin_signed


class RotaryTableSelfAttention(SelfAttention):
    """mcore's SelfAttention that also takes `rotary_pos_emb` as RotaryTables: applied to query and key right after
    get_query_key_value_tensors (the projection, and the query / key norms where the layer has them), and mcore's own
    RoPE skipped. Angles (a tensor) still go to mcore's RoPE."""

    _rotary_tables = None

    def forward(self, hidden_states, *args, rotary_pos_emb=None, **kwargs):
        if not isinstance(rotary_pos_emb, RotaryTables):
            return super().forward(hidden_states, *args, rotary_pos_emb=rotary_pos_emb, **kwargs)
        self._rotary_tables = rotary_pos_emb
        try:
            return super().forward(hidden_states, *args, rotary_pos_emb=None, **kwargs)
        finally:
            self._rotary_tables = None

    def get_query_key_value_tensors(self, *args, **kwargs):
        qkv = super().get_query_key_value_tensors(*args, **kwargs)
        tables = self._rotary_tables
        if tables is None:
            return qkv
        query, key, *rest = qkv  # split_qkv: mcore splits whenever it applies no fused single-QKV RoPE (ours)
        return (tables.apply(query), tables.apply(key), *rest)
