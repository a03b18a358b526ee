"""Core attention through `torch.nn.functional.scaled_dot_product_attention` (flash / cuDNN / efficient kernels on
GPU, math on CPU), a drop-in for mcore's `DotProductAttention` slot (`SelfAttentionSubmodules.core_attention`).

Layouts (as mcore's Attention hands them over, after RoPE):
- BSHD-style "sbhd": query [sq, b, np, hn], key/value [sk, b, ng, hn] -> output [sq, b, np*hn]
- packed "thd" (`packed_seq_params.qkv_format == 'thd'`): query [t, np, hn], key/value [t, ng, hn], sequences
  delimited by `cu_seqlens_q/kv` (padded variants preferred when given, like mcore) -> output [t, np*hn].
  On CUDA this uses `torch.nn.attention.varlen.varlen_attn` when it is available for the dtype, otherwise one SDPA
  call per sequence (exact; what the CPU path does). `SDPAttention.thd_kernel = "loop"` forces the per-sequence
  calls (a benchmark switch: bench/train_throughput.py).
- packed rows in "sbhd" form (`qkv_format == 'sbhd'` with `cu_seqlens_q` set; language_model.per_token_rope_packing):
  query [t, 1, np, hn] -> output [t, 1, np*hn], attention as for "thd". mcore then applies RoPE token by token
  instead of its per-sequence THD loop with host syncs.
GQA is handled by SDPA's `enable_gqa` (no K/V head repetition in memory). Causal masking uses SDPA's `is_causal`
(top-left aligned, sq == sk in training). An explicit boolean `attention_mask` (mcore convention: True = masked
out, broadcastable to [b, 1|np, sq, sk]) is honoured instead when given.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule


def _varlen_fn():
    try:
        from torch.nn.attention.varlen import varlen_attn  # torch >= 2.10

        return varlen_attn
    except Exception:  # pragma: no cover - older torch
        return None


class SDPAttention(MegatronModule):
    thd_kernel = "auto"  # "auto": varlen_attn where it applies, else per-sequence SDPA; "loop": always per sequence

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
        **_unused,
    ):
        super().__init__(config=config)
        assert config.context_parallel_size == 1, (
            "SDPAttention has no context-parallel ring; CP needs the TE spec (TEDotProductAttention)"
        )
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        if config.apply_query_key_layer_scaling:
            self.softmax_scale /= self.layer_number
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def _sdpa(self, q, k, v, mask, causal):
        # q [b, np, sq, hn], k/v [b, ng, sk, hn]
        gqa = q.shape[1] != k.shape[1]
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout_p if self.training else 0.0,
            is_causal=causal and mask is None,
            scale=self.softmax_scale,
            enable_gqa=gqa,
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
        **_unused,
    ) -> torch.Tensor:
        assert attention_bias is None, "attention_bias is not supported by SDPAttention"
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        causal = mask_type in (AttnMaskType.causal, AttnMaskType.padding_causal)
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            return self._forward_thd(query, key, value, packed_seq_params, causal)
        if packed_seq_params is not None and packed_seq_params.cu_seqlens_q is not None:  # packed rows, sbhd form
            assert query.shape[1] == 1, f"packed rows in sbhd form have batch 1, got {tuple(query.shape)}"
            out = self._forward_thd(query.squeeze(1), key.squeeze(1), value.squeeze(1), packed_seq_params, causal)
            return out.unsqueeze(1)

        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        sdpa_mask = None
        if attention_mask is not None and mask_type != AttnMaskType.causal:
            sdpa_mask = ~attention_mask.bool()  # mcore: True = masked; SDPA: True = attend
        elif attention_mask is not None and causal and attention_mask.dtype == torch.bool:
            # an explicit causal(+padding) mask from the data path: honour it exactly
            sdpa_mask = ~attention_mask
        out = self._sdpa(q, k, v, sdpa_mask, causal)  # [b, np, sq, hn]
        b, n, s, d = out.shape
        return out.permute(2, 0, 1, 3).reshape(s, b, n * d)

    def _forward_thd(self, query, key, value, psp, causal):
        cu_q = psp.cu_seqlens_q_padded if getattr(psp, "cu_seqlens_q_padded", None) is not None else psp.cu_seqlens_q
        cu_k = (
            psp.cu_seqlens_kv_padded if getattr(psp, "cu_seqlens_kv_padded", None) is not None else psp.cu_seqlens_kv
        )
        t, n, d = query.shape
        varlen = _varlen_fn()
        if (self.thd_kernel == "auto" and query.is_cuda and varlen is not None
                and query.dtype in (torch.bfloat16, torch.float16)):
            max_q = int(psp.max_seqlen_q) if psp.max_seqlen_q is not None else int((cu_q[1:] - cu_q[:-1]).max())
            max_k = int(psp.max_seqlen_kv) if psp.max_seqlen_kv is not None else int((cu_k[1:] - cu_k[:-1]).max())
            try:
                out = varlen(
                    query,
                    key,
                    value,
                    cu_q.to(torch.int32),
                    cu_k.to(torch.int32),
                    max_q,
                    max_k,
                    scale=self.softmax_scale,
                    window_size=(-1, 0) if causal else (-1, -1),
                    enable_gqa=key.shape[1] != n,
                )
                return out.reshape(t, n * d)
            except (TypeError, RuntimeError, NotImplementedError):
                pass  # older torch signature / unsupported config: exact per-sequence fallback below
        bounds_q = cu_q.tolist()
        bounds_k = cu_k.tolist()
        outs = []
        for i in range(len(bounds_q) - 1):
            q = query[bounds_q[i] : bounds_q[i + 1]].permute(1, 0, 2).unsqueeze(0)
            k = key[bounds_k[i] : bounds_k[i + 1]].permute(1, 0, 2).unsqueeze(0)
            v = value[bounds_k[i] : bounds_k[i + 1]].permute(1, 0, 2).unsqueeze(0)
            if q.shape[2] == 0:
                continue
            o = self._sdpa(q, k, v, None, causal)  # [1, np, s_i, hn]
            outs.append(o.squeeze(0).permute(1, 0, 2))
        out = torch.cat(outs, dim=0) if outs else query.new_zeros(0, n, d)
        if out.shape[0] < t:  # tokens past the last cu_seqlens bound (padding): zeros, like TE
            out = torch.cat([out, query.new_zeros(t - out.shape[0], n, d)], dim=0)
        return out.reshape(t, n * d)
