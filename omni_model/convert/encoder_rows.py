"""HF <-> Megatron-Core rows for the two encoder towers of the Qwen3-Omni thinker (consumed by mapping.Mapper).

HF keys are the on-disk names (`thinker.visual.*`, `thinker.audio_tower.*`); mcore keys are the state-dict names of
`omni_model.model.vision.VisionEncoder` under `vision_model.` and of `omni_model.model.audio.AudioEncoder` under
`audio_model.`. `{i}` is a layer index (ViT block / AuT layer) or, in the deepstack rows, the deepstack merger index.

The towers' attention is full MHA, so their fused qkv is the LLM's `qkv` layout with one head per query group:
the ViT's one `attn.qkv` tensor uses `qkv_fused`, the AuT's separate q/k/v use `qkv` (geometry from the config).

`encoder_rules(te=...)` takes the LayerNorm names from the same `use_te` the towers are built with (TE fuses them
into the following linear: `linear_qkv.layer_norm_{weight,bias}`, `mlp.linear_fc1.layer_norm_{weight,bias}`);
`audio_tp=False` marks every audio row replicated (tower built with `replicate=True`, needed when TP does not divide
the 20 audio heads, e.g. TP=8).
"""

from __future__ import annotations

from .rules import Rule

VISION_HF = "thinker.visual."
VISION_MCORE = "vision_model."
AUDIO_HF = "thinker.audio_tower."
AUDIO_MCORE = "audio_model."


def _r(hf, mcore, transform="identity", tp_dim=None) -> Rule:
    return Rule(hf=hf if isinstance(hf, tuple) else (hf,), mcore=mcore, transform=transform, tp_dim=tp_dim)


def _linear(hf_prefix: str, mcore_prefix: str, kind: str, tp: bool) -> list[Rule]:
    """weight+bias of a column ("col") or row ("row") parallel linear."""
    if kind == "col":
        dims = (0, 0)
    else:
        dims = (1, None)
    if not tp:
        dims = (None, None)
    return [
        _r(hf_prefix + "weight", mcore_prefix + "weight", tp_dim=dims[0]),
        _r(hf_prefix + "bias", mcore_prefix + "bias", tp_dim=dims[1]),
    ]


def _norm(hf_prefix: str, mcore_prefix: str) -> list[Rule]:
    return [_r(hf_prefix + "weight", mcore_prefix + "weight"), _r(hf_prefix + "bias", mcore_prefix + "bias")]


def _layer_norm_names(te: bool) -> tuple[str, str]:
    if te:
        return "self_attention.linear_qkv.layer_norm_", "mlp.linear_fc1.layer_norm_"
    return "input_layernorm.", "pre_mlp_layernorm."


def vision_rules(te: bool = False) -> list[Rule]:
    H, M = VISION_HF, VISION_MCORE
    ln1, ln2 = _layer_norm_names(te)
    blk, lay = H + "blocks.{i}.", M + "decoder.layers.{i}."
    rows = [
        _r(H + "patch_embed.proj.weight", M + "patch_embed.proj.weight"),
        _r(H + "patch_embed.proj.bias", M + "patch_embed.proj.bias"),
        _r(H + "pos_embed.weight", M + "pos_embed.weight"),
        *_norm(blk + "norm1.", lay + ln1),
        _r(blk + "attn.qkv.weight", lay + "self_attention.linear_qkv.weight", "qkv_fused", 0),
        _r(blk + "attn.qkv.bias", lay + "self_attention.linear_qkv.bias", "qkv_fused", 0),
        *_linear(blk + "attn.proj.", lay + "self_attention.linear_proj.", "row", True),
        *_norm(blk + "norm2.", lay + ln2),
        *_linear(blk + "mlp.linear_fc1.", lay + "mlp.linear_fc1.", "col", True),
        *_linear(blk + "mlp.linear_fc2.", lay + "mlp.linear_fc2.", "row", True),
    ]
    for hf_m, mc_m in ((H + "merger.", M + "merger."), (H + "merger_list.{i}.", M + "deepstack_mergers.{i}.")):
        rows += [
            *_norm(hf_m + "ln_q.", mc_m + "ln_q."),
            *_linear(hf_m + "mlp.0.", mc_m + "linear_fc1.", "col", True),
            *_linear(hf_m + "mlp.2.", mc_m + "linear_fc2.", "row", True),
        ]
    return rows


def audio_rules(te: bool = False, tp: bool = True) -> list[Rule]:
    H, M = AUDIO_HF, AUDIO_MCORE
    ln1, ln2 = _layer_norm_names(te)
    lyr, lay = H + "layers.{i}.", M + "decoder.layers.{i}."
    qkv_dim = 0 if tp else None
    rows = []
    for conv in ("conv2d1", "conv2d2", "conv2d3"):
        rows += [_r(H + conv + ".weight", M + conv + ".weight"), _r(H + conv + ".bias", M + conv + ".bias")]
    rows += [
        _r(H + "conv_out.weight", M + "conv_out.weight"),
        *_norm(lyr + "self_attn_layer_norm.", lay + ln1),
        _r(tuple(lyr + f"self_attn.{p}_proj.weight" for p in "qkv"), lay + "self_attention.linear_qkv.weight",
           "qkv", qkv_dim),
        _r(tuple(lyr + f"self_attn.{p}_proj.bias" for p in "qkv"), lay + "self_attention.linear_qkv.bias",
           "qkv", qkv_dim),
        *_linear(lyr + "self_attn.out_proj.", lay + "self_attention.linear_proj.", "row", tp),
        *_norm(lyr + "final_layer_norm.", lay + ln2),
        *_linear(lyr + "fc1.", lay + "mlp.linear_fc1.", "col", tp),
        *_linear(lyr + "fc2.", lay + "mlp.linear_fc2.", "row", tp),
        *_norm(H + "ln_post.", M + "ln_post."),
        *_linear(H + "proj1.", M + "proj1.", "col", False),
        *_linear(H + "proj2.", M + "proj2.", "col", False),
    ]
    return rows


def encoder_rules(te: bool = False, audio_tp: bool = True) -> list[Rule]:
    return vision_rules(te) + audio_rules(te, audio_tp)


def encoder_rules_for(config, tp: int, te: bool = False) -> list[Rule]:
    """The rows for a TP size: the audio rows replicated when the audio tower is
    (`omni_model.model.audio.audio_replicated`, e.g. the released 20-head tower at TP=8)."""
    from ..model.audio import audio_replicated
    from ..model.transformer_config import thinker_config_of

    has_audio = "audio_config" in thinker_config_of(config)
    return encoder_rules(te=te, audio_tp=not (has_audio and audio_replicated(config, tp)))
