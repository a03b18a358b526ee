"""Spoken answers: an assistant turn's speech -> the talker's codec codes (``num_code_groups`` x T frames).

What the checkpoint fixes (read from its config.json, never assumed):

* ``talker_config.num_code_groups`` (16 released) codes per frame: group 0 is the talker's own token, groups
  1.. the code predictor's; ``code2wav_config.num_quantizers`` must be the same number.
* code range: the talker's group-0 vocabulary keeps its top 1024 ids for codec control tokens (transformers'
  ``generate`` suppresses ``[vocab_size - 1024, vocab_size)`` but EOS), the code predictor has ``vocab_size`` ids
  per group, and code2wav embeds every group in ``codebook_size`` rows: a code is valid below the smallest of the
  three (2048 in the release).
* frame: code2wav turns each frame into ``prod(upsampling_ratios + upsample_rates)`` samples (2*2*8*5*4*3 = 1920
  released) at 24 kHz (``SPEECH_RATE``; the release's examples write its audio at 24000 Hz; the config does not
  say), so 12.5 frames per second. The exact decoded length of T frames is ``code2wav_samples``: the two
  upsampling transposed convolutions (kernel = stride) give 4T positions, and every decoder block's causal
  transposed convolution (kernel 2r, stride r, r trimmed at each end) maps L positions to (L - 1) r, so
  1920 T - 555 samples for the released rates (the causal convolutions keep their length).

The codec encoder (``model.codec``): the released model's own is not public. Mimi (transformers' ``MimiModel``,
``kyutai/mimi``) has the same frame (24 kHz, 1920 samples, 12.5 Hz) and codebooks of 2048; its residual
quantizers are 1 semantic + 31 acoustic, of which the first ``num_code_groups`` are taken (RVQ: the first k
quantizers are a coarser code of the same signal). Public reports say the released talker's codes decode with
``kyutai/mimi``'s decoder like code2wav's output (QwenLM/Qwen2.5-Omni#219), i.e. that the two share codebooks;
this is not verified here (no released weights offline). Any codec with a Mimi-like ``encode(input_values,
num_quantizers=...)`` and the same frame and codebook size is accepted; the tiny default is a random Mimi
(``omni_model.tiny.write_tiny_codec``), written by the ``codec`` rule next to the tiny checkpoint
(``results/model/codec/``).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..configs import config_dict
from .media import MediaError, audio_samples_at, decode_audio, error_text, to_mono

SPEECH_RATE = 24000  # Hz of code2wav's waveform (and so of the codec's input)
TALKER_CONTROL_POSITIONS = 6  # talker positions beside the thinker's tokens and the frames: 4 pads + codec BOS + EOS
SPEECH_FILE = ".nv-meta/speech.json"  # in a shards folder: the codec and the code layout the codes were made with
CODES_DTYPE = np.int16  # codes are < 2048 in the release (checked against the checkpoint's range when written)


class CodecError(ValueError):
    """A codec that cannot make this checkpoint's codes (frame, rate, codebook, quantizers), or failed on a clip."""


class MissingCodec(RuntimeError):
    """Data with spoken answers but no codec configured (a setting to fix, not a sample to drop)."""


