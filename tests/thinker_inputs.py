"""Multimodal thinker inputs for parity tests: a chat prompt whose placeholders are expanded to the encoders'
output lengths, plus the transformers-format media tensors (image processor, Whisper features, a video)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def load_processors(hf_dir):
    from transformers import AutoTokenizer, Qwen2VLImageProcessor, WhisperFeatureExtractor

    return (AutoTokenizer.from_pretrained(hf_dir), Qwen2VLImageProcessor.from_pretrained(hf_dir),
            WhisperFeatureExtractor.from_pretrained(hf_dir))


def _audio_tokens(n_frames: int) -> int:
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import _get_feat_extract_output_lengths

    return int(_get_feat_extract_output_lengths(torch.tensor(n_frames)))


def build_inputs(processors, n_images=0, audio_seconds=(), video_frames=0, text="Say something."):
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
