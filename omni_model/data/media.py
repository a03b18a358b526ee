"""Media decoding and preprocessing for Qwen3-Omni: images, video frames, audio.

* Images and video frames: RGB, smart-resize to a multiple of ``patch_size * merge_size`` (PIL bicubic on uint8, as
  transformers' PIL image processor does), rescale 1/255, normalise with the model's own mean/std (0.5, not
  ImageNet's), patchify into rows of ``C * temporal_patch * patch * patch`` in the ViT's merge order. A still image is
  one temporal patch (the frame repeated ``temporal_patch_size`` times).
* Video: PyAV; the plan (how many frames, at which presentation times, at which size) comes from the container
  header (``plan_video``); only the frames nearest the planned times are converted, each resized to the model's frame
  size at once, seeking over long gaps (memory: the sampled frames at model size, not the clip).
  ``video_fps`` frames per second of the video stream's duration (count rounded to a multiple of the temporal patch,
  at least ``video_min_frames``), ``second_per_grid = temporal_patch_size * duration / frames``.
* Cheap shapes first: ``image_size`` / ``audio_samples_16k`` / ``plan_video`` read headers only, so token counts
  (and the over-long check) need no pixel or mel work.
* Audio: decoded with soundfile (or PyAV for a video's audio track), mixed to mono, **resampled to 16 kHz**
  (librosa soxr_hq, as ``librosa.load(sr=16000)``), Whisper log-mel features from the checkpoint's own
  ``WhisperFeatureExtractor`` config (128 mel bins).

* Canonical media (``MEDIA_FORMAT``): what the shards store once decoded (16 kHz waveforms, sampled frames), so that
  training reads audio with soundfile and frames with PIL, and never resamples or opens a video container.

Every decoder raises :class:`MediaError` with a precise reason; the shards stage drops such samples.
"""

from __future__ import annotations

import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# the AuT's token count is the audio model's formula; the data side (encoder, rope index) counts tokens with it
from ..model.audio_lengths import audio_output_lengths, conv_out_length  # noqa: F401

AUDIO_SR = 16000


class MediaError(ValueError):
    """Media that cannot be decoded; the message is the reason for drops.jsonl."""


_IN_MEMORY_FILE = re.compile(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


def error_text(exc: BaseException) -> str:
    """``Type: message`` of an exception, for a drop reason: without the address of an in-memory file that PIL and
    soundfile put in their messages, so the same input gives the same drops.jsonl in every run and process."""
    return f"{type(exc).__name__}: " + _IN_MEMORY_FILE.sub("", str(exc))


# the data config's keys that override MediaConfig fields of the same name (the shards and the task encoder encode
# video with them)
VIDEO_SETTINGS = ("video_fps", "video_max_frames", "video_min_pixels", "video_max_pixels")


@dataclass
class MediaConfig:
    """Preprocessing parameters. ``from_hf_dir`` reads the checkpoint's preprocessor_config.json."""

    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple = (0.5, 0.5, 0.5)
    image_std: tuple = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    min_pixels: int = 3136
    max_pixels: int = 12845056
    # video frames: the released processor's video size bounds (shortest/longest edge in pixels)
    video_min_pixels: int = 128 * 32 * 32
    video_max_pixels: int = 768 * 32 * 32
    video_fps: float = 2.0
    video_min_frames: int = 4
    video_max_frames: int = 768
    n_window: int = 50  # audio encoder window (thinker audio_config.n_window)
    feature_extractor: dict = field(default_factory=dict)

    @classmethod
    def from_hf_dir(cls, hf_dir: Path, **overrides) -> "MediaConfig":
        hf_dir = Path(hf_dir)
        pre = json.loads((hf_dir / "preprocessor_config.json").read_text())
        kwargs = {}
        for key in ("patch_size", "temporal_patch_size", "merge_size", "min_pixels", "max_pixels", "rescale_factor"):
            if key in pre:
                kwargs[key] = pre[key]
        size = pre.get("size") or {}
        if "shortest_edge" in size:
            kwargs["min_pixels"] = size["shortest_edge"]
        if "longest_edge" in size:
            kwargs["max_pixels"] = size["longest_edge"]
        if "image_mean" in pre:
            kwargs["image_mean"] = tuple(pre["image_mean"])
        if "image_std" in pre:
            kwargs["image_std"] = tuple(pre["image_std"])
        if (hf_dir / "config.json").is_file():
            from ..model.transformer_config import audio_config_of

            audio = audio_config_of(hf_dir)
            if "n_window" in audio:
                kwargs["n_window"] = audio["n_window"]
        kwargs["feature_extractor"] = {k: v for k, v in pre.items() if k in _WHISPER_KEYS}
        kwargs.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kwargs)


