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


def _short_clip(path, samples_16k: int, rate: int = 16000):
    import numpy as np
    import soundfile as sf

    n = samples_16k * rate // 16000
    sf.write(path, (0.2 * np.sin(np.arange(n) / 3)).astype(np.float32), rate, subtype="PCM_16")
    return path


# (samples at 16 kHz, file rate): the feature extractor's centred STFT needs more than n_fft // 2 = 200 samples
SHORT_CLIPS = [(200, 16000), (201, 16000), (200, 8000), (202, 8000)]


def test_validation_keeps_exactly_the_audio_the_encoder_can_encode(encoder, tmp_path):
    """The datajuicer stage's validation and the encoder share one minimum: each clip is kept by validation exactly
    when the encoder encodes it (below it the Whisper extractor raised a RuntimeError in training)."""
    from omni_model.data.datajuicer import validate
    from omni_model.data.encoder import media_from_paths

    records = [_record(f"n{n}-{rate}", "<audio>What is it?", audios=[_short_clip(tmp_path / f"{n}-{rate}.wav", n, rate)])
               for n, rate in SHORT_CLIPS]
    (tmp_path / "raw.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    valid, drops, total = validate(tmp_path / "raw.jsonl")
    kept = {r["id"] for r in valid}
    for record in records:
        try:
            encoder.encode(record, media_from_paths(record))
            encodes = True
        except Exception:
            encodes = False
        assert (record["id"] in kept) == encodes, record["id"]
    assert kept == {"n201-16000", "n202-8000"} and total == 4
    reasons = {d["id"]: (d["stage"], d["op"], d["reason"]) for d in drops}
    assert reasons["n200-16000"] == ("validate", "decode", "audio0.wav (200-16000.wav): 200 samples at 16 kHz, fewer "
                                     "than the 201 the audio feature extractor needs")


def test_shards_stage_keeps_only_audio_the_encoder_can_encode(tiny_hf_dir, tmp_path):
    """What the shards report calls kept is what training encodes: a clip too short for the feature extractor that
    reached the shards stage (another recipe, no validation) is dropped there with the reason."""
    from omni_model.data.shards import write_shards

    short = _record("short", "<audio>What is it?", audios=[_short_clip(tmp_path / "s.wav", 150)])
    fine = _record("fine", "<audio>What is it?", audios=[_short_clip(tmp_path / "f.wav", 201)])
    broken = _record("broken", "Hello?")
    broken["messages"][1]["content"] = None  # any other per-sample failure: a drop, not the stage's crash
    processed = tmp_path / "processed.jsonl"
    processed.write_text("".join(json.dumps(r) + "\n" for r in (short, fine, broken)))
    report = write_shards(processed, tmp_path / "shards", tiny_hf_dir, val_fraction=0.0)
    drops = [json.loads(l) for l in (tmp_path / "shards" / "drops.jsonl").read_text().splitlines()]
    assert report["kept"] == 1 and [(d["id"], d["stage"], d["op"]) for d in drops] == [
        ("short", "shards", "decode"), ("broken", "shards", "encode")]
    assert drops[0]["reason"] == "audio0 (s.wav): 150 samples at 16 kHz, fewer than the 201 the audio feature " \
                                 "extractor needs"
    assert drops[1]["reason"].startswith("TypeError: ")


def _shard_sample(encoder, record):
    """The OmniSample training reads for ``record`` (its canonical members, as the shards stage writes them), without
    the shards stage's checks."""
    from omni_model.data.encoder import media_from_paths
    from omni_model.data.sample import OmniSample

    media = media_from_paths(record)
    members, fields = encoder.canonical_members(record, media, encoder.decode(record, media))
    document = {**{k: v for k, v in record.items() if k not in ("images", "audios", "videos")}, **fields}
    return OmniSample(__key__=record["id"], __restore_key__=(), __subflavors__=None, __sources__=None,
                      record=document, media=members)


def test_training_counts_each_sample_it_cannot_encode_in_one_line(tiny_hf_dir, tmp_path, caplog):
    """A sample training cannot encode is skipped, counted by the skip counters (which the training loop sums) and
    logged in one line naming it, without a traceback: too-short audio ("decode": media the encoder cannot use) and
    any other per-sample failure ("encode")."""
    import logging

    from megatron.energon import SkipSample
    from megatron.energon.errors import FatalSampleError

    from omni_model.data.encoder import ShardFormatError
    from omni_model.data.task_encoder import OmniTaskEncoder

    task_encoder = OmniTaskEncoder(tiny_hf_dir)
    short = _record("short", "<audio>What is it?", audios=[_short_clip(tmp_path / "s.wav", 150)])
    broken = _record("broken", "Hello?")
    broken["messages"][1]["content"] = None  # a record no stage wrote: the template cannot render it
    caplog.set_level(logging.WARNING, logger="omni_model.data.task_encoder")
    for record in (short, broken, short):
        with pytest.raises(SkipSample):
            task_encoder.encode_sample(_shard_sample(task_encoder.encoder, record))
    assert task_encoder.skipped == {"over_long": 0, "decode": 2, "encode": 1}
    lines = [r for r in caplog.records if r.name == "omni_model.data.task_encoder"]
    assert [r.getMessage().split(":")[0] for r in lines] == ["skipping sample short", "skipping sample broken",
                                                              "skipping sample short"]
    assert all(r.exc_info is None and "\n" not in r.getMessage() for r in lines)
    assert "150 samples at 16 kHz, fewer than the 201" in lines[0].getMessage()
    task_encoder.max_failures_in_a_row = 4  # a data set where every sample fails stops training (here the 4th)
    with pytest.raises(FatalSampleError, match="4 samples in a row could not be encoded, the last: skipping sample br"):
        task_encoder.encode_sample(_shard_sample(task_encoder.encoder, broken))
    stale = _shard_sample(task_encoder.encoder, _record("stale", "Hello?"))
    stale.record["media_format"] = "canonical-1"  # shards of another pipeline version stop training, not skipped
    with pytest.raises(ShardFormatError, match="rerun the shards stage"):
        task_encoder.encode_sample(stale)


def test_validation_in_processes_gives_the_same_records_drops_and_fingerprints(tmp_path):
    """Validation decodes every medium, in ``num_proc`` processes in chunks: the same outcome as one process, and drop
    reasons that name no in-memory address (PIL/soundfile put one in their messages), so reruns give the same file."""
    from omni_model.data.datajuicer import validate
    from omni_model.data.demo import generate_demo

    raw = generate_demo(tmp_path / "raw", 16, seed=3)
    runs = {}
    for procs in (1, 2):
        fingerprints: dict = {}
        runs[procs] = (*validate(raw, fingerprints=fingerprints, num_proc=procs), fingerprints)
    assert runs[2] == runs[1]
    records, drops, total, fingerprints = runs[1]
    assert set(fingerprints) == {r["id"] for r in records} and len(records) + len(drops) == total
    assert sum(d["op"] == "decode" for d in drops) == 7 and not any("0x" in d["reason"] for d in drops)  # +speech
