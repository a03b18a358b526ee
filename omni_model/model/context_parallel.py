"""Context parallelism on our packed (THD) attention, without TransformerEngine.

The split (`zigzag_plan`): every packed sequence of a micro-batch (padding segments included) is cut into 2 x cp
equal chunks and CP rank r keeps chunks r and 2cp-1-r, in that order, sequence after sequence (the load-balanced
order mcore and TE use: under a causal mask chunk i costs ~i, so each rank gets one cheap and one dear chunk). The
data side (`pad_for_context_parallel`) first pads each sequence at its end to a multiple of 2 x cp (and the row to a
multiple of 2 x cp x tp so that sequence parallelism can split a rank's tokens); pad tokens come after every real
token of their sequence, so under the causal mask no real token sees them, and they carry no label and are
padding for the MoE routers: the real tokens' outputs, losses and gradients are those of the unpadded batch.

Per-token inputs (MRoPE positions, shifted labels, loss mask, padding mask) are cut by the plan's `local_index` on
the host (forward_step); the decoder input (token embeddings with the towers' features merged in) and the deepstack
features are cut on the first pipeline stage by the language model, after the towers ran on the whole micro-batch.

Attention (`cp_attention`, the Llama-3 way): each layer all-gathers K and V over the CP group (backward:
reduce-scatter of their gradients, mcore's sequence-parallel gather with the CP group), lays every query chunk's
causal key prefix out contiguously (`kv_index`) and runs the ordinary varlen kernel / per-sequence loop with
BOTTOM-RIGHT aligned causal masks: query chunk k of a sequence (global offset o, length c) sees its sequence's keys
[0, o + c), query i of the chunk the first o + i + 1 of them. GQA keeps K/V small (4 of 32 heads at 30B-A3B): the
gathered K/V of a layer are 1/8 of its full-sequence query size, the all-gather is cheaper than a ring's cp-1 steps
and needs no online-softmax merging.

The towers are NOT split: every CP rank runs them on the micro-batch's whole media and keeps the rows of its
chunks. Why: a long clip's tokens cover every chunk (a 20-minute audio is spread over all ranks), so splitting the
media would need the towers to be CP-aware themselves (the audio tower's windows and the ViT's full attention cross
chunk bounds); the towers are a few percent of a step and their activations are bounded by their windows and by
the image/frame size, while the LLM's grow with the packed row, which CP does split. The tower parameters are
replicated over CP and their gradients come from each rank's own chunks: the data-parallel gradient reduction,
which mcore runs over DP x CP, sums them into the full gradient (exactness: tests/test_context_parallel.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from megatron.core.packed_seq_params import PackedSeqParams


@dataclass
class ZigzagPlan:
    """One CP rank's share of a packed row of `total` tokens whose sequences all divide into 2 x cp chunks."""

    local_index: np.ndarray  # int64 [total / cp]: the global token positions this rank keeps, in its order
    cu_q: np.ndarray  # int32 [2 n_seq + 1]: bounds of this rank's query chunks (its local tokens)
    cu_kv: np.ndarray  # int32 [2 n_seq + 1]: bounds of each chunk's causal key prefix in the laid-out keys
    kv_index: np.ndarray  # int64: rows of the CP-gathered keys (rank-major) that lay out those prefixes
    max_q: int
    max_kv: int


def zigzag_chunks(cu_seqlens, cp: int, rank: int) -> list:
    """(sequence start, chunk offset within the sequence, chunk length) of this rank's chunks, in local order."""
    bounds = [int(b) for b in cu_seqlens]
    chunks = []
    for start, end in zip(bounds, bounds[1:]):
        length = end - start
        if length % (2 * cp):
            raise ValueError(f"a packed sequence of {length} tokens does not split into 2 x cp = {2 * cp} chunks: "
                             f"pad each sequence first (data.packing.pad_for_context_parallel)")
        size = length // (2 * cp)
        if size:
            chunks += [(start, rank * size, size), (start, (2 * cp - 1 - rank) * size, size)]
    return chunks


