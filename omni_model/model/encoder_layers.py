"""Building blocks shared by the Qwen3-Omni vision and audio encoders (Megatron-Core based).

Both towers are pre-norm LayerNorm transformers with biased linears and *non-causal attention inside segments*
(one image or video frame for the ViT, one `n_window_infer` window for the AuT). They are built from Megatron-Core's
`TransformerBlock` with our own layer spec, so tensor parallelism (column/row parallel linears) comes from mcore and
the TransformerEngine spec is used when the one TE decision (`model.use_te`) asks for it.

Segments are passed as mcore `PackedSeqParams(qkv_format="thd", cu_seqlens_*)`, what TE's `TEDotProductAttention`
consumes natively (flash/cuDNN varlen). Without TE the core attention is `PackedSDPAttention` below, fed the
per-token-RoPE form of the same packing (`attention.per_token_rope_packing`: one RoPE pass over all tokens instead of
mcore's per-segment loop with host syncs), and attention.packed_attention does the work: flash `varlen_attn` on CUDA
in half precision, else one `scaled_dot_product_attention` per segment, which is exactly what transformers' sdpa path
of these encoders does (so CPU parity with HF is at rounding level).
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add

from .attention import PackedKernelChoice, packed_attention, per_token_rope_packing
from .linear import LocalColumnParallelLinear, LocalRowParallelLinear
from .rope import RotaryTableSelfAttention

# ---------------------------------------------------------------------------------------------------------------
# process groups
# ---------------------------------------------------------------------------------------------------------------


class _SingleRankGroup:
    """Stand-in for a size-1 process group (only `.size()`/`.rank()` are asked of it on the paths we use)."""

    def size(self) -> int:
        return 1

    def rank(self) -> int:
        return 0


_REPLICATED_TP_GROUP = None


def _replicated_tp_group():
    """A real size-1 group per rank (collective: every rank must call this together, e.g. at model build)."""
    global _REPLICATED_TP_GROUP
    if _REPLICATED_TP_GROUP is None:
        _REPLICATED_TP_GROUP, _ = torch.distributed.new_subgroups(group_size=1)
    return _REPLICATED_TP_GROUP


def encoder_process_groups(replicate: bool = False) -> ProcessGroupCollection:
    """Process groups for an encoder tower.

    * tp: the model's tensor-parallel group (or a size-1 group when `replicate`, i.e. the tower is a full copy on
      every TP rank);
    * pp: none — the towers live whole on the first pipeline stage, their layers are never split across stages;
    * cp: size 1 — encoder inputs are never split by context parallelism (images/clips are short).
    Works without `torch.distributed` (single process, meta device): tp=None there.
    """
    pg = ProcessGroupCollection()
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed and parallel_state.model_parallel_is_initialized():
        pg.tp = _replicated_tp_group() if replicate else parallel_state.get_tensor_model_parallel_group()
    else:
        pg.tp = None
    pg.pp = None
    pg.cp = _SingleRankGroup()
    return pg


def tp_world_size(pg: ProcessGroupCollection) -> int:
    if pg.tp is None or not torch.distributed.is_initialized():
        return 1
    return pg.tp.size()


# ---------------------------------------------------------------------------------------------------------------
# Megatron-Core TransformerConfig for an encoder tower
# ---------------------------------------------------------------------------------------------------------------


def encoder_transformer_config(
    *,
    num_layers: int,
    hidden_size: int,
    num_heads: int,
    ffn_hidden_size: int,
    activation_func,
    layernorm_epsilon: float,
    tp_size: int,
    params_dtype: torch.dtype = torch.float32,
    use_cpu_initialization: Optional[bool] = None,
    perform_initialization: bool = True,
    **overrides,
) -> TransformerConfig:
    """mcore config of a pre-LN, biased, non-gated encoder (full MHA, no GQA, no q/k norm, dropout 0)."""
    if use_cpu_initialization is None:
        use_cpu_initialization = not torch.cuda.is_available()
    kw = dict(
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_attention_heads=num_heads,
        num_query_groups=num_heads,
        kv_channels=hidden_size // num_heads,
        ffn_hidden_size=ffn_hidden_size,
        add_bias_linear=True,
        add_qkv_bias=True,
        gated_linear_unit=False,
        activation_func=activation_func,
        normalization="LayerNorm",
        layernorm_epsilon=layernorm_epsilon,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        tensor_model_parallel_size=tp_size,
        pipeline_model_parallel_size=1,
        context_parallel_size=1,
        sequence_parallel=False,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        pipeline_dtype=params_dtype,
        use_cpu_initialization=use_cpu_initialization,
        perform_initialization=perform_initialization,
    )
    kw.update(overrides)
    return TransformerConfig(**kw)


def plain_param_device(config: TransformerConfig):
    """Device for parameters we create outside mcore's linears: follow mcore (`use_cpu_initialization` -> the
    ambient default device, so a `torch.device("meta")` context works; else the current CUDA device)."""
    if config.use_cpu_initialization or not torch.cuda.is_available():
        return None
    return torch.device("cuda", torch.cuda.current_device())


class EncoderLayerNorm(nn.LayerNorm):
    """The local spec's LayerNorm, in `params_dtype`. mcore's WrappedTorchNorm always makes fp32 weights, and on
    CUDA a bf16 input against fp32 LayerNorm weights is an error (CPU silently upcasts, so only GPUs show it)."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype, device=plain_param_device(config))