@dataclass(frozen=True)
class TalkerCodes:
    """The code layout a checkpoint's talker and code2wav read."""

    num_code_groups: int
    code_limit: int  # every code is in [0, code_limit)
    upsampling_ratios: tuple
    upsample_rates: tuple

    @classmethod
    def from_config(cls, cfg) -> "TalkerCodes":
        """From a config.json dict / path / HF dir. Raises CodecError when the talker and code2wav disagree."""
        cfg = config_dict(cfg)
        talker, code2wav = cfg.get("talker_config"), cfg.get("code2wav_config")
        if not talker or not code2wav:
            raise CodecError("config.json has no talker_config / code2wav_config: this checkpoint cannot speak")
        groups = int(talker["num_code_groups"])
        if int(code2wav["num_quantizers"]) != groups:
            raise CodecError(f"talker_config.num_code_groups {groups} != code2wav_config.num_quantizers "
                             f"{code2wav['num_quantizers']}")
        limits = (int(talker["text_config"]["vocab_size"]) - 1024,
                  int(talker["code_predictor_config"]["vocab_size"]), int(code2wav["codebook_size"]))
        return cls(groups, min(limits), tuple(code2wav["upsampling_ratios"]), tuple(code2wav["upsample_rates"]))

    @property
    def samples_per_frame(self) -> int:
        return int(math.prod(self.upsampling_ratios + self.upsample_rates))

    @property
    def frame_rate(self) -> float:
        return SPEECH_RATE / self.samples_per_frame

    def frames_of(self, n_samples: int) -> int:
        """Frames a codec with this frame makes of ``n_samples`` at SPEECH_RATE (a started frame counts)."""
        return -(-int(n_samples) // self.samples_per_frame)

    def decoded_samples(self, n_frames: int) -> int:
        """Samples code2wav's forward gives for ``n_frames`` frames (see the module doc)."""
        length = int(n_frames) * math.prod(self.upsampling_ratios)
        for rate in self.upsample_rates:
            length = (length - 1) * rate
        return length


def talker_length(n_tokens: int, frames: list[int]) -> int:
    """Talker positions of a conversation: its thinker tokens (the talker reads a subset of them, projected) plus,
    per spoken answer, its frames and the control positions (transformers' ``generate`` layout)."""
    return int(n_tokens) + sum(int(f) + TALKER_CONTROL_POSITIONS for f in frames)


# ---------------------------------------------------------------------------------------------------- the codec
def codec_source(model_cfg: dict) -> dict | None:
    """``model.codec`` -> where the codec comes from (the codec rule's record), or None for no codec: ``auto`` =
    the tiny random Mimi for the tiny / random sources and none otherwise; ``tiny``; ``none``; a local folder; a
    Hugging Face hub id (owner/name, e.g. kyutai/mimi)."""
    setting = str(model_cfg.get("codec", "auto") or "none")
    if setting == "auto":
        setting = "tiny" if model_cfg.get("source", "tiny") in ("tiny", "random") else "none"
    if setting == "none":
        return None
    if setting == "tiny":
        return {"kind": "tiny", "seed": int(model_cfg.get("seed", 0))}
    folder = Path(setting).expanduser()
    if folder.exists() or not _HUB_ID.match(setting):
        return {"kind": "local", "path": str(folder.resolve())}
    return {"kind": "huggingface", "id": setting}


_HUB_ID = re.compile(r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$")


def folder_digest(folder: Path) -> str:
    """sha256 over a codec folder's config and weight files (names and bytes)."""
    digest = hashlib.sha256()
    for path in sorted(Path(folder).iterdir()):
        if path.suffix in (".json", ".safetensors"):
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


class SpeechCodec:
    """A Mimi-style codec checked against a checkpoint's code layout; ``encode`` gives int64 [groups, frames]."""

    def __init__(self, folder: Path, codes: TalkerCodes):
        import torch
        from transformers import AutoConfig, AutoModel

        self.folder, self.codes = Path(folder), codes
        config = AutoConfig.from_pretrained(self.folder)
        self._check(config)
        self.model = AutoModel.from_pretrained(self.folder, dtype=torch.float32).eval()
        self.digest = folder_digest(self.folder)

    def _check(self, config) -> None:
        where = f"codec {self.folder}"
        problems = []
        if not hasattr(config, "frame_rate") or not hasattr(config, "num_quantizers"):
            raise CodecError(f"{where}: model_type {config.model_type!r} is not a residual-quantizer codec like "
                             "Mimi (no frame_rate / num_quantizers)")
        if config.sampling_rate != SPEECH_RATE:
            problems.append(f"sampling_rate {config.sampling_rate} != {SPEECH_RATE} (code2wav's)")
        if config.sampling_rate / config.frame_rate != self.codes.samples_per_frame:
            problems.append(f"{config.sampling_rate / config.frame_rate:g} samples per frame != code2wav's "
                            f"{self.codes.samples_per_frame} ({self.codes.frame_rate:g} frames/s)")
        if config.num_quantizers < self.codes.num_code_groups:
            problems.append(f"{config.num_quantizers} quantizers < num_code_groups {self.codes.num_code_groups}")
        if config.codebook_size > self.codes.code_limit:
            problems.append(f"codebook_size {config.codebook_size} > the {self.codes.code_limit} codes the talker "
                            "and code2wav take")
        if problems:
            raise CodecError(f"{where} cannot make this checkpoint's codes: " + "; ".join(problems))

    def encode(self, wave: np.ndarray) -> np.ndarray:
        """Mono float32 at SPEECH_RATE -> int64 [num_code_groups, frames]. Raises CodecError (the codec failed or
        gave a code outside the checkpoint's range, or another frame count than its frame implies)."""
        import torch

        try:
            with torch.inference_mode():
                codes = self.model.encode(torch.from_numpy(np.ascontiguousarray(wave, np.float32))[None, None],
                                          num_quantizers=self.codes.num_code_groups).audio_codes
        except Exception as exc:  # noqa: BLE001  the codec's own failure on this clip: the sample's drop reason
            raise CodecError(f"codec failed: {error_text(exc)}") from None
        codes = codes[0].to(torch.int64).numpy()
        expected = (self.codes.num_code_groups, self.codes.frames_of(len(wave)))
        if codes.shape != expected:
            raise CodecError(f"codec gave codes {list(codes.shape)}, expected {list(expected)}")
        if codes.min() < 0 or codes.max() >= self.codes.code_limit:
            raise CodecError(f"codec gave codes in [{codes.min()}, {codes.max()}], outside [0, {self.codes.code_limit})")
        return codes

    def settings(self) -> dict:
        """What the codes depend on: recorded in the shards (SPEECH_FILE)."""
        return {"codec": str(self.folder), "codec_digest": self.digest,
                "codec_model_type": self.model.config.model_type, "speech_rate": SPEECH_RATE,
                "frame_rate": self.codes.frame_rate, **{k: list(v) if isinstance(v, tuple) else v
                                                        for k, v in asdict(self.codes).items()}}


# ---------------------------------------------------------------------------------------------------- speech clips
def speech_samples(data: bytes) -> int:
    """Length of a speech clip at SPEECH_RATE from its header (no decoding). Raises MediaError."""
    return audio_samples_at(data, SPEECH_RATE)


def load_speech(data: bytes) -> np.ndarray:
    """A speech clip -> mono float32 at SPEECH_RATE (any rate and channel count; librosa's soxr_hq resampling).
    Raises MediaError (undecodable, empty, non-finite)."""
    samples, rate = decode_audio(data)
    return to_mono(samples, rate, SPEECH_RATE)


def write_codes(codes: np.ndarray) -> bytes:
    """Codes as the shard member's .npy bytes (CODES_DTYPE; the values are checked to fit by SpeechCodec.encode)."""
    import io

    buffer = io.BytesIO()
    np.save(buffer, codes.astype(CODES_DTYPE), allow_pickle=False)
    return buffer.getvalue()


def read_codes(data: bytes) -> np.ndarray:
    """A codes member -> int64 [groups, frames]."""
    import io

    try:
        codes = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:
        raise MediaError(f"cannot read speech codes: {error_text(exc)}") from None
    if codes.ndim != 2 or codes.dtype != CODES_DTYPE:
        raise MediaError(f"speech codes are {codes.dtype} {list(codes.shape)}, not {np.dtype(CODES_DTYPE)} [groups, frames]")
    return codes.astype(np.int64)


def speech_turns(record: dict) -> list[tuple[int, str]]:
    """(message index, speech path or member name) of every spoken assistant turn, in order."""
    return [(index, message["speech"]) for index, message in enumerate(record["messages"]) if message.get("speech")]


def read_speech_settings(shards_dir: Path) -> dict | None:
    """The shards' SPEECH_FILE (None when they hold no spoken answer)."""
    path = Path(shards_dir) / SPEECH_FILE
    return json.loads(path.read_text()) if path.is_file() else None
