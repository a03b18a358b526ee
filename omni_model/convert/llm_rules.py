"""The HF <-> mcore rows of the thinker LLM (one declarative table; see rules.Rule and mapping.py).

mcore names are those of the full thinker (`language_model.` prefix); the standalone LLM module drops the prefix
(`load_hf_into_model(..., prefix="language_model.")`). `{i}`: layer index (HF global; mcore local to the pipeline
stage, placed by mapping.layer_placement), `{e}`: expert index (HF global; mcore local to the EP rank). Dense rows
(`mlp.gate_proj`, ...) only match layers listed in `mlp_only_layers` / off the `decoder_sparse_step`; MoE rows only
MoE layers: the rows are matched against the keys that exist, so no layer-kind logic is needed here.
"""

from __future__ import annotations

from .rules import Rule

HF = "thinker.model."
MC = "language_model."
L = HF + "layers.{i}."
ML = MC + "decoder.layers.{i}."

def layer_rows(hf_layer: str, mc_layer: str) -> list:
    """The rows of one decoder layer of the thinker's layout (attention, MoE or dense MLP), under the given HF / mcore
    layer prefixes (with `{i}`): the thinker LLM's, and the talker's decoder and code predictor (talker_rules.py)."""
    L, ML = hf_layer, mc_layer
    return [
        # attention
        Rule(hf=(L + "input_layernorm.weight",), mcore=ML + "input_layernorm.weight"),
        Rule(
            hf=(L + "self_attn.q_proj.weight", L + "self_attn.k_proj.weight", L + "self_attn.v_proj.weight"),
            mcore=ML + "self_attention.linear_qkv.weight",
            transform="qkv",
            tp_dim=0,
        ),
        Rule(
            hf=(L + "self_attn.q_proj.bias", L + "self_attn.k_proj.bias", L + "self_attn.v_proj.bias"),
            mcore=ML + "self_attention.linear_qkv.bias",
            transform="qkv",
            tp_dim=0,
        ),
        Rule(hf=(L + "self_attn.q_norm.weight",), mcore=ML + "self_attention.q_layernorm.weight"),
        Rule(hf=(L + "self_attn.k_norm.weight",), mcore=ML + "self_attention.k_layernorm.weight"),
        Rule(hf=(L + "self_attn.o_proj.weight",), mcore=ML + "self_attention.linear_proj.weight", tp_dim=1),
        Rule(hf=(L + "post_attention_layernorm.weight",), mcore=ML + "pre_mlp_layernorm.weight"),
        # MoE layers
        Rule(hf=(L + "mlp.gate.weight",), mcore=ML + "mlp.router.weight"),
        Rule(
            hf=(L + "mlp.experts.{e}.gate_proj.weight", L + "mlp.experts.{e}.up_proj.weight"),
            mcore=ML + "mlp.experts.linear_fc1.weight{e}",
            transform="gate_up",
            tp_dim=0,
        ),
        Rule(hf=(L + "mlp.experts.{e}.down_proj.weight",), mcore=ML + "mlp.experts.linear_fc2.weight{e}", tp_dim=1),
        # dense layers (mlp_only_layers / decoder_sparse_step)
        Rule(
            hf=(L + "mlp.gate_proj.weight", L + "mlp.up_proj.weight"),
            mcore=ML + "mlp.linear_fc1.weight",
            transform="gate_up",
            tp_dim=0,
        ),
        Rule(hf=(L + "mlp.down_proj.weight",), mcore=ML + "mlp.linear_fc2.weight", tp_dim=1),
    ]


LLM_RULES = [
    Rule(hf=(HF + "embed_tokens.weight",), mcore=MC + "embedding.word_embeddings.weight", tp_dim=0),
    Rule(hf=(HF + "norm.weight",), mcore=MC + "decoder.final_layernorm.weight"),
    Rule(hf=("thinker.lm_head.weight",), mcore=MC + "output_layer.weight", tp_dim=0),
    *layer_rows(L, ML),
]
