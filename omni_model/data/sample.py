"""The shard sample type, and the loader functions that ``.nv-meta/sample_loader.py`` re-exports to Energon.

Kept free of heavy imports: ``energon info`` imports this module to name the sample type.
"""

from __future__ import annotations

import json

from megatron.energon import Sample, edataclass

MEDIA_LISTS = {"image": "images", "audio": "audios", "video": "videos"}


@edataclass
class OmniSample(Sample):
    """One shard sample: the canonical conversation (``record``; its media lists name tar members) and the
    original media bytes keyed by (kind, index)."""

    record: dict
    media: dict


def sample_loader(raw: dict) -> dict:
    """WebDataset parts of one sample -> OmniSample fields (media stay raw bytes; decoding is the encoder's job)."""
    record = raw["json"]
    if isinstance(record, (bytes, bytearray, str)):
        record = json.loads(record)
    media = {}
    for kind, key in MEDIA_LISTS.items():
        for index, member in enumerate(record.get(key, [])):
            if member not in raw:
                raise ValueError(f"sample {raw.get('__key__')}: member {member} missing from the shard")
            media[(kind, index)] = raw[member]
    return {"record": record, "media": media}


def part_filter(part: str) -> bool:
    return True
