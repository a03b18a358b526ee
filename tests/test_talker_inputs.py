"""The talker's training input (train.talker_inputs) is what transformers' `generate` builds for the talker.

A conversation with an image and an audio clip in the user turn and a spoken answer goes through the data pipeline
(shards, task encoder, OmniBatch); our mcore thinker (converted tiny weights) and talker build the TalkerBatch. The
reference: transformers' `Qwen3OmniMoeForConditionalGeneration.generate(..., return_audio=True)` on the same
checkpoint and prompt, its thinker text held to the spoken answer (`thinker_prefix_allowed_tokens_fn`); the talker's
inputs are read where generate hands them to `talker.generate` (inputs_embeds of the prompt, trailing_text_hidden,
tts_pad_embed, talker_input_ids) and the generation stops there. Compared: every prompt position (user tokens with
the hidden projection of the accepted layer at the image and audio pads, assistant header, codec control ids), the
text part of every frame position, and the MRoPE positions (the talker's own get_rope_index on its ids and media).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

TOL = 1e-5  # fp32, relative to the largest value


class _Captured(Exception):
    pass


@pytest.fixture(scope="module")
def spoken_batch(tiny_hf_dir, tmp_path_factory):
    from omni_model.data.batch import collate
    from omni_model.data.encoder import OmniEncoder
    from omni_model.data.formats import load_raw
    from omni_model.data.shards import write_shards
    from omni_model.eval.generate import split_samples
    from omni_model.tiny import write_tiny_codec

    root = tmp_path_factory.mktemp("talker_inputs")
    media = root / "media"
    media.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(media / "p.png")
    t = np.arange(16000) / 16000
    sf.write(media / "q.wav", (0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), 16000)
    sf.write(media / "a.wav", (0.3 * np.sin(2 * np.pi * 500 * np.arange(9600) / 24000)).astype(np.float32), 24000)
    record = {"id": "mm-spoken", "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "<image>Look, and <audio>listen. What is it?"},
        {"role": "assistant", "content": "A bright tone.", "audio": "media/a.wav"}],
        "images": ["media/p.png"], "audios": ["media/q.wav"]}
    (root / "raw.jsonl").write_text(json.dumps(record) + "\n")
    records, drops, _ = load_raw(root / "raw.jsonl")
    assert drops == []
    (root / "processed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    write_shards(root / "processed.jsonl", root / "shards", tiny_hf_dir, val_fraction=0.0, max_seq_len=2048,
                 codec_dir=write_tiny_codec(root / "codec", seed=0))
    [sample] = list(split_samples(root / "shards", "train", 10))
    encoder = OmniEncoder(tiny_hf_dir, max_seq_len=2048)
    encoded = encoder.encode_canonical(sample["record"], sample["media"])
    batch = collate([encoded], pad_id=encoder.pad_id, packed=False)
    return batch, encoder, sample


def _ours(hf_dir, batch):
    from omni_model.convert.mapping import load_hf_into_model, load_hf_into_talker
    from omni_model.model.talker import build_talker
    from omni_model.model.thinker import build_thinker
    from omni_model.runtime.parallel import destroy_parallel, init_parallel
    from omni_model.train.talker_inputs import TalkerBatches

    init_parallel()
    try:
        thinker = build_thinker(hf_dir).eval()
        load_hf_into_model(thinker, hf_dir, prefix="")
        talker = build_talker(hf_dir).eval()
        load_hf_into_talker(talker, hf_dir)
        built = TalkerBatches(hf_dir)(thinker, batch)
        with torch.no_grad():
            embeds = talker.inputs_embeds(built.thinker_embeds, built.codec_codes, built.multimodal_mask,
                                          built.thinker_hidden)
            no_frames = built.codec_codes.clone()
            no_frames[:, built.frame_positions + 1] = -1  # the text part of the frame positions alone
            text = talker.inputs_embeds(built.thinker_embeds, no_frames, built.multimodal_mask, built.thinker_hidden)
        return built, embeds[0], text[0]
    finally:
        destroy_parallel()


def _theirs(hf_dir, encoder, sample):
    from transformers import Qwen3OmniMoeForConditionalGeneration

    from omni_model.eval.generate import prompt_inputs

    inputs, answer = prompt_inputs(encoder, sample)
    model = Qwen3OmniMoeForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
    for module in model.modules():  # the eager per-expert loop (llm_helpers.hf_thinker says why)
        cfg = getattr(module, "config", None)
        if cfg is not None and hasattr(cfg, "_experts_implementation"):
            cfg._experts_implementation = "eager"
    forced = [int(t) for t in answer]
    start = inputs["input_ids"].shape[1]
    captured = {}

    def talker_generate(**kwargs):
        captured.update(kwargs)
        raise _Captured()

    model.talker.generate = talker_generate
    with pytest.raises(_Captured), torch.no_grad():
        model.generate(**inputs, return_audio=True, thinker_max_new_tokens=len(forced), thinker_do_sample=False,
                       thinker_prefix_allowed_tokens_fn=lambda _, ids: [forced[min(ids.shape[0] - start,
                                                                                   len(forced) - 1)]])
    # the talker's get_rope_index is the thinker's function run on the talker (its config's merge size, seconds
    # scale and audio window); transformers 5.24's talker config has no audio_config, so with an audio in the prompt
    # the talker's own call fails (AttributeError: 'Qwen3OmniMoeTalkerConfig' object has no attribute
    # 'audio_config') and generate cannot speak there: the same function on the thinker (whose values the tiny
    # config's talker shares, asserted) gives the positions it means
    talker_config, thinker_config = model.config.talker_config, model.config.thinker_config
    assert talker_config.position_id_per_seconds == thinker_config.position_id_per_seconds
    assert talker_config.spatial_merge_size == thinker_config.vision_config.spatial_merge_size
    positions, _ = model.thinker.get_rope_index(
        captured["talker_input_ids"], inputs.get("image_grid_thw"), None, captured["attention_mask"], False,
        inputs["feature_attention_mask"].sum(-1), None)
    return captured, positions


def test_talker_batch_is_what_generate_builds(tiny_hf_dir, spoken_batch):
    batch, encoder, sample = spoken_batch
    built, embeds, text = _ours(tiny_hf_dir, batch)
    captured, positions = _theirs(tiny_hf_dir, encoder, sample)
    prompt = captured["inputs_embeds"][0]
    n = prompt.shape[0]
    scale = prompt.abs().max().item()
    error = (embeds[:n] - prompt).abs().max().item() / scale
    frames = len(built.frame_positions)
    trailing = captured["trailing_text_hidden"][0]
    expected_text = torch.stack([trailing[k] if k < trailing.shape[0] else captured["tts_pad_embed"][0, 0]
                                 for k in range(frames)])
    text_error = (text[n:n + frames] - expected_text).abs().max().item() / scale
    mm = int(built.multimodal_mask.sum())
    print(f"talker prompt {n} positions ({mm} multimodal), {frames} frames: prompt error {error:.2e}, "
          f"frame text error {text_error:.2e}")
    assert mm > 0 and n + frames == built.labels.shape[1]
    assert error <= TOL and text_error <= TOL
    assert torch.equal(built.position_ids[:, 0, :n].to(positions.dtype), positions[:, 0])
    # positions continue one by one after the prompt (generate: past length + rope delta)
    tail = built.position_ids[0, 0, n:]
    assert torch.equal(tail, positions[0, 0, -1] + 1 + torch.arange(frames, dtype=tail.dtype))
