"""The download stage's manifest: every file sized and hashed; damage is detected and repaired, never used."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from omni_model.checkpoint_files import sha256_of
from omni_model.download import (MANIFEST, CheckpointError, check_local_checkpoint, fetch_checkpoint, require_intact,
                                 verify_manifest)


@pytest.fixture()
def tiny_out(tmp_path):
    out = tmp_path / "results" / "model" / "hf"
    manifest = fetch_checkpoint({"source": "tiny", "seed": 0}, out)
    return out, manifest


def test_manifest_lists_every_file_with_size_and_sha256(tiny_out):
    out, manifest = tiny_out
    on_disk = sorted(p.name for p in out.iterdir() if p.name != MANIFEST)
    assert sorted(manifest["files"]) == on_disk
    for name, meta in manifest["files"].items():
        assert meta["size"] == (out / name).stat().st_size
        assert meta["sha256"] == sha256_of(out / name)
    assert manifest["source"] == {"kind": "tiny", "seed": 0}
    assert not (out.parent / "hf.staging").exists()  # staging was published atomically
    assert verify_manifest(out) == []


def _flip_one_byte(path, offset):
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0xFF]))


def test_truncated_and_corrupted_files_are_detected(tiny_out):
    out, _ = tiny_out
    weights = out / "model.safetensors"
    _flip_one_byte(weights, weights.stat().st_size // 2)
    with open(out / "tokenizer.json", "r+b") as handle:
        handle.truncate(100)
    os.remove(out / "merges.txt")
    problems = verify_manifest(out)
    assert any(p.startswith("model.safetensors: sha256 mismatch") for p in problems)
    assert any(p.startswith("tokenizer.json: size 100") for p in problems)
    assert "merges.txt: missing" in problems
    with pytest.raises(CheckpointError, match="corrupted"):
        require_intact(out)


def test_rerun_refetches_a_damaged_tiny_checkpoint_and_keeps_an_intact_one(tiny_out):
    out, manifest = tiny_out
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    assert fetch_checkpoint({"source": "tiny", "seed": 0}, out) == manifest
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime  # intact: nothing rebuilt
    _flip_one_byte(out / "model.safetensors", 1000)
    repaired = fetch_checkpoint({"source": "tiny", "seed": 0}, out)
    assert repaired["files"] == manifest["files"] and verify_manifest(out) == []


def test_a_different_seed_replaces_the_checkpoint(tiny_out):
    out, manifest = tiny_out
    other = fetch_checkpoint({"source": "tiny", "seed": 3}, out)
    assert other["files"]["model.safetensors"]["sha256"] != manifest["files"]["model.safetensors"]["sha256"]
    assert json.loads((out / MANIFEST).read_text())["source"]["seed"] == 3


def test_local_source_is_verified_and_linked(tiny_out, tmp_path):
    src, manifest = tiny_out
    local = tmp_path / "my_ckpt"
    shutil.copytree(src, local)
    out = tmp_path / "linked"
    linked = fetch_checkpoint({"source": "local", "path": str(local)}, out)
    assert linked["files"] == manifest["files"]
    assert (out / "model.safetensors").is_symlink()
    _flip_one_byte(local / "merges.txt", 5)  # the folder's own manifest now disagrees
    with pytest.raises(CheckpointError, match="merges.txt: sha256 mismatch") as error:
        fetch_checkpoint({"source": "local", "path": str(local)}, tmp_path / "again")
    assert str(local) in str(error.value) and "staging" not in str(error.value)


def test_local_source_rejects_a_folder_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="not 'qwen3_omni_moe'"):
        fetch_checkpoint({"source": "local", "path": str(tmp_path / "empty")}, tmp_path / "out")
    with pytest.raises(CheckpointError, match="no such directory"):
        fetch_checkpoint({"source": "local", "path": str(tmp_path / "nowhere")}, tmp_path / "out")


def _local_copy(src, dest, drop=(), config=None):
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns(MANIFEST, *drop))
    if config is not None:
        (dest / "config.json").write_text(json.dumps(config))
    return dest


@pytest.mark.parametrize("damage, must_say", [
    ("8-byte weights", ["model.safetensors: 8 bytes, not a safetensors file", "preprocessor_config.json is missing"]),
    ("truncated weights", ["model.safetensors: truncated"]),
    ("config of another size", ["tensors disagree with config.json's shapes", "thinker.model.embed_tokens.weight"]),
    ("layers missing", ["tensors that config.json implies are missing", "thinker.model.layers.4."]),
])
def test_local_checkpoint_is_checked_from_headers_and_the_previous_model_survives(tiny_out, tmp_path, damage,
                                                                                 must_say):
    """Finding 4: config.json + an 8-byte model.safetensors replaced the working model; errors named hf.staging."""
    out, manifest = tiny_out
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    config = json.loads((out / "config.json").read_text())
    local = tmp_path / "user_ckpt"
    if damage == "8-byte weights":
        local.mkdir()
        (local / "config.json").write_text(json.dumps(config))
        (local / "model.safetensors").write_bytes(b"\x00" * 8)
    elif damage == "truncated weights":
        _local_copy(out, local)
        with open(local / "model.safetensors", "r+b") as handle:
            handle.truncate(1_000_000)
    elif damage == "config of another size":
        config["thinker_config"]["text_config"]["hidden_size"] *= 2
        _local_copy(out, local, config=config)
    else:
        config["thinker_config"]["text_config"]["num_hidden_layers"] += 2
        _local_copy(out, local, config=config)
    with pytest.raises(CheckpointError) as error:
        fetch_checkpoint({"source": "local", "path": str(local)}, out)
    message = str(error.value)
    print(message)
    assert message.startswith(f"model.path {local}") and "staging" not in message and "fetched" not in message
    for words in must_say:
        assert words in message
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # model + MANIFEST.json untouched
    assert not (out.parent / "hf.fetched").exists() or not any((out.parent / "hf.fetched").iterdir())


def _edit_json(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("damage, must_say", [
    ("tokenizer of a larger vocabulary", "the tokenizer has ids up to 152064 ('<|extra|>') but config.json's "
                                         "thinker_config.text_config.vocab_size is 152064"),
    ("image token id", "config.json thinker_config.image_token_id = 151654 but the tokenizer's '<|image_pad|>' is "
                       "151655"),
    ("merge size", "preprocessor_config.json merge_size = 1 but config.json's thinker_config.vision_config."
                   "spatial_merge_size is 2"),
    ("mel bins", "preprocessor_config.json feature_size = 80 but config.json's thinker_config.audio_config."
                 "num_mel_bins is 128"),
    ("quick_gelu", "config.json thinker_config.vision_config.hidden_act = 'quick_gelu' is not implemented"),
])
def test_local_checkpoint_files_must_agree_with_its_config(tiny_out, tmp_path, damage, must_say):
    """Issue 26 finding 7: these passed the checks and failed mid-convert with a bare KeyError / IndexError."""
    out, _ = tiny_out
    local = _local_copy(out, tmp_path / "user_ckpt")
    if damage == "tokenizer of a larger vocabulary":
        _edit_json(local / "tokenizer.json", lambda t: t["added_tokens"].append(
            {**t["added_tokens"][-1], "id": 152064, "content": "<|extra|>"}))
    elif damage == "image token id":
        _edit_json(local / "config.json", lambda c: c["thinker_config"].update(image_token_id=151654))
    elif damage == "merge size":
        _edit_json(local / "preprocessor_config.json", lambda p: p.update(merge_size=1))
    elif damage == "mel bins":
        _edit_json(local / "preprocessor_config.json", lambda p: p.update(feature_size=80))
    else:
        _edit_json(local / "config.json", lambda c: c["thinker_config"]["vision_config"].update(hidden_act="quick_gelu"))
    check_local_checkpoint(out)  # the intact tiny checkpoint passes the same checks
    with pytest.raises(CheckpointError) as error:
        check_local_checkpoint(local)
    print(error.value)
    assert must_say in str(error.value)


def test_the_checked_vision_activations_are_the_models():
    from omni_model.download import VISION_ACTIVATIONS
    from omni_model.model.vision import _ACTIVATIONS

    assert set(VISION_ACTIVATIONS) == set(_ACTIVATIONS)
