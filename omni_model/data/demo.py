"""Deterministic synthetic multimodal demo set (the embedded default's data).

Writes ``<out_dir>/demo.jsonl`` plus ``<out_dir>/media/``: PNG/JPEG images drawn with PIL, audio clips at 44.1 kHz,
22.05 kHz and 16 kHz (mono and stereo WAV/FLAC; spoken text from espeak-ng when it is installed, otherwise
synthesised tones/chirps), short MPEG-4 videos (some with an AAC audio track). Conversations use both the
``messages`` and the ``conversations`` (ShareGPT) format, single and multi-turn, with and without system prompt,
text-only, image-only, audio-only, several media of a kind. A few answers are spoken (``SPOKEN``: an assistant
audio in each of the three input forms, formats.py; speech at 24, 16 and 44.1 kHz, one stereo, a multi-turn sample
with two spoken turns), drawn from their own random stream so that every other sample is the same with or without
them; they start at sample 48, so small demo sets (the tests') have none. A handful of deliberately bad samples
exercise every drop reason of the pipeline (see ``BAD_KINDS``). Same seed -> byte-identical output (espeak-ng output
depends on its version, so it is only used when present).
"""

from __future__ import annotations

import io
import json
import math
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

import numpy as np

WORDS = ("amber azure bright calm crisp dark deep dusty early faint fierce gentle golden hollow icy jagged keen "
         "lively lucid mellow misty noble odd pale quiet rapid rough round sharp shiny silent sleek smooth soft "
         "spare steady stormy sunny swift tall tender thin tidy vivid warm wild windy young").split()
NOUNS = ("apple anchor badge barrel beacon bridge candle canyon castle cedar cloud comet compass crater desert "
         "engine falcon feather forest fountain garden glacier harbor island kettle lantern meadow mirror "
         "mountain orchard pebble planet prism puzzle river rocket saddle signal spiral summit temple tower "
         "tunnel valley violin wagon window").split()
COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40),
          "purple": (150, 60, 190), "orange": (240, 140, 30), "white": (245, 245, 245), "black": (15, 15, 15)}
SHAPES = ("circle", "square", "triangle", "cross", "ring", "stripe")

# Deliberately bad samples and the stage that must drop them.
BAD_KINDS = {
    "invalid_json": "validate",
    "missing_file": "validate",
    "corrupt_image_header": "validate",
    "corrupt_audio_header": "validate",
    "corrupt_video_header": "validate",
    "wrong_role_order": "validate",
    "empty_assistant": "validate",
    "tag_media_mismatch": "validate",
    "text_too_short": "datajuicer",
    "image_too_small": "datajuicer",
    "audio_too_long": "datajuicer",
    "video_too_short": "datajuicer",
    "exact_duplicate": "datajuicer",
    "near_duplicate": "datajuicer",
    "truncated_image": "validate",
    "nan_audio": "validate",
    "undecodable_video": "validate",
    "over_long": "shards",
    "corrupt_speech": "validate",
    "speech_without_text": "validate",
    "speech_too_long": "shards",
}
# Spoken answers: sample index % SPOKEN_PERIOD -> the form the speech is given in (formats.py)
SPOKEN_PERIOD = 64
SPOKEN = {48: "content_part", 49: "sharegpt_audio", 55: "message_audio"}


