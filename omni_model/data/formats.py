"""Input chat formats -> one canonical record, with precise reasons for everything that cannot be used.

Accepted jsonl lines (media paths relative to the jsonl file or absolute):

* OpenAI / ms-swift ``messages``: ``{"messages": [{"role": "system|user|assistant", "content": "..."}],
  "images": [...], "audios": [...], "videos": [...]}`` with ``<image>``/``<audio>``/``<video>`` tags in content.
  ``content`` may also be a list of OpenAI-style parts: ``{"type": "text", "text": ...}``,
  ``{"type": "image", "image": path}`` (also ``image_url``/``audio``/``input_audio``/``video``), which are turned into
  tags + media lists in order.
* ShareGPT / LLaMA-Factory ``conversations``: ``[{"from": "human|user|gpt|assistant|system", "value": "..."}]``,
  optional top-level ``system``, same media lists and tags.

Spoken answers (speech the talker is trained to say; data.speech): an assistant turn may carry its speech as

* ``messages``: an audio part in its content list, ``{"role": "assistant", "content": [{"type": "text", "text":
  "..."}, {"type": "audio", "audio": "answer.wav"}]}`` (also ``input_audio``/``audio_url`` with ``{"url"|"path":
  ...}``), or OpenAI's assistant-audio key ``{"role": "assistant", "content": "...", "audio": "answer.wav"}``
  (``{"path"|"url": ...}`` too; inline base64 ``data`` is not supported);
* ShareGPT: the same ``audio`` key on the answer, ``{"from": "gpt", "value": "...", "audio": "answer.wav"}``.

One spoken answer per assistant turn, any sample rate and channel count (resampled to the codec's 24 kHz mono), and
the turn's text is required: it is the transcript the thinker is trained on and the talker speaks. ``<audio>`` tags
in assistant text stay an error (tags mark input media).

The canonical record (what processed.jsonl and the shards hold) is the ``messages`` form::

    {"id": str, "messages": [{"role": ..., "content": "text with <image>/<audio>/<video> tags"}],
     "images": [abs path...], "audios": [...], "videos": [...]}

with ``"speech": abs path`` on a spoken assistant message (no key otherwise). The k-th tag of a kind in reading
order refers to the k-th entry of that kind's list.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

MEDIA_KINDS = ("image", "audio", "video")
LIST_KEY = {"image": "images", "audio": "audios", "video": "videos"}
TAG = {kind: f"<{kind}>" for kind in MEDIA_KINDS}
TAG_RE = re.compile(r"<(image|audio|video)>")

ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
}


class InvalidSample(ValueError):
    """A sample that cannot be used; ``str(exc)`` is the precise reason written to drops.jsonl, ``op`` the check."""

    def __init__(self, reason: str, op: str = "structure"):
        super().__init__(reason)
        self.op = op


@dataclass
class RawLine:
    """One jsonl line with its position (for ids and messages)."""

    line_no: int  # 1-based
    text: str


def read_lines(path: Path) -> Iterator[RawLine]:
    with open(path, encoding="utf-8") as handle:
        for line_no, text in enumerate(handle, start=1):
            if text.strip():
                yield RawLine(line_no, text)


def detect_format(obj: dict) -> str:
    if isinstance(obj.get("messages"), list):
        return "messages"
    if isinstance(obj.get("conversations"), list):
        return "sharegpt"
    raise InvalidSample("no 'messages' or 'conversations' list in the sample")


def sample_id(obj, line_no: int) -> str:
    """Stable id: the input's own ``id`` if it has one, else ``line<N>`` (1-based line number of the jsonl)."""
    if isinstance(obj, dict):
        for key in ("id", "sample_id", "uid"):
            value = obj.get(key)
            if isinstance(value, (str, int)) and str(value).strip():
                return str(value)
    return f"line{line_no}"


