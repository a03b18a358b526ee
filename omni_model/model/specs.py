"""Layer specs of the Qwen3-Omni thinker LLM: the fast local spec, or the TransformerEngine spec when the one TE
decision (config `model.use_te`, passed explicitly to every builder) asks for it. Both give the SAME state-dict names (TE adds `_extra_state` entries, which the mapping ignores):

  decoder.layers.N.input_layernorm.weight                     (TE: TENorm, not fused into linear_qkv)
  decoder.layers.N.self_attention.linear_qkv.weight           [ng*(nh/ng+2)*hd / tp, H], per-group [q.., k, v]
  decoder.layers.N.self_attention.{q,k}_layernorm.weight      [hd]
  decoder.layers.N.self_attention.linear_proj.weight          [H, nh*hd / tp]
  decoder.layers.N.pre_mlp_layernorm.weight
  decoder.layers.N.mlp.router.weight                          [E, H]                (MoE layers)
  decoder.layers.N.mlp.experts.linear_fc{1,2}.weight{e}       local expert e        (MoE layers)
  decoder.layers.N.mlp.shared_experts.linear_fc{1,2}.weight, .gate_weight [1, H]    (talker: shared expert)
  decoder.layers.N.mlp.linear_fc{1,2}.weight                                        (dense layers, mlp_only_layers)
  decoder.final_layernorm.weight, embedding.word_embeddings.weight, output_layer.weight

Local spec: `SDPAttention` (attention.py), `GroupedGemmExperts` (experts.py), SP-capable `RMSNorm` (norm.py),
`OmniTopKRouter` (router.py: mcore's, aux-loss token count per micro-batch), `OmniMoELayer` (dispatcher.py: no host
syncs in the token permutation at EP=1), mcore's Column/RowParallelLinear as plain matmuls when no TP communication
rides on them (linear.py). Every layer is a `DeepstackTransformerLayer`.
"""

from __future__ import annotations

from typing import List, Optional

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.moe.experts import GroupedMLPSubmodules
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.shared_experts import SharedExpertMLP
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)

from .attention import SDPAttention
from .dispatcher import OmniMoELayer
from .experts import ColumnGroupedLinear, GroupedGemmExperts, RowGroupedLinear
from .linear import LocalColumnParallelLinear, LocalRowParallelLinear
from .norm import RMSNorm
from .rope import RotaryTableSelfAttention
from .router import OmniTopKRouter
from ..configs import moe_layer_pattern  # noqa: F401  (torch-free home: the planner reads it too)


def require_te(use_te: bool) -> bool:
    """The one TE probe: `use_te` back when TransformerEngine (and mcore's TE extension) imports; asking for TE on a
    machine without it is an error, never a silent fallback (the checkpoint names and kernels would differ)."""
    if use_te:
        try:
            import transformer_engine.pytorch  # noqa: F401
            from megatron.core.extensions import transformer_engine  # noqa: F401,F811
        except Exception as error:
            raise RuntimeError(f"model.use_te is true but TransformerEngine does not import here ({error}); install "
                               f"transformer_engine or set model.use_te: false (the local spec)") from error
    return bool(use_te)


class DeepstackTransformerLayer(TransformerLayer):
    """A TransformerLayer that adds Qwen3-VL deepstack features after itself.

    The additions ride in mcore's `context` argument (unused by self-attention-only layers, passed unchanged by
    TransformerBlock to every layer, through activation recompute too): a dense tensor [s, b, n_deepstack, h] that
    holds each deepstack feature at its visual token position and zeros elsewhere. Layer with global index k
    (0-based) < n_deepstack adds slice k to its output: hidden + 0 is exact, so this equals HF's
    `hidden[visual_pos_masks] += deepstack_visual_embeds[k]` bit for bit.
    """

    def forward(self, *args, **kwargs):
        output, context = super().forward(*args, **kwargs)
        idx = self.layer_number - 1  # global, 0-based
        if context is not None and idx < context.shape[2]:
            output = output + context[:, :, idx].to(output.dtype)
        return output, context