class _Gen:
    def __init__(self, out_dir: Path, seed: int):
        self.out = Path(out_dir)
        self.media = self.out / "media"
        self.rng = np.random.default_rng(seed)
        self.espeak = shutil.which("espeak-ng")

    # ------------------------------------------------------------------ text
    def phrase(self, n: int = 6) -> str:
        words = [f"{self.rng.choice(WORDS)} {self.rng.choice(NOUNS)}" for _ in range(n)]
        return ", ".join(words)

    def sentence(self) -> str:
        number = int(self.rng.integers(2, 999))
        return f"Note {number}: the {self.phrase(3)} and the {self.phrase(2)}."

    # ------------------------------------------------------------------ media
    def image(self, name: str, width: int, height: int, fmt: str = "PNG") -> tuple[str, str]:
        from PIL import Image, ImageDraw

        bg, fg = self.rng.choice(list(COLORS), size=2, replace=False)
        shape = str(self.rng.choice(SHAPES))
        image = Image.new("RGB", (width, height), COLORS[bg])
        draw = ImageDraw.Draw(image)
        x0, y0 = int(width * 0.2), int(height * 0.2)
        x1, y1 = int(width * 0.8), int(height * 0.8)
        if shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=COLORS[fg])
        elif shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=COLORS[fg])
        elif shape == "triangle":
            draw.polygon([(width // 2, y0), (x0, y1), (x1, y1)], fill=COLORS[fg])
        elif shape == "cross":
            draw.rectangle((width // 2 - width // 10, y0, width // 2 + width // 10, y1), fill=COLORS[fg])
            draw.rectangle((x0, height // 2 - height // 10, x1, height // 2 + height // 10), fill=COLORS[fg])
        elif shape == "ring":
            draw.ellipse((x0, y0, x1, y1), outline=COLORS[fg], width=max(2, width // 12))
        else:
            for x in range(0, width, max(4, width // 8)):
                draw.rectangle((x, 0, x + max(2, width // 16), height), fill=COLORS[fg])
        path = self.media / f"{name}.{'jpg' if fmt == 'JPEG' else 'png'}"
        image.save(path, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        return path.name, f"a {fg} {shape} on a {bg} background ({width}x{height})"

    def audio(self, name: str, seconds: float, rate: int, channels: int = 1, fmt: str = "WAV",
              text: str | None = None) -> tuple[str, str]:
        import soundfile as sf

        if self.espeak and text:
            with tempfile.TemporaryDirectory() as tmp:
                wav = Path(tmp) / "speech.wav"
                subprocess.run([self.espeak, "-w", str(wav), text], check=True, capture_output=True)
                speech, speech_rate = sf.read(wav, dtype="float32")
            import librosa

            signal = librosa.resample(speech, orig_sr=speech_rate, target_sr=rate) if speech_rate != rate else speech
            description = f"speech saying '{text}'"
        else:
            t = np.arange(int(seconds * rate)) / rate
            f0 = float(self.rng.choice([220, 330, 440, 550, 660, 880]))
            kind = str(self.rng.choice(["tone", "chirp", "chord"]))
            if kind == "tone":
                signal = np.sin(2 * math.pi * f0 * t)
            elif kind == "chirp":
                signal = np.sin(2 * math.pi * (f0 + 200 * t / max(seconds, 1e-3)) * t)
            else:
                signal = sum(np.sin(2 * math.pi * f0 * r * t) for r in (1.0, 1.25, 1.5)) / 3
            signal = 0.3 * signal * np.minimum(1.0, 20 * t) * np.minimum(1.0, 20 * (seconds - t))
            description = f"a {seconds:.1f} second {kind} around {int(f0)} Hz"
        signal = np.asarray(signal, dtype=np.float32)
        if channels == 2:
            signal = np.stack([signal, 0.5 * signal], axis=1)
        path = self.media / f"{name}.{fmt.lower()}"
        sf.write(path, signal, rate, format=fmt, subtype="PCM_16")
        return path.name, description

    def video(self, name: str, seconds: float, fps: int = 8, width: int = 64, height: int = 48,
              with_audio: bool = False) -> tuple[str, str]:
        import av

        color = str(self.rng.choice(list(COLORS)))
        direction = str(self.rng.choice(["left to right", "top to bottom"]))
        path = self.media / f"{name}.mp4"
        container = av.open(str(path), "w", format="mp4")
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.thread_count = 1
        audio_stream = None
        if with_audio:
            audio_stream = container.add_stream("aac", rate=16000)
            audio_stream.layout = "mono"
        frames = max(1, int(round(seconds * fps)))
        for index in range(frames):
            frame = np.full((height, width, 3), 30, dtype=np.uint8)
            if direction == "left to right":
                x = int(index / frames * (width - 12))
                frame[height // 3: 2 * height // 3, x:x + 12] = COLORS[color]
            else:
                y = int(index / frames * (height - 12))
                frame[y:y + 12, width // 3: 2 * width // 3] = COLORS[color]
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        if audio_stream is not None:
            t = np.arange(int(16000 * seconds)) / 16000
            signal = (0.2 * np.sin(2 * math.pi * 440 * t)).astype(np.float32)
            for start in range(0, len(signal), 1024):
                chunk = av.AudioFrame.from_ndarray(signal[None, start:start + 1024], format="flt", layout="mono")
                chunk.rate = 16000
                for packet in audio_stream.encode(chunk):
                    container.mux(packet)
            for packet in audio_stream.encode():
                container.mux(packet)
        container.close()
        sound = " with a 440 Hz tone" if with_audio else ""
        return path.name, f"a {color} block moving {direction} for {seconds:.1f} seconds{sound}"


def _messages(system: str | None, turns: list[tuple[str, str]]) -> list[dict]:
    out = [{"role": "system", "content": system}] if system else []
    for user, assistant in turns:
        out += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return out


def _sharegpt(record: dict) -> dict:
    conv = [{"from": {"user": "human", "assistant": "gpt", "system": "system"}[m["role"]], "value": m["content"],
             **({"audio": m["audio"]} if "audio" in m else {})} for m in record["messages"]]
    out = {k: v for k, v in record.items() if k != "messages"}
    out["conversations"] = conv
    return out


def generate_demo(out_dir: Path, n_samples: int = 200, seed: int = 0) -> Path:
    """Write the demo set; returns the jsonl path. ``n_samples`` counts good samples (bad ones are added)."""
    out_dir = Path(out_dir)
    gen = _Gen(out_dir, seed)
    speaker = _Gen(out_dir, seed + 7919)  # the spoken answers' own stream: the other samples do not depend on them
    gen.media.mkdir(parents=True, exist_ok=True)
    rng = gen.rng
    rates = [44100, 22050, 16000]
    systems = [None, "You are a helpful multimodal assistant.", "Answer briefly and precisely."]
    lines: list[str] = []

    def media_path(name: str) -> str:
        return f"media/{name}"

    for index in range(n_samples):
        sid = f"demo-{index:04d}"
        kind = ["text", "image", "audio", "image+audio", "images", "audios", "video", "multiturn"][index % 8]
        system = systems[int(rng.integers(len(systems)))]
        record: dict = {"id": sid}
        if kind == "text":
            question = f"Write one line about the {gen.phrase(2)}. {gen.sentence()}"
            record["messages"] = _messages(system, [(question, f"Here it is: {gen.sentence()}")])
        elif kind == "image":
            width, height = int(rng.integers(40, 320)), int(rng.integers(40, 320))
            name, desc = gen.image(f"{sid}-img0", width, height, "JPEG" if index % 3 == 0 else "PNG")
            record["images"] = [media_path(name)]
            record["messages"] = _messages(system, [(f"<image>What shape is shown? {gen.sentence()}",
                                                     f"It shows {desc}.")])
        elif kind == "audio":
            rate = rates[index % 3]
            name, desc = gen.audio(f"{sid}-aud0", float(rng.uniform(0.6, 3.0)), rate, channels=1 + index % 2,
                                   fmt="FLAC" if index % 5 == 0 else "WAV", text=gen.phrase(2))
            record["audios"] = [media_path(name)]
            record["messages"] = _messages(system, [(f"<audio>Describe the sound. {gen.sentence()}",
                                                     f"I hear {desc}, recorded at {rate} Hz.")])
        elif kind == "image+audio":
            name_i, desc_i = gen.image(f"{sid}-img0", int(rng.integers(48, 200)), int(rng.integers(48, 200)))
            name_a, desc_a = gen.audio(f"{sid}-aud0", float(rng.uniform(0.5, 2.5)), rates[index % 3],
                                       text=gen.phrase(2))
            record["images"], record["audios"] = [media_path(name_i)], [media_path(name_a)]
            record["messages"] = _messages(system, [(f"<audio><image>Relate the sound to the picture. {gen.sentence()}",
                                                     f"The picture is {desc_i}; the sound is {desc_a}.")])
        elif kind == "images":
            names = [gen.image(f"{sid}-img{k}", int(rng.integers(40, 160)), int(rng.integers(40, 160))) for k in range(2 + index % 2)]
            record["images"] = [media_path(n) for n, _ in names]
            tags = "".join("<image>" for _ in names)
            record["messages"] = _messages(system, [(f"{tags}Compare these images. {gen.sentence()}",
                                                     "; ".join(f"image {k + 1} is {d}" for k, (_, d) in enumerate(names)) + ".")])
        elif kind == "audios":
            names = [gen.audio(f"{sid}-aud{k}", float(rng.uniform(0.4, 1.5)), rates[(index + k) % 3],
                               text=gen.phrase(1)) for k in range(2)]
            record["audios"] = [media_path(n) for n, _ in names]
            record["messages"] = _messages(system, [(f"First clip <audio>, second clip <audio>. Which is longer? {gen.sentence()}",
                                                     f"The first is {names[0][1]} and the second is {names[1][1]}.")])
        elif kind == "video":
            name, desc = gen.video(f"{sid}-vid0", float(rng.choice([1.0, 1.5, 2.0])), with_audio=index % 16 == 6)
            record["videos"] = [media_path(name)]
            record["messages"] = _messages(system, [(f"<video>What happens in the video? {gen.sentence()}",
                                                     f"The video shows {desc}.")])
        else:  # multi-turn with media in later turns
            name_i, desc_i = gen.image(f"{sid}-img0", int(rng.integers(64, 128)), int(rng.integers(64, 128)))
            name_a, desc_a = gen.audio(f"{sid}-aud0", float(rng.uniform(0.5, 1.5)), rates[index % 3], channels=2,
                                       text=gen.phrase(1))
            record["images"], record["audios"] = [media_path(name_i)], [media_path(name_a)]
            record["messages"] = _messages(system or "You are a helpful multimodal assistant.", [
                (f"Hello! {gen.sentence()}", f"Hello, how can I help? {gen.sentence()}"),
                (f"<image>What is this? {gen.sentence()}", f"It is {desc_i}."),
                ("And this sound: <audio>", f"That is {desc_a}."),
            ])
        sharegpt = index % 4 == 1
        if index % SPOKEN_PERIOD in SPOKEN:
            record = _speak(speaker, record, SPOKEN[index % SPOKEN_PERIOD], sharegpt, index)
        lines.append(json.dumps(_sharegpt(record) if sharegpt else record))

    lines += _bad_samples(gen, lines)
    path = out_dir / "demo.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _speak(gen: _Gen, record: dict, form: str, sharegpt: bool, index: int) -> dict:
    """Give the record's assistant turns speech (the last one; every one for ``message_audio``): ``content_part`` =
    an audio part in the content list, ``message_audio`` = the message's ``audio`` key, ``sharegpt_audio`` = the
    ShareGPT turn's ``audio`` key (applied by _sharegpt, which keeps extra turn keys)."""
    rates = (24000, 16000, 44100)
    assistants = [m for m in record["messages"] if m["role"] == "assistant"]
    for k, message in enumerate(assistants if form == "message_audio" else assistants[-1:]):
        text = message["content"]
        seconds = min(3.0, 0.5 + 0.04 * len(text.split()))
        name, _ = gen.audio(f"demo-{index:04d}-speech{k}", seconds, rates[(index + k) % 3], channels=1 + k % 2,
                            fmt="FLAC" if k else "WAV", text=text)
        if form == "content_part" and not sharegpt:
            message["content"] = [{"type": "text", "text": text}, {"type": "audio", "audio": f"media/{name}"}]
        else:
            message["audio"] = f"media/{name}"
    return record


def _bad_samples(gen: _Gen, good_lines: list[str]) -> list[str]:
    """One sample per entry of BAD_KINDS (ids ``bad-<kind>``), appended after the good ones."""
    media = gen.media
    out = []

    def rec(kind: str, messages: list[dict], **lists) -> str:
        return json.dumps({"id": f"bad-{kind}", "messages": messages, **lists})

    qa = lambda q, a: _messages(None, [(q, a)])  # noqa: E731
    out.append('{"id": "bad-invalid_json", "messages": [{"role": "user", "content": "unterminated}')
    out.append(rec("missing_file", qa("<image>What is it?", "Nothing, the file is gone."), images=["media/does-not-exist.png"]))
    (media / "garbage.png").write_bytes(b"this is not a png at all" * 8)
    out.append(rec("corrupt_image_header", qa("<image>Describe the garbage.", "It cannot be opened."), images=["media/garbage.png"]))
    (media / "garbage.wav").write_bytes(b"RIFF0000WAVEjunk" + bytes(range(256)))
    out.append(rec("corrupt_audio_header", qa("<audio>Describe the noise.", "It cannot be opened."), audios=["media/garbage.wav"]))
    (media / "garbage.mp4").write_bytes(b"\x00\x00\x00\x18ftypisom" + b"\xff" * 200)
    out.append(rec("corrupt_video_header", qa("<video>Describe the clip.", "It cannot be opened."), videos=["media/garbage.mp4"]))
    out.append(rec("wrong_role_order", [{"role": "user", "content": "Hi there, first question."},
                                        {"role": "user", "content": "Second question without an answer."},
                                        {"role": "assistant", "content": "An answer."}]))
    out.append(rec("empty_assistant", qa("Please answer this question properly.", "   ")))
    name, _ = gen.image("bad-mismatch-img0", 64, 64)
    out.append(rec("tag_media_mismatch", qa("<image><image>Two tags but one image.", "Mismatch."), images=[f"media/{name}"]))
    out.append(rec("text_too_short", qa("Hi", "Yo")))
    name, _ = gen.image("bad-small-img0", 12, 12)
    out.append(rec("image_too_small", qa("<image>What is in this tiny picture of a signal lamp?", "Too small to see."), images=[f"media/{name}"]))
    name, _ = gen.audio("bad-long-aud0", 35.0, 16000)
    out.append(rec("audio_too_long", qa("<audio>Summarise this very long recording of a quiet harbor.", "It is long."), audios=[f"media/{name}"]))
    name, _ = gen.video("bad-short-vid0", 0.25, fps=8)
    out.append(rec("video_too_short", qa("<video>What happens in this blink of a clip about rockets?", "Too short."), videos=[f"media/{name}"]))
    # exact duplicate of the first good text-only sample; near duplicate of another (one word changed)
    first = json.loads(good_lines[0])
    out.append(json.dumps({**first, "id": "bad-exact_duplicate"}))
    near = json.loads(good_lines[8 if len(good_lines) > 8 else 0])  # a text-only sample (every 8th); 8 = the minimum
    near["id"] = "bad-near_duplicate"
    turns = near.get("messages") or near.get("conversations")
    key = "content" if "messages" in near else "value"
    turns[-1][key] = turns[-1][key].replace("Here it is", "Here it was")
    out.append(json.dumps(near))
    from PIL import Image

    name = "bad-truncated-img0.png"  # noise does not compress: cutting the file in half always cuts pixel rows
    noise = gen.rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG")
    (media / name).write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    out.append(rec("truncated_image", qa("<image>What is in this half-written file of a lantern?", "Half an image."), images=[f"media/{name}"]))
    import soundfile as sf

    nan_signal = np.zeros(16000, dtype=np.float32)
    nan_signal[100:200] = np.nan
    sf.write(media / "bad-nan-aud0.wav", nan_signal, 16000, subtype="FLOAT")
    out.append(rec("nan_audio", qa("<audio>What do you hear in this broken recording of a meadow?", "Only errors."), audios=["media/bad-nan-aud0.wav"]))
    name, _ = gen.video("bad-undecodable-vid0", 1.0)
    data = bytearray((media / name).read_bytes())
    start = data.find(b"mdat")
    size = struct.unpack(">I", bytes(data[start - 4:start]))[0]
    data[start + 4:start - 4 + size] = b"\x55" * (size - 8)
    (media / name).write_bytes(bytes(data))
    out.append(rec("undecodable_video", qa("<video>What happens in this damaged clip of a comet?", "It cannot be decoded."), videos=[f"media/{name}"]))
    name, _ = gen.image("bad-huge-img0", 2400, 2400)
    out.append(rec("over_long", qa("<image>Describe every detail of this enormous poster of a glacier.", "Too many tokens."), images=[f"media/{name}"]))
    (media / "garbage-speech.wav").write_bytes(b"RIFF0000WAVEjunk" + bytes(range(255, -1, -1)))
    spoken = qa("Say something about the harbor at night, out loud please.", "The harbor is quiet.")
    spoken[-1]["audio"] = "media/garbage-speech.wav"
    out.append(rec("corrupt_speech", spoken))
    name, _ = gen.audio("bad-speech-only0", 1.0, 24000)
    out.append(rec("speech_without_text", [{"role": "user", "content": "Answer this question about a lantern aloud."},
                                           {"role": "assistant", "content": [{"type": "audio", "audio": f"media/{name}"}]}]))
    # 340 s of silence (a few kB of FLAC): 4250 frames at 12.5 Hz, over the talker's max_seq_len 4096 from the header
    sf.write(media / "bad-long-speech0.flac", np.zeros(340 * 8000, dtype=np.float32), 8000, format="FLAC",
             subtype="PCM_16")
    spoken = qa("Tell me a very long story about a lighthouse keeper, out loud.", "Once upon a time, a keeper.")
    spoken[-1]["audio"] = "media/bad-long-speech0.flac"
    out.append(rec("speech_too_long", spoken))
    return out
