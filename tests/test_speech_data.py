"""Spoken answers (issue 22, item 1): assistant audio -> the talker's codec codes in the shards -> the batch.

References: transformers' MimiModel run directly on the clip resampled by librosa (the codes), transformers'
Qwen3OmniMoeCode2Wav with the tiny checkpoint's own weights (the decoded length), the shards of the same records
without speech (text-only samples unchanged). Small: a handful of 1-3 s clips, the tiny codec.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from omni_model.data.formats import InvalidSample, load_raw, parse_sample

GROUPS = 16  # the tiny (and released) talker_config.num_code_groups


def _tone(seconds: float, rate: int, channels: int = 1, f0: float = 330.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    wave = (0.3 * np.sin(2 * np.pi * (f0 + 120 * t) * t)).astype(np.float32)
    return np.stack([wave, 0.5 * wave], 1) if channels == 2 else wave


def _qa(question: str, answer, **extra) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer, **extra}]


@pytest.fixture(scope="module")
def codec_dir(tmp_path_factory) -> Path:
    from omni_model.tiny import write_tiny_codec

    return write_tiny_codec(tmp_path_factory.mktemp("codec") / "codec", seed=0)


@pytest.fixture(scope="module")
def raw_set(tmp_path_factory) -> Path:
    """Raw jsonl: text-only samples, spoken answers in the three input forms at 24 / 16 / 44.1 kHz (one stereo),
    a two-turn sample with two spoken answers."""
    root = tmp_path_factory.mktemp("speech_raw")
    media = root / "media"
    media.mkdir()
    sf.write(media / "a24.wav", _tone(2.0, 24000), 24000, subtype="PCM_16")
    sf.write(media / "b16.flac", _tone(1.3, 16000, channels=2, f0=220), 16000, subtype="PCM_16")
    sf.write(media / "c44.wav", _tone(0.9, 44100, f0=440), 44100, subtype="PCM_16")
    sf.write(media / "d24.wav", _tone(0.05, 24000, f0=550), 24000, subtype="PCM_16")  # one frame
    lines = [
        {"id": "text-1", "messages": _qa("Name a calm river in one sentence please.", "The quiet river flows on.")},
        {"id": "text-2", "messages": _qa("Describe a golden lantern briefly.", "It glows warmly in the dark.")},
        {"id": "spoken-part", "messages": _qa("Tell me about the amber harbor.", [
            {"type": "text", "text": "The amber harbor is calm."}, {"type": "audio", "audio": "media/a24.wav"}])},
        {"id": "spoken-sharegpt", "conversations": [
            {"from": "human", "value": "What does the windy meadow sound like?"},
            {"from": "gpt", "value": "Like a soft whistle.", "audio": "media/b16.flac"}]},
        {"id": "spoken-two-turns", "messages": [
            {"role": "user", "content": "Hello there, who are you?"},
            {"role": "assistant", "content": "A helpful assistant.", "audio": {"path": "media/c44.wav"}},
            {"role": "user", "content": "Say one word about a comet."},
            {"role": "assistant", "content": "Bright.", "audio": "media/d24.wav"}]},
    ]
    (root / "raw.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root / "raw.jsonl"


def _write(records: list[dict], out: Path, hf_dir: Path, **kwargs) -> dict:
    from omni_model.data.shards import write_shards

    out.mkdir(parents=True, exist_ok=True)
    processed = out / "processed.jsonl"
    processed.write_text("".join(json.dumps(r) + "\n" for r in records))
    return write_shards(processed, out / "shards", hf_dir, val_fraction=0.0, max_seq_len=kwargs.pop("max_seq_len", 1024),
                        **kwargs)


def _members(shards: Path) -> dict:
    """Every tar member's bytes by name, over all tars (tar headers carry the write time: compare the contents)."""
    out = {}
    for path in sorted(shards.glob("*.tar")):
        with tarfile.open(path) as tar:
            out.update({m.name: tar.extractfile(m).read() for m in tar.getmembers()})
    return out


@pytest.fixture(scope="module")
def written(raw_set, tiny_hf_dir, codec_dir, tmp_path_factory):
    records, drops, _ = load_raw(raw_set)
    assert drops == []
    root = tmp_path_factory.mktemp("speech_shards")
    report = _write(records, root, tiny_hf_dir, codec_dir=codec_dir)
    return {"records": {r["id"]: r for r in records}, "report": report, "shards": root / "shards", "root": root}


