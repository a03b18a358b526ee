"""Core attention through `torch.nn.functional.scaled_dot_product_attention` (flash / cuDNN / efficient kernels on
GPU, math on CPU), a drop-in for mcore's `DotProductAttention` slot (`SelfAttentionSubmodules.core_attention`).

Layouts (as mcore's Attention hands them over, after RoPE):
- BSHD-style "sbhd": query [sq, b, np, hn], key/value [sk, b, ng, hn] -> output [sq, b, np*hn]
- packed "thd" (`packed_seq_params.qkv_format == 'thd'`): query [t, np, hn], key/value [t, ng, hn], sequences
  delimited by `cu_seqlens_q/kv` (padded variants preferred when given, like mcore) -> output [t, np*hn].
  `packed_attention` (also the towers' attention, encoder_layers.PackedSDPAttention): on CUDA in half precision
  torch's flash `varlen_attn`, otherwise one SDPA call per sequence (exact; what the CPU path does).
  `PerfOptions(packed_kernel="loop")` forces the per-sequence calls (a benchmark and test switch).
- packed rows in "sbhd" form (`qkv_format == 'sbhd'` with `cu_seqlens_q` set; per_token_rope_packing):
  query [t, 1, np, hn] -> output [t, 1, np*hn], attention as for "thd". mcore then applies RoPE token by token
  instead of its per-sequence THD loop with host syncs.
GQA is handled by SDPA's `enable_gqa` (no K/V head repetition in memory). Causal masking uses SDPA's `is_causal`
(sq == sk in training); a packed sequence with fewer queries than keys (a context-parallel query chunk and its key
prefix) is causal BOTTOM-RIGHT aligned, as the flash varlen kernel does: query i sees the first sk - sq + i + 1 keys.
Context parallelism (`parallel.cp > 1`, model.context_parallel): K/V all-gathered over the CP group and laid out as
each local query chunk's key prefix, then the same packed kernels. An explicit boolean `attention_mask` (mcore convention: True = masked
out, broadcastable to [b, 1|np, sq, sk]) is honoured instead when given.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from typing import Optional

import torch
import torch.nn.functional as F

from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from .context_parallel import gather_keys_values, is_context_parallel
from .options import DEFAULT


@functools.lru_cache(maxsize=1)
def _varlen():
    """(torch's varlen_attn, the keyword names it takes), or None on a torch without it.

    Its signature changed between releases (2.10: `is_causal`, no scale or GQA; later: `scale`, `window_size`,
    `enable_gqa`): the call below adapts to what this torch has instead of trying and falling back, which on the
    H200 (torch 2.11) silently turned every LLM attention into a per-sequence loop."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # pragma: no cover - torch < 2.10
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def varlen_applies(query: torch.Tensor, kernel: str = DEFAULT.packed_kernel) -> bool:
    """Whether `packed_attention` takes the flash varlen kernel for this query (else the exact per-sequence loop);
    `kernel`: PerfOptions.packed_kernel."""
    return (kernel == "auto" and query.is_cuda and query.dtype in (torch.bfloat16, torch.float16)
            and _varlen() is not None)


def packed_attention(query, key, value, cu_seqlens_q, cu_seqlens_kv, max_seqlen_q: int, max_seqlen_kv: int, *,
                     scale: float, causal: bool, kernel: str = DEFAULT.packed_kernel) -> torch.Tensor:
    """Attention inside each packed sequence. query [t, np, hn], key/value [t, ng, hn] (ng divides np: GQA),
    sequence bounds `cu_seqlens_*` (int) -> [t, np, hn].

    The bounds must cover all t tokens, padding as a sequence of its own (what data.batch.collate writes and
    forward_step.packed_seq_params_of checks): the varlen kernel leaves tokens past the last bound unwritten, and
    checking that here would cost a host sync per layer. The per-sequence loop zero-fills them."""
    if varlen_applies(query, kernel):
        return _varlen_attention(query, key, value, cu_seqlens_q, cu_seqlens_kv, max_seqlen_q, max_seqlen_kv,
                                 scale=scale, causal=causal)
    return _looped_attention(query, key, value, cu_seqlens_q, cu_seqlens_kv, scale=scale, causal=causal)


def _varlen_attention(query, key, value, cu_q, cu_k, max_q, max_k, *, scale, causal):
    varlen_attn, takes = _varlen()
    heads, kv_heads, head_dim = query.shape[1], key.shape[1], query.shape[2]
    kwargs = {}
    if kv_heads != heads and "enable_gqa" in takes:
        kwargs["enable_gqa"] = True
    elif kv_heads != heads:  # query head i reads kv head i // (heads / kv_heads), as SDPA's enable_gqa
        key, value = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (key, value))
    if "scale" in takes:
        kwargs["scale"] = scale
    elif not math.isclose(scale, head_dim ** -0.5):
        query = query * (scale * head_dim ** 0.5)  # the kernel's own scale is 1/sqrt(head_dim)
    if "window_size" in takes:
        kwargs["window_size"] = (-1, 0) if causal else (-1, -1)
    else:
        kwargs["is_causal"] = causal
    if max_q is None or max_k is None:  # a host sync: callers on the training path pass the data's maximum
        max_q, max_k = (int((cu[1:] - cu[:-1]).max()) for cu in (cu_q, cu_k))
    cu_q, cu_k = (cu.to(device=query.device, dtype=torch.int32) for cu in (cu_q, cu_k))
    return varlen_attn(query, key, value, cu_q, cu_k, int(max_q), int(max_k), **kwargs)


