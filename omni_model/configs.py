"""Qwen3-Omni configurations as `config.json` dicts: the released 30B-A3B values and the embedded tiny model.

Sizes and token ids come from the released checkpoint (shared/reference/qwen3-omni-30b-a3b.md), never from
transformers' class defaults, which describe a different (Qwen2.5-Omni-like) model.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

# Token ids of the released tokenizer/config. The tiny model keeps them all, so data encoded for it is valid
# for the real model and vice versa.
TOKEN_IDS = {
    "im_start": 151644,
    "im_end": 151645,
    "vision_start": 151652,
    "vision_end": 151653,
    "image_pad": 151655,
    "video_pad": 151656,
    "audio_start": 151669,
    "audio_end": 151670,
    "tts_pad": 151671,
    "tts_bos": 151672,
    "tts_eos": 151673,
    "audio_pad": 151675,
    "system": 8948,
    "user": 872,
    "assistant": 77091,
}

VOCAB_SIZE = 152064  # embedding rows of the released thinker (tokenizer ids < 151680, the rest is padding)


def _thinker_ids() -> dict:
    return {
        "audio_start_token_id": TOKEN_IDS["audio_start"],
        "audio_end_token_id": TOKEN_IDS["audio_end"],
        "audio_token_id": TOKEN_IDS["audio_pad"],
        "image_token_id": TOKEN_IDS["image_pad"],
        "video_token_id": TOKEN_IDS["video_pad"],
        "vision_start_token_id": TOKEN_IDS["vision_start"],
        "vision_end_token_id": TOKEN_IDS["vision_end"],
        "user_token_id": TOKEN_IDS["user"],
        "position_id_per_seconds": 13,
        "seconds_per_chunk": 2,
    }


def _top_level_ids() -> dict:
    return {
        "enable_audio_output": True,
        "im_start_token_id": TOKEN_IDS["im_start"],
        "im_end_token_id": TOKEN_IDS["im_end"],
        "system_token_id": TOKEN_IDS["system"],
        "user_token_id": TOKEN_IDS["user"],
        "assistant_token_id": TOKEN_IDS["assistant"],
        "tts_pad_token_id": TOKEN_IDS["tts_pad"],
        "tts_bos_token_id": TOKEN_IDS["tts_bos"],
        "tts_eos_token_id": TOKEN_IDS["tts_eos"],
    }


_TALKER_CODEC_IDS = {
    "codec_bos_id": 2149,
    "codec_eos_token_id": 2150,
    "codec_pad_id": 2148,
    "codec_nothink_id": 2155,
    "codec_think_bos_id": 2156,
    "codec_think_eos_id": 2157,
    "speaker_id": {"chelsie": 2301, "ethan": 2302, "aiden": 2303},
}


# Talker values of the released config.json that differ from transformers' class defaults (norm_topk_prob is False
# there, the code predictor's rope_theta 10000): spelled out so that neither the tiny model nor the 30B one uses them.
_TALKER_TEXT_COMMON = {
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 65536,
    "router_aux_loss_coef": 0.001,
    "tie_word_embeddings": False,
}
_CODE_PREDICTOR_COMMON = {
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 32768,
    "tie_word_embeddings": False,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
}


def released_30b_a3b_config() -> dict:
    """The Qwen3-Omni-30B-A3B-Instruct `config.json` values that matter for training and conversion."""
    text = {
        "vocab_size": VOCAB_SIZE,
        "hidden_size": 2048,
        "num_hidden_layers": 48,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "moe_intermediate_size": 768,
        "intermediate_size": 768,
        "shared_expert_intermediate_size": 0,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 65536,
        "router_aux_loss_coef": 0.001,
        "tie_word_embeddings": False,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 1000000.0,
            "mrope_section": [24, 20, 20],
            "interleaved": True,
            "mrope_interleaved": True,
        },
    }
    vision = {
        "depth": 27,
        "hidden_size": 1152,
        "num_heads": 16,
        "intermediate_size": 4304,
        "hidden_act": "gelu_pytorch_tanh",
        "patch_size": 16,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
        "in_channels": 3,
        "out_hidden_size": 2048,
        "num_position_embeddings": 2304,
        "deepstack_visual_indexes": [8, 16, 24],
    }
    audio = {
        "num_mel_bins": 128,
        "d_model": 1280,
        "encoder_attention_heads": 20,
        "encoder_ffn_dim": 5120,
        "encoder_layers": 32,
        "downsample_hidden_size": 480,
        "output_dim": 2048,
        "n_window": 50,
        "n_window_infer": 800,
        "conv_chunksize": 500,
        "max_source_positions": 1500,
    }
    talker_text = {
        "vocab_size": 3072,
        "hidden_size": 1024,
        "num_hidden_layers": 20,
        "num_attention_heads": 16,
        "num_key_value_heads": 2,
        "head_dim": 128,
        "num_experts": 128,
        "num_experts_per_tok": 6,
        "moe_intermediate_size": 384,
        "shared_expert_intermediate_size": 768,
        "intermediate_size": 2048,  # the text/hidden projections' width (thinker hidden -> this -> talker hidden)
        **_TALKER_TEXT_COMMON,
        "rope_parameters": copy.deepcopy(text["rope_parameters"]),
    }
    code_predictor = {
        "vocab_size": 2048,
        "hidden_size": 1024,
        "num_hidden_layers": 5,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "intermediate_size": 3072,
        "num_code_groups": 16,
        **_CODE_PREDICTOR_COMMON,
    }
    code2wav = {
        "num_quantizers": 16,
        "codebook_size": 2048,
        "hidden_size": 1024,
        "num_hidden_layers": 8,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "sliding_window": 72,
        "decoder_dim": 1536,
        "upsample_rates": [8, 5, 4, 3],
        "upsampling_ratios": [2, 2],
    }
    return _assemble(text, vision, audio, talker_text, code_predictor, code2wav, talker_hidden_layer=24)


def tiny_config() -> dict:
    """The embedded default: every architectural feature of the released model at toy width.

    Real vocabulary, real token ids, real patch/mel/window sizes (so the data path is the real one), interleaved
    MRoPE, MoE with top-k > 1 on every layer, deepstack on three vision layers feeding three LLM layers.
    """
    text = {
        "vocab_size": VOCAB_SIZE,
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "moe_intermediate_size": 32,
        "intermediate_size": 32,
        "shared_expert_intermediate_size": 0,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 65536,
        "router_aux_loss_coef": 0.001,
        "tie_word_embeddings": False,
        # head_dim/2 = 8 rotary frequencies split T/H/W, interleaved like the released [24, 20, 20] of 64.
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 1000000.0,
            "mrope_section": [4, 2, 2],
            "interleaved": True,
            "mrope_interleaved": True,
        },
    }
    vision = {
        "depth": 4,
        "hidden_size": 32,
        "num_heads": 2,
        "intermediate_size": 64,
        "hidden_act": "gelu_pytorch_tanh",
        "patch_size": 16,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
        "in_channels": 3,
        "out_hidden_size": 64,
        "num_position_embeddings": 2304,
        "deepstack_visual_indexes": [1, 2, 3],
    }
    audio = {
        "num_mel_bins": 128,
        "d_model": 32,
        "encoder_attention_heads": 2,
        "encoder_ffn_dim": 64,
        "encoder_layers": 2,
        "downsample_hidden_size": 16,
        "output_dim": 64,
        "n_window": 50,
        "n_window_infer": 800,
        "conv_chunksize": 500,
        "max_source_positions": 1500,
    }
    # talker and code predictor: grouped-query attention with a query width of twice the hidden size, as released
    # (16 x 128 over 1024); two KV heads so that TP=2 splits them
    talker_text = {
        "vocab_size": 3072,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 16,
        "shared_expert_intermediate_size": 32,
        "intermediate_size": 64,  # the projections' width: the thinker hidden size, as in the release (2048)
        **_TALKER_TEXT_COMMON,
        "rope_parameters": copy.deepcopy(text["rope_parameters"]),
    }
    code_predictor = {
        "vocab_size": 2048,
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "intermediate_size": 64,
        "num_code_groups": 16,
        **_CODE_PREDICTOR_COMMON,
    }
    code2wav = {
        "num_quantizers": 16,
        "codebook_size": 2048,
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "intermediate_size": 64,
        "sliding_window": 72,
        "decoder_dim": 32,
        "upsample_rates": [8, 5, 4, 3],
        "upsampling_ratios": [2, 2],
    }
    return _assemble(text, vision, audio, talker_text, code_predictor, code2wav, talker_hidden_layer=2)


def _assemble(text, vision, audio, talker_text, code_predictor, code2wav, talker_hidden_layer) -> dict:
    talker = {
        "text_config": talker_text,
        "code_predictor_config": code_predictor,
        "num_code_groups": code_predictor["num_code_groups"],
        "thinker_hidden_size": text["hidden_size"],
        "accept_hidden_layer": talker_hidden_layer,
        "audio_token_id": TOKEN_IDS["audio_pad"],
        "image_token_id": TOKEN_IDS["image_pad"],
        "video_token_id": TOKEN_IDS["video_pad"],
        "vision_start_token_id": TOKEN_IDS["vision_start"],
        "audio_start_token_id": TOKEN_IDS["audio_start"],
        "position_id_per_seconds": 13,
        "spatial_merge_size": vision["spatial_merge_size"],
        **_TALKER_CODEC_IDS,
    }
    return {
        "architectures": ["Qwen3OmniMoeForConditionalGeneration"],
        "model_type": "qwen3_omni_moe",
        **_top_level_ids(),
        "thinker_config": {
            "text_config": text,
            "vision_config": vision,
            "audio_config": audio,
            "tie_word_embeddings": False,
            **_thinker_ids(),
        },
        "talker_config": talker,
        "code2wav_config": code2wav,
    }


# ---------------------------------------------------------------------- unwrapping (no torch: config checks use it)
def config_dict(cfg) -> dict:
    """An HF config as a dict: a dict, a path to config.json or an HF dir, or a transformers config object."""
    if isinstance(cfg, (str, Path)):
        p = Path(cfg)
        cfg = json.loads((p / "config.json" if p.is_dir() else p).read_text())
    if not isinstance(cfg, dict):
        cfg = cfg.to_dict()
    return cfg


def thinker_config_of(cfg) -> dict:
    """The thinker_config dict of a full / thinker config (a component dict comes back as is)."""
    cfg = config_dict(cfg)
    return cfg.get("thinker_config", cfg)


def text_config_of(cfg) -> dict:
    """The text_config dict of a full / thinker / text config."""
    cfg = thinker_config_of(cfg)
    return cfg.get("text_config", cfg)


def vision_config_of(cfg) -> dict:
    """The vision_config dict of a full / thinker / vision config."""
    cfg = thinker_config_of(cfg)
    return cfg.get("vision_config", cfg)


def audio_config_of(cfg) -> dict:
    """The audio_config dict of a full / thinker / audio config."""
    cfg = thinker_config_of(cfg)
    return cfg.get("audio_config", cfg)


def moe_layer_pattern(text_cfg: dict) -> list[bool]:
    """HF's rule: layer i is MoE iff i not in mlp_only_layers and num_experts > 0 and (i+1) % decoder_sparse_step == 0."""
    n = text_cfg["num_hidden_layers"]
    step = text_cfg.get("decoder_sparse_step", 1) or 1
    dense = set(text_cfg.get("mlp_only_layers", []) or [])
    experts = text_cfg.get("num_experts", 0) or 0
    return [(i not in dense) and experts > 0 and (i + 1) % step == 0 for i in range(n)]