def _reference_codes(codec_dir: Path, path: str) -> torch.Tensor:
    """transformers' MimiModel on the clip mixed to mono and resampled to 24 kHz by librosa (soxr_hq)."""
    import librosa
    from transformers import MimiModel

    wave, rate = sf.read(path, dtype="float32", always_2d=True)
    wave = wave.mean(axis=1)
    if rate != 24000:
        wave = librosa.resample(wave, orig_sr=rate, target_sr=24000, res_type="soxr_hq")
    model = MimiModel.from_pretrained(codec_dir).eval()
    with torch.inference_mode():
        return model.encode(torch.from_numpy(np.ascontiguousarray(wave))[None, None], num_quantizers=GROUPS).audio_codes[0]


def test_three_input_forms_give_one_canonical_spoken_message(tmp_path):
    sf.write(tmp_path / "s.wav", _tone(0.5, 24000), 24000)
    forms = [
        {"messages": _qa("Question about a river?", [{"type": "text", "text": "Answer."},
                                                      {"type": "audio", "audio": "s.wav"}])},
        {"messages": _qa("Question about a river?", "Answer.", audio="s.wav")},
        {"messages": _qa("Question about a river?", "Answer.", audio={"url": "s.wav"})},
        {"conversations": [{"from": "human", "value": "Question about a river?"},
                           {"from": "gpt", "value": "Answer.", "audio": "s.wav"}]},
    ]
    expected = _qa("Question about a river?", "Answer.", speech=str((tmp_path / "s.wav").resolve()))
    for form in forms:
        assert parse_sample(form, 1, base_dir=tmp_path)["messages"] == expected
    plain = parse_sample({"messages": _qa("Question about a river?", "Answer.")}, 1, base_dir=tmp_path)
    assert "speech" not in plain["messages"][1]


@pytest.mark.parametrize("sample, reason", [
    ({"messages": _qa("Question?", [{"type": "audio", "audio": "s.wav"}])}, "spoken answer without its text (turn 1)"),
    ({"messages": _qa("Question?", [{"type": "text", "text": "A."}, {"type": "audio", "audio": "s.wav"}],
                      audio="s.wav")}, "turn 1: 2 spoken answers in one assistant turn"),
    ({"messages": _qa("Question?", "A.", audio={"data": "UklGRg==", "format": "wav"})},
     "turn 1: audio part has no path (inline data is not supported)"),
    ({"messages": _qa("Question?", "A.", audio="gone.wav")}, "missing speech file: gone.wav"),
])
def test_bad_spoken_answers_have_reasons(tmp_path, sample, reason):
    sf.write(tmp_path / "s.wav", _tone(0.5, 24000), 24000)
    with pytest.raises(InvalidSample, match="^" + reason.replace("(", r"\(").replace(")", r"\)")):
        parse_sample(sample, 1, base_dir=tmp_path)


