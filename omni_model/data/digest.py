"""Content fingerprints of a sample's media, for deduplication: "the same media" means the same decoded content,
whatever file format or encoder settings store it.

A fingerprint has an exact part (``key``: kinds and counts of media, the audio digests, the number of sampled video
frames) and, for pictures, small thumbnails compared with a tolerance (an exact hash of pixels, even a perceptual
hash, flips on compression noise: pHash kept only 46 % of PNG->JPEG copies of the demo images equal):

* image: area-averaged 16x16 grey + 4x4 RGB thumbnails and the aspect ratio. Same when the aspect ratios agree within
  5 % and no thumbnail cell differs by more than 12 grey / 30 colour levels (of 255): a cell, not the mean, so a
  small object of another colour makes a different picture. Measured on 150 demo images re-saved as JPEG
  q90/q75/q50: at most 7 grey / 18 colour levels; clips re-encoded at 100-400 kbit/s: at most 3; different demo clips
  (a small block of another colour): at least 49 colour levels. A scaled copy also counts as the same.
* audio: md5 of the decoded samples mixed to mono, resampled to 16 kHz (what training sees) and rounded to int16:
  any lossless re-encoding (WAV <-> FLAC, PCM_16 <-> float) digests the same.
* video: the same thumbnails of one frame per second, picked by presentation timestamp and scaled while decoding
  (memory stays bounded whatever the clip), plus the duration (same within 0.25 s).

Fingerprinting decodes every medium in full (strictly: a truncated image fails, though Data-Juicer switches PIL to
pad truncated files) and raises media.MediaError when it cannot: the datajuicer stage's validation is this decode,
and the dedup ops reuse its fingerprints.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np

GREY_SIDE, COLOUR_SIDE = 16, 4
GREY_TOLERANCE, COLOUR_TOLERANCE = 12, 30  # largest |difference| of a thumbnail cell, in levels of 255
ASPECT_TOLERANCE = 0.05  # |log aspect ratio difference|
DURATION_TOLERANCE = 0.25  # seconds, video


def _thumbs(rgb) -> dict:
    """PIL RGB image -> the compared part of a picture's fingerprint."""
    from PIL import Image

    grey = rgb.convert("L").resize((GREY_SIDE, GREY_SIDE), resample=Image.Resampling.BOX)
    colour = rgb.resize((COLOUR_SIDE, COLOUR_SIDE), resample=Image.Resampling.BOX)
    return {"grey": np.asarray(grey).ravel().tolist(), "colour": np.asarray(colour).ravel().tolist()}


def image_fingerprint(path: str) -> dict:
    from PIL import Image

    from .media import decode_image

    rgb = Image.fromarray(decode_image(Path(path).read_bytes()))
    return {"key": "image", "aspect": math.log(rgb.width / rgb.height), "frames": [_thumbs(rgb)]}


def audio_fingerprint(path: str) -> dict:
    """Also gives the clip's length at 16 kHz (``samples``), for validation's minimum length check."""
    from .media import load_audio_16k

    mono = load_audio_16k(Path(path).read_bytes())
    quantised = np.round(np.clip(mono, -1.0, 1.0) * 32767).astype("<i2")
    return {"key": "audio:" + hashlib.md5(quantised.tobytes()).hexdigest(), "samples": len(mono)}


def video_fingerprint(path: str) -> dict:
    import av
    from PIL import Image

    from .media import MediaError, error_text

    frames, next_second = [], 0.0
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            duration = float(container.duration / 1_000_000) if container.duration else 0.0
            aspect = math.log(stream.codec_context.width / stream.codec_context.height)
            for frame in container.decode(stream):
                if frame.time is None or frame.time + 1e-6 < next_second:
                    continue
                small = frame.reformat(width=64, height=64, format="rgb24").to_ndarray()
                frames.append(_thumbs(Image.fromarray(small)))
                next_second = math.floor(frame.time) + 1.0
    except Exception as exc:
        raise MediaError(f"cannot decode video: {error_text(exc)}") from None
    if not frames:
        raise MediaError("video has no decodable frames")
    return {"key": f"video:{len(frames)}", "aspect": aspect, "duration": duration, "frames": frames}


FINGERPRINTS = {"images": image_fingerprint, "audios": audio_fingerprint, "videos": video_fingerprint}


FINGERPRINT_KEY = "omni_media_fingerprint"  # the Data-Juicer column of a sample's fingerprint (JSON)


def sample_fingerprint(media_lists: dict, check=None) -> dict:
    """Fingerprint of all media of one sample (``{"images": [paths], "audios": [...], "videos": [...]}``):
    ``{"key": exact part, "media": [per-medium fingerprints in list order]}``. ``check(list key, path, fingerprint)``
    may raise MediaError too. A MediaError names the medium: ``image0.jpg (cut.jpg): cannot decode image: ...``."""
    from .formats import media_member
    from .media import MediaError, error_text

    media = []
    for key, fingerprint in FINGERPRINTS.items():
        for index, path in enumerate(media_lists.get(key) or []):
            try:
                media.append(fingerprint(path))
                if check is not None:
                    check(key, path, media[-1])
            except Exception as exc:  # any failure on one medium is that sample's reason (an unread file, a codec)
                member = media_member(key.rstrip("s"), index, path)
                reason = exc if isinstance(exc, MediaError) else error_text(exc)
                raise MediaError(f"{member} ({Path(path).name}): {reason}") from None
    return {"key": "|".join(m["key"] for m in media), "media": media}


def same_medium(a: dict, b: dict) -> bool:
    if a["key"] != b["key"]:
        return False
    if "frames" not in a:  # exact fingerprints (audio)
        return True
    if abs(a["aspect"] - b["aspect"]) > ASPECT_TOLERANCE:
        return False
    if abs(a.get("duration", 0.0) - b.get("duration", 0.0)) > DURATION_TOLERANCE:
        return False
    for fa, fb in zip(a["frames"], b["frames"]):
        if np.abs(np.subtract(fa["grey"], fb["grey"])).max() > GREY_TOLERANCE:
            return False
        if np.abs(np.subtract(fa["colour"], fb["colour"])).max() > COLOUR_TOLERANCE:
            return False
    return True


def same_media(a: dict, b: dict) -> bool:
    """True when two sample fingerprints hold the same media content, medium by medium."""
    return a["key"] == b["key"] and all(same_medium(x, y) for x, y in zip(a["media"], b["media"]))
