"""Media-aware deduplication (Data-Juicer ops omni_document_media_deduplicator / omni_minhash_media_deduplicator):
a sample is a duplicate only when its text AND the decoded content of all its media match; each drop names the
sample it duplicates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dedup_media import clip, picture, reencode_audio, reencode_clip, resave_image, tone

RECIPE = Path("config/datajuicer_recipe.yaml")


def _record(sid: str, user: str, answer: str, **media) -> dict:
    record = {"id": sid, "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}
    for key in ("images", "audios", "videos"):
        record[key] = [str(p) for p in media.get(key, [])]
    return record


def test_image_fingerprint_survives_reencoding_and_separates_pictures(tmp_path):
    from omni_model.data.digest import image_fingerprint, same_medium

    fingerprints, worst = [], 0.0
    for k in range(24):
        source = picture(tmp_path / f"p{k}.png", k)
        fingerprints.append(image_fingerprint(str(source)))
        for quality in (90, 75, 50):
            copy = image_fingerprint(str(resave_image(source, tmp_path / "copy.jpg", quality)))
            grey = np.abs(np.subtract(copy["frames"][0]["grey"], fingerprints[-1]["frames"][0]["grey"])).max()
            worst = max(worst, grey)
            assert same_medium(fingerprints[-1], copy), (k, quality)
    distinct = sum(not same_medium(a, b) for i, a in enumerate(fingerprints) for b in fingerprints[i + 1:])
    print(f"PNG -> JPEG q50..90: largest grey thumbnail cell difference {worst:.2f} levels; "
          f"{distinct} of {24 * 23 // 2} distinct pairs told apart")
    assert distinct == 24 * 23 // 2


@pytest.fixture(scope="module")
def dedup_run(tmp_path_factory):
    from omni_model.data.datajuicer import run_recipe

    d = tmp_path_factory.mktemp("dedup")
    img_a, img_b = picture(d / "a.png", 1), picture(d / "b.png", 2)
    img_a_jpg = resave_image(img_a, d / "a_copy.jpg", 80)
    aud_x = tone(d / "x.wav", 3, rate=44100, channels=2)
    aud_x_flac = reencode_audio(aud_x, d / "x_copy.flac")
    aud_y = tone(d / "y.wav", 4, rate=44100, channels=2)
    vid_v, vid_w = clip(d / "v.mp4", 1), clip(d / "w.mp4", 2)
    vid_v_copy = reencode_clip(vid_v, d / "v_copy.mp4", bit_rate=150_000)
    assert vid_v_copy.read_bytes() != vid_v.read_bytes() and img_a_jpg.read_bytes() != img_a.read_bytes()
    long_text = ("<image>Look at the picture and describe the colours, the shapes, where each shape sits, "
                 "how large each shape is compared with the frame, which shape is nearest to the top edge, "
                 "whether any two shapes touch, and what the whole scene reminds you of in a few careful sentences.")
    records = [
        _record("img-a", "<image>Describe the image.", "A picture.", images=[img_a]),
        _record("img-b", "<image>Describe the image.", "A picture.", images=[img_b]),
        _record("img-a-jpeg", "<image>Describe the image.", "A picture.", images=[img_a_jpg]),
        _record("img-a-other-text", "<image>What colour is the block?", "Green.", images=[img_a]),
        _record("aud-x", "<audio>Transcribe the audio.", "A tone.", audios=[aud_x]),
        _record("aud-x-flac", "<audio>Transcribe the audio.", "A tone.", audios=[aud_x_flac]),
        _record("aud-y", "<audio>Transcribe the audio.", "A tone.", audios=[aud_y]),
        _record("aud-x-other-text", "<audio>How long is the tone?", "About a second.", audios=[aud_x]),
        _record("mix-ax", "<image><audio>Relate them.", "They match.", images=[img_a], audios=[aud_x]),
        _record("mix-ay", "<image><audio>Relate them.", "They match.", images=[img_a], audios=[aud_y]),
        _record("vid-v", "<video>What happens?", "A block moves.", videos=[vid_v]),
        _record("vid-v-copy", "<video>What happens?", "A block moves.", videos=[vid_v_copy]),
        _record("vid-w", "<video>What happens?", "A block moves.", videos=[vid_w]),
        _record("clip-3", "<audio>Transcribe clip number 3.", "Clip 3.", audios=[aud_x]),
        _record("clip-4", "<audio>Transcribe clip number 4.", "Clip 4.", audios=[aud_x]),
        _record("near-a", long_text, "Blue and green shapes on red.", images=[img_a]),
        _record("near-a-edit", long_text.replace("few careful", "few short"), "Blue and green shapes on red.",
                images=[img_a_jpg]),
        _record("near-b-edit", long_text.replace("few careful", "few short"), "Blue and green shapes on red.",
                images=[img_b]),
        # fewer words than the near op's window (5): no shingle at all, which MinHash hashed as one shared signature
        _record("short-capital", "Capital of France?", "Paris."),
        _record("short-translate", "Translate 'cat' to German.", "Katze."),
        _record("short-capital-copy", "capital of  France?", "Paris."),
        _record("vqa-colour", "<image>Main color?", "Green.", images=[img_b]),  # VQA: two questions, one image
        _record("vqa-dark", "<image>Is it dark?", "No.", images=[img_b]),
    ]
    # two worker processes under a deep work dir: Data-Juicer's pool sockets must not land under it (AF_UNIX paths
    # are limited to 107 bytes: a work dir of ~72+ characters failed with "AF_UNIX path too long")
    work = d / ("deep-" * 12) / "work"
    assert len(str(work)) > 100
    kept, drops = run_recipe(records, RECIPE, work, num_proc=2)
    return {r["id"] for r in kept}, {drop["id"]: drop for drop in drops}


@pytest.mark.parametrize("sid, duplicate_of, op", [
    ("img-a-jpeg", "img-a", "omni_document_media_deduplicator"),
    ("aud-x-flac", "aud-x", "omni_document_media_deduplicator"),
    ("vid-v-copy", "vid-v", "omni_document_media_deduplicator"),
    ("near-a-edit", "near-a", "omni_minhash_media_deduplicator"),
    ("short-capital-copy", "short-capital", "omni_document_media_deduplicator"),
])
def test_same_text_and_same_media_reencoded_is_dropped_naming_the_original(dedup_run, sid, duplicate_of, op):
    kept, drops = dedup_run
    assert sid not in kept and drops[sid]["op"] == op
    assert drops[sid]["reason"] == f"{op}: duplicate of {duplicate_of}"


@pytest.mark.parametrize("sid", ["img-b", "aud-y", "vid-w", "mix-ay", "near-b-edit"])
def test_same_text_different_media_is_kept(dedup_run, sid):
    kept, drops = dedup_run
    assert sid in kept, drops.get(sid)


@pytest.mark.parametrize("sid", ["img-a-other-text", "aud-x-other-text", "clip-3", "clip-4", "short-capital",
                                 "short-translate", "vqa-colour", "vqa-dark"])
def test_different_text_same_media_is_kept(dedup_run, sid):
    kept, drops = dedup_run
    assert sid in kept, drops.get(sid)


def test_only_the_duplicates_are_dropped(dedup_run):
    kept, drops = dedup_run
    print(f"dedup cases: kept {len(kept)}, dropped {sorted(drops)}")
    assert set(drops) == {"img-a-jpeg", "aud-x-flac", "vid-v-copy", "near-a-edit", "short-capital-copy"}


def test_near_op_joins_short_texts_only_when_their_words_match(tmp_path):
    """The near op alone, on texts shorter than its window: equal words (case and spacing aside) with the same media
    are near duplicates, different words are not."""
    import yaml

    from omni_model.data.datajuicer import run_recipe

    recipe = yaml.safe_load(RECIPE.read_text())
    recipe["process"] = [op for op in recipe["process"] if "omni_minhash_media_deduplicator" in op]
    (tmp_path / "near.yaml").write_text(yaml.safe_dump(recipe))
    image = picture(tmp_path / "p.png", 5)
    records = [_record("capital", "Capital of France?", "Paris."),
               _record("capital-shouted", "CAPITAL  of France?", "Paris."),
               _record("translate", "Translate 'cat' to German.", "Katze."),
               _record("colour", "<image>Main color?", "Green.", images=[image]),
               _record("colour-again", "<image>main color?", "green.", images=[image]),
               _record("dark", "<image>Is it dark?", "No.", images=[image])]
    kept, drops = run_recipe(records, tmp_path / "near.yaml", tmp_path / "work")
    assert [r["id"] for r in kept] == ["capital", "translate", "colour", "dark"]
    assert {d["id"]: d["reason"] for d in drops} == {
        "capital-shouted": "omni_minhash_media_deduplicator: duplicate of capital",
        "colour-again": "omni_minhash_media_deduplicator: duplicate of colour"}


def test_truncated_image_is_dropped_before_dedup_and_its_copies_survive(tmp_path):
    """A truncated progressive JPEG decodes leniently (Data-Juicer lets PIL pad truncated files) to the same
    thumbnails as its intact copies: it must be dropped by validation's full decode, not kept as the "original" that
    its copies are dropped against and then lost at the shards stage."""
    import io
    import json

    from PIL import Image

    from omni_model.data.datajuicer import run_stage

    source = picture(tmp_path / "p.png", 3, size=(192, 144))
    buffer = io.BytesIO()
    Image.open(source).convert("RGB").save(buffer, "JPEG", quality=95, progressive=True)
    (tmp_path / "cut.jpg").write_bytes(buffer.getvalue()[:-200])  # the last scans lost: the picture is all there
    resave_image(source, tmp_path / "copy.jpg", 80)
    ask = {"role": "user", "content": "<image>Describe the image."}
    rows = [{"id": sid, "messages": [ask, {"role": "assistant", "content": "Shapes on a field."}], "images": [name]}
            for sid, name in (("cut", "cut.jpg"), ("png", "p.png"), ("jpeg", "copy.jpg"))]
    (tmp_path / "raw.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    summary = run_stage(tmp_path / "raw.jsonl", RECIPE, tmp_path / "processed.jsonl", tmp_path / "drops.jsonl")
    kept = [json.loads(line)["id"] for line in (tmp_path / "processed.jsonl").read_text().splitlines()]
    drops = {d["id"]: d for d in map(json.loads, (tmp_path / "drops.jsonl").read_text().splitlines())}
    assert kept == ["png"] and summary["kept"] == 1
    assert (drops["cut"]["stage"], drops["cut"]["op"]) == ("validate", "decode")
    assert drops["cut"]["reason"].startswith("image0.jpg (cut.jpg): cannot decode image: OSError: image file is truncated")
    assert drops["jpeg"]["reason"] == "omni_document_media_deduplicator: duplicate of png"
