"""Media makers for the dedup tests: distinct pictures / tones / clips by index, and re-encoded copies of them."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

PALETTE = [(220, 40, 40), (40, 180, 60), (40, 70, 220), (230, 210, 40), (150, 60, 190), (240, 140, 30),
           (245, 245, 245), (15, 15, 15)]


def picture(path: Path, k: int, size: tuple[int, int] = (96, 72)) -> Path:
    """Picture number ``k``: background, block colour and block position all depend on k (distinct per k)."""
    from PIL import Image, ImageDraw

    width, height = size
    image = Image.new("RGB", size, PALETTE[k % 8])
    draw = ImageDraw.Draw(image)
    x = (k * 13) % (width - 30)
    y = (k * 7) % (height - 24)
    draw.rectangle((x, y, x + 30, y + 24), fill=PALETTE[(k * 3 + 1) % 8])
    draw.ellipse((width - 20 - k % 5 * 8, 4, width - 4 - k % 5 * 8, 20), fill=PALETTE[(k + 5) % 8])
    image.save(path)
    return path


def resave_image(source: Path, path: Path, quality: int = 80) -> Path:
    from PIL import Image

    with Image.open(source) as image:
        image.convert("RGB").save(path, format="JPEG", quality=quality)
    return path


def tone(path: Path, k: int, rate: int = 16000, channels: int = 1, seconds: float | None = None,
         fmt: str = "WAV") -> Path:
    """Tone number ``k``: frequency and length depend on k."""
    import soundfile as sf

    seconds = seconds or 0.8 + 0.1 * (k % 7)
    t = np.arange(int(seconds * rate)) / rate
    signal = (0.3 * np.sin(2 * math.pi * (220 + 40 * k) * t)).astype(np.float32)
    if channels == 2:
        signal = np.stack([signal, 0.5 * signal], axis=1)
    sf.write(path, signal, rate, format=fmt, subtype="PCM_16")
    return path


def reencode_audio(source: Path, path: Path, fmt: str = "FLAC") -> Path:
    import soundfile as sf

    samples, rate = sf.read(source, dtype="int16", always_2d=True)
    sf.write(path, samples, rate, format=fmt, subtype="PCM_16")
    return path


def clip(path: Path, k: int, seconds: float = 2.0, fps: int = 8, size: tuple[int, int] = (64, 48),
         bit_rate: int | None = None, frames: list | None = None) -> Path:
    """Clip number ``k`` (a block of colour k crossing the frame), or the given frames re-encoded."""
    import av

    width, height = size
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if bit_rate:
            stream.bit_rate = bit_rate
        count = len(frames) if frames is not None else int(seconds * fps)
        for index in range(count):
            if frames is not None:
                frame = frames[index]
            else:
                frame = np.full((height, width, 3), 30, dtype=np.uint8)
                x = int(index / count * (width - 12))
                frame[height // 3: 2 * height // 3, x:x + 12] = PALETTE[k % 8]
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def reencode_clip(source: Path, path: Path, bit_rate: int = 200_000) -> Path:
    import av

    with av.open(str(source)) as container:
        stream = container.streams.video[0]
        fps = int(round(float(stream.average_rate)))
        size = (stream.codec_context.width, stream.codec_context.height)
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    return clip(path, 0, fps=fps, size=size, bit_rate=bit_rate, frames=frames)
