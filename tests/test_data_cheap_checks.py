"""Cheap checks first: the token count (and the over-long drop) comes from the media headers (image size -> grid,
audio length -> AuT output length, video duration/fps -> frames), before any pixel, sample or mel work."""

from __future__ import annotations

import io
import json

import pytest

from dedup_media import clip, tone


def _truncated_huge_png(path):
    """A 2400x2400 PNG cut in half: the header says 2400x2400, the pixels cannot be decoded."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.linear_gradient("L").resize((2400, 2400)).convert("RGB").save(buffer, "PNG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return path


def _record(sid, user, **media):
    record = {"id": sid, "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": "ok"}]}
    for key in ("images", "audios", "videos"):
        record[key] = [str(p) for p in media.get(key, [])]
    return record


def test_over_long_is_decided_from_the_header_before_decoding(tiny_hf_dir, tmp_path):
    from omni_model.data.encoder import OmniEncoder, OverLongSample, media_from_paths
    from omni_model.data.media import MediaError

    record = _record("huge", "<image>Describe.", images=[_truncated_huge_png(tmp_path / "huge.png")])
    media = media_from_paths(record)
    with pytest.raises(OverLongSample, match=r"\d+ tokens after media expansion > max_seq_len 4096"):
        OmniEncoder(tiny_hf_dir, max_seq_len=4096).encode(record, media)  # the truncated pixels are never read
    with pytest.raises(MediaError, match="cannot decode image"):  # with room for it, decoding finds the damage
        OmniEncoder(tiny_hf_dir, max_seq_len=1 << 20).encode(record, media)


def test_shards_stage_drops_over_long_without_decoding(tiny_hf_dir, tmp_path):
    from omni_model.data.shards import write_shards

    good = _record("fine", "<audio>Transcribe clip 1.", audios=[tone(tmp_path / "a.wav", 1, rate=44100, channels=2)])
    huge = _record("huge", "<image>Describe.", images=[_truncated_huge_png(tmp_path / "huge.png")])
    processed = tmp_path / "processed.jsonl"
    processed.write_text("".join(json.dumps(r) + "\n" for r in (good, huge)))
    report = write_shards(processed, tmp_path / "shards", tiny_hf_dir, val_fraction=0.0, max_seq_len=4096)
    drops = [json.loads(l) for l in (tmp_path / "shards" / "drops.jsonl").read_text().splitlines()]
    assert report["kept"] == 1 and len(drops) == 1
    assert drops[0]["id"] == "huge" and drops[0]["op"] == "max_seq_len"
    assert "(from the media headers)" in drops[0]["reason"], drops[0]


@pytest.fixture(scope="module")
def encoder(tiny_hf_dir):
    from omni_model.data.encoder import OmniEncoder

    return OmniEncoder(tiny_hf_dir)


@pytest.mark.parametrize("rate, channels", [(44100, 2), (22050, 1), (48000, 2)])
def test_header_count_equals_decoded_count(encoder, tmp_path, rate, channels):
    from omni_model.data.encoder import media_from_paths

    record = _record("mix", "<audio> and <video>?", audios=[tone(tmp_path / "a.flac", 5, rate=rate, channels=channels,
                                                                   seconds=7.3, fmt="FLAC")],
                     videos=[clip(tmp_path / "v.mp4", 3, seconds=3.5, fps=10, size=(96, 64))])
    media = media_from_paths(record)
    shapes = encoder.probe(record, media)
    from_headers = encoder.count_tokens(record, shapes)
    encoded = encoder.encode(record, media)
    assert shapes.exact and from_headers == len(encoded.input_ids)
