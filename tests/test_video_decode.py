"""Video decoding bounded in memory and true in time (omni_model.data.media.decode_video / plan_video)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from dedup_media import NO_STREAM_DURATION, clip, clip_without_stream_duration, failing_op_case, video_record
from omni_model.data.media import MediaConfig, decode_video, plan_video

REPO = Path(__file__).resolve().parents[1]


def _long_1080p_clip(path: Path, seconds: int = 60, fps: int = 30) -> Path:
    """A 60 s 1920x1080 30 fps H.264 clip made cheaply: one second is encoded (a block crossing a flat frame,
    keyframe every 0.5 s) and its packets are muxed ``seconds`` times with shifted timestamps (~5 s instead of
    minutes of 1080p encoding)."""
    import av

    second = io.BytesIO()
    with av.open(second, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 1920, 1080, "yuv420p"
        stream.options = {"preset": "ultrafast"}
        stream.gop_size = fps // 2
        for index in range(fps):
            frame = np.full((1080, 1920, 3), 40, dtype=np.uint8)
            frame[400:600, index * 60:index * 60 + 120] = (200, 80, 30)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    second.seek(0)
    with av.open(second) as source, av.open(str(path), "w") as target:
        in_stream = source.streams.video[0]
        out_stream = target.add_stream(template=in_stream)
        packets = [p for p in source.demux(in_stream) if p.size]
        span = int(round(1 / in_stream.time_base))  # one second in stream time units
        for k in range(seconds):
            for p in packets:
                copy = av.Packet(bytes(p))
                copy.pts, copy.dts, copy.duration = p.pts + k * span, p.dts + k * span, p.duration
                copy.is_keyframe, copy.stream, copy.time_base = p.is_keyframe, out_stream, in_stream.time_base
                target.mux(copy)
    return path


# Peak resident memory of this process (VmHWM, reset at exec; ru_maxrss is not: a child inherits the parent's peak).
MEMORY_PROBE = """
import json, sys, time
from pathlib import Path
from omni_model.data.media import MediaConfig, decode_video, plan_video

def status_kb(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key + ":"))

data = Path(sys.argv[1]).read_bytes()
cfg = MediaConfig()
plan = plan_video(data, cfg)
before = status_kb("VmRSS")
started = time.time()
video = decode_video(data, cfg)
after = status_kb("VmHWM")
print(json.dumps({"peak_mb": (after - before) / 1024, "seconds": time.time() - started, "frames": list(video.frames.shape),
                  "planned": plan.n_frames, "first": video.times[:3].tolist(), "last": float(video.times[-1]),
                  "second_per_grid": video.second_per_grid, "duration": video.duration}))
