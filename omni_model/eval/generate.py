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
    # use_kernels=False: transformers >= 5.25 swaps layers for kernels fetched from the Hub by default, which fails on
    # a GPU node without Hub access (the full-depth run's offline H100 did) and would evaluate other numerics than
    # the model that was trained
    model = Qwen3OmniMoeForConditionalGeneration.from_pretrained(
        hf_dir, dtype=torch.bfloat16 if on_gpu else torch.float32, device_map="auto" if on_gpu else None,
        use_kernels=False)
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


# ------------------------------------------------------------------------------------------------- spoken answers
SPEECH_FRAMES_CAP = (2, 12)  # a spoken answer may run to 2 x its reference's frames + 12 (an untrained talker never
# stops: transformers' default cap is 4096 frames, minutes of CPU per answer on the tiny model)


def spoken_samples(shards_dir: Path, split: str, limit: int) -> Iterator[dict]:
    """The first `limit` samples of a split whose last answer is spoken (its speech codes in the shard)."""
    count = 0
    for sample in split_samples(Path(shards_dir), split, 10**9):
        if count >= limit:
            return
        if sample["record"]["messages"][-1].get("speech"):
            count += 1
            yield sample


def reference_frames(record: dict) -> int:
    """Frames of the last answer's recorded speech (media_meta.speech of the shards)."""
    turn = len(record["messages"]) - 1
    meta = [m for m in record.get("media_meta", {}).get("speech", []) if m["turn"] == turn]
    return int(meta[0]["frames"]) if meta else 0


def spoken_answer(model, inputs: dict, max_new_tokens: int, stop: list[int], pad_id: int, speaker: str,
                  max_frames: int) -> tuple[list[int], np.ndarray]:
    """transformers' generate with the talker, greedy throughout (thinker, talker and code predictor):
    (the answer's new token ids, its 24 kHz waveform)."""
    device = model.thinker.get_input_embeddings().weight.device
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    with torch.no_grad():
        ids, wave = model.generate(**inputs, return_audio=True, speaker=speaker, thinker_max_new_tokens=max_new_tokens,
                                   thinker_do_sample=False, thinker_eos_token_id=stop, thinker_pad_token_id=pad_id,
                                   talker_do_sample=False, talker_max_new_tokens=max_frames)
    return ids[0, inputs["input_ids"].shape[1]:].tolist(), wave.reshape(-1).float().cpu().numpy()


def generate_speech(hf_dir: Path, shards_dir: Path, split: str, limit: int, max_new_tokens: int, out_dir: Path,
                    speaker: str = "ethan", encoder_settings: Optional[dict] = None) -> list[dict]:
    """Spoken answers of the model at `hf_dir` (its talker and code2wav) to the first `limit` samples of `split`
    whose last answer is spoken: a wav each in `out_dir` (<id>.wav, 24 kHz) and a row: id, prompt, reference and
    answer text, seconds generated, reference seconds and frames, wav path, whether the talker ended the speech
    (codec EOS before the frame cap)."""
    import soundfile as sf

    from ..data.speech import SPEECH_RATE, TalkerCodes

    check_tokenizer(hf_dir, shards_dir)
    samples = list(spoken_samples(shards_dir, split, limit)) if limit > 0 else []
    if not samples:
        return []
    encoder = OmniEncoder(hf_dir, **(encoder_settings or {}))
    tokenizer = encoder.chat.tokenizer
    model = load_model(hf_dir)
    codes = TalkerCodes.from_config(Path(hf_dir))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for sample in samples:
        inputs, reference = prompt_inputs(encoder, sample)
        frames = reference_frames(sample["record"])
        cap = SPEECH_FRAMES_CAP[0] * frames + SPEECH_FRAMES_CAP[1]
        new, wave = spoken_answer(model, inputs, max_new_tokens, stop_ids(tokenizer), encoder.pad_id, speaker, cap)
        wav = out_dir / f"{sample['record']['id']}.wav"
        sf.write(wav, wave, SPEECH_RATE, subtype="FLOAT")
        row = answer_row(tokenizer, sample["record"], reference, new, inputs["input_ids"].shape[1])
        generated_frames = -(-len(wave) // codes.samples_per_frame)
        rows.append({**row, "seconds": len(wave) / SPEECH_RATE, "frames": generated_frames,
                     "reference_frames": frames, "reference_seconds": frames / codes.frame_rate,
                     "ended": generated_frames < cap, "wav": str(wav)})
    return rows


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
