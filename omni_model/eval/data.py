"""`eval.data`: an extra evaluation set in the formats of `data.raw`, through the same validation (formats + media
probes: omni_model.data.datajuicer.validate) and the same encoding (omni_model.data.shards.write_shards, all samples
in one split) as the training data, but not through the Data-Juicer recipe (no filtering, no dedup against training):
the user's test set is evaluated as given. Its overlap with the training split is counted and reported (conversations
equal to a training one, compared by their messages and media lists)."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path
from typing import Optional

from ..data.formats import LIST_KEY

SPLIT = "train"  # write_shards with val_fraction 0 puts every sample in this split


def conversation_key(record: dict) -> str:
    """Identity of a conversation's content (messages and media paths), whatever its id."""
    content = {"messages": record.get("messages"), **{key: record.get(key, []) for key in LIST_KEY.values()}}
    return hashlib.sha256(json.dumps(content, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def training_keys(processed: Path, shards_dir: Path) -> set:
    """Conversation keys of the training split: the processed records the shards stage kept outside val."""
    from ..data.shards import split_tars

    val_ids = _split_ids(split_tars(Path(shards_dir), "val"))
    keys = set()
    for line in Path(processed).read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            if record["id"] not in val_ids:
                keys.add(conversation_key(record))
    return keys


def _split_ids(tars: list) -> set:
    ids = set()
    for path in tars:
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    ids.add(json.loads(tar.extractfile(member).read())["id"])
    return ids


def prepare_eval_data(raw: Path, out_dir: Path, hf_dir: Path, training_processed: Path, training_shards: Path, *,
                      fmt: str = "auto", max_seq_len: int = 4096, media_overrides: Optional[dict] = None) -> dict:
    """Validate and encode `raw` into out_dir/{processed.jsonl, shards/, report.json}; returns the report (input,
    kept, dropped with reasons from validation and encoding, overlap with the training split)."""
    from ..data.datajuicer import validate
    from ..data.shards import write_shards

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records, drops, total = validate(Path(raw), fmt)
    processed = out_dir / "processed.jsonl"
    processed.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    (out_dir / "validate_drops.jsonl").write_text("".join(json.dumps(d) + "\n" for d in drops))
    shards = write_shards(processed, out_dir / "shards", hf_dir, previous_drops=out_dir / "validate_drops.jsonl",
                          input_count=total, val_fraction=0.0, max_seq_len=max_seq_len,
                          media_overrides=media_overrides)
    seen = training_keys(training_processed, training_shards)
    overlap = sorted(r["id"] for r in records if conversation_key(r) in seen)
    report = {"input": total, "kept": shards["kept"], "dropped": shards["dropped"],
              "dropped_by_stage_op": shards["dropped_by_stage_op"],
              "overlap_with_training": {"samples": len(overlap), "ids": overlap}}
    (out_dir / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    return report
