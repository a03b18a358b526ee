"""Our renderer (omni_model.data.template) and task encoder against the RELEASED Qwen3-Omni chat template.

The released template is shipped as tests/fixtures/qwen3_omni_chat_template.jinja: the ``chat_template`` of the
released checkpoints' ``chat_template.json``, from two independent public copies that agree byte for byte
(``TheDoctor-JI/Qwen3-Omni`` tests/fixtures/thinking_chat_template.json @ 0fca5b0537f5d0581b360f8e82e96d7f11457f93,
a copy of Qwen/Qwen3-Omni-30B-A3B-Thinking's; ``kyr0/qwen3-omni-vllm-docker`` chat-template.jinja2 @
d8aab1295f2d8993c9cebe93af5c97bb90cb0f5e, extracted from Qwen/Qwen3-Omni-30B-A3B-Captioner's); why it is also the
Instruct checkpoint's, and what could not be checked offline, is in tests/fixtures/README.md. With
``OMNI_RELEASED_HF_DIR`` pointing at a downloaded Qwen3-Omni-30B-A3B-Instruct folder the fixture is compared with
that checkpoint's own template.

The reference is transformers' chat-template engine (``apply_chat_template`` with the released template) on the
tiny checkpoint's tokenizer (the real Qwen3 BPE plus the Omni special tokens at their released ids), fed the parts
form of each conversation (content as a list of text/image/audio/video parts), as Qwen3-Omni's processor is.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from omni_model.data.template import IGNORE_INDEX, ChatTokenizer, render, to_parts

FIXTURE = Path(__file__).parent / "fixtures" / "qwen3_omni_chat_template.jinja"
FIXTURE_SHA256 = "f61059186b44ffa656362bf6a56fc80160f6873b49546042afa25654c9a660ea"
EMPTY_THINK = "<think>\n\n</think>\n\n"

CONVERSATIONS = {
    "text": [("user", "What is 12 plus 30?"), ("assistant", "It is 42.")],
    "image": [("user", "<image>Describe the image."), ("assistant", "A red square on blue.")],
    "audio": [("user", "<audio>Transcribe the audio."), ("assistant", "Hello there.")],
    "video": [("user", "<video>What moves?"), ("assistant", "A block, left to right.")],
    "multi_turn": [("user", "Hi!"), ("assistant", "Hello, how can I help?"), ("user", "<image>And this?"),
                   ("assistant", "A cat."), ("user", "Now <audio> this."), ("assistant", "A bird singing.\n\nDone.")],
    "system": [("system", "You are a careful assistant."), ("user", "<image><audio>Relate them."),
               ("assistant", "They match.")],
    "system_with_media": [("system", "Speak like this voice: <audio> thanks."), ("user", "<video>Narrate it."),
                          ("assistant", "It begins quietly.")],
}


def _messages(name: str) -> list[dict]:
    return [{"role": role, "content": content} for role, content in CONVERSATIONS[name]]


@pytest.fixture(scope="module")
def released() -> str:
    return FIXTURE.read_text()


@pytest.fixture(scope="module")
def chat(tiny_hf_dir) -> ChatTokenizer:
    return ChatTokenizer(tiny_hf_dir)


def _released_text(chat: ChatTokenizer, released: str, messages: list[dict], parts: bool = True) -> str:
    return chat.tokenizer.apply_chat_template(to_parts(messages) if parts else messages, chat_template=released,
                                              tokenize=False)


def _ids(chat: ChatTokenizer, text: str) -> list[int]:
    return chat.tokenizer(text, add_special_tokens=False)["input_ids"]


def _answer_ids(chat: ChatTokenizer, messages: list[dict]) -> list[int]:
    """What training must learn: every assistant answer followed by its <|im_end|>, tokenised on its own."""
    return [i for m in messages if m["role"] == "assistant" for i in _ids(chat, m["content"] + "<|im_end|>")]


def test_fixture_is_the_verified_release():
    digest = hashlib.sha256(FIXTURE.read_bytes()).hexdigest()
    assert digest == FIXTURE_SHA256, f"{FIXTURE} changed (sha256 {digest}); it must stay the released text"


@pytest.mark.skipif(not os.environ.get("OMNI_RELEASED_HF_DIR"), reason="OMNI_RELEASED_HF_DIR (a downloaded "
                    "Qwen3-Omni-30B-A3B-Instruct folder) is not set")
def test_fixture_equals_downloaded_checkpoint(released):
    hf_dir = Path(os.environ["OMNI_RELEASED_HF_DIR"])
    for name in ("chat_template.json", "tokenizer_config.json"):
        template = json.loads((hf_dir / name).read_text()).get("chat_template") if (hf_dir / name).is_file() else None
        if template is not None:
            assert template == released, f"{hf_dir / name}: chat_template differs from {FIXTURE}"
            return
    template = (hf_dir / "chat_template.jinja").read_text()
    assert template == released, f"{hf_dir / 'chat_template.jinja'} differs from {FIXTURE}"


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_renderer_equals_released_template(name, chat, released):
    messages = _messages(name)
    text = _released_text(chat, released, messages)
    ours, labels = chat.tokenize(messages)
    assert ours.tolist() == _ids(chat, text), f"released:\n{text!r}\nours:\n{render(messages)[0]!r}"
    assert labels[labels != IGNORE_INDEX].tolist() == _answer_ids(chat, messages)


def test_string_content_differs_only_by_the_empty_think_block(chat, released):
    """Given string contents the released template writes an empty think block before the last answer. The
    Instruct model's generation prompt is ``<|im_start|>assistant\\n`` and it answers without that block, so we
    train on the parts-form layout; this pins that the block is the whole difference."""
    text_only = [
        _messages("text"),
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
         {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a colour."},
         {"role": "assistant", "content": "Blue."}],
    ]
    for messages in text_only:
        head, _, answer = render(messages)[0].rpartition("<|im_start|>assistant\n")
        expected = head + "<|im_start|>assistant\n" + EMPTY_THINK + answer
        assert _released_text(chat, released, messages, parts=False) == expected


def test_reasoning_in_answers_is_trained(chat, released):
    """The released template drops ``<think>`` reasoning from every answer of a parts-form conversation; we keep it,
    or training on reasoning data would teach the model to skip reasoning."""
    messages = [{"role": "user", "content": "<audio>What is it?"},
                {"role": "assistant", "content": "<think>\nA bird, high pitch.\n</think>\n\nA bird."}]
    assert "A bird, high pitch." not in _released_text(chat, released, messages)
    _, labels = chat.tokenize(messages)
    assert chat.tokenizer.decode(labels[labels != IGNORE_INDEX]) == messages[1]["content"] + "<|im_end|>"


def _collapse_pad_runs(ids: np.ndarray, pad_ids: set[int]) -> list[int]:
    """Expanded media blocks back to one pad each (every block sits between its own start/end tokens)."""
    keep = np.ones(len(ids), dtype=bool)
    keep[1:] = ~((ids[1:] == ids[:-1]) & np.isin(ids[1:], list(pad_ids)))
    return ids[keep].tolist()


def test_task_encoder_equals_released_template(tiny_hf_dir, chat, released, tmp_path):
    """The training path (OmniEncoder.encode on decoded media: demo records of every kind, with and without a
    system prompt) gives the released template's ids, each single media pad expanded in place."""
    from omni_model.data.demo import generate_demo
    from omni_model.data.encoder import OmniEncoder, media_from_paths
    from omni_model.data.formats import LIST_KEY, load_raw

    records, _, _ = load_raw(generate_demo(tmp_path, 16, seed=3))
    encoder = OmniEncoder(tiny_hf_dir, max_seq_len=8192)
    pads = {encoder.chat.ids[k] for k in ("image_pad", "audio_pad", "video_pad")}
    seen = set()
    for record in records[:16]:
        sample = encoder.encode(record, media_from_paths(record))
        messages = record["messages"]
        expected = _ids(chat, _released_text(chat, released, messages))
        assert _collapse_pad_runs(sample.input_ids, pads) == expected, record["id"]
        assert sample.labels[sample.labels != IGNORE_INDEX].tolist() == _answer_ids(chat, messages), record["id"]
        seen |= {kind for kind, key in LIST_KEY.items() if record.get(key)}
        seen |= {"system"} if messages[0]["role"] == "system" else set()
        seen |= {"multi_turn"} if sum(m["role"] == "assistant" for m in messages) > 1 else set()
    assert seen >= {"image", "audio", "video", "system", "multi_turn"}, seen
