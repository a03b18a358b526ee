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
         bit_rate: int | None = None, frames: list | None = None, container_format: str = "mp4",
         codec: str = "mpeg4") -> Path:
    """Clip number ``k`` (a block of colour k crossing the frame), or the given frames re-encoded. Other containers
    as PyAV (FFmpeg) writes them: ``webm``/``matroska`` (duration in the container, none on the stream),
    ``mpeg1video`` (an MPEG-1 elementary stream: no timestamps, a duration guessed from the bit rate), ``h264``
    (raw H.264: no timestamps at all)."""
    import av

    width, height = size
    with av.open(str(path), "w", format=container_format) as container:
        stream = container.add_stream(codec, rate=fps)
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


# Containers whose video stream states no duration, as FFmpeg/PyAV write them: (container, codec, fps, file suffix).
NO_STREAM_DURATION = {"webm": ("webm", "libvpx", 8, "webm"), "matroska": ("matroska", "mpeg4", 8, "mkv"),
                      "mpeg1-elementary": ("mpeg1video", "mpeg1video", 25, "m1v")}


def clip_without_stream_duration(directory: Path, kind: str, seconds: float = 2.0) -> Path:
    """A distinct clip (another colour) per container kind: the stage must not see them as copies of each other."""
    container_format, codec, fps, suffix = NO_STREAM_DURATION[kind]
    return clip(directory / f"{kind}-{seconds}.{suffix}", sorted(NO_STREAM_DURATION).index(kind), seconds=seconds,
                fps=fps, container_format=container_format, codec=codec)


def video_record(sid: str, path: Path) -> dict:
    return {"id": sid, "messages": [{"role": "user", "content": "<video>What moves in this clip?"},
                                    {"role": "assistant", "content": "A coloured block."}],
            "images": [], "audios": [], "videos": [str(path)]}


def failing_op_case(directory: Path):
    """(recipe path, records, check(kept, drops)): Data-Juicer's own video_duration_filter, which fails on a WebM (no
    stream duration), over an mp4, that WebM and a short mp4; the WebM must be dropped with the op's error."""
    import yaml

    recipe = {"process": [{"video_duration_filter": {"min_duration": 0.5, "max_duration": 60, "video_backend": "av"}}]}
    (directory / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    records = [video_record("mp4", clip(directory / "a.mp4", 1)),
               video_record("webm", clip_without_stream_duration(directory, "webm")),
               video_record("mp4-short", clip(directory / "b.mp4", 2, seconds=0.25))]

    def check(kept, drops):
        assert [r["id"] for r in kept] == ["mp4"]
        by_id = {d["id"]: d for d in drops}
        assert by_id["webm"]["stage"] == "datajuicer" and by_id["webm"]["op"] == "video_duration_filter"
        assert by_id["webm"]["reason"] == ("video_duration_filter failed on this sample: TypeError: unsupported "
                                           "operand type(s) for *: 'NoneType' and 'Fraction'")
        assert "video_duration=[0.25] outside bounds" in by_id["mp4-short"]["reason"]

    return directory / "recipe.yaml", records, check