gelu_tanh = functools.partial(F.gelu, approximate="tanh")
gelu_tanh.__name__ = "gelu_tanh"  # mcore logs/asserts on activation names in a few places


# ---------------------------------------------------------------------------------------------------------------
# core attention (local spec)
# ---------------------------------------------------------------------------------------------------------------


class PackedSDPAttention(PackedKernelChoice, MegatronModule):
    """mcore core-attention module for the local spec: non-causal attention within `packed_seq_params` segments.

    Accepts `thd` ([t, heads, dim]) with `cu_seqlens_q`, or plain `sbhd` without packing (one segment per batch row).
    Returns [t, heads*dim] (mcore reshapes to [t, 1, h] for thd).
    """

    def __init__(self, config: TransformerConfig, layer_number: int = 1, attn_mask_type=AttnMaskType.no_mask,
                 attention_type: str = "self", softmax_scale: Optional[float] = None, **kwargs):
        super().__init__(config=config)
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params: Optional[PackedSeqParams] = None):
        assert attention_bias is None, "attention bias is not supported by the encoder attention"
        if packed_seq_params is not None:  # thd [t, h, d], or the per-token-RoPE form [t, 1, h, d] (run_layers)
            psp = packed_seq_params
            q, k, v = (x.reshape(x.shape[0], *x.shape[-2:]) for x in (query, key, value))
            out = packed_attention(q, k, v, psp.cu_seqlens_q, psp.cu_seqlens_kv, psp.max_seqlen_q,
                                   psp.max_seqlen_kv, scale=self.scale, causal=False)
            return out.reshape(*query.shape[:-2], -1)
        # sbhd: [s, b, h, d] full (non-causal) attention per batch row
        s, b = query.shape[:2]
        o = F.scaled_dot_product_attention(*(x.permute(1, 2, 0, 3) for x in (query, key, value)), scale=self.scale)
        return o.permute(2, 0, 1, 3).reshape(s, b, -1)


# ---------------------------------------------------------------------------------------------------------------
# rotary embedding from tables (local spec)
# ---------------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------------
# layer spec
# ---------------------------------------------------------------------------------------------------------------


