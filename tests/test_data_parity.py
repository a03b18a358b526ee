"""Parity of the data encoder with transformers' Qwen3-Omni reference path on the same inputs.

Reference pieces (all real transformers code): the checkpoint tokenizer's ``apply_chat_template`` + pad expansion as
``Qwen3OmniMoeProcessor`` does it (its counts from ``Qwen2VLImageProcessorPil`` grids and
``_get_feat_extract_output_lengths``), ``Qwen2VLImageProcessorPil`` pixel values, ``WhisperFeatureExtractor`` on
``librosa.load(sr=16000)`` audio (as qwen-omni-utils loads it), and the thinker's own ``get_rope_index``.
The processor class itself cannot be built here (its video processor needs torchvision).
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from omni_model.data.batch import collate
from omni_model.data.encoder import OmniEncoder
from omni_model.data.media import preprocess_image, preprocess_video, Video
from omni_model.data.template import IGNORE_INDEX, render, to_parts

# the reference resampler; the GPU image lacks it, and a collection error there stops `pytest -m gpu` (no GPU test here)
librosa = pytest.importorskip("librosa")

RNG = np.random.default_rng(1234)


def _png(height, width):
    buf = io.BytesIO()
    Image.fromarray(RNG.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _wav(seconds, rate, channels=1):
    t = np.arange(int(seconds * rate)) / rate
    signal = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * RNG.standard_normal(len(t))
    if channels == 2:
        signal = np.stack([signal, 0.5 * signal], 1)
    buf = io.BytesIO()
    sf.write(buf, signal.astype(np.float32), rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


@pytest.fixture(scope="module")
def encoder(tiny_hf_dir):
    return OmniEncoder(tiny_hf_dir, max_seq_len=8192)


@pytest.fixture(scope="module")
def reference(tiny_hf_dir):
    from transformers import AutoTokenizer, WhisperFeatureExtractor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    pre = json.loads((tiny_hf_dir / "preprocessor_config.json").read_text())
    image_kwargs = {k: v for k, v in pre.items() if k in (
        "patch_size", "temporal_patch_size", "merge_size", "min_pixels", "max_pixels", "image_mean", "image_std",
        "do_rescale", "rescale_factor", "do_normalize", "do_resize", "do_convert_rgb")}
    whisper_kwargs = {k: v for k, v in pre.items() if k in (
        "feature_size", "sampling_rate", "hop_length", "n_fft", "chunk_length", "n_samples", "nb_max_frames",
        "padding_side", "padding_value", "dither", "return_attention_mask")}
    return {
        "tokenizer": AutoTokenizer.from_pretrained(str(tiny_hf_dir)),
        "image": Qwen2VLImageProcessorPil(**image_kwargs),
        "whisper": WhisperFeatureExtractor(**whisper_kwargs),
    }


@pytest.fixture(scope="module")
def thinker(tiny_hf_dir):
    from transformers import Qwen3OmniMoeConfig
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
        Qwen3OmniMoeThinkerForConditionalGeneration,
    )

    config = Qwen3OmniMoeConfig.from_pretrained(str(tiny_hf_dir))
    torch.manual_seed(0)
    return Qwen3OmniMoeThinkerForConditionalGeneration(config.thinker_config).eval()


MIXED = {
    "id": "mixed",
    "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "<audio><image>What do you see and hear?"},
        {"role": "assistant", "content": "A picture and a tone."},
        {"role": "user", "content": "And these? <audio> <image>\n\nand <audio>"},
        {"role": "assistant", "content": "\n\nMore of the same.\nDone."},
    ],
    "images": ["a.png", "b.png"], "audios": ["x.wav", "y.flac", "z.wav"], "videos": [],
}


@pytest.fixture(scope="module")
def mixed_media():
    return {
        ("image", 0): _png(97, 130), ("image", 1): _png(300, 40),
        ("audio", 0): _wav(2.3, 44100, channels=2), ("audio", 1): _wav(0.9, 22050), ("audio", 2): _wav(3.7, 16000),
    }


def _reference_encode(ref, record, media, thinker):
    """The HF path: template text -> image/audio processors -> expanded text -> tokenizer -> get_rope_index."""
    from transformers.models.qwen3_omni_moe.processing_qwen3_omni_moe import _get_feat_extract_output_lengths

    tok = ref["tokenizer"]
    text = tok.apply_chat_template(to_parts(record["messages"]), tokenize=False)
    images = [Image.open(io.BytesIO(media[("image", i)])) for i in range(len(record["images"]))]
    audios = [librosa.load(io.BytesIO(media[("audio", i)]), sr=16000)[0] for i in range(len(record["audios"]))]
    image_out = ref["image"](images=images, return_tensors="np") if images else None
    audio_out = ref["whisper"](audios, sampling_rate=16000, padding=True, truncation=False,
                               return_attention_mask=True, return_tensors="np") if audios else None
    counts = {"image": [], "audio": []}
    if image_out is not None:
        counts["image"] = [int(np.prod(g)) // 4 for g in image_out["image_grid_thw"]]
    if audio_out is not None:
        counts["audio"] = [int(n) for n in _get_feat_extract_output_lengths(
            torch.from_numpy(audio_out["attention_mask"].sum(-1)), 50)]
    pieces, index = text.split("<|image_pad|>"), 0
    text = pieces[0] + "".join("<|image_pad|>" * counts["image"][k] + p for k, p in enumerate(pieces[1:]))
    pieces = text.split("<|audio_pad|>")
    text = pieces[0] + "".join("<|audio_pad|>" * counts["audio"][k] + p for k, p in enumerate(pieces[1:]))
    del index
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    positions, _ = thinker.model.get_rope_index(
        ids,
        image_grid_thw=torch.from_numpy(image_out["image_grid_thw"]) if image_out is not None else None,
        attention_mask=torch.ones_like(ids),
        audio_seqlens=torch.from_numpy(audio_out["attention_mask"].sum(-1)) if audio_out is not None else None,
    )
    return ids[0].numpy(), positions[:, 0].numpy(), image_out, audio_out


def _reference_labels(tok, messages):
    """Independent label mask: the tokens between the rendered prefix before an assistant answer and after its
    <|im_end|> (prefix tokenisation, no offsets)."""
    full, _ = render(messages)
    n = len(tok(full, add_special_tokens=False)["input_ids"])
    mask = np.zeros(n, dtype=bool)
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, _ = render(messages[:index])
        start = len(tok(before + "<|im_start|>assistant\n", add_special_tokens=False)["input_ids"])
        prefix, _ = render(messages[:index + 1])
        end = len(tok(prefix, add_special_tokens=False)["input_ids"]) - 1  # minus the trailing "\n"
        mask[start:end] = True
    return mask


def test_render_equals_chat_template(reference):
    tok = reference["tokenizer"]
    for messages in (MIXED["messages"], [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                     [{"role": "user", "content": "<video>what?"}, {"role": "assistant", "content": "a clip"}]):
        assert render(messages)[0] == tok.apply_chat_template(to_parts(messages), tokenize=False)


def test_mixed_image_audio_parity(encoder, reference, thinker, mixed_media):
    sample = encoder.encode(MIXED, mixed_media)
    ref_ids, ref_pos, image_out, audio_out = _reference_encode(reference, MIXED, mixed_media, thinker)
    np.testing.assert_array_equal(sample.input_ids, ref_ids)
    # labels: exactly the assistant content tokens + their <|im_end|>, equal to the token ids there
    trained = sample.labels != IGNORE_INDEX
    ref_mask = _reference_labels(reference["tokenizer"], MIXED["messages"])
    ref_trained = np.zeros(len(ref_ids), dtype=bool)
    # map the unexpanded mask onto the expanded sequence: pads are never trained, so align the non-pad tokens
    pad_ids = {encoder.chat.ids["image_pad"], encoder.chat.ids["audio_pad"]}
    keep = np.asarray([i not in pad_ids for i in ref_ids])
    unexpanded_keep = np.asarray([i not in pad_ids for i in encoder.chat.tokenize(MIXED["messages"])[0]])
    ref_trained[np.flatnonzero(keep)] = ref_mask[unexpanded_keep]
    np.testing.assert_array_equal(trained, ref_trained)
    np.testing.assert_array_equal(sample.labels[trained], sample.input_ids[trained])
    assert (sample.input_ids[trained] == encoder.chat.ids["im_end"]).sum() == 2
    # vision
    np.testing.assert_array_equal(sample.image_grid_thw, image_out["image_grid_thw"])
    np.testing.assert_allclose(sample.pixel_values, image_out["pixel_values"], atol=1e-6, rtol=0)
    # audio: mono, resampled to 16 kHz, Whisper features; valid frames equal, lengths equal
    lengths = audio_out["attention_mask"].sum(-1)
    np.testing.assert_array_equal(sample.audio_feature_lengths, lengths)
    for index, feature in enumerate(sample.input_features):
        np.testing.assert_allclose(feature, audio_out["input_features"][index, :, :lengths[index]], atol=1e-5, rtol=0)
    # the collated batch carries the processor's feature_attention_mask
    batch = collate([sample], pad_id=encoder.pad_id, packed=False)
    np.testing.assert_array_equal(batch.feature_attention_mask.numpy(), audio_out["attention_mask"])
    # MRoPE positions
    np.testing.assert_array_equal(sample.position_ids, ref_pos)


def test_batch_positions_and_forward_match_hf(encoder, thinker, mixed_media):
    """B=2 (mixed media + text-only): our padded batch positions == HF's own positions; logits equal."""
    text_only = {"id": "t", "messages": [{"role": "user", "content": "Just text, no media at all."},
                                         {"role": "assistant", "content": "Fine."}],
                 "images": [], "audios": [], "videos": []}
    samples = [encoder.encode(MIXED, mixed_media), encoder.encode(text_only, {})]
    batch = collate(samples, pad_id=encoder.pad_id, packed=False)
    hf_pos, _ = thinker.model.get_rope_index(batch.input_ids, batch.image_grid_thw, None, batch.attention_mask,
                                             False, batch.audio_feature_lengths, None)
    real = batch.attention_mask.bool()
    torch.testing.assert_close(batch.position_ids[:, real], hf_pos[:, real])
    inputs = batch.hf_inputs()
    inputs.pop("labels")
    with torch.no_grad():
        ours = thinker(**inputs).logits
        inputs.pop("position_ids")
        thinker.model.rope_deltas = None
        theirs = thinker(**inputs).logits
    torch.testing.assert_close(ours[real], theirs[real])


