"""The ``shards`` stage: processed.jsonl -> WebDataset tars + Energon ``.nv-meta/`` (train/val split).

One WebDataset sample = ``<key>.json`` (the canonical conversation; its ``images``/``audios``/``videos`` lists name
the sample's media members, the original paths are kept under ``source``, ``media_format`` and ``media_meta`` say
how the media are stored) + the media in the form training uses them (media.MEDIA_FORMAT, written by
``OmniEncoder.canonical_members`` from the decode that counted the tokens): ``<key>.image0.png`` (original bytes),
``<key>.audio0.flac`` or ``.npy`` (the 16 kHz mono waveform: FLAC when it is 24-bit exact, else float32 .npy),
``<key>.video0.png`` (the sampled frames at the model's frame size, stacked; their times in ``media_meta``) and
``<key>.video0.npy``/``.flac`` (its audio track, when audio-in-video is on).
The loader needs soundfile and PIL only: no resampling, no video container.

Spoken answers (an assistant message with ``speech``, formats.py): per spoken turn, in order, a member
``<key>.speech<k>.npy`` holds the talker's codec codes, int16 ``[num_code_groups, frames]`` (numpy .npy, no pickle;
data.speech: frames at the checkpoint's 12.5 Hz, every code below the checkpoint's code range), made by the codec of
``model.codec`` from the clip resampled to 24 kHz mono. In the json that message's ``speech`` names the member,
``media_meta.speech`` lists ``{"turn": message index, "frames", "samples": the clip's 24 kHz length}`` per spoken
answer and ``source.speech`` the original paths. ``.nv-meta/speech.json`` (speech.SPEECH_FILE) records the codec
(folder, sha256 of its files, model type), the code layout and the counts; it exists only when some kept sample
speaks. A sample without speech is written exactly as before (no new key, member or file).

Before a sample is written its token count after pad expansion is computed from the media headers (image size, audio
length, video duration -> frames; no pixel or mel work) and an over-long sample is dropped without decoding; then
every medium is fully decoded and the exact count taken with the training encoder (tokenizer + preprocessor config of
the checkpoint): samples whose media cannot be decoded or used by the encoder (stage ``shards``, op ``decode``: also
audio shorter than media.min_audio_samples, and an unreadable or undecodable spoken answer), that exceed
``max_seq_len`` (op ``max_seq_len``; also the talker's sequence of a spoken answer, speech.talker_length, from the
clip's header before decoding), whose speech the codec fails on (op ``codec``) or fail otherwise (op ``encode``) are
dropped here with the reason, never at training time. Speech at another rate is resampled, not dropped.

Outputs in ``out_dir``: ``train-NNNNNN.tar``, ``val-NNNNNN.tar``, ``.nv-meta/`` (written non-interactively with
Energon's own preparator: split.yaml, index; dataset.yaml with sample type
``omni_model.data.sample.OmniSample`` and sample_loader.py), ``drops.jsonl`` (every drop of every
stage: the datajuicer stage's drops followed by this stage's) and ``report.json`` (counts; input = kept + dropped).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

from ..runtime.logs import progress
from .formats import LIST_KEY, MEDIA_KINDS, count_drops, drop_entry, media_member
from .speech import SPEECH_FILE, speech_turns

log = logging.getLogger(__name__)

DATASET_YAML = {
    "sample_type": {"__module__": "omni_model.data.sample", "__class__": "OmniSample"},
    "sample_loader": "sample_loader.py:sample_loader",
    "part_filter": "sample_loader.py:part_filter",
}
SAMPLE_LOADER_PY = (
    "# Written by omni-pipeline's shards stage: the loader of omni_model.data.sample (member bytes, no decoding).\n"
    "from omni_model.data.sample import part_filter, sample_loader  # noqa: F401\n"
)


@dataclass
class ShardItem:
    """One processed record's outcome: its WebDataset parts (``json`` + media members; no ``__key__``) and token
    count, or its drop entry."""

    id: str
    parts: dict | None = None
    n_tokens: int = 0
    drop: dict | None = None
    speech_frames: tuple = ()  # frames of each of its spoken answers


def shard_item(record: dict, encoder, layout=None, codec=None) -> ShardItem:
    """Processed record -> its shard parts with canonical media, or why it is dropped. Depends only on the record,
    the media files it names, the encoder (``OmniEncoder``: its settings decide) and, for spoken answers, the
    checkpoint's code layout (``speech.TalkerCodes``) and the codec (``speech.SpeechCodec``), so any executor can map
    it; keys and the train/val split are assigned by the writer. A spoken answer that fits but has no codec to
    encode it raises speech.MissingCodec (the stage stops: a setting is missing, not a sample bad)."""
    from .encoder import OverLongSample
    from .media import MediaError, error_text
    from .speech import CodecError, MissingCodec

    sid = record["id"]
    media, names = {}, {}
    try:
        for kind in MEDIA_KINDS:
            for index, path in enumerate(record.get(LIST_KEY[kind], [])):
                try:
                    media[(kind, index)] = Path(path).read_bytes()
                except OSError as exc:
                    raise MediaError(f"cannot read {kind} {path}: {exc}") from None
                names[(kind, index)] = media_member(kind, index, path)
        try:  # cheap first: the count from the media headers; an over-long sample is never decoded
            encoder.check_length(record, media)
        except OverLongSample as exc:
            return ShardItem(sid, drop=drop_entry(sid, "shards", "max_seq_len", f"{exc} (from the media headers)"))
        decoded = encoder.decode(record, media, names=names)
        n_tokens = encoder.count_tokens(record, decoded)
        if n_tokens > encoder.max_seq_len:
            return ShardItem(sid, drop=drop_entry(
                sid, "shards", "max_seq_len",
                f"{n_tokens} tokens after media expansion > max_seq_len {encoder.max_seq_len}"))
        members, fields = encoder.canonical_members(record, media, decoded)
        spoken = speech_parts(record, n_tokens, layout, codec, encoder.max_seq_len) if speech_turns(record) else None
    except OverLongSample as exc:  # the talker's sequence (speech_parts)
        return ShardItem(sid, drop=drop_entry(sid, "shards", "max_seq_len", str(exc)))
    except MediaError as exc:
        return ShardItem(sid, drop=drop_entry(sid, "shards", "decode", str(exc)))
    except CodecError as exc:
        return ShardItem(sid, drop=drop_entry(sid, "shards", "codec", str(exc)))
    except MissingCodec:  # a setting, not this sample: the stage stops
        raise
    except Exception as exc:  # any other failure on this sample (its template, a codec): its drop, not the stage's end
        return ShardItem(sid, drop=drop_entry(sid, "shards", "encode", error_text(exc)))
    document = {**{k: v for k, v in record.items() if k not in LIST_KEY.values()}, **fields, "num_tokens": n_tokens,
                "source": {LIST_KEY[kind]: record.get(LIST_KEY[kind], []) for kind in MEDIA_KINDS}}
    if spoken is not None:  # spoken answers: codes members, messages naming them, their meta and original paths
        document["messages"], document["media_meta"]["speech"] = spoken.messages, spoken.meta
        document["source"]["speech"] = [path for _, path in speech_turns(record)]
        members.update(spoken.members)
    return ShardItem(sid, {"json": json.dumps(document, ensure_ascii=False).encode(), **members}, n_tokens,
                     speech_frames=tuple(entry["frames"] for entry in spoken.meta) if spoken else ())


@dataclass
class SpokenParts:
    """A record's spoken answers in shard form: ``speech<k>.npy`` members (int16 codes [groups, frames]), the
    messages with each ``speech`` path replaced by its member's name, and per answer ``{"turn", "frames",
    "samples"}`` (samples: the clip's length at speech.SPEECH_RATE)."""

    members: dict
    messages: list
    meta: list


def speech_parts(record: dict, n_tokens: int, layout, codec, max_seq_len: int) -> SpokenParts:
    """Encode a record's spoken answers with the codec. Raises OverLongSample when the talker's sequence
    (speech.talker_length: the thinker's tokens + frames + control positions) exceeds ``max_seq_len`` -- from the
    clips' headers, before decoding --, MediaError for a clip that cannot be read or decoded, CodecError when the
    codec fails, MissingCodec when the answers fit but there is no codec."""
    from .encoder import OverLongSample
    from .media import MediaError
    from .speech import CodecError, MissingCodec, load_speech, speech_samples, talker_length, write_codes

    turns, clips = speech_turns(record), []
    for turn, path in turns:
        try:
            clips.append(Path(path).read_bytes())
        except OSError as exc:
            raise MediaError(f"cannot read the speech of turn {turn} {path}: {exc}") from None

    def named(turn, path, fn, *args):
        try:
            return fn(*args)
        except (MediaError, CodecError) as exc:
            raise type(exc)(f"speech of turn {turn} ({Path(path).name}): {exc}") from None

    frames = [layout.frames_of(named(turn, path, speech_samples, data)) for (turn, path), data in zip(turns, clips)]
    length = talker_length(n_tokens, frames)
    if length > max_seq_len:
        raise OverLongSample(f"talker sequence of {length} positions ({n_tokens} tokens + {sum(frames)} speech frames "
                             f"at {layout.frame_rate:g}/s + control positions) > max_seq_len {max_seq_len} "
                             "(from the speech headers)")
    if codec is None:
        raise MissingCodec(f"sample {record['id']} has a spoken answer but no speech codec is configured: set "
                           "model.codec (a Mimi-style codec folder or hub id, see config/schema.yaml), or remove the "
                           "assistant audio from the data")
    messages = [dict(message) for message in record["messages"]]
    members, meta = {}, []
    for k, ((turn, path), data) in enumerate(zip(turns, clips)):
        wave = named(turn, path, load_speech, data)
        codes = named(turn, path, codec.encode, wave)
        name = f"speech{k}.npy"
        members[name], messages[turn]["speech"] = write_codes(codes), name
        meta.append({"turn": turn, "frames": int(codes.shape[1]), "samples": int(len(wave))})
    return SpokenParts(members, messages, meta)


@functools.lru_cache(maxsize=2)
def _encoder(hf_dir: str, max_seq_len: int, media_overrides: tuple):
    """One OmniEncoder per Ray worker process and settings, built for its first task (workers live for one run)."""
    from .encoder import OmniEncoder

    return OmniEncoder(Path(hf_dir), max_seq_len=max_seq_len, **dict(media_overrides))


@functools.lru_cache(maxsize=2)
def _speech(hf_dir: str, codec_dir: str | None):
    """One (layout, codec) per Ray worker process and codec."""
    return speech_setup(Path(hf_dir), None if codec_dir is None else Path(codec_dir))


def speech_setup(hf_dir: Path, codec_dir: Path | None) -> tuple:
    """(the checkpoint's code layout, the codec or None) for data with spoken answers. Raises CodecError when the
    checkpoint cannot speak or the codec does not fit it."""
    from .speech import SpeechCodec, TalkerCodes

    layout = TalkerCodes.from_config(hf_dir)
    return layout, (None if codec_dir is None else SpeechCodec(codec_dir, layout))


def _shard_items(records: list[dict], hf_dir: str, max_seq_len: int, media_overrides: tuple,
                 codec_dir: str | None = None) -> list[ShardItem]:
    """shard_item over a chunk of records: the unit of work of one Ray task (data.executor ray)."""
    encoder = _encoder(hf_dir, max_seq_len, media_overrides)
    layout, codec = _speech(hf_dir, codec_dir) if any(speech_turns(record) for record in records) else (None, None)
    return [shard_item(record, encoder, layout, codec) for record in records]


def safe_key(sample_id: str, used: set) -> str:
    """A WebDataset key (no dots: WebDataset splits member names at the first dot), unique in the dataset."""
    key = re.sub(r"[^A-Za-z0-9_-]", "_", sample_id)[:120] or "sample"
    candidate, n = key, 1
    while candidate in used:
        n += 1
        candidate = f"{key}_{n}"
    used.add(candidate)
    return candidate


def is_val(sample_id: str, seed: int, val_fraction: float) -> bool:
    digest = hashlib.sha256(f"{seed}:{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


def write_shards(processed_path: Path, out_dir: Path, hf_dir: Path, *, previous_drops: Path | None = None,
                 max_samples: int = 64, max_bytes: int = 64 << 20, val_fraction: float = 0.1, seed: int = 0,
                 max_seq_len: int = 4096, input_count: int | None = None, media_overrides: dict | None = None,
                 workers: int = 1, executor: str = "default", ray_address: str | None = None,
                 codec_dir: Path | None = None) -> dict:
    """Write the shards and the Energon metadata; returns the report (also written to report.json).

    ``codec_dir``: the speech codec (the codec rule's folder) that encodes spoken answers into the talker's codes;
    a spoken answer that fits the talker's limit and has no codec stops the stage (speech.MissingCodec).

    ``executor``: ``default`` runs ``shard_item`` (decoding, token counts, canonical media) in this process; ``ray``
    fans it out over Ray tasks on the cluster at ``ray_address`` (``None``: a local Ray with ``workers`` CPUs) and
    writes the items in input order, so the shards hold the same samples. The checkpoint and the media must be
    readable at the same paths on every Ray node."""
    import webdataset as wds

    from .encoder import OmniEncoder

    started = time.time()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in list(out_dir.glob("*.tar")):
        old.unlink()
    encoder = OmniEncoder(hf_dir, max_seq_len=max_seq_len, **(media_overrides or {}))
    records = [json.loads(line) for line in Path(processed_path).read_text(encoding="utf-8").splitlines() if line.strip()]
    # spoken answers: the checkpoint's code layout and the codec (text-only data loads neither)
    layout, codec = speech_setup(hf_dir, codec_dir) if any(speech_turns(r) for r in records) else (None, None)
    encoder_args = (str(hf_dir), max_seq_len, tuple(sorted((media_overrides or {}).items())),  # for Ray workers
                    None if codec is None else str(codec_dir))
    split = {r["id"]: is_val(r["id"], seed, val_fraction) for r in records}
    if val_fraction > 0 and len(records) >= 2:  # both splits non-empty, deterministically
        if all(split.values()):
            split[records[0]["id"]] = False
        if not any(split.values()):
            split[min(split, key=lambda sid: hashlib.sha256(f"{seed}:{sid}".encode()).hexdigest())] = True

    drops: list[dict] = []
    writers = {name: wds.ShardWriter(str(out_dir / f"{name}-%06d.tar"), maxcount=max_samples, maxsize=max_bytes,
                                     verbose=0) for name in ("train", "val")}
    counts = {"train": 0, "val": 0}
    tokens = {"train": 0, "val": 0}
    speech = {"answers": 0, "frames": 0}  # kept spoken answers
    used_keys: set = set()
    items = iter(())
    try:
        if executor == "ray":
            from .ray_executor import ray_map

            items = ray_map(_shard_items, records, args=encoder_args, address=ray_address, num_cpus=workers)
        elif executor == "default":
            items = (shard_item(record, encoder, layout, codec) for record in records)
        else:
            raise ValueError(f"data.executor must be one of default, ray, got {executor!r}")
        for item in progress(items, total=len(records), every=100, what="samples", log=log):  # lines + rate, ETA
            if item.drop is not None:
                drops.append(item.drop)
                continue
            name = "val" if split[item.id] else "train"
            writers[name].write({"__key__": safe_key(item.id, used_keys), **item.parts})
            counts[name] += 1
            tokens[name] += item.n_tokens
            speech["answers"] += len(item.speech_frames)
            speech["frames"] += sum(item.speech_frames)
    finally:
        if hasattr(items, "close"):  # a failed run stops its Ray session now, not when the generator is collected
            items.close()
        for writer in writers.values():
            writer.close()

    shards = sorted(p.name for p in out_dir.glob("*.tar"))
    for path in list(out_dir.glob("*.tar")):  # an empty split leaves an empty tar behind
        if not _tar_has_members(path):
            path.unlink()
            shards.remove(path.name)
    if not shards:
        raise RuntimeError("no sample survived: nothing to write (see drops)")
    prepare_energon(out_dir, shards, workers=workers)
    settings = encoder.settings()
    (out_dir / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")
    speech_settings = None
    if speech["answers"]:  # what the codes were made with, for the talker stage (speech.read_speech_settings)
        speech_settings = {**codec.settings(), **speech}
        (out_dir / SPEECH_FILE).write_text(json.dumps(speech_settings, indent=2) + "\n")

    all_drops = []
    if previous_drops is not None and Path(previous_drops).is_file():
        all_drops = [json.loads(l) for l in Path(previous_drops).read_text().splitlines() if l.strip()]
    all_drops += drops
    with open(out_dir / "drops.jsonl", "w", encoding="utf-8") as handle:
        for drop in all_drops:
            handle.write(json.dumps(drop, ensure_ascii=False) + "\n")
    report = {
        "input": input_count if input_count is not None else len(records) + len(all_drops) - len(drops),
        "kept": counts["train"] + counts["val"],
        "dropped": len(all_drops),
        "train": counts["train"],
        "val": counts["val"],
        "tokens": tokens,
        "shards": shards,
        "dropped_by_stage_op": count_drops(all_drops),
        "media_format": settings["media_format"],
        "encoder_settings": settings,
        "speech": speech_settings,
        "seconds": round(time.time() - started, 2),
    }
    if report["input"] != report["kept"] + report["dropped"]:
        raise RuntimeError(f"drop accounting broken: {report}")
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    log.info("shards report: %s", json.dumps(report))
    return report


SETTINGS_FILE = ".nv-meta/encoder_settings.json"


class ShardSettingsError(ValueError):
    """Shards written with other encoder settings than the ones training uses."""


def check_shard_settings(shards_dir: Path, settings: dict) -> None:
    """Refuse shards whose recorded encoder settings differ from ``settings`` (``OmniEncoder.settings()`` of the
    training task encoder): the shards stage dropped over-long / undecodable samples and counted tokens with its
    settings, so other settings silently change what is trained on. A larger ``max_seq_len`` than the shards' is
    fine (every kept sample still fits). Raises ShardSettingsError with one line per differing setting."""
    path = Path(shards_dir) / SETTINGS_FILE
    if not path.is_file():
        raise ShardSettingsError(f"{shards_dir}: no {SETTINGS_FILE}; the shards predate recorded settings, rerun "
                                 "the shards stage")
    recorded = json.loads(path.read_text())
    if recorded.get("media_format") != settings.get("media_format"):  # a different layout, not a different limit
        raise ShardSettingsError(
            f"{shards_dir} stores media as {recorded.get('media_format') or 'original files (before canonical media)'}"
            f", training reads {settings.get('media_format')}: rerun the shards stage (it rewrites the media in the "
            "form training reads)")
    lines = []
    for key in sorted(set(recorded) | set(settings)):
        mine, theirs = settings.get(key), recorded.get(key)
        if key == "max_seq_len" and mine is not None and theirs is not None and mine >= theirs:
            continue
        if mine != theirs:
            lines.append(f"  {key}: shards {theirs!r}, training {mine!r}")
    if lines:
        raise ShardSettingsError(f"{shards_dir} was written with other encoder settings than training uses "
                                 f"(rerun the shards stage with these settings):\n" + "\n".join(lines))


def _tar_has_members(path: Path) -> bool:
    import tarfile

    with tarfile.open(path) as tar:
        return tar.next() is not None


def split_tars(shards_dir: Path, split: str) -> list[Path]:
    """The tar files of one split, in order, as Energon reads them from .nv-meta/split.yaml (its part names are
    brace patterns: `train-{000000..000002}.tar`)."""
    import yaml
    from braceexpand import braceexpand

    parts = yaml.safe_load((Path(shards_dir) / ".nv-meta/split.yaml").read_text())["split_parts"].get(split) or []
    return [Path(shards_dir) / name for part in parts for name in braceexpand(part)]


def prepare_energon(out_dir: Path, shards: list[str], workers: int = 1) -> None:
    """Energon metadata without prompts: index + split.yaml by Energon's own preparator, dataset.yaml for crude samples."""
    import yaml
    from megatron.energon.flavors.webdataset.prepare import WebdatasetPreparator

    meta = out_dir / ".nv-meta"
    if meta.exists():
        for item in sorted(meta.rglob("*"), reverse=True):
            item.unlink() if item.is_file() else item.rmdir()
    patterns = [(name, rf"^{name}-.*\.tar$") for name in ("train", "val") if any(s.startswith(name) for s in shards)]
    WebdatasetPreparator.prepare_dataset(out_dir, shards, split_parts_patterns=patterns, workers=max(1, workers),
                                         shuffle_seed=None)
    (meta / "sample_loader.py").write_text(SAMPLE_LOADER_PY)
    (meta / "dataset.yaml").write_text(yaml.safe_dump(DATASET_YAML, sort_keys=False))