"""


def test_decoding_a_60s_1080p_clip_stays_under_500_mb(tmp_path):
    clip = _long_1080p_clip(tmp_path / "long.mp4")
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(clip)], capture_output=True, text=True, timeout=600,
                         cwd=REPO)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    frames = np.prod(result["frames"]) / 2**20
    print(f"60 s 1080p30 clip ({clip.stat().st_size / 1e6:.1f} MB): peak resident memory growth {result['peak_mb']:.0f} MB while "
          f"decoding {result['frames'][0]} frames to {result['frames'][1]}x{result['frames'][2]} ({frames:.0f} MB of "
          f"them) in {result['seconds']:.1f} s; every frame at native size would be "
          f"{1800 * 1920 * 1080 * 3 / 2**30:.1f} GiB")
    assert result["frames"][0] == result["planned"] == 120  # 2 fps over 60 s
    assert result["peak_mb"] < 500
    assert abs(result["duration"] - 60.0) < 1e-6 and abs(result["second_per_grid"] - 1.0) < 1e-6
    assert np.allclose(result["first"], [0.0, 0.5, 1.0], atol=0.02) and abs(result["last"] - 59.9667) < 0.02


def _vfr_clip(path: Path) -> tuple[Path, np.ndarray]:
    """2.55 s of variable frame rate: 20 fps for the first second, then 2 fps. Frame i is painted grey level 10*i+5
    (so the decoded frame tells which source frame it was). Returns (path, presentation times)."""
    import av

    ticks = list(range(0, 20)) + [20, 30, 40, 50]  # in 1/20 s
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=20)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 20)
        for index, tick in enumerate(ticks):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 10 * index + 5, dtype=np.uint8), format="rgb24")
            frame.pts, frame.time_base = tick, Fraction(1, 20)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path, np.asarray(ticks) / 20.0


def test_variable_frame_rate_frames_are_picked_by_timestamp(tmp_path):
    path, pts = _vfr_clip(tmp_path / "vfr.mp4")
    data = path.read_bytes()
    cfg = MediaConfig(video_fps=2.0)
    plan = plan_video(data, cfg)
    video = decode_video(data, cfg)
    source_index = np.round((video.frames[:, 24, 32].astype(float).mean(-1) - 5) / 10).astype(int)
    targets = plan.target_times() - plan.start
    expected = [int(np.argmin(np.abs(pts - t))) for t in targets]
    by_index = np.linspace(0, len(pts) - 1, plan.n_frames).round().astype(int)  # the old index sampling
    print(f"VFR: targets {np.round(targets, 3).tolist()} -> source frames {source_index.tolist()} at "
          f"{video.times.tolist()} s (index sampling would take frames at {pts[by_index].tolist()} s)")
    assert abs(plan.duration - (pts[-1] + 1 / 20)) < 1e-6 and plan.n_frames == 6  # last frame shown for 1/20 s
    for got, want, target in zip(source_index, expected, targets):
        assert abs(pts[got] - target) <= abs(pts[want] - target) + 1e-9  # the nearest frame (ties either way)
    np.testing.assert_allclose(video.times, pts[source_index], atol=1e-6)
    assert np.abs(pts[by_index] - targets).max() > 0.5 > np.abs(video.times - targets).max()


def test_audio_track_longer_than_video_does_not_stretch_frame_times(tmp_path):
    import av

    path = tmp_path / "av.mp4"
    with av.open(str(path), "w", format="mp4") as container:
        video = container.add_stream("mpeg4", rate=8)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        audio = container.add_stream("aac", rate=16000)
        audio.layout = "mono"
        for index in range(16):  # 2 s of video
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 8 * index, dtype=np.uint8), format="rgb24")
            for packet in video.encode(frame):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
        tone = (0.2 * np.sin(2 * np.pi * 440 * np.arange(48000) / 16000)).astype(np.float32)  # 3 s of audio
        for start in range(0, len(tone), 1024):
            chunk = av.AudioFrame.from_ndarray(tone[None, start:start + 1024], format="flt", layout="mono")
            chunk.rate = 16000
            for packet in audio.encode(chunk):
                container.mux(packet)
        for packet in audio.encode():
            container.mux(packet)
    data = path.read_bytes()
    with av.open(str(path)) as container:
        container_seconds = container.duration / 1e6
    decoded = decode_video(data, MediaConfig(video_fps=2.0), with_audio=True)
    print(f"container {container_seconds:.3f} s, video stream {decoded.duration:.3f} s, audio track "
          f"{len(decoded.audio) / 16000:.3f} s, second_per_grid {decoded.second_per_grid:.3f}")
    assert container_seconds > 2.9  # the container spans the audio
    assert abs(decoded.duration - 2.0) < 1e-6 and abs(decoded.second_per_grid - 1.0) < 1e-6
    assert len(decoded.frames) == 4 and decoded.times[-1] <= 2.0
    assert len(decoded.audio) >= 47000


@pytest.mark.parametrize("damage", ["no_video_stream", "garbage"])
def test_unreadable_video_header_is_a_media_error(tmp_path, damage):
    from omni_model.data.media import MediaError

    data = b"\x00\x00\x00\x18ftypisom" + b"\xff" * 200 if damage == "garbage" else _audio_only_mp4(tmp_path)
    with pytest.raises(MediaError, match="video"):
        plan_video(data, MediaConfig())


def _audio_only_mp4(tmp_path: Path) -> bytes:
    import av

    path = tmp_path / "audio_only.mp4"
    with av.open(str(path), "w", format="mp4") as container:
        audio = container.add_stream("aac", rate=16000)
        audio.layout = "mono"
        chunk = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="flt", layout="mono")
        chunk.rate = 16000
        for packet in list(audio.encode(chunk)) + list(audio.encode()):
            container.mux(packet)
    return path.read_bytes()


@pytest.mark.parametrize("kind", sorted(NO_STREAM_DURATION))
def test_duration_of_a_stream_without_one_is_its_packets_span(tmp_path, kind):
    import av

    path = clip_without_stream_duration(tmp_path, kind)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        header = None if stream.duration is None else float(stream.duration * stream.time_base)
        frames = sum(1 for _ in container.decode(stream))
    fps = NO_STREAM_DURATION[kind][2]
    plan = plan_video(path.read_bytes(), MediaConfig(video_fps=2.0))
    print(f"{kind}: stream header duration {header}, {frames} frames at {fps} fps, planned duration {plan.duration:.3f} s")
    assert abs(plan.duration - 2.0) <= 1.5 / fps and plan.n_frames == 4  # 2 s, within the last frame's span


def test_raw_stream_without_timestamps_is_a_media_error(tmp_path):
    from omni_model.data.media import MediaError

    path = clip(tmp_path / "raw.h264", 1, container_format="h264", codec="libx264")
    with pytest.raises(MediaError, match="video stream has no timestamps"):
        plan_video(path.read_bytes(), MediaConfig())


def test_datajuicer_stage_reads_durations_that_only_the_container_or_packets_state(tmp_path):
    """The default recipe on videos whose stream has no duration: Data-Juicer's video_duration_filter crashed the
    whole stage on them (``NoneType * Fraction``); the recipe's duration filter reads the duration the encoder
    plans with, so 2 s clips are kept and a 0.25 s clip is dropped for its duration."""
    from omni_model.data.datajuicer import run_recipe

    records = [video_record(kind, clip_without_stream_duration(tmp_path, kind)) for kind in sorted(NO_STREAM_DURATION)]
    records.append(video_record("webm-short", clip_without_stream_duration(tmp_path, "webm", seconds=0.25)))
    kept, drops = run_recipe(records, Path("config/datajuicer_recipe.yaml"), tmp_path / "work")
    assert [r["id"] for r in kept] == sorted(NO_STREAM_DURATION)
    assert [(d["id"], d["op"]) for d in drops] == [("webm-short", "omni_video_duration_filter")]
    assert "video_duration=[0.25] outside bounds (max_duration=60, min_duration=0.5" in drops[0]["reason"]


def test_an_op_failing_on_one_sample_drops_that_sample_with_the_error(tmp_path):
    """Any op's per-sample failure is that sample's drop (id, op, the error), never the stage's crash: Data-Juicer's
    own video_duration_filter still fails on a WebM (no stream duration), the other samples go on."""
    from omni_model.data.datajuicer import run_recipe

    recipe, records, check = failing_op_case(tmp_path)
    check(*run_recipe(records, recipe, tmp_path / "work", num_proc=2))
