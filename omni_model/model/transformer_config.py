"""HF Qwen3-Omni thinker text config -> Megatron-Core TransformerConfig (+ the extras mcore has no field for).

Sizes always come from the checkpoint's config (never transformers' class defaults). Accepts the full
`config.json` dict, the `thinker_config` dict, or the `text_config` dict.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from megatron.core.transformer.transformer_config import TransformerConfig

from ..configs import audio_config_of, config_dict, text_config_of, thinker_config_of, vision_config_of  # noqa: F401
from ..layout import Layout  # noqa: F401  (the one layout type; model builders take it from here)


def current_tp_size() -> int:
    """Tensor-parallel size of mcore's parallel_state, 1 when it is not initialised (single process, meta builds)."""
    from megatron.core import parallel_state

    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and parallel_state.model_parallel_is_initialized():
        return parallel_state.get_tensor_model_parallel_world_size()
    return 1


def rope_params(text: dict) -> dict:
    rp = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
    if "rope_theta" not in rp:
        rp["rope_theta"] = text.get("rope_theta", 1_000_000.0)
    rp.setdefault("mrope_section", [24, 20, 20])
    rp.setdefault("interleaved", rp.get("mrope_interleaved", True))
    return rp


def deepstack_count(cfg) -> int:
    """Number of deepstack features (one per `deepstack_visual_indexes` entry) of a full/thinker config."""
    try:
        return len(thinker_config_of(cfg)["vision_config"]["deepstack_visual_indexes"])
    except (KeyError, TypeError):
        return 0


def build_transformer_config(
    cfg,
    layout: Optional[Layout] = None,
    *,
    dtype: torch.dtype = torch.float32,
    use_cpu_initialization: Optional[bool] = None,
    perform_initialization: bool = True,
    dispatcher: Optional[str] = None,
    shared_expert: bool = False,
    **overrides,
) -> TransformerConfig:
    """`shared_expert`: every MoE layer also has a sigmoid-gated shared expert of `shared_expert_intermediate_size`
    (the talker's decoder). A model fact, not read from the config: the thinker's config carries the key too (0) and
    transformers' thinker has no shared expert whatever its value."""
    text = text_config_of(cfg)
    layout = layout or Layout()
    rp = rope_params(text)
    head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    num_experts = text.get("num_experts", 0) or 0
    topk = text.get("num_experts_per_tok", 1)
    norm_topk = bool(text.get("norm_topk_prob", True))
    if num_experts and topk == 1 and norm_topk:
        raise NotImplementedError("top-1 with norm_topk_prob (prob == 1) is not mapped onto mcore's router")
    from .specs import moe_layer_pattern

    pattern = moe_layer_pattern(text)
    if dispatcher is None:
        # without EP the alltoall dispatcher still splits and re-concatenates the permuted tokens by expert
        # (sort_chunks_by_idxs: ~0.7 ms per MoE layer and step at the 30B shape, measured on H200); allgather has
        # no such pass. With EP, alltoall moves only the routed tokens.
        dispatcher = "alltoall" if layout.ep > 1 else "allgather"
    if use_cpu_initialization is None:
        use_cpu_initialization = not torch.cuda.is_available()
    kw = dict(
        num_layers=text["num_hidden_layers"],
        hidden_size=text["hidden_size"],
        num_attention_heads=text["num_attention_heads"],
        num_query_groups=text.get("num_key_value_heads", text["num_attention_heads"]),
        kv_channels=head_dim,
        ffn_hidden_size=text.get("intermediate_size", text.get("moe_intermediate_size")),
        normalization="RMSNorm",
        layernorm_epsilon=text.get("rms_norm_eps", 1e-6),
        qk_layernorm=True,
        add_bias_linear=False,
        add_qkv_bias=bool(text.get("attention_bias", False)),
        gated_linear_unit=True,
        activation_func=F.silu,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=text.get("initializer_range", 0.02),
        rotary_interleaved=False,
        apply_rope_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        mrope_section=list(rp["mrope_section"]),
        # parallel layout
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp,
        context_parallel_size=layout.cp,
        sequence_parallel=bool(layout.sequence_parallel) and layout.tp > 1,
        # dtype
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        pipeline_dtype=dtype,
        use_cpu_initialization=use_cpu_initialization,
        perform_initialization=perform_initialization,
        attention_softmax_in_fp32=True,
        # the LM loss is model.cross_entropy (Qwen3OmniLanguageModel.compute_language_model_loss), which reads neither
        # this nor cross_entropy_fusion_impl: mcore's fused variant kept a 10 GB fp32 softmax and ran out of memory
        cross_entropy_loss_fusion=False,
    )
    if num_experts:
        kw.update(
            num_moe_experts=num_experts,
            moe_ffn_hidden_size=text.get("moe_intermediate_size"),
            moe_router_topk=topk,
            moe_router_score_function="softmax",
            # HF: softmax over all experts in fp32, top-k, renormalised when norm_topk_prob. mcore's TopKRouter:
            # pre_softmax=False takes top-k of the logits and softmaxes those k (= the renormalised top-k softmax);
            # pre_softmax=True is softmax, then top-k, not renormalised
            moe_router_pre_softmax=not norm_topk,
            moe_router_load_balancing_type="aux_loss",
            moe_aux_loss_coeff=float(text.get("router_aux_loss_coef", 0.0)),
            moe_router_dtype="fp32",
            moe_token_dispatcher_type=dispatcher,
            moe_grouped_gemm=True,
            moe_permute_fusion=False,
            moe_layer_freq=[1 if m else 0 for m in pattern],
            moe_shared_expert_intermediate_size=text["shared_expert_intermediate_size"] if shared_expert else None,
            moe_shared_expert_gate=shared_expert,  # HF: sigmoid(shared_expert_gate(x)) * shared_expert(x)
        )
    kw.update(overrides)
    return TransformerConfig(**kw)
