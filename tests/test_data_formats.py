"""Input formats -> canonical records, and the validation reasons (no Data-Juicer, no model needed)."""

from __future__ import annotations

import json

import pytest

from omni_model.data.formats import InvalidSample, load_raw, media_tag_order, parse_sample


@pytest.fixture()
def media_dir(tmp_path):
    (tmp_path / "m").mkdir()
    for name in ("a.png", "b.png", "x.wav", "v.mp4"):
        (tmp_path / "m" / name).write_bytes(b"not empty")
    (tmp_path / "m" / "empty.png").write_bytes(b"")
    return tmp_path


def test_messages_and_sharegpt_give_the_same_record(media_dir):
    messages = {"id": "s1", "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "<image>hi <audio>"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "and <image>?"},
        {"role": "assistant", "content": "same"}], "images": ["m/a.png", "m/b.png"], "audios": ["m/x.wav"]}
    sharegpt = {"id": "s1", "system": "Be brief.", "conversations": [
        {"from": "human", "value": "<image>hi <audio>"}, {"from": "gpt", "value": "hello"},
        {"from": "human", "value": "and <image>?"}, {"from": "gpt", "value": "same"}],
        "images": ["m/a.png", "m/b.png"], "audios": ["m/x.wav"]}
    a = parse_sample(messages, 1, base_dir=media_dir)
    b = parse_sample(sharegpt, 1, base_dir=media_dir)
    assert a == b
    assert a["images"] == [str((media_dir / "m/a.png").resolve()), str((media_dir / "m/b.png").resolve())]
    assert media_tag_order(a) == [("image", 0), ("audio", 0), ("image", 1)]


def test_openai_parts_content_and_absolute_paths(media_dir):
    absolute = str(media_dir / "m" / "v.mp4")
    obj = {"messages": [
        {"role": "user", "content": [{"type": "video", "video": absolute}, {"type": "text", "text": "what?"},
                                     {"type": "image_url", "image_url": {"url": "m/a.png"}}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a clip"}]}]}
    record = parse_sample(obj, 7, base_dir=media_dir)
    assert record["id"] == "line7"
    assert record["messages"][0]["content"] == "<video>what?<image>"
    assert record["videos"] == [absolute] and len(record["images"]) == 1 and record["audios"] == []


def test_text_only_and_audio_only(media_dir):
    assert parse_sample({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
                        1)["images"] == []
    record = parse_sample({"conversations": [{"from": "user", "value": "<audio>"}, {"from": "assistant",
                                                                                     "value": "noise"}],
                           "audios": "m/x.wav"}, 1, base_dir=media_dir)
    assert len(record["audios"]) == 1


@pytest.mark.parametrize("obj, op, reason", [
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                   {"role": "assistant", "content": "c"}]}, "structure",
     "wrong role order: turn 1 is 'user' after 'user' (expected 'assistant')"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, "structure",
     "wrong role order: turn 0 is 'assistant' after 'start' (expected 'user')"),
    ({"messages": [{"role": "user", "content": "a"}]}, "structure",
     "wrong role order: last turn is 'user', no assistant answer to train on"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                   {"role": "system", "content": "s"}]}, "structure", "'system' at turn 2, only allowed first"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": " \n"}]}, "structure",
     "empty assistant turn (turn 1)"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "<image>b"}],
      "images": ["m/a.png"]}, "structure", "media tag <image> in assistant turn 1"),
    ({"messages": [{"role": "user", "content": "<image>a"}, {"role": "assistant", "content": "b"}]}, "structure",
     "tag/media count mismatch: 1 <image> tag(s) but 0 images"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
      "audios": ["m/x.wav"]}, "structure", "tag/media count mismatch: 0 <audio> tag(s) but 1 audios"),
    ({"messages": [{"role": "user", "content": "<image>a"}, {"role": "assistant", "content": "b"}],
      "images": ["m/nope.png"]}, "media", "missing image file: m/nope.png"),
    ({"messages": [{"role": "user", "content": "<image>a"}, {"role": "assistant", "content": "b"}],
      "images": ["m/empty.png"]}, "media", "empty image file (0 bytes): m/empty.png"),
    ({"conversations": [{"from": "alien", "value": "a"}]}, "structure", "turn 0: unknown role 'alien'"),
    ({"text": "plain"}, "structure", "no 'messages' or 'conversations' list in the sample"),
])
def test_validation_reasons(media_dir, obj, op, reason):
    with pytest.raises(InvalidSample) as info:
        parse_sample(obj, 1, base_dir=media_dir)
    assert reason in str(info.value)
    assert info.value.op == op


def test_format_forced_and_load_raw_accounting(media_dir):
    with pytest.raises(InvalidSample, match="format is set to 'sharegpt'"):
        parse_sample({"messages": []}, 1, fmt="sharegpt")
    path = media_dir / "raw.jsonl"
    good = {"id": "dup", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    path.write_text("\n".join([json.dumps(good), "{broken", "", json.dumps(good), "[1, 2]"]) + "\n")
    records, drops, total = load_raw(path)
    assert total == 4 and len(records) + len(drops) == total
    assert [r["id"] for r in records] == ["dup", "dup#line4"]
    assert drops[0]["id"] == "line2" and drops[0]["reason"].startswith("invalid JSON")
    assert drops[1] == {"id": "line5", "stage": "validate", "op": "structure",
                        "reason": "line is JSON list, not an object"}
