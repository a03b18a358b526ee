"""The export is a working Qwen3-Omni: transformers loads it with `from_pretrained`, generates text from a
text+image+audio prompt and speech through the talker + code2wav, exactly like the source model when the weights
are untouched; a changed thinker tensor changes the text while talker and code2wav stay byte-identical."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

TEXT_TOKENS = 8
SPEECH_CODES = 12  # talker steps; the random tiny talker never says EOS, so this fixes the waveform length


def prompt_inputs(hf_dir: Path, audio: bool) -> dict:
    """A chat prompt with one image (and one second of audio), placeholders expanded to the encoders' output
    lengths, media through the released preprocessors' classes (the full Omni processor needs torchvision)."""
    from thinker_inputs import load_processors
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import _get_feat_extract_output_lengths

    tok, image_proc, audio_proc = load_processors(hf_dir)
    rng = np.random.default_rng(0)
    vision = image_proc(images=[Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8))],
                        return_tensors="pt")
    out = {"pixel_values": vision["pixel_values"], "image_grid_thw": vision["image_grid_thw"]}
    content = [{"type": "image"}]
    if audio:
        wave = rng.standard_normal(16000).astype(np.float32) * 0.1
        feats = audio_proc([wave], sampling_rate=16000, return_attention_mask=True, padding=True, return_tensors="pt")
        out.update(input_features=feats["input_features"], feature_attention_mask=feats["attention_mask"])
        content.append({"type": "audio"})
    content.append({"type": "text", "text": "Describe what you see and hear."})
    prompt = tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                     add_generation_prompt=True)
    prompt = prompt.replace("<|image_pad|>", "<|image_pad|>" * (int(vision["image_grid_thw"].prod()) // 4))
    if audio:
        n_audio = int(_get_feat_extract_output_lengths(feats["attention_mask"].sum(-1))[0])
        prompt = prompt.replace("<|audio_pad|>", "<|audio_pad|>" * n_audio)
    ids = torch.tensor([tok.encode(prompt)])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), **out}


def generate(hf_dir: Path) -> dict:
    """What a user of the released model gets: greedy text from text+image+audio, and speech (text ids + waveform).

    Speech is asked for with a text+image prompt: transformers 5.24's talker cannot take an audio prompt
    (`Qwen3OmniMoeTalkerConfig` has no `audio_config`, which its `get_rope_index` reads for audio positions)."""
    from transformers import Qwen3OmniMoeForConditionalGeneration

    model = Qwen3OmniMoeForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
    assert model.has_talker
    with torch.no_grad():
        inputs = prompt_inputs(hf_dir, audio=True)
        text = model.generate(**inputs, return_audio=False, thinker_max_new_tokens=TEXT_TOKENS,
                              thinker_do_sample=False)
        inputs = prompt_inputs(hf_dir, audio=False)
        speech_ids, wave = model.generate(**inputs, return_audio=True, speaker="Ethan",
                                          thinker_max_new_tokens=TEXT_TOKENS, thinker_do_sample=False,
                                          talker_max_new_tokens=SPEECH_CODES, talker_do_sample=False)
    n = inputs["input_ids"].shape[1]
    return {"text": text[0, -TEXT_TOKENS:].tolist(), "speech_ids": speech_ids[0, n:].tolist(), "wave": wave}


@pytest.fixture(scope="module")
def source_outputs(tiny_hf_dir):
    return generate(tiny_hf_dir)


def test_exported_model_generates_text_and_speech_like_the_source(tiny_hf_dir, source_outputs, tmp_path):
    from omni_model.convert import convert_checkpoint
    from omni_model.convert.export import export_to_hf
    from omni_model.runtime.parallel import init_parallel

    init_parallel()
    convert_checkpoint(tiny_hf_dir, tmp_path / "mcore", dtype="fp32", log=lambda _: None)
    export_to_hf(tmp_path / "mcore" / "checkpoint", tiny_hf_dir, tmp_path / "export", log=lambda _: None)
    got = generate(tmp_path / "export")

    print("text ids:", got["text"], "speech text ids:", got["speech_ids"],
          f"waveform: {tuple(got['wave'].shape)} samples, max |x| {got['wave'].abs().max():.3e}")
    assert len(got["text"]) == TEXT_TOKENS
    assert got["wave"].numel() > 0 and torch.isfinite(got["wave"]).all() and got["wave"].abs().max() > 0
    assert got["text"] == source_outputs["text"]
    assert got["speech_ids"] == source_outputs["speech_ids"]
    assert torch.equal(got["wave"], source_outputs["wave"])  # bit-identical waveform


def test_a_changed_thinker_tensor_changes_text_and_nothing_else(tiny_hf_dir, source_outputs, tmp_path):
    """A checkpoint whose LM head was changed (negated: greedy decoding then picks other tokens) exports with that
    change in `thinker.lm_head.weight` only; talker and code2wav are the source's bytes."""
    from safetensors import safe_open
    from test_export import _save_edited_checkpoint, hf_tensor_differences

    from omni_model.convert.export import export_to_hf, source_tensors
    from omni_model.runtime.parallel import init_parallel

    def negate_lm_head(sharded):
        with torch.no_grad():
            sharded["language_model.output_layer.weight"].data.neg_()

    init_parallel()
    _save_edited_checkpoint(tiny_hf_dir, tmp_path / "ckpt", negate_lm_head)
    export_to_hf(tmp_path / "ckpt", tiny_hf_dir, tmp_path / "export", log=lambda _: None)

    count, differences = hf_tensor_differences(tiny_hf_dir, tmp_path / "export")
    print(f"{count} tensors, differing: {differences}")
    assert differences == ["thinker.lm_head.weight: values differ"]

    def lm_head(hf_dir):
        entry = source_tensors(hf_dir)["thinker.lm_head.weight"]
        return safe_open(str(entry.file), "pt").get_tensor(entry.name)

    assert torch.equal(lm_head(tmp_path / "export"), -lm_head(tiny_hf_dir))  # exactly the change, in bf16
    got = generate(tmp_path / "export")
    print("changed model text ids:", got["text"], "source:", source_outputs["text"])
    assert got["text"] != source_outputs["text"]