def encoder_layer_spec(use_te: bool = False) -> ModuleSpec:
    """Pre-LN encoder layer: LayerNorm -> self-attention (non-causal, packed segments) -> LayerNorm -> MLP.

    State-dict names differ between the two specs (local: `input_layernorm.*`, `pre_mlp_layernorm.*`; TE: fused
    into `linear_qkv.layer_norm_*` and `mlp.linear_fc1.layer_norm_*`); `omni_model.convert.encoder_rows.
    encoder_rules(te=...)` gives the rows for the same `use_te`.
    """
    from .specs import require_te

    if require_te(use_te):
        from megatron.core.extensions.transformer_engine import (
            TEDotProductAttention,
            TELayerNormColumnParallelLinear,
            TERowParallelLinear,
        )

        return ModuleSpec(
            module=TransformerLayer,
            submodules=TransformerLayerSubmodules(
                self_attention=ModuleSpec(
                    module=SelfAttention,
                    params={"attn_mask_type": AttnMaskType.no_mask},
                    submodules=SelfAttentionSubmodules(
                        linear_qkv=TELayerNormColumnParallelLinear,
                        core_attention=TEDotProductAttention,
                        linear_proj=TERowParallelLinear,
                        q_layernorm=IdentityOp,
                        k_layernorm=IdentityOp,
                    ),
                ),
                self_attn_bda=get_bias_dropout_add,
                mlp=ModuleSpec(
                    module=MLP,
                    submodules=MLPSubmodules(linear_fc1=TELayerNormColumnParallelLinear, linear_fc2=TERowParallelLinear),
                ),
                mlp_bda=get_bias_dropout_add,
            ),
        )
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=EncoderLayerNorm,
            self_attention=ModuleSpec(
                module=RotaryTableSelfAttention,
                params={"attn_mask_type": AttnMaskType.no_mask},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=LocalColumnParallelLinear,
                    core_attention=PackedSDPAttention,
                    linear_proj=LocalRowParallelLinear,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=EncoderLayerNorm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=LocalColumnParallelLinear,
                                                                 linear_fc2=LocalRowParallelLinear)),
            mlp_bda=get_bias_dropout_add,
            # dist checkpoints use the TE names for both specs (same convention as mcore's GPT local spec)
            sharded_state_dict_keys_map={
                "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
            },
        ),
    )


def host_to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A tensor the towers build on the host (segment bounds, patch positions, ...) on `device` without a host sync.
    A plain `.to("cuda")` of pageable memory makes torch wait for the stream (memcpy_and_sync): for every kernel
    queued before it, e.g. the previous micro-batch's whole backward, leaving the GPU idle while the host then
    launches the towers. From page-locked memory the copy is queued like a kernel (the pinned block is not reused
    before the copy has run: torch's caching host allocator records it on the stream)."""
    if tensor.device.type != "cpu" or torch.device(device).type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def packed_seq_params(cu_seqlens: torch.Tensor, max_seqlen: int) -> PackedSeqParams:
    cu = cu_seqlens.to(torch.int32)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=int(max_seqlen), max_seqlen_kv=int(max_seqlen))


def run_layers(layers: nn.ModuleList, hidden_states: torch.Tensor, *, rotary_pos_emb=None,
               packed: PackedSeqParams, recompute: bool = False, collect: tuple = (), on_collect=None):
    """Run mcore TransformerLayers over a packed [t, 1, h] sequence; call `on_collect(i, h)` after layer i in
    `collect` (deepstack taps). `recompute` uses torch's non-reentrant checkpoint per layer (works on CPU and GPU,
    no dependence on mcore's CUDA RNG tracker; dropout is 0 in these towers).

    With our core attention (local spec) the segments go in the per-token-RoPE form: mcore's THD RoPE would sync the
    host once per segment (every image frame, every audio window) in every layer."""
    if layers and isinstance(layers[0].self_attention.core_attention, PackedSDPAttention):
        packed = per_token_rope_packing(packed)
    for i, layer in enumerate(layers):
        if recompute and torch.is_grad_enabled():
            hidden_states = torch.utils.checkpoint.checkpoint(
                lambda h, _layer=layer: _layer(h, attention_mask=None, rotary_pos_emb=rotary_pos_emb,
                                              packed_seq_params=packed)[0],
                hidden_states, use_reentrant=False,
            )
        else:
            hidden_states = layer(hidden_states, attention_mask=None, rotary_pos_emb=rotary_pos_emb,
                                  packed_seq_params=packed)[0]
        if i in collect and on_collect is not None:
            on_collect(i, hidden_states)
    return hidden_states


def mark_replicated(module: nn.Module) -> None:
    """Tag every parameter of a tower built with a size-1 TP group as TP-duplicated (mcore's grad-norm and
    checkpoint code otherwise count a 'tensor_model_parallel' weight once per TP rank)."""
    for p in module.parameters():
        if getattr(p, "tensor_model_parallel", False):
            p.tensor_model_parallel = False
            p.partition_dim = -1
