"""A generated chat set for comparing Data-Juicer executors (tests/test_data_ray.py, bench/data_executors.py):
text-mostly rows with planted exact duplicates, near duplicates, media reuse, re-encoded media copies and rows the
recipe's filters drop. ``plan`` says what each planted row is, so a test can check the decisions are the intended
ones as well as equal between executors.

Kinds (fractions of the rows): fresh text 72 %, exact duplicate of an earlier fresh row (case/spacing changed) 6 %,
near duplicate (one word of ~45 changed) 5 %, image rows 8 % ("Describe the image." over a pool of pictures: a
picture reused under other text, the same text over other pictures, and the same text over a JPEG copy of the same
picture), audio rows 4 % (the same for tones, copies re-encoded as FLAC), video rows 0.5 %, and rows the filters drop:
too short text 2 %, a 20x20 picture 1 %, a 0.1 s tone 1 %.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "ze", "po", "da", "fe", "gu", "hi", "jo", "ba"]


def _words(rng, count: int, vocab: list[str]) -> str:
    return " ".join(vocab[i] for i in rng.integers(len(vocab), size=count))


def _picture(path: Path, k: int, size=(96, 72)) -> Path:
    from PIL import Image, ImageDraw

    colours = [(220, 40, 40), (40, 180, 60), (40, 70, 220), (230, 210, 40), (150, 60, 190), (240, 140, 30)]
    image = Image.new("RGB", size, colours[k % 6])
    draw = ImageDraw.Draw(image)
    x, y = (k * 11) % (size[0] - 30), (k * 7) % (size[1] - 24)
    draw.rectangle((x, y, x + 30, y + 24), fill=colours[(k // 6 + 1 + k) % 6])
    image.save(path)
    return path


def _tone(path: Path, k: int, seconds: float | None = None, fmt: str = "WAV") -> Path:
    import soundfile as sf

    rate = 16000
    seconds = seconds or 0.6 + 0.05 * (k % 9)
    t = np.arange(int(seconds * rate)) / rate
    sf.write(path, (0.3 * np.sin(2 * math.pi * (200 + 37 * k) * t)).astype(np.float32), rate, format=fmt,
             subtype="PCM_16")
    return path


def _clip(path: Path, k: int, fps: int = 4, seconds: float = 1.0) -> Path:
    import av

    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv420p"
        for index in range(int(fps * seconds)):
            frame = np.full((32, 48, 3), 20 + 60 * k, dtype=np.uint8)
            frame[8:24, (index * 6) % 36:(index * 6) % 36 + 12] = (250, 250, 250)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def _row(sid: str, user: str, answer: str, **media) -> dict:
    row = {"id": sid, "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}
    row.update({key: list(media.get(key, [])) for key in ("images", "audios", "videos")})
    return row


def make_rows(out_dir: Path, n: int = 5000, seed: int = 0) -> tuple[Path, dict]:
    """Write ``out_dir/rows.jsonl`` (+ ``media/``); returns (path, plan: id -> (kind, id of the original or None))."""
    rng = np.random.default_rng(seed)
    out_dir = Path(out_dir)
    media = out_dir / "media"
    media.mkdir(parents=True, exist_ok=True)
    vocab = [a + b + c for a in SYLLABLES for b in SYLLABLES for c in SYLLABLES[:4]]
    pictures = [_picture(media / f"p{k}.png", k) for k in range(24)]
    tones = [_tone(media / f"t{k}.wav", k) for k in range(12)]
    clips = [_clip(media / f"v{k}.mp4", k) for k in range(3)]
    tiny_picture = _picture(media / "tiny.png", 0, size=(20, 20))
    short_tone = _tone(media / "short.wav", 0, seconds=0.1)
    copies: dict = {}

    def copy_of(path: Path) -> str:  # a re-encoded copy: other bytes, same content
        if path not in copies:
            if path.suffix == ".png":
                from PIL import Image

                target = path.with_name(path.stem + "_copy.jpg")
                with Image.open(path) as image:
                    image.convert("RGB").save(target, format="JPEG", quality=85)
            else:
                import soundfile as sf

                target = path.with_name(path.stem + "_copy.flac")
                samples, rate = sf.read(path, dtype="int16")
                sf.write(target, samples, rate, format="FLAC", subtype="PCM_16")
            copies[path] = target
        return str(copies[path])

    rows, plan, fresh, seen_media = [], {}, [], {}
    kinds = ["fresh", "exact", "near", "image", "audio", "video", "short", "tiny_image", "short_audio"]
    weights = np.array([72, 6, 5, 8, 4, 0.5, 2, 1, 1], dtype=np.float64)
    for index, kind in enumerate(rng.choice(kinds, size=n, p=weights / weights.sum())):
        sid, original = f"row-{index:05d}", None
        if kind in ("exact", "near") and not fresh:
            kind = "fresh"
        if kind == "fresh":
            row = _row(sid, f"Question {index}: {_words(rng, 30, vocab)}?", _words(rng, 15, vocab))
            fresh.append(row)
        elif kind == "exact":
            source = fresh[int(rng.integers(len(fresh)))]
            user, answer = source["messages"][0]["content"], source["messages"][1]["content"]
            row, original = _row(sid, "  " + user.upper().replace(" ", "  "), answer), source["id"]
        elif kind == "near":
            source = fresh[int(rng.integers(len(fresh)))]
            words = source["messages"][0]["content"].split()
            words[2 + int(rng.integers(len(words) - 4))] = "changed"
            row, original = _row(sid, " ".join(words), source["messages"][1]["content"]), source["id"]
        elif kind in ("image", "audio", "video"):
            tag, key = f"<{kind}>", kind + "s"
            pool = {"image": pictures, "audio": tones, "video": clips}[kind]
            medium = pool[int(rng.integers(len(pool)))]
            prompt = {"image": "Describe the image.", "audio": "Transcribe the audio.",
                      "video": "What happens in the clip?"}[kind]
            if rng.random() < 0.5:  # the same prompt over many media: distinct samples unless the medium repeats
                text = (prompt, "Done.")
            else:  # the same medium under a new prompt: distinct samples
                text = (f"{prompt} {_words(rng, 6, vocab)}", _words(rng, 5, vocab))
            path = str(medium)
            if (text, medium) in seen_media:
                original = seen_media[(text, medium)]
                if kind != "video" and rng.random() < 0.5:
                    path = copy_of(medium)
            else:
                seen_media[(text, medium)] = sid
            row = _row(sid, tag + text[0], text[1], **{key: [path]})
        elif kind == "short":
            row = _row(sid, "Hi", "ok")
        elif kind == "tiny_image":
            row = _row(sid, f"<image>What is in this small picture number {index}?", "A block.",
                       images=[str(tiny_picture)])
        else:  # short_audio
            row = _row(sid, f"<audio>Transcribe clip {index}.", "A beep.", audios=[str(short_tone)])
        rows.append(row)
        plan[sid] = (kind, original)
    path = out_dir / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path, plan