_WHISPER_KEYS = ("feature_size", "sampling_rate", "hop_length", "n_fft", "chunk_length", "n_samples",
                 "nb_max_frames", "padding_side", "padding_value", "dither", "return_attention_mask")


# ----------------------------------------------------------------------------------------------------- vision
def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's smart resize: both sides multiples of ``factor``, area within [min_pixels, max_pixels]."""
    if min(height, width) <= 0:
        raise MediaError(f"image has no pixels ({width}x{height})")
    if max(height, width) / min(height, width) > 200:
        raise MediaError(f"aspect ratio {max(height, width) / min(height, width):.1f} > 200 ({width}x{height})")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def decode_image(data: bytes) -> np.ndarray:
    """Full decode to RGB uint8 [H, W, 3]; a truncated or corrupt file raises MediaError."""
    from PIL import Image, ImageFile

    # Some libraries (Data-Juicer among them) switch PIL to silently pad truncated files; a truncated image must fail.
    lenient, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            rgb = image.convert("RGB")
    except Exception as exc:  # PIL raises several types (UnidentifiedImageError, OSError, SyntaxError...)
        raise MediaError(f"cannot decode image: {error_text(exc)}") from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = lenient
    return np.asarray(rgb)


def _resize_rgb(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    from PIL import Image

    if frame.shape[0] == height and frame.shape[1] == width:
        return frame
    return np.asarray(Image.fromarray(frame).resize((width, height), resample=Image.Resampling.BICUBIC))


def patchify(frames: np.ndarray, cfg: MediaConfig) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Normalised frames [T, H, W, 3] float32 (T a multiple of temporal_patch_size) -> (patches, (t, h, w) grid).

    Row order: temporal patch, then merge-blocks of ``merge x merge`` patches row-major, as the Qwen3 ViT expects.
    """
    p, tp, m = cfg.patch_size, cfg.temporal_patch_size, cfg.merge_size
    t, height, width, channels = frames.shape
    grid_t, grid_h, grid_w = t // tp, height // p, width // p
    x = frames.transpose(0, 3, 1, 2)  # T C H W
    x = x.reshape(grid_t, tp, channels, grid_h // m, m, p, grid_w // m, m, p)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)  # gt, gh/m, gw/m, mh, mw, C, tp, ph, pw
    patches = np.ascontiguousarray(x).reshape(grid_t * grid_h * grid_w, channels * tp * p * p)
    return patches, (grid_t, grid_h, grid_w)


def _normalise(frames_uint8: np.ndarray, cfg: MediaConfig) -> np.ndarray:
    x = frames_uint8.astype(np.float32) * np.float32(cfg.rescale_factor)
    mean = np.asarray(cfg.image_mean, dtype=np.float32)
    std = np.asarray(cfg.image_std, dtype=np.float32)
    return (x - mean) / std


def image_grid(height: int, width: int, cfg: MediaConfig) -> tuple[int, int, int]:
    h, w = smart_resize(height, width, cfg.patch_size * cfg.merge_size, cfg.min_pixels, cfg.max_pixels)
    return 1, h // cfg.patch_size, w // cfg.patch_size


def preprocess_image(rgb: np.ndarray, cfg: MediaConfig) -> tuple[np.ndarray, tuple[int, int, int]]:
    """RGB uint8 [H, W, 3] -> (pixel_values rows, (1, grid_h, grid_w))."""
    height, width = smart_resize(rgb.shape[0], rgb.shape[1], cfg.patch_size * cfg.merge_size,
                                 cfg.min_pixels, cfg.max_pixels)
    frame = _normalise(_resize_rgb(rgb, height, width), cfg)
    frames = np.broadcast_to(frame[None], (cfg.temporal_patch_size, *frame.shape))
    return patchify(frames, cfg)


@dataclass
class Video:
    frames: np.ndarray  # sampled RGB uint8 [T, H, W, 3] at the model's frame size, T a multiple of temporal_patch_size
    second_per_grid: float  # seconds covered by one temporal patch
    duration: float  # of the video stream (not the container: an audio track may be longer)
    audio: np.ndarray | None = None  # 16 kHz mono float32 of the audio track, if any and requested
    times: np.ndarray | None = None  # presentation time (s, from the stream start) of each sampled frame


@dataclass
class VideoPlan:
    """What the sampled video will be, from the container header alone (no frame decoded)."""

    width: int  # source frame size
    height: int
    start: float  # first presentation time of the video stream (s)
    duration: float  # of the video stream (s)
    n_frames: int  # frames to sample (a multiple of temporal_patch_size)
    frame_size: tuple[int, int]  # (height, width) the sampled frames are resized to
    audio_duration: float | None  # of the first audio stream (s), None without one
    frame_period: float  # 1 / average frame rate (s), 0 when unknown
    temporal_patch_size: int

    @property
    def second_per_grid(self) -> float:
        """Seconds one temporal patch covers (transformers: temporal_patch_size / sampled fps)."""
        return self.temporal_patch_size * self.duration / self.n_frames

    def target_times(self) -> np.ndarray:
        """Sample times (s, absolute presentation time): evenly spaced from the first to the last frame's time, as
        transformers' index sampling ``linspace(0, total - 1, n)`` is for constant-frame-rate video."""
        return self.start + np.linspace(0.0, max(self.duration - self.frame_period, 0.0), self.n_frames)


def _open_container(data: bytes):
    import av

    try:
        return av.open(io.BytesIO(data), mode="r")
    except Exception as exc:
        raise MediaError(f"cannot open video: {error_text(exc)}") from None


def _stream_span(container, stream) -> tuple[float, float, float]:
    """(start, duration, frame period) of a stream in seconds, from the header; packets are scanned (demux only, no
    decoding) when the stream states no duration (Matroska/WebM as FFmpeg writes them keep it in the container only)
    or the format has no timestamps of its own (MPEG-1/H.264 elementary streams: FFmpeg guesses the duration from the
    bit rate, 0.3 ms for a 2 s MPEG-1 clip, and numbers the packets by frame rate)."""
    import av

    base = float(stream.time_base)
    start = float(stream.start_time * base) if stream.start_time is not None else 0.0
    rate = float(getattr(stream, "average_rate", None) or 0.0)  # video streams only
    period = 1.0 / rate if rate > 0 else 0.0
    if stream.duration and not container.format.flags & av.format.Flags.NOTIMESTAMPS:
        return start, float(stream.duration * base), period
    first = last = None
    for packet in container.demux(stream):
        if packet.pts is not None:
            end = (packet.pts + (packet.duration or 0)) * base
            first = packet.pts * base if first is None else min(first, packet.pts * base)
            last = end if last is None else max(last, end)
    if last is None:
        raise MediaError("video stream has no timestamps")
    container.seek(0)
    start = start if stream.start_time is not None else first
    return start, last - start, period


def plan_video(data: bytes, cfg: MediaConfig) -> VideoPlan:
    """Sampling plan from the container header: how many frames at which times and size (the token count of the
    video follows from it without decoding a frame)."""
    container = _open_container(data)
    try:
        if not container.streams.video:
            raise MediaError("video has no video stream")
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        start, duration, period = _stream_span(container, stream)
        audio_duration = None
        if container.streams.audio:
            _, audio_duration, _ = _stream_span(container, container.streams.audio[0])
    except MediaError:
        raise
    except Exception as exc:
        raise MediaError(f"cannot read video header: {error_text(exc)}") from None
    finally:
        container.close()
    if not width or not height:
        raise MediaError(f"cannot decode video: the video stream has no frame size ({width}x{height})")
    if duration <= 0:
        raise MediaError(f"cannot decode video: the video stream has no duration ({duration:.3g} s)")
    tp = cfg.temporal_patch_size
    wanted = round(duration * cfg.video_fps / tp) * tp
    wanted = int(min(max(wanted, cfg.video_min_frames), cfg.video_max_frames))
    wanted = max(tp, wanted // tp * tp)
    return VideoPlan(width, height, start, duration, wanted, video_frame_size(height, width, wanted, cfg),
                     audio_duration, period, tp)


def decode_video(data: bytes, cfg: MediaConfig, with_audio: bool = False) -> Video:
    """Decode only the sampled frames, chosen by presentation timestamp, resized to the model's frame size one at a
    time: memory is the sampled frames at model size plus two source frames, whatever the clip's length.

    Each target time takes the frame whose timestamp is nearest; a target more than a second ahead of the decoder
    seeks (to the keyframe before it) instead of decoding the gap. ``second_per_grid`` and ``times`` come from the
    stream's timestamps, so variable-frame-rate video and a longer audio track do not shift them."""
    plan = plan_video(data, cfg)
    targets = plan.target_times()
    height, width = plan.frame_size
    container = _open_container(data)
    picked = np.empty((len(targets), height, width, 3), dtype=np.uint8)  # filled in place: no list + stack copy
    times = np.zeros(len(targets))
    try:
        stream = container.streams.video[0]
        base = float(stream.time_base)
        index, previous, position = 0, None, -math.inf
        seek, can_seek = True, True

        def take(frame, slot):
            picked[slot] = _resize_rgb(frame.to_ndarray(format="rgb24"), height, width)  # one source frame at a time
            times[slot] = frame.pts * base - plan.start

        while index < len(targets):
            if seek:
                container.seek(int(targets[index] / base), stream=stream, backward=True, any_frame=False)
                previous, seek, first = None, False, True
            for frame in container.decode(stream):
                if frame.pts is None:
                    continue
                t = frame.pts * base
                if first:  # a seek that lands behind where decoding already was: keyframes too sparse to help
                    can_seek, first = can_seek and t > position, False
                while index < len(targets) and t >= targets[index]:  # this frame is at/after the target
                    use_previous = previous is not None and targets[index] - previous.pts * base < t - targets[index]
                    take(previous if use_previous else frame, index)
                    index += 1
                previous, position = frame, t
                if index < len(targets) and can_seek and targets[index] - t > SEEK_GAP:
                    seek = True
                    break
            else:  # end of stream: the remaining targets take the last frame
                if previous is None:
                    raise MediaError("video has no decodable frames")
                while index < len(targets):
                    take(previous, index)
                    index += 1
    except MediaError:
        raise
    except Exception as exc:
        raise MediaError(f"cannot decode video: {error_text(exc)}") from None
    finally:
        container.close()
    audio = decode_audio_track(data) if with_audio else None
    return Video(frames=picked, second_per_grid=plan.second_per_grid, duration=plan.duration, audio=audio,
                 times=times)


# A target further ahead than this (s) seeks to the keyframe before it instead of decoding the frames in between; when a
# seek lands behind where decoding already was (keyframes further apart than the targets), seeking is switched off.
SEEK_GAP = 0.25


def video_frame_size(height: int, width: int, n_frames: int, cfg: MediaConfig) -> tuple[int, int]:
    return smart_resize(height, width, cfg.patch_size * cfg.merge_size, cfg.video_min_pixels, cfg.video_max_pixels)


def preprocess_video(video: Video, cfg: MediaConfig) -> tuple[np.ndarray, tuple[int, int, int]]:
    height, width = video_frame_size(video.frames.shape[1], video.frames.shape[2], len(video.frames), cfg)
    resized = np.stack([_resize_rgb(frame, height, width) for frame in video.frames])
    return patchify(_normalise(resized, cfg), cfg)


# ------------------------------------------------------------------------------------------------------ audio
def to_mono(samples: np.ndarray, sample_rate: int, target_rate: int) -> np.ndarray:
    """[n] or [n, channels] float -> mono float32 at ``target_rate`` (librosa's mean-mix and soxr_hq resampling)."""
    import librosa

    samples = np.asarray(samples, dtype=np.float32)
    if samples.ndim == 2:
        samples = samples.mean(axis=1)
    if sample_rate != target_rate:
        samples = librosa.resample(samples, orig_sr=sample_rate, target_sr=target_rate, res_type="soxr_hq")
    return np.ascontiguousarray(samples, dtype=np.float32)


def to_mono_16k(samples: np.ndarray, sample_rate: int) -> np.ndarray:
    """[n] or [n, channels] float -> mono float32 at 16 kHz, the audio tower's rate."""
    return to_mono(samples, sample_rate, AUDIO_SR)


def decode_audio(data: bytes) -> tuple[np.ndarray, int]:
    """Full decode with soundfile: (float32 [n, channels], sample rate). Raises MediaError."""
    import soundfile as sf

    try:
        samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as exc:
        raise MediaError(f"cannot decode audio: {error_text(exc)}") from None
    if samples.shape[0] == 0:
        raise MediaError("audio has no samples")
    if not np.isfinite(samples).all():
        raise MediaError("audio has non-finite samples")
    return samples, int(rate)


def audio_samples_16k(data: bytes) -> int:
    """Length of the clip once mixed and resampled to 16 kHz (``to_mono_16k``), from the header only."""
    return audio_samples_at(data, AUDIO_SR)


def audio_samples_at(data: bytes, target_rate: int) -> int:
    """Length of the clip once mixed and resampled to ``target_rate`` (``to_mono``), from the header only."""
    import soundfile as sf

    try:
        info = sf.info(io.BytesIO(data))
    except Exception as exc:
        raise MediaError(f"cannot read audio header: {error_text(exc)}") from None
    if info.frames <= 0:
        raise MediaError("audio has no samples")
    return resampled_length(info.frames, info.samplerate, target_rate)


def resampled_length(n_samples: int, sample_rate: float, target_rate: int = AUDIO_SR) -> int:
    """Samples after resampling to ``target_rate`` (librosa.resample: ``ceil(n * target / sr)``)."""
    return n_samples if sample_rate == target_rate else int(math.ceil(n_samples * (float(target_rate) / sample_rate)))


def image_size(data: bytes) -> tuple[int, int]:
    """(height, width) from the image header, without decoding pixels."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except Exception as exc:
        raise MediaError(f"cannot read image header: {error_text(exc)}") from None
    return height, width


def load_audio_16k(data: bytes) -> np.ndarray:
    samples, rate = decode_audio(data)
    return to_mono_16k(samples, rate)


def decode_audio_track(data: bytes) -> np.ndarray | None:
    """The audio track of a video as 16 kHz mono float32, or None if the video has no audio stream."""
    container = _open_container(data)
    try:
        if not container.streams.audio:
            return None
        stream = container.streams.audio[0]
        rate = stream.rate
        chunks = []
        for frame in container.decode(audio=0):
            array = frame.to_ndarray()
            if frame.format.is_planar:
                chunks.append(array.T)
            else:
                chunks.append(array.reshape(-1, len(frame.layout.channels)))
    except Exception as exc:
        raise MediaError(f"cannot decode video audio track: {error_text(exc)}") from None
    finally:
        container.close()
    if not chunks:
        return None
    samples = np.concatenate(chunks).astype(np.float32)
    if np.issubdtype(chunks[0].dtype, np.integer):
        samples /= float(np.iinfo(chunks[0].dtype).max)
    return to_mono_16k(samples, rate)


def audio_feature_length(n_samples_16k: int, hop_length: int = 160) -> int:
    """Mel frames of a 16 kHz clip (Whisper drops the last STFT frame)."""
    return n_samples_16k // hop_length


_EXTRACTORS: dict = {}


def whisper_extractor(cfg: MediaConfig):
    from transformers import WhisperFeatureExtractor

    key = json.dumps(cfg.feature_extractor, sort_keys=True)
    if key not in _EXTRACTORS:
        _EXTRACTORS[key] = WhisperFeatureExtractor(**cfg.feature_extractor)
    return _EXTRACTORS[key]


def min_audio_samples(cfg: MediaConfig) -> int:
    """The shortest 16 kHz clip the encoder can encode: the feature extractor's centred STFT reflect-pads n_fft // 2
    samples on each side, which torch refuses unless the clip is longer (201 samples for Whisper's n_fft 400), and a
    clip needs at least one mel frame (hop_length). The one definition: validation, the shards stage and training."""
    extractor = whisper_extractor(cfg)
    return max(extractor.n_fft // 2 + 1, extractor.hop_length)


def check_audio_length(n_samples_16k: int, cfg: MediaConfig) -> None:
    """Raise MediaError when a clip of ``n_samples_16k`` samples at 16 kHz is shorter than the encoder can encode."""
    minimum = min_audio_samples(cfg)
    if n_samples_16k < minimum:
        raise MediaError(f"{n_samples_16k} samples at 16 kHz, fewer than the {minimum} the audio feature extractor "
                         "needs")


def audio_features(waveforms: list[np.ndarray], cfg: MediaConfig) -> tuple[np.ndarray, np.ndarray]:
    """Whisper log-mel features of the clips of ONE sample, as Qwen3OmniMoeProcessor computes them.

    The processor extracts all clips of a call together with ``padding=True`` (pad to the longest clip),
    ``truncation=False``; the same is done here, so features equal the reference bit for bit.
    Returns (input_features [n, 128, frames] float32, feature_attention_mask [n, frames] int64).
    """
    extractor = whisper_extractor(cfg)
    out = extractor(waveforms, sampling_rate=AUDIO_SR, padding=True, truncation=False,
                    return_attention_mask=True, return_tensors="np")
    return out["input_features"].astype(np.float32), out["attention_mask"].astype(np.int64)


# ----------------------------------------------------------------------------------------------- canonical media
# The form the shards store decoded media in, read back with soundfile and PIL only (no resampling, no container):
# audio as the 16 kHz mono float32 waveform, video as its sampled frames at the model's frame size in one PNG (frames
# stacked vertically; lossless, about half the size of deflated raw frames on the demo set) plus their times in the
# sample's JSON, images as their original bytes. Bump MEDIA_FORMAT whenever what is stored changes: training refuses
# shards of another format (shards.check_shard_settings).
MEDIA_FORMAT = "canonical-2"  # 2: float audio as .npy (float WAV carried libsndfile's write time)

PCM24 = 1 << 23


def write_audio_16k(wave: np.ndarray) -> tuple[bytes, str]:
    """16 kHz mono float32 waveform -> (file bytes, extension) that ``read_audio_16k`` gives back bit for bit.

    FLAC (24-bit) when every sample lies on the 24-bit grid, as it does for 16 kHz integer PCM sources; otherwise
    (resampled or AAC-decoded audio: arbitrary float32 values, which FLAC's integers cannot hold) the float32 array
    as .npy. Rounding to 24 bits instead would move Whisper features by up to 2.6e-4 on the demo set (log-mel bins near
    the -80 dB floor), so the shards would no longer train on what the original files give. Not float WAV: libsndfile
    stamps the time of writing into its PEAK chunk, so two shards runs over the same data would differ. Both forms are
    the same bytes for the same waveform, whoever writes them."""
    import soundfile as sf

    wave = np.asarray(wave, dtype=np.float32)
    ints = np.rint(wave.astype(np.float64) * PCM24)
    buffer = io.BytesIO()
    on_grid = ints.min(initial=0) >= -PCM24 and ints.max(initial=0) < PCM24  # 24-bit signed: [-2**23, 2**23 - 1]
    if on_grid and np.array_equal(ints.astype(np.float32) / np.float32(PCM24), wave):
        # integers written (libsndfile's float -> int conversion scales by 2**23 - 1 and would not read back exactly)
        sf.write(buffer, ints.astype(np.int32) << 8, AUDIO_SR, format="FLAC", subtype="PCM_24")
        return buffer.getvalue(), "flac"
    np.save(buffer, wave, allow_pickle=False)
    return buffer.getvalue(), "npy"


def read_audio_16k(data: bytes) -> np.ndarray:
    """A canonical audio member (``write_audio_16k``) -> the float32 16 kHz mono waveform it was written from."""
    import soundfile as sf

    if data[:6] == b"\x93NUMPY":
        wave = np.load(io.BytesIO(data), allow_pickle=False)
        if wave.dtype != np.float32 or wave.ndim != 1:
            raise MediaError(f"canonical audio .npy must be 1-d float32, got {wave.dtype} {wave.shape}")
        return wave
    try:
        wave, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=False)
    except Exception as exc:
        raise MediaError(f"cannot decode canonical audio: {error_text(exc)}") from None
    if rate != AUDIO_SR or wave.ndim != 1:
        raise MediaError(f"canonical audio must be {AUDIO_SR} Hz mono, got {rate} Hz, shape {wave.shape}")
    return wave


def write_frames_png(frames: np.ndarray) -> bytes:
    """Sampled frames uint8 [T, H, W, 3] -> one PNG of the frames stacked vertically (lossless)."""
    from PIL import Image

    n, height, width, _ = frames.shape
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(frames).reshape(n * height, width, 3)).save(buffer, format="PNG")
    return buffer.getvalue()


def read_frames_png(data: bytes, n_frames: int) -> np.ndarray:
    """A canonical frames member -> uint8 [T, H, W, 3]. PIL's decompression-bomb limit (89 M pixels) is lifted for
    this call: the stack of a long clip is legitimately larger (768 frames at the video pixel bound are 600 M)."""
    from PIL import Image

    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
            frames = np.asarray(image.convert("RGB"))
    except Exception as exc:
        raise MediaError(f"cannot decode canonical frames: {error_text(exc)}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    if frames.shape[0] % n_frames:
        raise MediaError(f"canonical frames: {frames.shape[0]} rows do not split into {n_frames} frames")
    return frames.reshape(n_frames, frames.shape[0] // n_frames, frames.shape[1], 3)