def _content_to_text(content, media: dict[str, list], turn: int) -> str:
    """Normalise a message content (string or list of parts) to text with tags, appending inline media."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if not isinstance(content, list):
        raise InvalidSample(f"turn {turn}: content must be a string or a list of parts, got {type(content).__name__}")
    pieces = []
    for part in content:
        if isinstance(part, str):
            pieces.append(part)
            continue
        if not isinstance(part, dict) or "type" not in part:
            raise InvalidSample(f"turn {turn}: content part without a 'type'")
        kind = part["type"]
        if kind == "text":
            pieces.append(str(part.get("text", "")))
            continue
        kind = PART_KINDS.get(kind, kind)
        if kind not in MEDIA_KINDS:
            raise InvalidSample(f"turn {turn}: unsupported content part type {part['type']!r}")
        media[kind].append(_part_path(part.get(kind, part.get(part["type"])), kind, turn))
        pieces.append(TAG[kind])
    return "".join(pieces)


PART_KINDS = {"image_url": "image", "input_audio": "audio", "audio_url": "audio", "video_url": "video"}


def _part_path(value, kind: str, turn: int) -> str:
    """The path of a media part's value: a string, or ``{"url": ...}`` / ``{"path": ...}``."""
    if isinstance(value, dict):  # {"url": ...} / {"data": ..., "format": ...}
        value = value.get("url", value.get("path"))
    if not isinstance(value, str) or not value:
        raise InvalidSample(f"turn {turn}: {kind} part has no path (inline data is not supported)")
    return value


def _split_speech(content, turn: dict, index: int):
    """An assistant turn -> (its content without the spoken answer, the speech path or None). The spoken answer is
    an audio part of the content list or the message's own ``audio`` key (OpenAI's assistant-audio form; also the
    ShareGPT form's, beside ``value``)."""
    speech = []
    if isinstance(content, list):
        kept = []
        for part in content:
            kind = PART_KINDS.get(part.get("type"), part.get("type")) if isinstance(part, dict) else None
            if kind == "audio":
                speech.append(_part_path(part.get("audio", part.get(part["type"])), "audio", index))
            else:
                kept.append(part)
        content = kept
    if turn.get("audio") is not None:
        speech.append(_part_path(turn["audio"], "audio", index))
    if len(speech) > 1:
        raise InvalidSample(f"turn {index}: {len(speech)} spoken answers in one assistant turn (one audio at most)")
    return content, (speech[0] if speech else None)


def parse_sample(obj, line_no: int, fmt: str = "auto", base_dir: Path | None = None) -> dict:
    """Parse and validate one decoded jsonl object into the canonical record. Raises InvalidSample.

    Checks, each with its own reason: format, roles and their order (optional system first, then user/assistant
    alternating, starting with user, ending with assistant), empty assistant turns, media tags in assistant turns,
    tag count == media count per kind, media files present (and not empty).
    """
    if not isinstance(obj, dict):
        raise InvalidSample(f"line is JSON {type(obj).__name__}, not an object")
    detected = detect_format(obj)
    if fmt != "auto" and fmt != detected:
        raise InvalidSample(f"format is set to {fmt!r} but the sample is {detected!r}")

    media: dict[str, list] = {}
    for kind in MEDIA_KINDS:
        listed = obj.get(LIST_KEY[kind]) or []
        if isinstance(listed, str):
            listed = [listed]
        if not isinstance(listed, list) or not all(isinstance(p, str) and p for p in listed):
            raise InvalidSample(f"'{LIST_KEY[kind]}' must be a list of paths")
        media[kind] = list(listed)

    messages = []
    system = obj.get("system")
    if isinstance(system, str) and system.strip():
        messages.append({"role": "system", "content": system})
    turns = obj["messages"] if detected == "messages" else obj["conversations"]
    role_key, content_key = ("role", "content") if detected == "messages" else ("from", "value")
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise InvalidSample(f"turn {index}: not an object")
        raw_role = turn.get(role_key)
        role = ROLE_ALIASES.get(str(raw_role).lower()) if raw_role is not None else None
        if role is None:
            raise InvalidSample(f"turn {index}: unknown role {raw_role!r}")
        content, speech = _split_speech(turn.get(content_key), turn, index) if role == "assistant" else \
            (turn.get(content_key), None)
        message = {"role": role, "content": _content_to_text(content, media, index)}
        if speech is not None:
            if not message["content"].strip():
                raise InvalidSample(f"spoken answer without its text (turn {index}): the talker speaks the "
                                    "thinker's text, give the transcript as the turn's text")
            message["speech"] = speech
        messages.append(message)

    _check_roles(messages)
    _check_tags(messages, media)
    record = {"id": sample_id(obj, line_no), "messages": messages}
    for kind in MEDIA_KINDS:
        record[LIST_KEY[kind]] = [_resolve(path, kind, base_dir) for path in media[kind]]
    for message in messages:
        if "speech" in message:
            message["speech"] = _resolve(message["speech"], "speech", base_dir)
    return record