def zigzag_plan(cu_seqlens, cp: int, rank: int) -> ZigzagPlan:
    """This rank's tokens and its attention layout over the CP-gathered keys."""
    per_rank = [zigzag_chunks(cu_seqlens, cp, r) for r in range(cp)]
    local = [np.concatenate([np.arange(s + o, s + o + n) for s, o, n in chunks]) if chunks
             else np.zeros(0, dtype=np.int64) for chunks in per_rank]
    width = len(local[0])
    gathered_row = np.empty(width * cp, dtype=np.int64)  # global position -> row of the rank-major gathered keys
    for r, index in enumerate(local):
        gathered_row[index] = r * width + np.arange(width)
    mine = per_rank[rank]
    q_lens = [n for _, _, n in mine]
    kv_lens = [o + n for _, o, n in mine]
    kv_index = (np.concatenate([gathered_row[s:s + o + n] for s, o, n in mine]) if mine
                else np.zeros(0, dtype=np.int64))
    return ZigzagPlan(local_index=local[rank].astype(np.int64), cu_q=_bounds(q_lens), cu_kv=_bounds(kv_lens),
                      kv_index=kv_index, max_q=max(q_lens, default=0), max_kv=max(kv_lens, default=0))


def _bounds(lengths) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)


@dataclass
class ContextParallelPackedSeqParams(PackedSeqParams):
    """mcore's PackedSeqParams of one CP rank: `cu_seqlens_q` bound its query chunks, `cu_seqlens_kv` their causal
    key prefixes laid out by `kv_index` from the K/V all-gathered over `cp_group`; `local_index` (the rank's global
    token positions) cuts the decoder input and deepstack features on the first stage. Handed to the layers in
    'sbhd' form (per-token RoPE: the positions are already this rank's), read by attention.SDPAttention."""

    kv_index: Optional[torch.Tensor] = None
    local_index: Optional[torch.Tensor] = None


def cp_packed_seq_params(plan: ZigzagPlan, cp_group) -> ContextParallelPackedSeqParams:
    as_tensor = torch.from_numpy
    return ContextParallelPackedSeqParams(
        qkv_format="thd", cu_seqlens_q=as_tensor(plan.cu_q), cu_seqlens_kv=as_tensor(plan.cu_kv),
        max_seqlen_q=plan.max_q, max_seqlen_kv=plan.max_kv, cp_group=cp_group,
        kv_index=as_tensor(plan.kv_index), local_index=as_tensor(plan.local_index))


def is_context_parallel(packed_seq_params) -> bool:
    return isinstance(packed_seq_params, ContextParallelPackedSeqParams)


def local_rows(tensor: torch.Tensor, packed_seq_params, dim: int = 0) -> torch.Tensor:
    """`tensor` (full packed row along `dim`) cut to this CP rank's tokens; unchanged without CP."""
    if not is_context_parallel(packed_seq_params):
        return tensor
    return tensor.index_select(dim, packed_seq_params.local_index.to(tensor.device))


def gather_keys_values(key: torch.Tensor, value: torch.Tensor, packed_seq_params):
    """K and V of every CP rank ([t_local, ng, hn] each), laid out as this rank's causal key prefixes.

    mcore's sequence-parallel all-gather with the CP group: forward all-gather along dim 0, backward reduce-scatter,
    so each rank gets the gradient its keys and values received on every rank (the CPU patches make it run on gloo)."""
    from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

    group = packed_seq_params.cp_group
    index = packed_seq_params.kv_index.to(key.device)
    both = torch.cat([key, value], dim=-1).contiguous()  # one collective for K and V
    gathered = gather_from_sequence_parallel_region(both, tensor_parallel_output_grad=True, group=group)
    laid_out = gathered.index_select(0, index)
    return laid_out[..., :key.shape[-1]], laid_out[..., key.shape[-1]:]
