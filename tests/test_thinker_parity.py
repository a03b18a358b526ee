"""The whole thinker (audio + vision towers, multimodal merge, deepstack, MoE LLM) vs transformers, fp32 on CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from llm_helpers import hf_thinker
from omni_model.configs import TOKEN_IDS

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def models(tiny_hf_dir):
    from omni_model.convert.mapping import load_hf_into_model
    from omni_model.model.thinker import build_thinker
    from omni_model.runtime.parallel import init_parallel

    # ours first: the CPU patches are then active while transformers builds its model (they once broke its
    # RoPE init by wrapping torch factories globally; this order keeps that from coming back)
    init_parallel()
    ours = build_thinker(tiny_hf_dir, dtype=torch.float32).eval()
    load_hf_into_model(ours, tiny_hf_dir, prefix="")
    return ours, hf_thinker(tiny_hf_dir)


@pytest.fixture(scope="module")
def processors(tiny_hf_dir):
    from transformers import AutoTokenizer, Qwen2VLImageProcessor, WhisperFeatureExtractor

    return (AutoTokenizer.from_pretrained(tiny_hf_dir), Qwen2VLImageProcessor.from_pretrained(tiny_hf_dir),
            WhisperFeatureExtractor.from_pretrained(tiny_hf_dir))


def _audio_tokens(n_frames: int) -> int:
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import _get_feat_extract_output_lengths

    return int(_get_feat_extract_output_lengths(torch.tensor(n_frames)))


def _inputs(processors, n_images=0, audio_seconds=(), video_frames=0, text="Say something."):
    """Prompt with placeholders expanded to the encoders' output lengths, plus the HF-format media tensors."""
    tok, image_proc, audio_proc = processors
    rng = np.random.default_rng(0)
    content, out = [], {}
    if audio_seconds:
        waves = [rng.standard_normal(int(16000 * s)).astype(np.float32) * 0.1 for s in audio_seconds]
        feats = audio_proc(waves, sampling_rate=16000, return_attention_mask=True, padding=True, return_tensors="pt")
        out["input_features"], out["feature_attention_mask"] = feats["input_features"], feats["attention_mask"]
        content += [{"type": "audio"}] * len(waves)
    if n_images:
        images = [Image.fromarray(rng.integers(0, 255, (32 * (i + 2), 64, 3), dtype=np.uint8)) for i in range(n_images)]
        vision = image_proc(images=images, return_tensors="pt")
        out["pixel_values"], out["image_grid_thw"] = vision["pixel_values"], vision["image_grid_thw"]
        content += [{"type": "image"}] * n_images
    if video_frames:
        frames = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(video_frames)]
        video = image_proc(images=frames, return_tensors="pt")  # one image per frame ...
        patches = video["pixel_values"].reshape(video_frames, -1, video["pixel_values"].shape[-1])
        # ... regrouped as one video: temporal patch 2 pairs frames (the Qwen2-VL patch layout is per t-slice)
        grid = video["image_grid_thw"][0].clone()
        out["pixel_values_videos"] = _as_video(patches, grid, image_proc)
        out["video_grid_thw"] = torch.tensor([[video_frames // 2, grid[1], grid[2]]])
        out["video_second_per_grid"] = torch.tensor([1.0])
        content += [{"type": "video"}]
    content.append({"type": "text", "text": text})
    prompt = tok.apply_chat_template([{"role": "user", "content": content},
                                      {"role": "assistant", "content": "Fine."}], tokenize=False)
    if audio_seconds:
        for n in out["feature_attention_mask"].sum(-1).tolist():
            prompt = prompt.replace("<|audio_pad|>", "<|AUDIO|>" * _audio_tokens(n), 1)
    for i in range(n_images):
        prompt = prompt.replace("<|image_pad|>", "<|IMAGE|>" * (int(out["image_grid_thw"][i].prod()) // 4), 1)
    if video_frames:
        prompt = prompt.replace("<|video_pad|>", "<|video_pad|>" * (int(out["video_grid_thw"][0].prod()) // 4), 1)
    prompt = prompt.replace("<|AUDIO|>", "<|audio_pad|>").replace("<|IMAGE|>", "<|image_pad|>")
    out["input_ids"] = torch.tensor([tok.encode(prompt)])
    return out


def _as_video(patches_per_frame, grid, image_proc):
    """Patches of a t-frame video: each image's patch row carries its frame repeated over the temporal patch;
    take the first temporal half of every second frame pair so the video really changes over time."""
    t, n, d = patches_per_frame.shape
    c, tp, p = 3, image_proc.temporal_patch_size, image_proc.patch_size
    per_frame = patches_per_frame.reshape(t, n, c, tp, p, p)[:, :, :, 0]  # [t, n, c, p, p]
    pairs = per_frame.reshape(t // tp, tp, n, c, p, p).permute(0, 2, 3, 1, 4, 5)  # [t/2, n, c, tp, p, p]
    return pairs.reshape(t // tp * n, d).contiguous()


def _compare(models, inputs):
    ours, ref = models
    attention = torch.ones_like(inputs["input_ids"])
    with torch.no_grad():
        position_ids, _ = ref.model.get_rope_index(
            inputs["input_ids"], inputs.get("image_grid_thw"), inputs.get("video_grid_thw"), attention, False,
            inputs["feature_attention_mask"].sum(-1) if "feature_attention_mask" in inputs else None,
            inputs.get("video_second_per_grid"))
        expected = ref(attention_mask=attention, **inputs).logits
        got = ours(position_ids=position_ids, **inputs)
    return (got - expected).abs().max().item()


CASES = {
    "text": dict(),
    "one_image": dict(n_images=1),
    "two_images_two_grids": dict(n_images=2),
    "one_audio": dict(audio_seconds=(1.0,)),
    "several_audios_long": dict(audio_seconds=(0.5, 2.3, 9.0)),
    "video": dict(video_frames=4),
    "image_audio_video": dict(n_images=1, audio_seconds=(1.5,), video_frames=4),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(models, processors, case):
    error = _compare(models, _inputs(processors, **CASES[case]))
    print(f"thinker parity {case}: max abs logit error {error:.2e}")
    assert error <= TOLERANCE


def test_placeholder_count_mismatch_is_a_clear_error(models, processors):
    from omni_model.model.thinker import PlaceholderMismatch

    inputs = _inputs(processors, n_images=1)
    ids = inputs["input_ids"]
    first = int((ids[0] == TOKEN_IDS["image_pad"]).nonzero()[0])
    inputs["input_ids"] = torch.cat([ids[:, :first], ids[:, first + 1:]], dim=1)  # one image pad short
    position_ids = torch.arange(inputs["input_ids"].shape[1]).view(1, 1, -1).expand(3, 1, -1)
    with pytest.raises(PlaceholderMismatch, match=r"image: the input has \d+ .* produced \d+ embeddings"):
        models[0](position_ids=position_ids, **inputs)
    inputs = _inputs(processors, audio_seconds=(1.0,))
    inputs.pop("input_features"), inputs.pop("feature_attention_mask")
    with pytest.raises(PlaceholderMismatch, match="audio: the input has 13"):
        models[0](position_ids=position_ids[..., :inputs["input_ids"].shape[1]], **inputs)