def talker_config_of(cfg) -> dict:
    """The talker_config dict of a full config (a talker config dict comes back as is)."""
    cfg = config_dict(cfg)
    return cfg.get("talker_config", cfg)


def talker_text_config_of(cfg) -> dict:
    """The talker's decoder config in the thinker text config's terms (what the model builders read).

    transformers writes the talker's expert count as `num_local_experts`; and its talker layer replaces the MLP by
    the sparse block with a shared expert on EVERY layer, whatever `mlp_only_layers` / `decoder_sparse_step` say, so
    the pattern is pinned to all-MoE here rather than read from keys the talker ignores."""
    text = dict(talker_config_of(cfg)["text_config"])
    text.setdefault("num_experts", text.get("num_local_experts", 0))
    text["mlp_only_layers"], text["decoder_sparse_step"] = [], 1
    if not text.get("shared_expert_intermediate_size"):
        raise ValueError("talker text_config: shared_expert_intermediate_size must be > 0 (every talker layer has a "
                         "shared expert)")
    return text


def code_predictor_config_of(cfg) -> dict:
    """The code predictor's decoder config (dense layers, plain 1-D RoPE) in the thinker text config's terms."""
    predictor = dict(talker_config_of(cfg)["code_predictor_config"])
    predictor["num_experts"], predictor["mlp_only_layers"] = 0, list(range(predictor["num_hidden_layers"]))
    return predictor
