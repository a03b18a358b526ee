"""Canonical media in the shards (issue 9 item 6): the shards store what the shards stage decoded (16 kHz waveforms,
sampled video frames + times, original images), and training reads them with soundfile and PIL only.

The promise tested here: for every kept demo sample, the task encoder's tensors from the canonical shards are EQUAL
(bit for bit: token ids, labels, MRoPE positions, pixel values, grids, seconds per grid, mel features, lengths) to
the tensors of the original path (the same encoder decoding the raw media files: PIL, soundfile + librosa resampling,
PyAV), with and without audio-in-video; and loading batches does not import PyAV or librosa.
"""

from __future__ import annotations

import dataclasses
import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from omni_model.data.demo import generate_demo
from omni_model.data.sample import shard_samples

N_GOOD = 40  # enough demo rows for every medium: 16 kHz and resampled audio, videos with and without a sound track
ENCODED_FIELDS = ("input_ids", "labels", "position_ids", "seq_lens", "pixel_values", "image_grid_thw",
                  "pixel_values_videos", "video_grid_thw", "video_second_per_grid", "audio_feature_lengths")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from omni_model.data.datajuicer import validate

    root = tmp_path_factory.mktemp("canonical")
    records, _, _ = validate(generate_demo(root / "raw", N_GOOD, seed=5))
    processed = root / "processed.jsonl"
    processed.write_text("".join(json.dumps(r) + "\n" for r in records))
    return {"root": root, "processed": processed, "records": {r["id"]: r for r in records}}


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "audio_in_video"])
def shards(request, demo, tiny_hf_dir):
    from omni_model.data.shards import write_shards

    out = demo["root"] / f"shards-{request.param}"
    report = write_shards(demo["processed"], out, tiny_hf_dir, max_samples=16, val_fraction=0.2, seed=0,
                          max_seq_len=4096, media_overrides={"use_audio_in_video": request.param})
    return {"dir": out, "report": report, "use_audio_in_video": request.param}


def _assert_same_encoding(a, b, where):
    for name in ENCODED_FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), (where, name)
        if x is not None:
            x, y = np.asarray(x), np.asarray(y)
            assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), (where, name)
    assert len(a.input_features) == len(b.input_features), where
    for x, y in zip(a.input_features, b.input_features):
        assert x.dtype == y.dtype and np.array_equal(x, y), (where, "input_features")


def test_canonical_shards_encode_exactly_like_the_original_files(demo, shards, tiny_hf_dir):
    from omni_model.data.encoder import OmniEncoder, media_from_paths

    encoder = OmniEncoder(tiny_hf_dir, max_seq_len=4096, use_audio_in_video=shards["use_audio_in_video"])
    samples = shard_samples(shards["dir"])
    assert len(samples) == shards["report"]["kept"]
    assert {f"demo-{i:04d}" for i in range(N_GOOD)} <= {s["record"]["id"] for s in samples}
    members = [name for sample in samples for name in sample["media"]]
    # every canonical form occurs: original images, 16 kHz audio as exact FLAC and as float32 .npy, frames as PNG
    assert any(n.startswith("image") for n in members) and any(n.startswith("video") and n.endswith(".png")
                                                               for n in members)
    assert any(n.startswith("audio") and n.endswith(".flac") for n in members)
    assert any(n.startswith("audio") and n.endswith(".npy") for n in members)
    assert any(n.startswith("video") and n.endswith((".npy", ".flac")) for n in members) == shards["use_audio_in_video"]
    for sample in samples:
        record = sample["record"]
        original = demo["records"][record["id"]]
        assert record["source"]["videos"] == original["videos"] and record["media_format"] == "canonical-2"
        expected = encoder.encode(original, media_from_paths(original))
        got = encoder.encode_canonical(record, sample["media"])
        _assert_same_encoding(expected, got, record["id"])
        assert record["num_tokens"] == len(got.input_ids)


LOADER_SCRIPT = textwrap.dedent("""
    import sys
    sys.modules["av"] = None  # any `import av` / `import librosa` on the loading path raises ImportError
    sys.modules["librosa"] = None
    import dataclasses, torch
    from pathlib import Path
    from omni_model.data.task_encoder import OmniTaskEncoder, build_loader

    shards, hf, aiv, out = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1", sys.argv[4]
    loader = build_loader(shards, OmniTaskEncoder(hf, use_audio_in_video=aiv), batch_size=3, repeat=False,
                          shuffle_buffer_size=None, max_samples_per_sequence=None)
    batches = [{f.name: getattr(b, f.name) for f in dataclasses.fields(b)} for b in loader]
    assert sys.modules["av"] is None and sys.modules["librosa"] is None
    torch.save(batches, out)
    print(len(batches), "batches")
""")


