"""Interleaved multimodal RoPE (Qwen3-VL / Qwen3-Omni), in mcore's `rotary_pos_emb` format.

HF (`Qwen3OmniMoeThinkerTextRotaryEmbedding.recomposition_frequencies`): with head_dim/2 = F rotary frequencies and
`mrope_section = [t, h, w]` (t + h + w = F), frequency j takes its angle from the
  H axis if j % 3 == 1 and j < 3 * h,   W axis if j % 3 == 2 and j < 3 * w,   T axis otherwise,
and the F angles are duplicated (`cat(f, f)`) for rotate-half application. mcore's own `MultimodalRotaryEmbedding`
assigns contiguous sections (Qwen2-VL style), which is NOT this model's layout.

Output: angles `[S, B, 1, head_dim]` (fp32); mcore's `apply_rotary_pos_emb` takes cos/sin of them (non-interleaved
rotate-half, `config.rotary_interleaved=False`), both for [S,B] and packed THD inputs (THD uses per-token angles
when the angle tensor has one row per packed token, which it has here).
"""

from __future__ import annotations

import torch
from torch import nn


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
