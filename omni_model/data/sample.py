"""The shard sample type, and the loader functions that ``.nv-meta/sample_loader.py`` re-exports to Energon.

Kept free of heavy imports: ``energon info`` imports this module to name the sample type.
"""

from __future__ import annotations

import json

from megatron.energon import Sample, edataclass

MEDIA_LISTS = {"image": "images", "audio": "audios", "video": "videos"}


@edataclass
class OmniSample(Sample):
    """One shard sample: the conversation (``record``; its media lists and ``media_meta`` name tar members) and the
    bytes of those members by name (canonical media, see omni_model.data.media.MEDIA_FORMAT)."""

    record: dict
    media: dict


def member_names(record: dict) -> list[str]:
    """Every media member a shard record names: its media lists, the videos' audio-track members and the codes
    members of its spoken answers (a message's ``speech``)."""
    names = [name for key in MEDIA_LISTS.values() for name in record.get(key, [])]
    names += [video["audio"] for video in (record.get("media_meta") or {}).get("videos", []) if video.get("audio")]
    names += [message["speech"] for message in record.get("messages", []) if message.get("speech")]
    return names


def shard_samples(shards_dir) -> list[dict]:
    """Every sample of every tar of a shards dir, through sample_loader (what Energon's loader gets): for checks and
    benchmarks that read the shards without a loader."""
    import tarfile
    from pathlib import Path

    out = []
    for tar in sorted(Path(shards_dir).glob("*.tar")):
        parts: dict = {}
        with tarfile.open(tar) as handle:
            for member in handle.getmembers():
                key, ext = member.name.split(".", 1)
                parts.setdefault(key, {"__key__": key})[ext] = handle.extractfile(member).read()
        out += [sample_loader(raw) for raw in parts.values()]
    return out


def sample_loader(raw: dict) -> dict:
    """WebDataset parts of one sample -> OmniSample fields (member bytes; decoding is the encoder's job)."""
    record = raw["json"]
    if isinstance(record, (bytes, bytearray, str)):
        record = json.loads(record)
    media = {}
    for member in member_names(record):
        if member not in raw:
            raise ValueError(f"sample {raw.get('__key__')}: member {member} missing from the shard")
        media[member] = raw[member]
    return {"record": record, "media": media}


def part_filter(part: str) -> bool:
    return True
