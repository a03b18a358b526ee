"""Our renderer (omni_model.data.template) against the RELEASED Qwen3-Omni chat template.

The released template text is not shipped with this repository: it could not be found in the public sources this
project can reach (no hub access here; searches of vendored copies in public repositories found only custom or
simplified Qwen3-Omni templates, which would prove nothing), and a hand-written copy would be a fake. Point
``OMNI_RELEASED_HF_DIR`` at a downloaded Qwen/Qwen3-Omni-30B-A3B-Instruct folder (only its tokenizer files are read:
``chat_template.json`` / ``chat_template.jinja`` / ``tokenizer_config.json``, ``tokenizer.json``, ...; the workflow's
``model.source: huggingface`` download puts them in ``results/model/hf``) to run it; it is skipped otherwise.

For each conversation (text, image, audio, video, multi-turn, system prompt) the released template is rendered by
transformers' chat-template engine (jinja2) on the parts form of the conversation and tokenised with the released
tokenizer; the ids must equal ``ChatTokenizer.tokenize``'s.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

RELEASED = os.environ.get("OMNI_RELEASED_HF_DIR")
pytestmark = pytest.mark.skipif(not RELEASED, reason="OMNI_RELEASED_HF_DIR (a released Qwen3-Omni checkpoint's "
                                                     "tokenizer files) is not set")

CONVERSATIONS = {
    "text": [("user", "What is 12 plus 30?"), ("assistant", "It is 42.")],
    "image": [("user", "<image>Describe the image."), ("assistant", "A red square on blue.")],
    "audio": [("user", "<audio>Transcribe the audio."), ("assistant", "Hello there.")],
    "video": [("user", "<video>What moves?"), ("assistant", "A block, left to right.")],
    "multi_turn": [("user", "Hi!"), ("assistant", "Hello, how can I help?"), ("user", "<image>And this?"),
                   ("assistant", "A cat."), ("user", "Now <audio> this."), ("assistant", "A bird singing.")],
    "system": [("system", "You are a careful assistant."), ("user", "<image><audio>Relate them."),
               ("assistant", "They match.")],
}


def released_template(hf_dir: Path) -> str:
    for name in ("chat_template.jinja", "chat_template.json", "tokenizer_config.json"):
        path = hf_dir / name
        if path.is_file():
            text = path.read_text()
            return text if name.endswith(".jinja") else json.loads(text)["chat_template"]
    raise FileNotFoundError(f"{hf_dir}: no chat_template.jinja / chat_template.json / tokenizer_config.json")


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_renderer_equals_released_template(name):
    from omni_model.data.template import ChatTokenizer, to_parts

    hf_dir = Path(RELEASED)
    chat = ChatTokenizer(hf_dir)
    messages = [{"role": role, "content": content} for role, content in CONVERSATIONS[name]]
    text = chat.tokenizer.apply_chat_template(to_parts(messages), chat_template=released_template(hf_dir),
                                              tokenize=False)
    theirs = chat.tokenizer(text, add_special_tokens=False)["input_ids"]
    ours, _ = chat.tokenize(messages)
    assert np.asarray(theirs).tolist() == ours.tolist(), f"released:\n{text!r}"
