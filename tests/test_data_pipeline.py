"""The data stages end to end on a small generated demo set, with the real components: Data-Juicer ops, webdataset
ShardWriter, Energon's preparator, ``get_train_dataset``, the savable loader and the ``energon info`` CLI.

Every deliberately bad sample of the demo set must be dropped at its stage with a precise reason, and the counts must
add up (input = kept + dropped).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from omni_model.data.demo import BAD_KINDS, generate_demo

N_GOOD = 16


@pytest.fixture(scope="module")
def pipeline(tiny_hf_dir, tmp_path_factory):
    from omni_model.data.datajuicer import run_stage
    from omni_model.data.shards import write_shards

    root = tmp_path_factory.mktemp("data")
    raw = generate_demo(root / "raw", N_GOOD, seed=3)
    dj = run_stage(raw, Path("config/datajuicer_recipe.yaml"), root / "processed.jsonl", root / "drops.jsonl",
                   num_proc=1)
    report = write_shards(root / "processed.jsonl", root / "shards", tiny_hf_dir, previous_drops=root / "drops.jsonl",
                          input_count=dj["input"], max_samples=4, max_bytes=1 << 20, val_fraction=0.25, seed=0,
                          max_seq_len=4096)
    drops = [json.loads(line) for line in (root / "shards" / "drops.jsonl").read_text().splitlines()]
    return {"root": root, "raw": raw, "dj": dj, "report": report, "drops": drops, "hf": tiny_hf_dir}


def test_counts_add_up(pipeline):
    raw_lines = [line for line in pipeline["raw"].read_text().splitlines() if line.strip()]
    dj, report = pipeline["dj"], pipeline["report"]
    assert dj["input"] == len(raw_lines) == N_GOOD + len(BAD_KINDS)
    assert dj["input"] == dj["kept"] + dj["dropped"]
    assert report["input"] == report["kept"] + report["dropped"] == len(raw_lines)
    assert report["kept"] == N_GOOD and report["train"] + report["val"] == N_GOOD
    assert report["train"] > 0 and report["val"] > 0
    processed = (pipeline["root"] / "processed.jsonl").read_text().splitlines()
    assert len(processed) == dj["kept"]
    ids = [d["id"] for d in pipeline["drops"]]
    assert len(ids) == len(set(ids)) == report["dropped"]


def test_every_bad_sample_dropped_at_its_stage_with_reason(pipeline):
    by_id = {d["id"]: d for d in pipeline["drops"]}
    by_id.setdefault("bad-invalid_json", by_id.get(f"line{N_GOOD + 1}"))  # unparseable: id = its line number
    expected_reason = {
        "invalid_json": "invalid JSON",
        "missing_file": "missing image file: media/does-not-exist.png",
        "corrupt_image_header": "image0.png (garbage.png): cannot decode image",
        "corrupt_audio_header": "audio0.wav (garbage.wav): cannot decode audio",
        "corrupt_video_header": "video0.mp4 (garbage.mp4): cannot decode video",
        "wrong_role_order": "wrong role order: turn 1 is 'user' after 'user'",
        "empty_assistant": "empty assistant turn (turn 1)",
        "tag_media_mismatch": "2 <image> tag(s) but 1 images",
        "text_too_short": "text_length_filter: text_len=5",
        "image_too_small": "image_width=[12], image_height=[12]",
        "audio_too_long": "audio_duration=[35]",
        "video_too_short": "video_duration=[0.25]",
        "exact_duplicate": "omni_document_media_deduplicator: duplicate of demo-0000",
        "near_duplicate": "omni_minhash_media_deduplicator: duplicate of demo-0008",
        "truncated_image": "image0.png (bad-truncated-img0.png): cannot decode image",
        "nan_audio": "non-finite samples",
        "undecodable_video": "cannot decode video",
        "over_long": "tokens after media expansion > max_seq_len 4096 (from the media headers)",
        "corrupt_speech": "speech of turn 1 (garbage-speech.wav): cannot decode audio",
        "speech_without_text": "spoken answer without its text (turn 1)",
        "speech_too_long": "+ 4250 speech frames at 12.5/s + control positions) > max_seq_len 4096 (from the speech "
                           "headers)",
    }
    assert set(expected_reason) == set(BAD_KINDS)
    for kind, stage in BAD_KINDS.items():
        drop = by_id.get(f"bad-{kind}")
        assert drop is not None, f"bad-{kind} was not dropped"
        assert drop["stage"] == stage, drop
        assert expected_reason[kind] in drop["reason"], drop
    assert all(d["id"].startswith("bad-") or d["id"] == f"line{N_GOOD + 1}" for d in pipeline["drops"])


def test_processed_records_round_trip_through_data_juicer_format(pipeline):
    from omni_model.data.datajuicer import from_dj, to_dj

    for line in (pipeline["root"] / "processed.jsonl").read_text().splitlines():
        record = json.loads(line)
        assert from_dj(json.loads(json.dumps(to_dj(record)))) == record
        assert all(Path(p).is_absolute() for key in ("images", "audios", "videos") for p in record[key])


def test_energon_reads_the_shards(pipeline):
    from megatron.energon import WorkerConfig, get_loader, get_train_dataset

    from omni_model.data.task_encoder import OmniTaskEncoder

    shards = pipeline["root"] / "shards"
    assert (shards / ".nv-meta" / "split.yaml").is_file() and (shards / ".nv-meta" / "dataset.yaml").is_file()
    assert len(pipeline["report"]["shards"]) >= 4  # max 4 samples per shard
    dataset = get_train_dataset(str(shards), worker_config=WorkerConfig(rank=0, world_size=1, num_workers=0),
                                batch_size=3, shuffle_buffer_size=None, max_samples_per_sequence=None,
                                task_encoder=OmniTaskEncoder(pipeline["hf"]), repeat=False)
    seen = [sid for batch in get_loader(dataset) for row in batch.sample_ids for sid in row]
    assert len(seen) == pipeline["report"]["train"] == len(set(seen))
    energon = shutil.which("energon", path=str(Path(sys.executable).parent))
    out = subprocess.run([energon, "info", str(shards)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"({N_GOOD} samples" in out.stdout and "OmniSample" in out.stdout


def test_micro_batches_of_every_shape(pipeline):
    """B>1 with text-only/image-only/audio-only rows, several audios, several images, video: all collate."""
    from omni_model.data.batch import collate
    from omni_model.data.encoder import OmniEncoder, media_from_paths

    encoder = OmniEncoder(pipeline["hf"])
    records = {json.loads(l)["id"]: json.loads(l) for l in (pipeline["root"] / "processed.jsonl").read_text().splitlines()}
    kinds = {}
    for record in records.values():
        key = (len(record["images"]), len(record["audios"]), len(record["videos"]))
        kinds.setdefault(key, record)
    assert {(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 2, 0), (1, 1, 0), (0, 0, 1)} <= set(kinds)
    encoded = {key: encoder.encode(rec, media_from_paths(rec)) for key, rec in kinds.items()}
    for combo in ([(0, 0, 0)], [(0, 0, 0), (0, 0, 0)], [(1, 0, 0), (0, 0, 0)], [(0, 1, 0), (0, 0, 0)],
                  [(0, 2, 0), (1, 1, 0), (0, 0, 1)], [(0, 0, 1), (0, 1, 0)]):
        batch = collate([encoded[k] for k in combo], pad_id=encoder.pad_id, packed=False)
        n_images = sum(k[0] for k in combo)
        n_audios = sum(k[1] for k in combo)
        assert (batch.image_grid_thw is None) == (n_images == 0)
        assert (0 if batch.input_features is None else batch.input_features.shape[0]) == n_audios
        assert (batch.video_grid_thw is None) == (sum(k[2] for k in combo) == 0)
        assert batch.input_ids.shape[0] == len(combo) and batch.position_ids.shape[:2] == (3, len(combo))
        if n_images:
            assert int((batch.input_ids == encoder.chat.ids["image_pad"]).sum()) == \
                int(batch.image_grid_thw.prod(-1).sum()) // 4
        # shifted labels never cross rows and equal the next token where trained
        mask = batch.loss_mask.bool()
        assert torch_equal(batch.shift_labels[:, :-1][mask[:, :-1]], batch.input_ids[:, 1:][mask[:, :-1]])


def torch_equal(a, b) -> bool:
    return bool((a == b).all())


def test_packing_boundaries_positions_and_resume(pipeline):
    from omni_model.data.task_encoder import OmniTaskEncoder, build_loader, restore_loader

    shards = pipeline["root"] / "shards"
    kwargs = dict(batch_size=1, packing_buffer_size=6, shuffle_buffer_size=8, max_samples_per_sequence=4)
    loader = build_loader(shards, OmniTaskEncoder(pipeline["hf"], max_seq_len=1024), **kwargs)
    it = iter(loader)
    first = [next(it) for _ in range(2)]
    for batch in first:
        cu = batch.cu_seqlens.tolist()
        assert cu[0] == 0 and cu[-1] == batch.input_ids.numel() and batch.input_ids.shape[0] == 1
        assert batch.input_ids.shape[1] <= 1024
        assert len(batch.sample_ids[0]) >= 1
        for start, end in zip(cu[:-1], cu[1:]):
            assert float(batch.position_ids[0, 0, start]) == 0.0  # positions restart per sequence
            assert float(batch.loss_mask[0, end - 1]) == 0.0  # never predict across a boundary
    assert any(len(b.sample_ids[0]) > 1 for b in first), "nothing was packed"
    state = loader.save_state_rank()
    expected = [next(it).sample_ids for _ in range(3)]
    resumed = restore_loader(shards, OmniTaskEncoder(pipeline["hf"], max_seq_len=1024), state, **kwargs)
    got = [batch.sample_ids for _, batch in zip(range(3), resumed)]
    assert got == expected


def test_over_long_is_counted_at_encode_time(pipeline):
    """A sample that slipped through with another max_seq_len is skipped by the task encoder and counted."""
    from megatron.energon import WorkerConfig, get_loader, get_train_dataset

    from omni_model.data.task_encoder import OmniTaskEncoder

    encoder = OmniTaskEncoder(pipeline["hf"], max_seq_len=128)
    dataset = get_train_dataset(str(pipeline["root"] / "shards"),
                                worker_config=WorkerConfig(rank=0, world_size=1, num_workers=0), batch_size=1,
                                shuffle_buffer_size=None, max_samples_per_sequence=None, task_encoder=encoder,
                                repeat=False)
    batches = list(get_loader(dataset))
    kept = len(batches)
    assert encoder.skipped["over_long"] > 0
    assert kept + encoder.skipped["over_long"] == pipeline["report"]["train"]
    # the skips travel on the batches (what the training loop sums over workers and ranks); skips after the last
    # batch of a finite pass wait for a next batch
    carried = sum(batch.skipped["over_long"] for batch in batches)
    print(f"over-long skips: {encoder.skipped['over_long']} counted, {carried} carried on batches")
    assert carried > 0 and carried + encoder._skipped_since_batch["over_long"] == encoder.skipped["over_long"]
    assert all(set(batch.skipped) == {"over_long", "decode", "encode"} for batch in batches)
    assert np.isfinite(kept)


def test_token_count_from_headers_equals_encoded_length(pipeline):
    """The cheap count (media headers only) is the exact sequence length for every kept demo sample."""
    from omni_model.data.encoder import OmniEncoder, media_from_paths

    encoder = OmniEncoder(pipeline["hf"])
    for line in (pipeline["root"] / "processed.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["id"].startswith("bad-"):
            continue  # bad media may not even decode
        media = media_from_paths(record)
        shapes = encoder.probe(record, media)
        assert shapes.exact and encoder.count_tokens(record, shapes) == len(encoder.encode(record, media).input_ids)


def test_shards_record_encoder_settings_and_training_checks_them(pipeline):
    from omni_model.data.encoder import OmniEncoder
    from omni_model.data.shards import ShardSettingsError, check_shard_settings

    shards = pipeline["root"] / "shards"
    settings = OmniEncoder(pipeline["hf"], max_seq_len=4096).settings()
    recorded = json.loads((shards / ".nv-meta" / "encoder_settings.json").read_text())
    assert recorded == pipeline["report"]["encoder_settings"] == settings
    assert {"max_seq_len", "video_fps", "video_max_frames", "video_max_pixels", "image_max_pixels",
            "use_audio_in_video", "tokenizer_digest"} <= set(recorded)
    check_shard_settings(shards, settings)
    check_shard_settings(shards, {**settings, "max_seq_len": 8192})  # a longer limit keeps every shard sample valid
    other = {**settings, "max_seq_len": 1024, "video_fps": 1.0, "tokenizer_digest": "0" * 64}
    with pytest.raises(ShardSettingsError) as error:
        check_shard_settings(shards, other)
    message = str(error.value)
    print(message)
    assert "max_seq_len: shards 4096, training 1024" in message and "video_fps: shards 2.0, training 1.0" in message
    assert "tokenizer_digest" in message and "use_audio_in_video" not in message