def _check_roles(messages: list[dict]) -> None:
    if not messages:
        raise InvalidSample("no turns")
    body = messages[1:] if messages[0]["role"] == "system" else messages
    for index, message in enumerate(messages):
        if message["role"] == "system" and index != 0:
            raise InvalidSample(f"wrong role order: 'system' at turn {index}, only allowed first")
    if not body:
        raise InvalidSample("no user/assistant turns")
    offset = len(messages) - len(body)
    for index, message in enumerate(body):
        expected = "user" if index % 2 == 0 else "assistant"
        if message["role"] != expected:
            previous = body[index - 1]["role"] if index else "start"
            raise InvalidSample(
                f"wrong role order: turn {index + offset} is {message['role']!r} after {previous!r} "
                f"(expected {expected!r})")
    if body[-1]["role"] != "assistant":
        raise InvalidSample("wrong role order: last turn is 'user', no assistant answer to train on")
    for index, message in enumerate(messages):
        if message["role"] == "assistant":
            if not message["content"].strip():
                raise InvalidSample(f"empty assistant turn (turn {index})")
            found = TAG_RE.search(message["content"])
            if found:
                raise InvalidSample(f"media tag {found.group(0)} in assistant turn {index} (input media only; a "
                                    "spoken answer is an audio part of the assistant message)")


def _check_tags(messages: list[dict], media: dict[str, list]) -> None:
    for kind in MEDIA_KINDS:
        tags = sum(m["content"].count(TAG[kind]) for m in messages)
        if tags != len(media[kind]):
            raise InvalidSample(
                f"tag/media count mismatch: {tags} {TAG[kind]} tag(s) but {len(media[kind])} {LIST_KEY[kind]}")


def _resolve(path: str, kind: str, base_dir: Path | None) -> str:
    candidate = Path(path)
    if not candidate.is_absolute() and base_dir is not None:
        candidate = base_dir / candidate
    candidate = candidate.resolve()
    if not candidate.is_file():
        raise InvalidSample(f"missing {kind} file: {path}", op="media")
    if candidate.stat().st_size == 0:
        raise InvalidSample(f"empty {kind} file (0 bytes): {path}", op="media")
    return str(candidate)


def load_raw(path: Path, fmt: str = "auto") -> tuple[list[dict], list[dict], int]:
    """Read a raw jsonl: (valid canonical records, drop entries, number of input lines).

    Every non-blank line is either a record or a drop (stage ``validate``); ids are made unique (a repeated input
    id gets ``#line<N>`` appended) so that the drop report and the shards never confuse two samples.
    """
    path = Path(path)
    records, drops, seen, total = [], [], set(), 0
    for raw in read_lines(path):
        total += 1
        try:
            obj = json.loads(raw.text)
        except json.JSONDecodeError as exc:
            drops.append(drop_entry(f"line{raw.line_no}", "validate", "parse", f"invalid JSON: {exc.msg} at column {exc.colno}"))
            continue
        sid = sample_id(obj, raw.line_no)
        if sid in seen:
            sid = f"{sid}#line{raw.line_no}"
        seen.add(sid)
        try:
            record = parse_sample(obj, raw.line_no, fmt, base_dir=path.parent)
        except InvalidSample as exc:
            drops.append(drop_entry(sid, "validate", exc.op, str(exc)))
            continue
        record["id"] = sid
        records.append(record)
    return records, drops, total


def media_member(kind: str, index: int, path: str) -> str:
    """The name a medium is called by in decode errors (``image0.png (file.png): ...``)."""
    suffix = Path(path).suffix.lower().lstrip(".") or "bin"
    return f"{kind}{index}.{suffix}"


def drop_entry(sid: str, stage: str, op: str, reason: str) -> dict:
    """One line of drops.jsonl."""
    return {"id": sid, "stage": stage, "op": op, "reason": reason}


def count_drops(drops: list[dict]) -> dict:
    """Drops per "stage/op", for the stage reports."""
    counts: dict = {}
    for drop in drops:
        key = f"{drop['stage']}/{drop['op']}"
        counts[key] = counts.get(key, 0) + 1
    return counts


def media_tag_order(record: dict) -> list[tuple[str, int]]:
    """(kind, index into that kind's list) for every tag, in reading order over all messages."""
    counters = {kind: 0 for kind in MEDIA_KINDS}
    order = []
    for message in record["messages"]:
        for match in TAG_RE.finditer(message["content"]):
            kind = match.group(1)
            order.append((kind, counters[kind]))
            counters[kind] += 1
    return order