def _looped_attention(query, key, value, cu_q, cu_k, *, scale, causal):
    """One SDPA call per sequence: exact, and what CPU runs (fp32 parity with transformers' per-sequence math)."""
    bounds_q, bounds_k = cu_q.tolist(), cu_k.tolist()
    outs = []
    for i in range(len(bounds_q) - 1):
        q, k, v = (t[b[i]:b[i + 1]].transpose(0, 1).unsqueeze(0)
                   for t, b in ((query, bounds_q), (key, bounds_k), (value, bounds_k)))
        if q.shape[2] == 0:
            continue
        sq, sk = q.shape[2], k.shape[2]
        mask = None
        if causal and sq != sk:  # bottom-right aligned (SDPA's is_causal is top-left): a CP chunk and its key prefix
            mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(diagonal=sk - sq)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None, scale=scale,
                                           enable_gqa=q.shape[1] != k.shape[1])
        outs.append(o.squeeze(0).transpose(0, 1))
    out = torch.cat(outs, dim=0) if outs else query.new_zeros(0, *query.shape[1:])
    return _zero_padding_tail(out, query.shape[0])


def _zero_padding_tail(out: torch.Tensor, total: int) -> torch.Tensor:
    """Tokens past the last cu_seqlens bound (padding to a fixed row length): zeros, like TE."""
    if out.shape[0] < total:
        out = torch.cat([out, out.new_zeros(total - out.shape[0], *out.shape[1:])], dim=0)
    return out


def per_token_rope_packing(packed_seq_params):
    """A THD packing as packed rows in [T, 1, ...] ('sbhd', batch 1) layout with the same `cu_seqlens`.

    Why: mcore's THD RoPE (`_apply_rotary_pos_emb_thd`) loops over the sequences in Python with `.tolist()`,
    one `.item()` per sequence and a tensor comparison in an `if`: host syncs in every attention layer, for queries
    and keys. Our angles already have one row per packed token (MRoPE positions restart per sequence in the data),
    so that loop only slices them back together; in 'sbhd' form mcore applies the same angles to the same tokens in
    one elementwise pass (bit-identical, tests/test_rope_thd.py) and SDPAttention / PackedSDPAttention read `cu_seqlens`
    to keep the sequences apart. The TE spec keeps THD (its attention and fused RoPE take THD natively)."""
    if packed_seq_params is None or packed_seq_params.qkv_format != "thd":
        return packed_seq_params
    return dataclasses.replace(packed_seq_params, qkv_format="sbhd")


class PackedKernelChoice:
    """The PerfOptions.packed_kernel switch of a core-attention module."""

    packed_kernel = DEFAULT.packed_kernel

    def use_options(self, options) -> None:
        self.packed_kernel = options.packed_kernel


class SDPAttention(PackedKernelChoice, MegatronModule):
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
        """Packed sequences, [t, np, hn] -> [t, np*hn] (mcore hands over padded bounds when it has them, like TE)."""
        if self.training and self.dropout_p > 0:
            raise ValueError("packed attention has no attention dropout (neither the varlen kernel nor the loop): "
                             "set attention_dropout to 0")
        if is_context_parallel(psp):  # this rank's query chunks against their causal key prefixes of all ranks
            key, value = gather_keys_values(key, value, psp)
        cu_q = psp.cu_seqlens_q_padded if psp.cu_seqlens_q_padded is not None else psp.cu_seqlens_q
        cu_k = psp.cu_seqlens_kv_padded if psp.cu_seqlens_kv_padded is not None else psp.cu_seqlens_kv
        out = packed_attention(query, key, value, cu_q, cu_k, psp.max_seqlen_q, psp.max_seqlen_kv,
                               scale=self.softmax_scale, causal=causal, kernel=self.packed_kernel)
        return out.reshape(out.shape[0], -1)
