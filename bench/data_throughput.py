"""Data throughput on the demo set: shard writer and task encoder (with packing) vs raw tar writing of the same bytes;
the task encoder's per-sample work from the original files (decode, resample, PyAV: what training did before canonical
media) vs from the canonical shard members (soundfile + PIL), on the same kept samples; shard size of the kept samples
with their original media (the layout before) vs canonical media.

    .venv/bin/python bench/data_throughput.py [--processed results/data/processed.jsonl] [--hf results/model/hf]

Without the pipeline outputs it builds its inputs in a temp dir (tiny checkpoint, demo set, validation only).
Prints a markdown table (samples/s, MB/s, tokens/s); all rows measured in the same run on the same inputs.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _inputs(args, tmp: Path) -> tuple[Path, Path, Path | None]:
    """(processed.jsonl, checkpoint, speech codec or None): the workflow's, else a demo set built here."""
    processed, hf, codec = Path(args.processed), Path(args.hf), Path(args.codec)
    if processed.is_file() and (hf / "config.json").is_file():
        return processed, hf, (codec if (codec / "config.json").is_file() else None)
    from omni_model.data.datajuicer import validate
    from omni_model.data.demo import generate_demo
    from omni_model.tiny import write_tiny_checkpoint, write_tiny_codec

    hf = write_tiny_checkpoint(tmp / "hf")
    records, _, _ = validate(generate_demo(tmp / "raw", 200, 0))
    processed = tmp / "processed.jsonl"
    processed.write_text("".join(json.dumps(r) + "\n" for r in records))
    return processed, hf, write_tiny_codec(tmp / "codec")  # the demo's spoken answers need the codec


def _samples(processed: Path) -> list[tuple[dict, dict]]:
    from omni_model.data.encoder import media_from_paths

    records = [json.loads(l) for l in processed.read_text().splitlines() if l.strip()]
    return [(r, media_from_paths(r)) for r in records]


def bench_raw_tar(samples, out: Path) -> tuple[float, int]:
    started, total = time.perf_counter(), 0
    with tarfile.open(out, "w") as tar:
        for index, (record, media) in enumerate(samples):
            parts = {"json": json.dumps(record).encode()}
            parts.update({f"{kind}{i}.bin": data for (kind, i), data in media.items()})
            for name, data in parts.items():
                info = tarfile.TarInfo(f"{index:06d}.{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
                total += len(data)
    return time.perf_counter() - started, total


def bench_shardwriter(samples, out_dir: Path, max_samples: int) -> float:
    import webdataset as wds

    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with wds.ShardWriter(str(out_dir / "s-%06d.tar"), maxcount=max_samples, verbose=0) as writer:
        for index, (record, media) in enumerate(samples):
            sample = {"__key__": f"{index:06d}", "json": json.dumps(record).encode()}
            sample.update({f"{kind}{i}.bin": data for (kind, i), data in media.items()})
            writer.write(sample)
    return time.perf_counter() - started


def bench_encode(encoder, items, canonical: bool) -> tuple[float, int]:
    """Seconds to encode every item (media already in memory), and tokens."""
    started, tokens = time.perf_counter(), 0
    for record, media in items:
        sample = encoder.encode_canonical(record, media) if canonical else encoder.encode(record, media)
        tokens += sample.length
    return time.perf_counter() - started, tokens


def original_layout_bytes(samples, kept_ids: set, out_dir: Path) -> int:
    """Tar bytes of the kept samples stored as before canonical media (json + original media files)."""
    import webdataset as wds

    from omni_model.data.formats import LIST_KEY
    from omni_model.data.shards import media_member

    out_dir.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(out_dir / "o-%06d.tar"), maxcount=64, verbose=0) as writer:
        for index, (record, media) in enumerate(samples):
            if record["id"] in kept_ids:
                writer.write({"__key__": f"{index:06d}", "json": json.dumps(record).encode(),
                              **{media_member(k, i, record[LIST_KEY[k]][i]): data for (k, i), data in media.items()}})
    return sum(p.stat().st_size for p in out_dir.glob("*.tar"))