def test_video_positions_and_patches(encoder, thinker):
    """Video: positions (t scaled by second_per_grid * position_id_per_seconds) == get_rope_index, also with
    audio-in-video; frames patchify like the image processor when the frame pair is constant."""
    tok = encoder.chat.ids
    grid = np.array([[3, 8, 6]])
    n_video = int(np.prod(grid[0])) // 4
    ids = np.array([1, 2, tok["vision_start"], *[tok["video_pad"]] * n_video, tok["vision_end"], 3, 4, 5])
    from omni_model.data.rope_index import interleave_audio_video_tokens, rope_index

    ours = rope_index(ids, token_ids=tok, video_grid_thw=grid, video_second_per_grid=[0.8], merge_size=2,
                      position_id_per_seconds=13)
    theirs, _ = thinker.model.get_rope_index(torch.tensor([ids]), None, torch.from_numpy(grid),
                                             torch.ones(1, len(ids), dtype=torch.long), False, None,
                                             torch.tensor([0.8]))
    np.testing.assert_allclose(ours, theirs[:, 0].numpy())
    # audio in video: <|vision_start|><|audio_start|> V/A interleaved <|audio_end|><|vision_end|>
    n_frames = 210  # mel frames -> audio tokens
    from omni_model.data.media import audio_output_lengths

    order = interleave_audio_video_tokens(n_video // 3, 3, 0.8, audio_output_lengths(n_frames), 13)
    pad = {"V": tok["video_pad"], "A": tok["audio_pad"]}
    ids = np.array([7, tok["vision_start"], tok["audio_start"], *[pad[c] for c in order], tok["audio_end"],
                    tok["vision_end"], 8])
    ours = rope_index(ids, token_ids=tok, video_grid_thw=grid, video_second_per_grid=[0.8],
                      audio_feature_lengths=[n_frames], use_audio_in_video=True)
    theirs, _ = thinker.model.get_rope_index(torch.tensor([ids]), None, torch.from_numpy(grid),
                                             torch.ones(1, len(ids), dtype=torch.long), True,
                                             torch.tensor([n_frames]), torch.tensor([0.8]))
    np.testing.assert_allclose(ours, theirs[:, 0].numpy())
    # patches: a video of one repeated frame == that frame as an image (same resize bounds)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    frame = RNG.integers(0, 256, (70, 90, 3), dtype=np.uint8)
    cfg = encoder.media
    video_cfg = type(cfg)(**{**vars(cfg), "video_min_pixels": cfg.min_pixels, "video_max_pixels": cfg.max_pixels})
    patches, grid_thw = preprocess_video(Video(np.stack([frame, frame]), 1.0, 1.0), video_cfg)
    image_patches, image_grid = preprocess_image(frame, cfg)
    assert grid_thw == image_grid
    np.testing.assert_array_equal(patches, image_patches)
    ref = Qwen2VLImageProcessorPil(patch_size=16, temporal_patch_size=2, merge_size=2, min_pixels=cfg.min_pixels,
                                   max_pixels=cfg.max_pixels, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    np.testing.assert_allclose(patches, ref(images=[Image.fromarray(frame)], return_tensors="np")["pixel_values"],
                               atol=1e-6, rtol=0)