def _attention_spec(use_te: bool) -> ModuleSpec:
    if use_te:
        from megatron.core.extensions.transformer_engine import (
            TEColumnParallelLinear,
            TEDotProductAttention,
            TENorm,
            TERowParallelLinear,
        )

        sub = SelfAttentionSubmodules(
            linear_qkv=TEColumnParallelLinear,
            core_attention=TEDotProductAttention,
            linear_proj=TERowParallelLinear,
            q_layernorm=TENorm,
            k_layernorm=TENorm,
        )
    else:
        sub = SelfAttentionSubmodules(
            linear_qkv=LocalColumnParallelLinear,
            core_attention=SDPAttention,
            linear_proj=LocalRowParallelLinear,
            q_layernorm=RMSNorm,
            k_layernorm=RMSNorm,
        )
    # without TE: RoPE from tables made once per forward (rope.RotaryTableSelfAttention, PerfOptions.llm_rope_tables)
    attention = SelfAttention if use_te else RotaryTableSelfAttention
    return ModuleSpec(module=attention, params={"attn_mask_type": AttnMaskType.causal}, submodules=sub)


def _moe_spec(use_te: bool, shared_expert: bool = False) -> ModuleSpec:
    if use_te:
        from megatron.core.extensions.transformer_engine import (
            TEColumnParallelGroupedLinear,
            TERowParallelGroupedLinear,
        )
        from megatron.core.transformer.moe.experts import TEGroupedMLP

        experts = ModuleSpec(
            module=TEGroupedMLP,
            submodules=GroupedMLPSubmodules(linear_fc1=TEColumnParallelGroupedLinear,
                                            linear_fc2=TERowParallelGroupedLinear),
        )
    else:
        experts = ModuleSpec(
            module=GroupedGemmExperts,
            submodules=GroupedMLPSubmodules(linear_fc1=ColumnGroupedLinear, linear_fc2=RowGroupedLinear),
        )
    # mcore's SharedExpertMLP (the gate is mcore's `moe_shared_expert_gate`: sigmoid(x @ gate_weight^T) * output)
    shared = ModuleSpec(module=SharedExpertMLP, submodules=_dense_mlp_spec(use_te).submodules) if shared_expert else None
    return ModuleSpec(
        module=MoELayer if use_te else OmniMoELayer,
        submodules=MoESubmodules(experts=experts, shared_experts=shared, router=OmniTopKRouter),
    )


def _dense_mlp_spec(use_te: bool) -> ModuleSpec:
    if use_te:
        from megatron.core.extensions.transformer_engine import TEColumnParallelLinear, TERowParallelLinear

        sub = MLPSubmodules(linear_fc1=TEColumnParallelLinear, linear_fc2=TERowParallelLinear)
    else:
        sub = MLPSubmodules(linear_fc1=LocalColumnParallelLinear, linear_fc2=LocalRowParallelLinear)
    return ModuleSpec(module=MLP, submodules=sub)


def _norm(use_te: bool):
    if use_te:
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm
    return RMSNorm


def layer_spec(is_moe: bool, use_te: bool, shared_expert: bool = False) -> ModuleSpec:
    norm = _norm(use_te)
    return ModuleSpec(
        module=DeepstackTransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=_attention_spec(use_te),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=_moe_spec(use_te, shared_expert) if is_moe else _dense_mlp_spec(use_te),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def decoder_block_spec(
    config, text_cfg: dict, use_te: bool = False, vp_stage: Optional[int] = None, pp_rank: Optional[int] = None
) -> TransformerBlockSubmodules:
    """Block spec for the layers of this pipeline stage (MoE or dense per layer, final RMSNorm)."""
    use_te = require_te(use_te)
    pattern = moe_layer_pattern(text_cfg)
    shared = getattr(config, "moe_shared_expert_intermediate_size", None) is not None
    specs = [layer_spec(m, use_te, shared) for m in pattern]
    n = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    off = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=specs[off : off + n], layer_norm=_norm(use_te))
