"""The HF <-> mcore rows of the talker (one declarative table; see rules.Rule, mapping.py and model/talker.py).

mcore names carry the prefix `talker.` (the talker module itself drops it: `load_hf_into_talker`). The decoder's and
the code predictor's layers use the thinker LLM's layer rows (llm_rules.layer_rows) plus the shared expert; `{i}` in
the predictor's embedding / head rows is the code group (0..num_code_groups-2), not a layer.
"""

from __future__ import annotations

from .llm_rules import layer_rows
from .rules import Rule

HF = "talker."
MC = "talker."
DECODER_LAYER = MC + "language_model.decoder.layers.{i}."
_L = HF + "model.layers.{i}."
_P = HF + "code_predictor."


def _projection_rows(name: str) -> list:
    hf, mc = f"{HF}{name}.", f"{MC}{name}."
    return [
        Rule(hf=(hf + "linear_fc1.weight",), mcore=mc + "linear_fc1.weight", tp_dim=0),
        Rule(hf=(hf + "linear_fc1.bias",), mcore=mc + "linear_fc1.bias", tp_dim=0),
        Rule(hf=(hf + "linear_fc2.weight",), mcore=mc + "linear_fc2.weight", tp_dim=1),
        Rule(hf=(hf + "linear_fc2.bias",), mcore=mc + "linear_fc2.bias"),
    ]


TALKER_RULES = [
    # the MoE decoder: codec_embedding in, codec_head out (the first code group)
    Rule(hf=(HF + "model.codec_embedding.weight",), mcore=MC + "language_model.embedding.word_embeddings.weight",
         tp_dim=0),
    Rule(hf=(HF + "model.norm.weight",), mcore=MC + "language_model.decoder.final_layernorm.weight"),
    Rule(hf=(HF + "codec_head.weight",), mcore=MC + "language_model.output_layer.weight", tp_dim=0),
    *layer_rows(_L, DECODER_LAYER),
    # the shared expert of every decoder layer: mcore's SharedExpertMLP (gate: sigmoid(x @ gate_weight^T))
    Rule(hf=(_L + "mlp.shared_expert.gate_proj.weight", _L + "mlp.shared_expert.up_proj.weight"),
         mcore=DECODER_LAYER + "mlp.shared_experts.linear_fc1.weight", transform="gate_up", tp_dim=0),
    Rule(hf=(_L + "mlp.shared_expert.down_proj.weight",), mcore=DECODER_LAYER + "mlp.shared_experts.linear_fc2.weight",
         tp_dim=1),
    Rule(hf=(_L + "mlp.shared_expert_gate.weight",), mcore=DECODER_LAYER + "mlp.shared_experts.gate_weight"),
    # thinker width -> talker width
    *_projection_rows("text_projection"),
    *_projection_rows("hidden_projection"),
    # the code predictor: dense layers, one embedding and one head per code group 1..G-1
    *layer_rows(_P + "model.layers.{i}.", MC + "code_predictor.decoder.layers.{i}."),
    Rule(hf=(_P + "model.norm.weight",), mcore=MC + "code_predictor.decoder.final_layernorm.weight"),
    Rule(hf=(_P + "model.codec_embedding.{i}.weight",), mcore=MC + "code_predictor.embeddings.{i}.weight", tp_dim=0),
    Rule(hf=(_P + "lm_head.{i}.weight",), mcore=MC + "code_predictor.heads.{i}.weight", tp_dim=0),
]
