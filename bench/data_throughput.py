"""Data throughput on the demo set: shard writer and task encoder (with packing) vs raw tar writing of the same bytes.

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


def _inputs(args, tmp: Path) -> tuple[Path, Path]:
    processed, hf = Path(args.processed), Path(args.hf)
    if processed.is_file() and (hf / "config.json").is_file():
        return processed, hf
    from omni_model.data.datajuicer import validate
    from omni_model.data.demo import generate_demo
    from omni_model.tiny import write_tiny_checkpoint

    hf = write_tiny_checkpoint(tmp / "hf")
    records, _, _ = validate(generate_demo(tmp / "raw", 200, 0))
    processed = tmp / "processed.jsonl"
    processed.write_text("".join(json.dumps(r) + "\n" for r in records))
    return processed, hf


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--processed", default=str(REPO / "results/data/processed.jsonl"))
    parser.add_argument("--hf", default=str(REPO / "results/model/hf"))
    parser.add_argument("--max-seq-len", type=int, default=4096)
    parser.add_argument("--pack-budget", type=int, default=4096)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from omni_model.data.shards import write_shards
    from omni_model.data.task_encoder import OmniTaskEncoder, build_loader

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        processed, hf = _inputs(args, tmp)
        samples = _samples(processed)
        n = len(samples)
        rows = []
        seconds, nbytes = bench_raw_tar(samples, tmp / "raw.tar")
        rows.append(("raw tarfile write of the same bytes", n / seconds, nbytes / seconds / 1e6, None))
        seconds = bench_shardwriter(samples, tmp / "sw", 64)
        rows.append(("webdataset.ShardWriter only (same bytes)", n / seconds, nbytes / seconds / 1e6, None))
        started = time.perf_counter()
        report = write_shards(processed, tmp / "shards", hf, max_samples=64, max_seq_len=args.max_seq_len,
                              val_fraction=0.0)
        seconds = time.perf_counter() - started
        rows.append(("shards stage (full decode + token count + ShardWriter + Energon index)", n / seconds,
                     nbytes / seconds / 1e6, sum(report["tokens"].values()) / seconds))
        kept = report["kept"]
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


if __name__ == "__main__":
    main()