def textured_clip(path: Path, seconds: int = 10, fps: int = 30, size: tuple[int, int] = (1280, 720)) -> Path:
    """A camera-like clip (gradient + moving block + fixed sensor-like noise; H.264 with x264's default keyframe
    interval, as most camera and web video): the demo's 64x48 MPEG-4 clips are far cheaper to decode than real video
    and compress far better losslessly."""
    import av
    import numpy as np

    width, height = size
    rng = np.random.default_rng(0)
    noise = rng.integers(-8, 9, (height, width, 1))
    ramp = np.linspace(40, 200, width)[None, :, None]
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "veryfast"}
        for index in range(seconds * fps):
            frame = np.broadcast_to(ramp + noise, (height, width, 3)).copy()
            x = int(index / (seconds * fps) * (width - 200))
            frame[height // 3: height // 3 + 200, x:x + 200] = (220, 60, 40)
            frame = np.clip(frame, 0, 255).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def bench_video_clip(encoder, path: Path, repeats: int = 3) -> tuple[list[tuple[str, float, int]], tuple]:
    """Best of ``repeats`` seconds: decode_video of the clip (before) vs reading its canonical frames (after)."""
    from omni_model.data.media import decode_video, read_frames_png, write_frames_png

    data = path.read_bytes()
    video = decode_video(data, encoder.media)
    frames = write_frames_png(video.frames)
    out = []
    for label, fn, size in (
            ("decode_video of the H.264 file (PyAV, seek, resize): before", lambda: decode_video(data, encoder.media),
             len(data)),
            ("read_frames_png of its canonical frames (PIL): after", lambda: read_frames_png(frames, len(video.frames)),
             len(frames))):
        out.append((label, min(_timed(fn) for _ in range(repeats)), size))
    return out, video.frames.shape


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--processed", default=str(REPO / "results/data/processed.jsonl"))
    parser.add_argument("--hf", default=str(REPO / "results/model/hf"))
    parser.add_argument("--codec", default=str(REPO / "results/model/codec"), help="speech codec (spoken answers)")
    parser.add_argument("--max-seq-len", type=int, default=4096)
    parser.add_argument("--pack-budget", type=int, default=4096)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from omni_model.data.shards import write_shards
    from omni_model.data.task_encoder import OmniTaskEncoder, build_loader

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        processed, hf, codec = _inputs(args, tmp)
        samples = _samples(processed)
        n = len(samples)
        rows = []
        seconds, nbytes = bench_raw_tar(samples, tmp / "raw.tar")
        rows.append(("raw tarfile write of the same bytes", n / seconds, nbytes / seconds / 1e6, None))
        seconds = bench_shardwriter(samples, tmp / "sw", 64)
        rows.append(("webdataset.ShardWriter only (same bytes)", n / seconds, nbytes / seconds / 1e6, None))
        started = time.perf_counter()
        report = write_shards(processed, tmp / "shards", hf, max_samples=64, max_seq_len=args.max_seq_len,
                              val_fraction=0.0, codec_dir=codec)
        seconds = time.perf_counter() - started
        rows.append(("shards stage (full decode + token count + ShardWriter + Energon index)", n / seconds,
                     nbytes / seconds / 1e6, sum(report["tokens"].values()) / seconds))
        kept = report["kept"]
        from omni_model.data.encoder import OmniEncoder
        from omni_model.data.sample import shard_samples

        canonical = [(s["record"], s["media"]) for s in shard_samples(tmp / "shards")]
        by_id = {record["id"]: (record, media) for record, media in samples}
        original = [by_id[record["id"]] for record, _ in canonical]
        encoder = OmniEncoder(hf, max_seq_len=args.max_seq_len)
        encode_rows = []
        for label, items, is_canonical in (
                ("original files (PIL, soundfile + librosa resampling, PyAV): before", original, False),
                ("canonical shard members (PIL, soundfile): after", canonical, True)):
            bench_encode(encoder, items[:2], is_canonical)  # warm-up (extractor construction, imports)
            seconds, encoded_tokens = bench_encode(encoder, items, is_canonical)
            encode_rows.append((f"task encoder per sample, {label}", len(items) / seconds, None,
                                encoded_tokens / seconds))
        rows += encode_rows
        size_before = original_layout_bytes(samples, {record["id"] for record, _ in canonical}, tmp / "orig")
        size_after = sum(p.stat().st_size for p in (tmp / "shards").glob("*.tar"))
        clip_rows, clip_shape = bench_video_clip(encoder, textured_clip(tmp / "clip.mp4"))
        for label, kwargs in (
            ("task encoder, packed rows of %d tokens (Energon loader)" % args.pack_budget,
             dict(batch_size=1, packing_buffer_size=128)),
            ("task encoder, unpacked, micro-batch 4 (Energon loader)", dict(batch_size=4)),
        ):
            encoder = OmniTaskEncoder(hf, max_seq_len=args.max_seq_len, pack_budget=args.pack_budget)
            loader = build_loader(tmp / "shards", encoder, shuffle_buffer_size=None, max_samples_per_sequence=None,
                                  repeat=False, **kwargs)
            started, count, tokens, rows_out, padded = time.perf_counter(), 0, 0, 0, 0
            for batch in loader:
                count += sum(len(ids) for ids in batch.sample_ids)
                tokens += batch.num_tokens
                padded += batch.input_ids.numel()
                rows_out += batch.input_ids.shape[0]
            seconds = time.perf_counter() - started
            assert count == kept, (count, kept)
            if "packing_buffer_size" in kwargs:
                padded = rows_out * args.pack_budget  # fill of the token budget
            rows.append((f"{label}; {rows_out} rows, fill {tokens / max(padded, 1):.0%}", count / seconds, None,
                         tokens / seconds))

    print(f"\n{n} samples, {nbytes / 1e6:.1f} MB of json + media; cpu threads 1, Energon workers 0; "
          f"host {os.cpu_count()} cores\n")
    print("| what | samples/s | MB/s | tokens/s |")
    print("| --- | ---: | ---: | ---: |")
    for label, sps, mbs, tps in rows:
        print(f"| {label} | {sps:.1f} | {'' if mbs is None else f'{mbs:.1f}'} | {'' if tps is None else f'{tps:.0f}'} |")
    print(f"\ntask encoder per sample: canonical / original = {encode_rows[1][1] / encode_rows[0][1]:.2f}x "
          f"({kept} kept samples)\n")
    print("| shards of the kept samples | MB on disk |")
    print("| --- | ---: |")
    print(f"| original media (json + original files; before) | {size_before / 1e6:.2f} |")
    print(f"| canonical media (json + 16 kHz audio, sampled frames PNG, original images; after) | "
          f"{size_after / 1e6:.2f} |")
    print(f"\none 10 s 1280x720 30 fps camera-like clip -> {clip_shape[0]} frames of {clip_shape[2]}x{clip_shape[1]} "
          "(best of 3)\n")
    print("| video medium | ms | MB stored |")
    print("| --- | ---: | ---: |")
    for label, seconds, size in clip_rows:
        print(f"| {label} | {seconds * 1e3:.0f} | {size / 1e6:.2f} |")


if __name__ == "__main__":
    main()
