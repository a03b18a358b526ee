"""The embedded tiny Qwen3-Omni: deterministic, real tokenizer + template, loads and generates in transformers."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch
from PIL import Image

from omni_model.configs import TOKEN_IDS, VOCAB_SIZE, released_30b_a3b_config, tiny_config
from omni_model.tiny import write_tiny_checkpoint
from omni_model.tokenizer import OMNI_ADDED_TOKENS


def _digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_same_seed_gives_byte_identical_files(tmp_path, tiny_hf_dir):
    again = write_tiny_checkpoint(tmp_path / "again", seed=0)
    assert _digests(again) == _digests(tiny_hf_dir)
    other = write_tiny_checkpoint(tmp_path / "other", seed=1)
    assert _digests(other)["model.safetensors"] != _digests(tiny_hf_dir)["model.safetensors"]


def test_config_carries_released_token_ids_not_class_defaults(tiny_hf_dir):
    config = json.loads((tiny_hf_dir / "config.json").read_text())
    thinker = config["thinker_config"]
    assert thinker["audio_token_id"] == 151675  # transformers' class default is 151646 (Qwen2.5-Omni)
    assert thinker["position_id_per_seconds"] == 13  # class default 25
    assert thinker["image_token_id"] == TOKEN_IDS["image_pad"]
    assert thinker["text_config"]["vocab_size"] == VOCAB_SIZE
    assert thinker["text_config"]["rope_parameters"]["interleaved"] is True
    assert config["enable_audio_output"] is True
    # every top-level id agrees with the 30B config
    released = released_30b_a3b_config()
    for key in ("im_start_token_id", "im_end_token_id", "assistant_token_id", "tts_pad_token_id"):
        assert config[key] == released[key]


def test_tokenizer_has_real_vocab_and_omni_special_tokens(tiny_hf_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_hf_dir)
    for token_id, text in OMNI_ADDED_TOKENS.items():
        assert tok.convert_tokens_to_ids(text) == token_id
    for name in ("im_start", "im_end", "vision_start", "vision_end", "image_pad", "video_pad"):
        assert tok.convert_ids_to_tokens(TOKEN_IDS[name]).startswith("<|")
    # the real Qwen BPE: a known encoding of the Qwen2/3 tokenizer
    assert tok.encode("Hello world", add_special_tokens=False) == [9707, 1879]
    assert len(tok) <= VOCAB_SIZE


def test_chat_template_renders_the_reference_layout(tiny_hf_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_hf_dir)
    messages = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": [{"type": "audio"}, {"type": "image"}, {"type": "video"},
                                     {"type": "text", "text": "What happens?"}]},
        {"role": "assistant", "content": "A cat."},
    ]
    expected = (
        "<|im_start|>system\nYou are helpful.<|im_end|>\n"
        "<|im_start|>user\n<|audio_start|><|audio_pad|><|audio_end|><|vision_start|><|image_pad|><|vision_end|>"
        "<|vision_start|><|video_pad|><|vision_end|>What happens?<|im_end|>\n"
        "<|im_start|>assistant\nA cat.<|im_end|>\n"
    )
    assert tok.apply_chat_template(messages, tokenize=False) == expected
    prompt = tok.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_tiny_model_is_small_but_complete():
    from transformers import Qwen3OmniMoeConfig

    text = tiny_config()["thinker_config"]["text_config"]
    assert text["num_experts_per_tok"] > 1 and text["num_experts"] > text["num_experts_per_tok"]
    assert text["num_hidden_layers"] >= len(tiny_config()["thinker_config"]["vision_config"]["deepstack_visual_indexes"])
    config = Qwen3OmniMoeConfig(**tiny_config())
    assert config.thinker_config.text_config.mlp_only_layers == []


def test_loads_in_transformers_and_generates_from_text_image_audio(tiny_hf_dir):
    from transformers import (AutoTokenizer, Qwen2VLImageProcessor, Qwen3OmniMoeForConditionalGeneration,
                              WhisperFeatureExtractor)
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import _get_feat_extract_output_lengths

    model = Qwen3OmniMoeForConditionalGeneration.from_pretrained(tiny_hf_dir, dtype=torch.float32).eval()
    assert model.has_talker  # talker + code2wav are in the checkpoint too
    tok = AutoTokenizer.from_pretrained(tiny_hf_dir)
    image_proc = Qwen2VLImageProcessor.from_pretrained(tiny_hf_dir)
    audio_proc = WhisperFeatureExtractor.from_pretrained(tiny_hf_dir)

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8))
    vision = image_proc(images=[image], return_tensors="pt")
    wave = rng.standard_normal(16000).astype(np.float32) * 0.1  # 1 s at 16 kHz
    audio = audio_proc([wave], sampling_rate=16000, return_attention_mask=True, padding=True, return_tensors="pt")

    n_image = int(vision["image_grid_thw"].prod()) // 4
    n_audio = int(_get_feat_extract_output_lengths(audio["attention_mask"].sum(-1))[0])
    assert tuple(vision["image_grid_thw"][0].tolist()) == (1, 4, 6)
    assert n_audio == 13  # ~13 tokens per second of audio
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "audio"}, {"type": "text", "text": "Describe."}]}],
        tokenize=False, add_generation_prompt=True)
    prompt = prompt.replace("<|image_pad|>", "<|image_pad|>" * n_image).replace("<|audio_pad|>", "<|audio_pad|>" * n_audio)
    input_ids = torch.tensor([tok.encode(prompt)])
    with torch.no_grad():
        out = model.thinker.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
            pixel_values=vision["pixel_values"], image_grid_thw=vision["image_grid_thw"],
            input_features=audio["input_features"], feature_attention_mask=audio["attention_mask"],
            max_new_tokens=4, do_sample=False)
    new_tokens = out[0, input_ids.shape[1]:]
    assert new_tokens.numel() == 4
    assert int(new_tokens.max()) < VOCAB_SIZE
