"""Qwen3-Omni chat rendering and tokenisation with training labels.

The layout is the RELEASED Qwen3-Omni chat template (tests/fixtures/qwen3_omni_chat_template.jinja, provenance in
tests/fixtures/README.md) applied to the parts form of a conversation (content as a list of text/image/audio/video
parts, the form Qwen3-Omni's processor and inference code use), ChatML::

    <|im_start|>{role}\\n{content}<|im_end|>\\n   (per message)

with each ``<image>``/``<audio>``/``<video>`` tag of the content replaced, where it stands, by
``<|vision_start|><|image_pad|><|vision_end|>``, ``<|audio_start|><|audio_pad|><|audio_end|>`` or
``<|vision_start|><|video_pad|><|vision_end|>``; no default system prompt. A first system message that holds media is
written part by part, one system turn per text run or medium, as the released template does. ``render`` must equal
the released template on ``to_parts(messages)`` token for token (tests/test_template_released.py).

Where we deliberately differ from the released template, for training:

* ``<think>...</think>`` inside an assistant answer is kept verbatim. On parts-form conversations the released
  template drops the reasoning of every assistant turn (its last-user-turn search only looks at string contents), so
  training data rendered by it would teach the model never to reason.
* On string-content conversations the released template writes an empty ``<think>\\n\\n</think>\\n\\n`` before the
  last assistant answer; the Instruct model's generation prompt is ``<|im_start|>assistant\\n`` and it answers without
  that block, so we do not train on it (the parts form, which we follow, has no such block either).

Labels: the token ids of every assistant turn's content and its ``<|im_end|>``; everything else (system, user,
the ``<|im_start|>assistant\\n`` header, the ``\\n`` after ``<|im_end|>``, media pads) is -100.
Single pads are expanded to the encoder output length after tokenisation (special tokens are atomic, so this is the
same as expanding the text first, as the HF processor does).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .formats import TAG_RE

IGNORE_INDEX = -100

PLACEHOLDER = {
    "image": "<|vision_start|><|image_pad|><|vision_end|>",
    "audio": "<|audio_start|><|audio_pad|><|audio_end|>",
    "video": "<|vision_start|><|video_pad|><|vision_end|>",
}


def to_parts(messages: list[dict]) -> list[dict]:
    """Canonical messages (content with tags) -> the parts form chat templates take."""
    out = []
    for message in messages:
        parts, last = [], 0
        for match in TAG_RE.finditer(message["content"]):
            if match.start() > last:
                parts.append({"type": "text", "text": message["content"][last:match.start()]})
            parts.append({"type": match.group(1)})
            last = match.end()
        if last < len(message["content"]):
            parts.append({"type": "text", "text": message["content"][last:]})
        out.append({"role": message["role"], "content": parts})
    return out


def _turns(messages: list[dict]):
    """(role, body) of every ChatML turn the released template writes, media tags replaced by their placeholders."""
    for index, message in enumerate(messages):
        if index == 0 and message["role"] == "system":
            # The released template writes each part of a first system message as a system turn of its own.
            for part in to_parts([message])[0]["content"]:
                yield "system", part["text"] if part["type"] == "text" else PLACEHOLDER[part["type"]]
        else:
            yield message["role"], TAG_RE.sub(lambda m: PLACEHOLDER[m.group(1)], message["content"])


def render(messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """(prompt text with single pads, character spans to train on)."""
    pieces, spans, pos = [], [], 0
    for role, body in _turns(messages):
        header = f"<|im_start|>{role}\n"
        end = "<|im_end|>"
        start_body = pos + len(header)
        if role == "assistant":
            spans.append((start_body, start_body + len(body) + len(end)))
        chunk = header + body + end + "\n"
        pieces.append(chunk)
        pos += len(chunk)
    return "".join(pieces), spans


class ChatTokenizer:
    """Tokenises rendered conversations from the checkpoint's tokenizer files and builds labels."""

    def __init__(self, hf_dir: Path):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
        convert = self.tokenizer.convert_tokens_to_ids
        self.ids = {
            "image_pad": convert("<|image_pad|>"),
            "video_pad": convert("<|video_pad|>"),
            "audio_pad": convert("<|audio_pad|>"),
            "vision_start": convert("<|vision_start|>"),
            "vision_end": convert("<|vision_end|>"),
            "audio_start": convert("<|audio_start|>"),
            "audio_end": convert("<|audio_end|>"),
            "im_start": convert("<|im_start|>"),
            "im_end": convert("<|im_end|>"),
        }
        self.pad_kind = {self.ids["image_pad"]: "image", self.ids["audio_pad"]: "audio",
                         self.ids["video_pad"]: "video"}

    def tokenize(self, messages: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, labels) with single pads (not yet expanded)."""
        text, spans = render(messages)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(enc["input_ids"], dtype=np.int64)
        starts = np.asarray([start for start, _ in enc["offset_mapping"]], dtype=np.int64)
        trained = np.zeros(len(ids), dtype=bool)
        for lo, hi in spans:
            trained |= (starts >= lo) & (starts < hi)
        labels = np.where(trained, ids, IGNORE_INDEX)
        return ids, labels

    def expand(self, ids: np.ndarray, labels: np.ndarray, blocks: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Replace the k-th single pad (any kind) with ``blocks[k]`` (a list of token ids)."""
        pad_positions = np.flatnonzero(np.isin(ids, list(self.pad_kind)))
        if len(pad_positions) != len(blocks):
            raise ValueError(f"{len(pad_positions)} media pads in the text, {len(blocks)} media blocks")
        out_ids, out_labels, last = [], [], 0
        for position, block in zip(pad_positions, blocks):
            out_ids.append(ids[last:position])
            out_labels.append(labels[last:position])
            out_ids.append(np.asarray(block, dtype=np.int64))
            out_labels.append(np.full(len(block), IGNORE_INDEX, dtype=np.int64))
            last = position + 1
        out_ids.append(ids[last:])
        out_labels.append(labels[last:])
        return np.concatenate(out_ids), np.concatenate(out_labels)