def test_loader_reads_batches_without_pyav_or_librosa(demo, shards, tiny_hf_dir, tmp_path):
    """A training loader (Energon + OmniTaskEncoder) in a process where PyAV and librosa cannot be imported; its
    batches equal the collated encodings of the original files."""
    from omni_model.data.batch import collate
    from omni_model.data.encoder import OmniEncoder, media_from_paths

    out = tmp_path / "batches.pt"
    run = subprocess.run([sys.executable, "-c", LOADER_SCRIPT, str(shards["dir"]), str(tiny_hf_dir),
                          "1" if shards["use_audio_in_video"] else "0", str(out)],
                         capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 0, run.stderr[-3000:]
    batches = torch.load(out, weights_only=False)
    encoder = OmniEncoder(tiny_hf_dir, use_audio_in_video=shards["use_audio_in_video"])
    seen = 0
    for got in batches:
        ids = [sid for row in got["sample_ids"] for sid in row]
        records = [demo["records"][sid] for sid in ids]
        expected = collate([encoder.encode(r, media_from_paths(r)) for r in records], pad_id=encoder.pad_id,
                           packed=False, use_audio_in_video=shards["use_audio_in_video"])
        assert got["skipped"] == {"over_long": 0, "decode": 0, "encode": 0}  # the task encoder's counters (none: shards checked)
        for field in dataclasses.fields(expected):
            x, y = getattr(expected, field.name), got[field.name]
            if field.name == "skipped":
                continue
            if isinstance(x, torch.Tensor):
                assert x.dtype == y.dtype and torch.equal(x, y), field.name
            else:
                assert x == y, field.name
        seen += len(ids)
    assert seen == shards["report"]["train"]


def test_old_shards_are_refused_with_a_clear_message(shards, tiny_hf_dir, tmp_path):
    """Shards written before canonical media (no media_format recorded) are refused by the settings check, and a
    sample without the format marker is never misread as canonical."""
    import shutil

    from omni_model.data.encoder import OmniEncoder, ShardFormatError
    from omni_model.data.shards import SETTINGS_FILE, ShardSettingsError, check_shard_settings

    encoder = OmniEncoder(tiny_hf_dir, use_audio_in_video=shards["use_audio_in_video"])
    settings = encoder.settings()
    check_shard_settings(shards["dir"], settings)
    old = tmp_path / "old"
    shutil.copytree(shards["dir"], old)
    recorded = json.loads((old / SETTINGS_FILE).read_text())
    del recorded["media_format"]
    (old / SETTINGS_FILE).write_text(json.dumps(recorded))
    with pytest.raises(ShardSettingsError, match=r"stores media as original files \(before canonical media\), "
                                                 r"training reads canonical-2: rerun the shards stage"):
        check_shard_settings(old, settings)
    record = {"id": "old", "images": [], "audios": ["audio0.wav"], "videos": [],
              "messages": [{"role": "user", "content": "<audio>hi"}, {"role": "assistant", "content": "x"}]}
    with pytest.raises(ShardFormatError, match="original files"):
        encoder.encode_canonical(record, {"audio0.wav": b"RIFF"})


def test_audio_members_read_back_bit_for_bit():
    """16 kHz integer PCM is stored as FLAC, anything else (resampled, > 1.0, tiny values) as float32 .npy; both read
    back as the exact float32 waveform written, and writing the same waveform again gives the same bytes (shards
    runs are reproducible); a canonical member at another rate is refused."""
    import soundfile as sf

    from omni_model.data.media import MediaError, read_audio_16k, write_audio_16k

    rng = np.random.default_rng(0)
    pcm16 = (rng.integers(-32768, 32767, 16000) / 32768).astype(np.float32)
    pcm16[:2] = [-1.0, 32767 / 32768]  # the 16-bit extremes
    resampled = (rng.standard_normal(16000) * 0.4).astype(np.float32)
    resampled[:4] = [1.37, -1.5, 3e-12, -2**-30]
    for wave, ext in ((pcm16, "flac"), (resampled, "npy"), (np.zeros(10, np.float32), "flac")):
        data, got_ext = write_audio_16k(wave)
        assert got_ext == ext
        assert write_audio_16k(wave.copy())[0] == data
        back = read_audio_16k(data)
        assert back.dtype == np.float32 and np.array_equal(back, wave)
    # 16-bit content in the 24-bit FLAC costs no more than 16-bit PCM (FLAC drops the zero low bits), even for noise
    assert len(write_audio_16k(pcm16)[0]) < 2.05 * len(pcm16)
    assert len(write_audio_16k(resampled)[0]) > 4 * len(resampled)
    other = io.BytesIO()
    sf.write(other, resampled, 44100, format="WAV", subtype="FLOAT")
    with pytest.raises(MediaError, match="16000 Hz mono"):
        read_audio_16k(other.getvalue())
