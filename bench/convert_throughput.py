"""Convert throughput: a multi-GB random checkpoint with the released 30B-A3B layer shapes (all 128 experts, real
vision and audio towers, real vocab) -> torch_dist, against a plain read of the same safetensors in the same run.

    .venv/bin/python bench/convert_throughput.py --layers 2 --dir /tmp/convert_bench [--dtype bf16] [--keep]

Phases, each in its own process so that its peak RSS (ru_maxrss) is its own:
  generate  omni_model.random_checkpoint (model.source: random), talker/code2wav cut to 1 layer (not converted)
  read      every thinker tensor read once through safetensors (SafetensorsReader.get + clone), nothing kept: the
            yardstick of the issue
  copy      the safetensors files copied (read + write + sync): what the disk allows for a step that writes
  convert   omni_model.convert.convert_checkpoint (one process, tp1): read + map + copy into the thinker + save
The warm read and the conversion both run right after the files were read (page cache warm when they fit in RAM);
peak RSS (ru_maxrss) counts the file pages safetensors maps as well as the process's own memory.
Prints a table; the numbers in bench/RESULTS.md come from this script.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB


def overrides(layers: int, experts: int = 0) -> dict:
    """The released architecture cut to `layers` LLM layers (and `experts` experts per layer when > 0: a narrower
    model whose depth can grow on a small machine)."""
    text = {"num_hidden_layers": layers, **({"num_experts": experts} if experts else {})}
    return {"thinker_config": {"text_config": text},
            "talker_config": {"text_config": {"num_hidden_layers": 1}, "code_predictor_config": {"num_hidden_layers": 1}},
            "code2wav_config": {"num_hidden_layers": 1}}


def phase_generate(args) -> dict:
    from omni_model.random_checkpoint import write_random_checkpoint

    start = time.perf_counter()
    write_random_checkpoint(args.dir / "hf", "released-30b-a3b", overrides(args.layers, args.experts), seed=0,
                            log=lambda _: None)
    return {"seconds": time.perf_counter() - start}


def thinker_bytes(reader) -> tuple[int, int]:
    keys = [k for k in reader.keys() if k.startswith("thinker.")]
    return sum(reader.nbytes(k) for k in keys), len(keys)


def phase_read(args) -> dict:
    from omni_model.convert.mapping import SafetensorsReader

    reader = SafetensorsReader(args.dir / "hf")
    total, count = thinker_bytes(reader)
    start = time.perf_counter()
    for key in reader.keys():
        if key.startswith("thinker."):
            tensor = reader.get(key).clone()  # safetensors maps the file: clone = every byte read into memory
            del tensor
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "bytes": total, "tensors": count, "gb_per_s": total / 1e9 / seconds}


def phase_copy(args) -> dict:
    """Disk yardstick for the save: copy the safetensors files (read + write the same bytes, no torch)."""
    files = sorted((args.dir / "hf").glob("*.safetensors"))
    target = args.dir / "copy"
    target.mkdir(exist_ok=True)
    total = sum(f.stat().st_size for f in files)
    start = time.perf_counter()
    for f in files:
        shutil.copyfile(f, target / f.name)
    os.sync()
    seconds = time.perf_counter() - start
    shutil.rmtree(target)
    return {"seconds": seconds, "bytes": total, "gb_per_s": total / 1e9 / seconds}


def phase_convert(args) -> dict:
    import torch

    from omni_model.convert import convert_checkpoint
    from omni_model.convert.mapping import SafetensorsReader
    from omni_model.runtime.parallel import destroy_parallel, init_parallel

    torch.set_num_threads(args.threads)
    init_parallel()
    total, count = thinker_bytes(SafetensorsReader(args.dir / "hf"))
    start = time.perf_counter()
    record = convert_checkpoint(args.dir / "hf", args.dir / "mcore", dtype=args.dtype, log=lambda _: None)
    seconds = time.perf_counter() - start
    destroy_parallel()
    return {"seconds": seconds, "bytes": total, "tensors": count, "gb_per_s": total / 1e9 / seconds,
            "build_s": record["seconds"]["build"], "read_and_map_s": record["seconds"]["read_and_map"],
            "save_s": record["seconds"]["save"], "save_groups": record["save_groups"],
            "read_and_map_gb_per_s": total / 1e9 / record["seconds"]["read_and_map"]}


def largest_layer_group(reader) -> dict:
    """The biggest mcore tensor one LLM layer is built from (all experts' fc1 = gate+up of 128 experts, one
    parameter here) and the whole layer, in bytes on disk."""
    layer = [k for k in reader.keys() if k.startswith("thinker.model.layers.0.")]
    fc1 = sum(reader.nbytes(k) for k in layer if k.endswith(("gate_proj.weight", "up_proj.weight")))
    return {"layer_bytes": sum(reader.nbytes(k) for k in layer), "experts_fc1_bytes": fc1}


def run_phase(name: str, args) -> dict:
    cmd = [sys.executable, __file__, "--phase", name, "--dir", str(args.dir), "--layers", str(args.layers),
           "--dtype", args.dtype, "--threads", str(args.threads), "--experts", str(args.experts)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if proc.returncode != 0:
        raise RuntimeError(f"phase {name} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2, help="thinker LLM layers (30B shapes, 128 experts each)")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/convert_bench"))
    parser.add_argument("--experts", type=int, default=0, help="experts per LLM layer (0 = the released 128)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="converted parameter dtype")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoint (default: delete)")
    parser.add_argument("--reuse", action="store_true", help="reuse a checkpoint kept in --dir by an earlier --keep")
    parser.add_argument("--phase", choices=["generate", "read", "copy", "convert"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        phases = {"generate": phase_generate, "read": phase_read, "copy": phase_copy, "convert": phase_convert}
        result = phases[args.phase](args)
        print(json.dumps(dict(result, peak_rss_gb=peak_rss_gb())))
        return

    from omni_model.convert.mapping import SafetensorsReader

    reuse = args.reuse and (args.dir / "hf" / "model.safetensors.index.json").is_file()
    if not reuse:
        shutil.rmtree(args.dir, ignore_errors=True)
        args.dir.mkdir(parents=True)
    shutil.rmtree(args.dir / "mcore", ignore_errors=True)
    try:
        generated = {"seconds": float("nan")} if reuse else run_phase("generate", args)
        reader = SafetensorsReader(args.dir / "hf")
        on_disk = sum(p.stat().st_size for p in (args.dir / "hf").glob("*.safetensors"))
        group = largest_layer_group(reader)
        cold = run_phase("read", args)  # first pass: from disk unless the page cache still holds the files
        copy = run_phase("copy", args)
        read = run_phase("read", args)  # second pass: warm, like the convert phase right after it
        convert = run_phase("convert", args)
        written = sum(p.stat().st_size for p in (args.dir / "mcore" / "checkpoint").rglob("*") if p.is_file())
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)
    gb = 1e9
    experts = f"{args.experts} experts per layer" if args.experts else "128 experts per layer"
    print(f"\nrandom checkpoint: released 30B-A3B shapes ({experts}), {args.layers} LLM layers, {on_disk / gb:.2f} GB safetensors "
          f"(thinker {read['bytes'] / gb:.2f} GB in {read['tensors']} tensors), generated in {generated['seconds']:.0f} s")
    print(f"one LLM layer: {group['layer_bytes'] / gb:.2f} GB; its largest tensor group (the experts' gate+up -> "
          f"one fc1 parameter): {group['experts_fc1_bytes'] / gb:.2f} GB; converted to {args.dtype}, "
          f"torch_dist written: {written / gb:.2f} GB\n")
    print("| phase | seconds | GB/s (thinker bytes read) | peak RSS GiB |")
    print("| --- | --- | --- | --- |")
    print(f"| plain read, first pass (page cache as found) | {cold['seconds']:.1f} | {cold['gb_per_s']:.2f} | "
          f"{cold['peak_rss_gb']:.2f} |")
    print(f"| plain read, warm (safetensors get + clone, every thinker tensor) | {read['seconds']:.1f} | "
          f"{read['gb_per_s']:.2f} | {read['peak_rss_gb']:.2f} |")
    print(f"| plain file copy of all safetensors (read + write + sync, disk yardstick) | {copy['seconds']:.1f} | "
          f"{copy['gb_per_s']:.2f} (all {copy['bytes'] / gb:.2f} GB) | |")
    print(f"| convert: build the (uninitialised) thinker | {convert['build_s']:.1f} | | |")
    print(f"| convert: read + map + copy into the thinker | {convert['read_and_map_s']:.1f} | "
          f"{convert['read_and_map_gb_per_s']:.2f} | |")
    print(f"| convert: + dist_checkpointing.save ({convert['save_groups']} save groups, merged) | "
          f"{convert['save_s']:.1f} | | |")
    print(f"| convert total (convert_checkpoint) | {convert['seconds']:.1f} | {convert['gb_per_s']:.2f} | "
          f"{convert['peak_rss_gb']:.2f} |")
    print(f"\nconvert / plain read speed: {convert['gb_per_s'] / read['gb_per_s']:.0%} (goal >= 50 %); read+map alone "
          f"{convert['read_and_map_gb_per_s'] / read['gb_per_s']:.0%}; peak RSS / largest layer group: "
          f"{convert['peak_rss_gb'] * 1024**3 / group['experts_fc1_bytes']:.1f}x, / one layer: "
          f"{convert['peak_rss_gb'] * 1024**3 / group['layer_bytes']:.1f}x (goal < 2x)")


if __name__ == "__main__":
    main()