def test_validation_decodes_speech(tmp_path):
    from omni_model.data.datajuicer import validate

    (tmp_path / "bad.wav").write_bytes(b"RIFF0000WAVEjunk" + bytes(200))
    sf.write(tmp_path / "good.wav", _tone(0.5, 22050), 22050)
    lines = [{"id": "bad", "messages": _qa("Question about a lamp?", "An answer.", audio="bad.wav")},
             {"id": "good", "messages": _qa("Question about a lamp?", "An answer.", audio="good.wav")}]
    (tmp_path / "raw.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    records, drops, total = validate(tmp_path / "raw.jsonl")
    assert total == 2 and [r["id"] for r in records] == ["good"]
    assert drops[0]["id"] == "bad" and drops[0]["op"] == "decode"
    assert drops[0]["reason"].startswith("speech of turn 1 (bad.wav): cannot decode audio")


def test_codes_round_trip_through_shards_and_energon_bit_equal(written, codec_dir, tiny_hf_dir):
    """Energon's loader + our task encoder give, per spoken answer, exactly MimiModel's codes of that clip."""
    from megatron.energon import WorkerConfig, get_loader, get_train_dataset

    from omni_model.data.task_encoder import OmniTaskEncoder

    report = written["report"]
    assert report["kept"] == 5 and report["dropped"] == 0
    assert report["speech"]["answers"] == 4 and report["speech"]["num_code_groups"] == GROUPS
    dataset = get_train_dataset(str(written["shards"]), worker_config=WorkerConfig(rank=0, world_size=1, num_workers=0),
                                batch_size=1, shuffle_buffer_size=None, max_samples_per_sequence=None,
                                task_encoder=OmniTaskEncoder(tiny_hf_dir), repeat=False)
    seen = {}
    for batch in get_loader(dataset):
        seen[batch.sample_ids[0][0]] = batch
    assert set(seen) == set(written["records"])
    for sid, record in written["records"].items():
        batch = seen[sid]
        spoken = [(i, m["speech"]) for i, m in enumerate(record["messages"]) if m.get("speech")]
        if not spoken:
            assert batch.talker_codes is None and batch.talker_turns is None
            continue
        assert batch.talker_turns == [(0, 0, turn) for turn, _ in spoken]
        for codes, (_, path) in zip(batch.talker_codes, spoken):
            reference = _reference_codes(codec_dir, path)
            assert codes.dtype == torch.int64 and codes.shape == reference.shape
            assert torch.equal(codes, reference), sid
            assert codes.shape[0] == GROUPS and len(torch.unique(codes[0])) > 1 or codes.shape[1] == 1
    lengths = {sid: seen[sid].talker_codes[-1].shape[1] for sid in ("spoken-part", "spoken-two-turns")}
    assert lengths == {"spoken-part": 25, "spoken-two-turns": 1}  # 2.0 s and 0.05 s at 12.5 frames/s


def test_code2wav_of_stored_codes_gives_the_expected_samples(written, tiny_hf_dir):
    """The tiny checkpoint's own code2wav (transformers, its weights) decodes every stored code array to
    1920 * T - 555 samples (speech.TalkerCodes.decoded_samples), also through chunked_decode (what generate uses)."""
    from safetensors.torch import load_file
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeCode2WavConfig
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeCode2Wav

    from omni_model.data.sample import shard_samples
    from omni_model.data.speech import TalkerCodes, read_codes

    config = json.loads((tiny_hf_dir / "config.json").read_text())
    code2wav = Qwen3OmniMoeCode2Wav(Qwen3OmniMoeCode2WavConfig(**config["code2wav_config"])).eval()
    weights = load_file(str(tiny_hf_dir / "model.safetensors"))
    missing, unexpected = code2wav.load_state_dict(
        {k[len("code2wav."):]: v.float() for k, v in weights.items() if k.startswith("code2wav.")}, strict=False)
    assert not unexpected and all(name.endswith("code_offset") or "inv_freq" in name for name in missing)
    layout = TalkerCodes.from_config(config)
    decoded = 0
    for sample in shard_samples(written["shards"]):
        for entry, message in zip(sample["record"]["media_meta"].get("speech", []),
                                  [m for m in sample["record"]["messages"] if m.get("speech")]):
            codes = torch.from_numpy(read_codes(sample["media"][message["speech"]]))[None]
            with torch.inference_mode():
                wav, chunked = code2wav(codes), code2wav.chunked_decode(codes)
            frames = codes.shape[-1]
            assert wav.shape == chunked.shape == (1, 1, 1920 * frames - 555) == (1, 1, layout.decoded_samples(frames))
            assert torch.isfinite(wav).all()
            assert frames == -(-entry["samples"] // 1920)  # a started frame of the 24 kHz clip counts
            decoded += 1
    assert decoded == 4


@pytest.mark.parametrize("ratios, rates", [((2, 2), (8, 5, 4, 3)), ((3,), (2, 5)), ((2,), (4, 3))])
def test_decoded_samples_formula_matches_code2wav(ratios, rates):
    """The length formula against transformers' code2wav at other upsampling layouts (tiny widths)."""
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeCode2WavConfig
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeCode2Wav

    from omni_model.data.speech import TalkerCodes

    config = Qwen3OmniMoeCode2WavConfig(num_quantizers=2, codebook_size=8, hidden_size=16, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, intermediate_size=16,
                                        decoder_dim=16, upsample_rates=list(rates), upsampling_ratios=list(ratios))
    code2wav = Qwen3OmniMoeCode2Wav(config).eval()
    layout = TalkerCodes(2, 8, ratios, rates)
    for frames in (1, 2, 7):
        with torch.inference_mode():
            wav = code2wav(torch.zeros(1, 2, frames, dtype=torch.long))
        assert wav.shape[-1] == layout.decoded_samples(frames)


def test_released_layout():
    from omni_model.configs import released_30b_a3b_config
    from omni_model.data.speech import TalkerCodes

    layout = TalkerCodes.from_config(released_30b_a3b_config())
    assert (layout.num_code_groups, layout.code_limit, layout.samples_per_frame) == (16, 2048, 1920)
    assert layout.frame_rate == 12.5 and layout.decoded_samples(10) == 1920 * 10 - 555


def test_samples_without_speech_are_written_as_before(written, tiny_hf_dir, codec_dir, tmp_path):
    """A text-only set writes the same shard members with and without a codec, and the spoken set's text-only
    samples are member for member those of the set without the spoken samples (no key, member or file added)."""
    records = written["records"]
    text_only = [r for r in records.values() if not any(m.get("speech") for m in r["messages"])]
    _write(text_only, tmp_path / "none", tiny_hf_dir)
    _write(text_only, tmp_path / "codec", tiny_hf_dir, codec_dir=codec_dir)
    plain, with_codec = _members(tmp_path / "none" / "shards"), _members(tmp_path / "codec" / "shards")
    assert plain == with_codec and len(plain) == 2
    mixed = _members(written["shards"])
    assert {name: mixed[name] for name in plain} == plain
    for path in ("none", "codec"):
        assert not (tmp_path / path / "shards" / ".nv-meta" / "speech.json").exists()
        assert json.loads((tmp_path / path / "shards" / "report.json").read_text())["speech"] is None
    spoken_json = json.loads(mixed["spoken-part.json"])
    assert spoken_json["messages"][1]["speech"] == "speech0.npy" and "spoken-part.speech0.npy" in mixed
    assert spoken_json["source"]["speech"] == [records["spoken-part"]["messages"][1]["speech"]]
    assert spoken_json["media_meta"]["speech"] == [{"turn": 1, "frames": 25, "samples": 48000}]
    meta = json.loads((written["shards"] / ".nv-meta" / "speech.json").read_text())
    assert meta["codec_model_type"] == "mimi" and meta["frame_rate"] == 12.5 and meta["answers"] == 4


def test_spoken_drops_have_reasons(written, tiny_hf_dir, codec_dir, tmp_path):
    from omni_model.data.speech import MissingCodec

    media = tmp_path / "media"
    media.mkdir()
    sf.write(media / "long.flac", np.zeros(30 * 8000, np.float32), 8000, format="FLAC")  # 375 frames
    (media / "broken.wav").write_bytes(b"RIFF0000WAVEjunk" + bytes(100))
    base = written["records"]["spoken-part"]
    long = json.loads(json.dumps(base)) | {"id": "too-long"}
    long["messages"][1]["speech"] = str(media / "long.flac")
    broken = json.loads(json.dumps(base)) | {"id": "broken"}
    broken["messages"][1]["speech"] = str(media / "broken.wav")
    report = _write([base, long, broken], tmp_path / "out", tiny_hf_dir, codec_dir=codec_dir, max_seq_len=256)
    drops = {d["id"]: d for d in map(json.loads, (tmp_path / "out" / "shards" / "drops.jsonl").read_text().splitlines())}
    assert report["kept"] == 1 and report["dropped"] == 2
    assert drops["too-long"]["op"] == "max_seq_len" and drops["too-long"]["reason"].startswith("talker sequence of ")
    assert "+ 375 speech frames at 12.5/s + control positions) > max_seq_len 256 (from the speech headers)" \
        in drops["too-long"]["reason"]
    assert drops["broken"]["op"] == "decode"
    assert drops["broken"]["reason"].startswith("speech of turn 1 (broken.wav): cannot read audio header")
    # no codec: the over-long answer is still dropped, the one that fits stops the stage with the setting to fix
    with pytest.raises(MissingCodec, match="sample spoken-part has a spoken answer but no speech codec is configured"):
        _write([long, base], tmp_path / "nocodec", tiny_hf_dir, max_seq_len=256)


def test_a_codec_that_does_not_fit_the_checkpoint_is_refused(tmp_path, tiny_hf_dir):
    from transformers import MimiConfig, MimiModel

    from omni_model.data.speech import CodecError, SpeechCodec, TalkerCodes
    from omni_model.tiny import tiny_codec_config

    wrong = tiny_codec_config() | {"num_quantizers": 8, "upsampling_ratios": [8, 6, 5, 2]}
    MimiModel(MimiConfig(**wrong)).save_pretrained(tmp_path / "wrong")
    with pytest.raises(CodecError) as error:
        SpeechCodec(tmp_path / "wrong", TalkerCodes.from_config(tiny_hf_dir))
    assert "960 samples per frame != code2wav's 1920 (12.5 frames/s)" in str(error.value)
    assert "8 quantizers < num_code_groups 16" in str(error.value)


def test_tiny_codec_is_deterministic_and_fetched_by_the_codec_rule(tmp_path, tiny_hf_dir, codec_dir):
    from omni_model.checkpoint_files import verify_manifest
    from omni_model.download import fetch_codec
    from omni_model.tiny import write_tiny_codec

    again = write_tiny_codec(tmp_path / "again", seed=0)
    for name in ("config.json", "model.safetensors"):
        assert (again / name).read_bytes() == (codec_dir / name).read_bytes()
    manifest = fetch_codec({"source": "tiny", "seed": 0, "codec": "auto"}, tmp_path / "rule", tiny_hf_dir)
    assert manifest["source"] == {"kind": "tiny", "seed": 0} and verify_manifest(tmp_path / "rule") == []
    assert (tmp_path / "rule" / "model.safetensors").read_bytes() == (codec_dir / "model.safetensors").read_bytes()
    local = fetch_codec({"source": "huggingface", "codec": str(codec_dir)}, tmp_path / "local", tiny_hf_dir)
    assert local["source"] == {"kind": "local", "path": str(codec_dir.resolve())}
    assert (tmp_path / "local" / "config.json").resolve() == (codec_dir / "config.json").resolve()


def test_packing_and_collate_carry_codes_and_leave_the_thinker_batch_unchanged(written, tiny_hf_dir):
    from omni_model.data.batch import collate
    from omni_model.data.encoder import OmniEncoder
    from omni_model.data.packing import pack
    from omni_model.data.sample import shard_samples

    encoder = OmniEncoder(tiny_hf_dir)
    samples = {s["record"]["id"]: s for s in shard_samples(written["shards"])}
    encoded = {sid: encoder.encode_canonical(s["record"], s["media"], key=sid) for sid, s in samples.items()}
    row = pack([encoded["text-1"], encoded["spoken-two-turns"], encoded["spoken-part"]])
    assert row.talker_turns == [(1, 1), (1, 3), (2, 1)]
    batch = collate([encoded["text-2"], row], pad_id=encoder.pad_id, packed=True)
    assert batch.talker_turns == [(1, 1, 1), (1, 1, 3), (1, 2, 1)]
    expected = encoded["spoken-two-turns"].talker_codes + encoded["spoken-part"].talker_codes
    assert all(torch.equal(a, torch.from_numpy(b)) for a, b in zip(batch.talker_codes, expected))
    # the thinker's fields are those of the same conversations without speech
    plain = {sid: json.loads(json.dumps(s["record"])) for sid, s in samples.items()}
    for record in plain.values():
        for message in record["messages"]:
            message.pop("speech", None)
        record["media_meta"].pop("speech", None)
    unspoken = {sid: encoder.encode_canonical(plain[sid], samples[sid]["media"], key=sid) for sid in plain}
    reference = collate([unspoken["text-2"], pack([unspoken["text-1"], unspoken["spoken-two-turns"],
                                                   unspoken["spoken-part"]])], pad_id=encoder.pad_id, packed=True)
    assert reference.talker_codes is None
    assert batch.tensors().keys() == reference.tensors().keys()
    assert all(torch.equal(value, reference.tensors()[name]) for name, value in batch.tensors().items())
