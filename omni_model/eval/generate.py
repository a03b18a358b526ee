"""Greedy answers to the first `eval.generate_samples` samples of a split, with transformers' Qwen3-Omni on an HF
checkpoint (the download for base, the export for tuned): a KV cache, `device_map="auto"` over the GPUs of one host
for the 30B model (see omni_model.eval for why not mcore's inference engines).

The prompt is the sample as training encodes it (OmniEncoder: the same template, media tensors and pad expansion),
cut before its last answer; the reference is that answer's trained tokens (without the closing `<|im_end|>`).
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from ..data.encoder import OmniEncoder, tokenizer_digest
from ..data.sample import sample_loader
from ..data.shards import split_tars
from ..data.template import IGNORE_INDEX


class TokenizerMismatch(ValueError):
    """A model whose tokenizer is not the one the evaluated data was encoded with."""


def check_tokenizer(model_dir: Path, shards_dir: Path) -> None:
    """Refuse a model whose tokenizer / chat template differ from the shards' (its token ids would mean other text:
    every loss, accuracy and answer would be garbage)."""
    from ..data.shards import SETTINGS_FILE

    recorded = json.loads((Path(shards_dir) / SETTINGS_FILE).read_text()).get("tokenizer_digest")
    mine = tokenizer_digest(Path(model_dir))
    if recorded != mine:
        raise TokenizerMismatch(
            f"evaluation refused: the tokenizer of {model_dir} (digest {mine[:12]}) is not the one {shards_dir} was "
            f"encoded with (digest {str(recorded)[:12]}); evaluate a model with the data's tokenizer and chat "
            f"template, or rerun the shards stage for this model")


def split_samples(shards_dir: Path, split: str, limit: int) -> Iterator[dict]:
    """The first `limit` samples of a split ({record, media}), in the order of its tars, read straight from them."""
    count = 0
    for path in split_tars(Path(shards_dir), split):
        with tarfile.open(path) as tar:
            grouped: dict = {}
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                grouped.setdefault(key, {"__key__": key})[ext] = tar.extractfile(member).read()
        for raw in grouped.values():
            if count >= limit:
                return
            count += 1
            yield sample_loader(raw)


def last_answer(labels: np.ndarray) -> tuple[int, int]:
    """[start, end) of the last run of trained tokens (the last assistant answer and its <|im_end|>)."""
    trained = np.flatnonzero(labels != IGNORE_INDEX)
    if not len(trained):
        raise ValueError("sample has no trained (answer) tokens")
    end = int(trained[-1]) + 1
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return start, end


def prompt_text(record: dict) -> str:
    """The last user turn as text (for the sample table)."""
    users = [m for m in record.get("messages", []) if m.get("role") == "user"]
    content = users[-1]["content"] if users else ""
    if isinstance(content, list):
        content = " ".join(part.get("text", f"<{part.get('type')}>") for part in content)
    return str(content)


def prompt_inputs(encoder: OmniEncoder, sample: dict) -> tuple[dict, np.ndarray]:
    """(transformers keywords of the prompt, token ids of the reference answer)."""
    from ..data.batch import collate

    encoded = encoder.encode_canonical(sample["record"], sample["media"])
    start, end = last_answer(encoded.labels)
    batch = collate([encoded], pad_id=encoder.pad_id, packed=False, use_audio_in_video=encoder.use_audio_in_video)
    inputs = batch.hf_inputs()
    for name in ("labels", "position_ids"):  # generate computes positions itself, step by step
        inputs.pop(name, None)
    inputs["input_ids"] = inputs["input_ids"][:, :start]
    inputs["attention_mask"] = inputs["attention_mask"][:, :start]
    return inputs, encoded.input_ids[start:end]


def load_model(hf_dir: Path):
    from transformers import Qwen3OmniMoeForConditionalGeneration

    on_gpu = torch.cuda.is_available()
    model = Qwen3OmniMoeForConditionalGeneration.from_pretrained(
        hf_dir, dtype=torch.bfloat16 if on_gpu else torch.float32, device_map="auto" if on_gpu else None)
    return model.eval()


def stop_ids(tokenizer) -> list[int]:
    """The ids that end an answer: the turn's close and the end of text."""
    return [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]


def greedy_answer(model, inputs: dict, max_new_tokens: int, stop: list[int], pad_id: int) -> list[int]:
    """The thinker's greedy answer (new token ids) to one prompt (prompt_inputs' keywords), with its KV cache."""
    device = model.thinker.get_input_embeddings().weight.device
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    with torch.no_grad():
        out = model.thinker.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop,
                                     pad_token_id=pad_id)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def answer_row(tokenizer, record: dict, reference: np.ndarray, new: list[int], prompt_tokens: int) -> dict:
    """One generated sample: id, prompt (last user turn), reference and answer text, token counts."""
    return {"id": record["id"], "prompt": prompt_text(record),
            "reference": tokenizer.decode(reference.tolist(), skip_special_tokens=True).strip(),
            "answer": tokenizer.decode(new, skip_special_tokens=True).strip(), "new_tokens": len(new),
            "prompt_tokens": prompt_tokens}


def generate_answers(hf_dir: Path, shards_dir: Path, split: str, limit: int, max_new_tokens: int,
                     encoder_settings: Optional[dict] = None) -> list[dict]:
    """Greedy answers of the thinker at `hf_dir` to the first `limit` samples of `split`: one answer_row each."""
    check_tokenizer(hf_dir, shards_dir)
    if limit <= 0:
        return []
    encoder = OmniEncoder(hf_dir, **(encoder_settings or {}))
    tokenizer = encoder.chat.tokenizer
    model = load_model(hf_dir)
    rows = []
    for sample in split_samples(shards_dir, split, limit):
        inputs, reference = prompt_inputs(encoder, sample)
        new = greedy_answer(model, inputs, max_new_tokens, stop_ids(tokenizer), encoder.pad_id)
        rows.append(answer_row(tokenizer, sample["record"], reference, new, inputs["input_ids"].shape[1]))
    return rows
