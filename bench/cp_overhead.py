"""Issue 25 item 5: does the context-parallel code path cost the cp1 training step anything? One run, one GPU: the
same training step at cp1 with the current omni_model and with the omni_model from before context parallelism was
merged, alternating in fresh processes on the same machine.

    python bench/cp_overhead.py                                    # GPU: 4-layer thinker at the 30B-A3B shapes
    python bench/cp_overhead.py --tiny --cpu --steps 3 --warmup 1  # CPU smoke run (tiny model, fp32)

On a lent GPU machine (no registry, no .git: the wheels of shared/tools/device-wheels.sh carried in .whl/):
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site:$PWD python3 bench/cp_overhead.py --json $OUT/cp_overhead.json

The pre-CP tree: `bench/pre_cp_omni_model.tar.gz`, the omni_model package at the first parent of the CP merge
(PRE_CP_COMMIT; 240 kB), made on a machine with the history by

    git archive --format=tar.gz -o bench/pre_cp_omni_model.tar.gz fae0e9a^1 omni_model

and unpacked at run time into a temporary folder (`--old-tree DIR` takes an unpacked one instead). Each row runs in
its own process (bench/train_throughput.py's run_child) that puts its tree first on sys.path, so `omni_model` is that
tree's package (the row records the file it imported); the bench's own code and the installed packages are the same
for both. Pre-CP and current trees take the same constructor calls used here (TrainSettings, build_training,
loop.Run / loop.step, FlopCounter, EncodedSample / pack / collate), which is why the step is built from them.

The step: omni_model.train.loop.step (mcore's schedule over forward_step, DDP, the distributed optimizer, bf16 with
fp32 masters) on build_training's objects at cp1, towers frozen, random weights drawn in the same order from the same
seed (planner_check.init_weights: both trees build the same parameters, so the same weights and the same MoE
routing; the first step's loss of the two rows is printed as the check), on the same packed text rows (random token
ids, sequences of 256..2048 tokens packed into rows of --seq-len: the LLM path that CP touched; the towers are
unchanged by CP). Per row: the median step time of --steps timed steps after --warmup, their spread ((max - min) /
median), tokens/s, peak memory. Rows alternate old/current --repeats times; the table gives each row's best repeat
(lowest median) and the ratio current / pre-CP of those medians (1.00 = unchanged; the repeats' spread says what
difference is noise).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRE_CP_COMMIT = "be69012"  # fae0e9a^1: main just before "Merge branch 'cp'" (context parallelism)
PRE_CP_TARBALL = REPO / "bench" / "pre_cp_omni_model.tar.gz"


# -- the row (child process) ---------------------------------------------------------------------------------------
def text_rows(count: int, seq_len: int, vocab: int, seed: int) -> list:
    """`count` packed rows of random text sequences as plain lists: [[(ids, n_prompt), ...], ...] (each row <=
    seq_len tokens); every tree turns them into its own OmniBatch."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        row, used = [], 0
        while True:
            n = rng.randint(256, 2048)
            if used + n > seq_len:
                break
            row.append(([rng.randrange(vocab) for _ in range(n)], n // 4))
            used += n
        rows.append(row)
    return rows


def to_batches(rows: list, pad_id: int) -> list:
    import numpy as np

    from omni_model.data.batch import EncodedSample, collate
    from omni_model.data.packing import pack

    batches = []
    for r, row in enumerate(rows):
        samples = []
        for i, (ids, n_prompt) in enumerate(row):
            ids = np.asarray(ids, dtype=np.int64)
            labels = ids.copy()
            labels[:n_prompt] = -100  # the prompt is not trained
            positions = np.tile(np.arange(len(ids), dtype=np.float32), (3, 1))
            samples.append(EncodedSample(__key__=f"r{r}s{i}", __restore_key__=(), __subflavors__={}, __sources__=(),
                                         sample_ids=[f"r{r}s{i}"], input_ids=ids, labels=labels,
                                         position_ids=positions, seq_lens=[len(ids)]))
        batches.append(collate([pack(samples)], pad_id=pad_id, packed=True))
    return batches


def run_row(spec: dict) -> dict:
    """One row in this process: `spec["tree"]` first on sys.path, then the training step of that omni_model."""
    sys.path.insert(0, spec["tree"])
    import torch

    import omni_model
    from omni_model.model.options import PerfOptions
    from omni_model.train import build, loop
    from omni_model.train.data import TokenCounter
    from omni_model.train.metrics import FlopCounter
    from omni_model.train.forward_step import forward_step
    from omni_model.train.settings import TrainSettings
    from planner_check import init_weights

    imported = str(Path(omni_model.__file__).resolve())
    assert imported.startswith(str(Path(spec["tree"]).resolve())), f"imported {imported}, not from {spec['tree']}"
    on_gpu = spec["device"] == "cuda"
    iters = spec["warmup"] + spec["steps"]
    train = {"iters": iters, "lr_warmup_iters": 1, "global_batch_size": spec["global_batch"], "micro_batch_size": 1,
             "seq_len": spec["seq_len"], "packing": True, "gpus_per_node": int(on_gpu), "cpu_procs": 1,
             "freeze_vision": True, "freeze_audio": True}
    settings = TrainSettings(hf_dir=spec["hf_dir"], init_checkpoint="", shards="",
                             train_dir=str(Path(spec["work"]) / "train"), train=train)
    build.init_training_parallel(settings)
    torch.manual_seed(0)
    training = build.build_training(settings, load_initial_weights=False, load_base=lambda thinker: None,
                                    options=PerfOptions())
    torch.manual_seed(0)
    init_weights(training.thinker)
    training.optimizer.reload_model_params()  # the fp32 masters copied the uninitialised weights
    rows = json.loads(Path(spec["rows"]).read_text())
    batches = to_batches(rows, spec["pad_id"])
    if on_gpu:
        batches = [batch.pin_memory() for batch in batches]
    flops = FlopCounter(spec["hf_dir"], settings.train)
    run = loop.Run(settings=settings, training=training, forward_step=forward_step, digest="bench", loader=None,
                   batches=TokenCounter(iter(batches)), evaluation=[], flops=flops, peak=None, log=None)
    training.model.train()
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    records = [loop.step(run, i) for i in range(1, iters + 1)]
    timed = records[spec["warmup"]:]
    seconds = [r["step_s"] for r in timed]
    median = statistics.median(seconds)
    return {"tree": spec["name"], "omni_model": imported, "median_step_s": median,
            "spread": (max(seconds) - min(seconds)) / median, "step_s": seconds,
            "tokens_per_s": statistics.median(r["tokens"] / r["step_s"] for r in timed),
            "first_loss": records[0]["loss"], "last_loss": records[-1]["loss"],
            "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if on_gpu else None}


# -- driver --------------------------------------------------------------------------------------------------------
def old_tree(args, work: Path) -> str:
    if args.old_tree:
        return str(Path(args.old_tree).resolve())
    if not PRE_CP_TARBALL.exists():
        raise SystemExit(f"{PRE_CP_TARBALL} is missing: make it with `git archive --format=tar.gz -o "
                         f"{PRE_CP_TARBALL.relative_to(REPO)} {PRE_CP_COMMIT} omni_model` (or pass --old-tree DIR)")
    target = work / "pre_cp"
    with tarfile.open(PRE_CP_TARBALL) as archive:
        archive.extractall(target, filter="data")
    return str(target)


def print_table(best: dict) -> dict:
    old, new = best.get("pre_cp"), best.get("current")
    header = ("tree", "median step s", "spread", "tokens/s", "peak GiB", "first loss")
    print("\n{:10s} {:>14s} {:>8s} {:>10s} {:>9s} {:>11s}".format(*header))
    for name, r in best.items():
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        print(f"{name:10s} {r['median_step_s']:14.4f} {r['spread']:8.1%} {r['tokens_per_s']:10.0f} {peak:>9s} "
              f"{r['first_loss']:11.5f}")
    if old and new:
        ratio = new["median_step_s"] / old["median_step_s"]
        print(f"current / pre-CP step time: {ratio:.3f} (first-step losses {new['first_loss']:.6f} vs "
              f"{old['first_loss']:.6f})")
        return {"ratio_current_vs_pre_cp": ratio}
    return {}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tiny", action="store_true", help="the embedded tiny config instead of the 30B shapes")
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--global-batch", type=int, default=4, help="rows per step (micro-batches of one row)")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per row (>= 10 for the GPU figure)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="each tree's row this many times, alternating")
    parser.add_argument("--old-tree", help="an unpacked pre-CP tree (a folder holding omni_model/)")
    parser.add_argument("--timeout", type=int, default=900)
    parser.add_argument("--json", default=str(REPO / "bench/results/cp_overhead.json"))
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_row(json.loads(args.one))), flush=True)
        return 0

    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "bench"))
    import torch
    from train_throughput import run_child, write_hf_dir

    device = "cpu" if args.cpu or not torch.cuda.is_available() else "cuda"
    work = Path(tempfile.mkdtemp(prefix="cp_overhead_"))
    hf_dir = write_hf_dir(work, args.tiny, args.layers)
    config = json.loads((hf_dir / "config.json").read_text())
    vocab = config["thinker_config"]["text_config"]["vocab_size"]
    rows_path = work / "rows.json"
    rows = text_rows(args.global_batch * (args.warmup + args.steps), args.seq_len, min(vocab, 150000), seed=0)
    rows_path.write_text(json.dumps(rows))
    trees = {"pre_cp": old_tree(args, work), "current": str(REPO)}
    base = {"hf_dir": str(hf_dir), "rows": str(rows_path), "device": device, "seq_len": args.seq_len,
            "global_batch": args.global_batch, "steps": args.steps, "warmup": args.warmup, "pad_id": 151643}
    results = []
    for repeat in range(args.repeats):
        order = list(trees) if repeat % 2 == 0 else list(reversed(trees))  # alternate which runs first
        for name in order:
            spec = dict(base, name=name, tree=trees[name], work=str(work / f"{name}{repeat}"))
            began = time.time()
            result = run_child(spec, args.timeout, device == "cpu", script=__file__, require_success=True)
            result.setdefault("tree", name)
            results.append(result)
            state = (f"median {result['median_step_s']:.4f} s, spread {result['spread']:.1%}"
                     if "failed" not in result else f"FAILED: {result['failed'][-1500:]}")
            print(f"[{repeat}] {name}: {state} ({time.time() - began:.0f} s)", flush=True)
    best = {}
    for result in results:
        if "failed" not in result and (result["tree"] not in best
                                       or result["median_step_s"] < best[result["tree"]]["median_step_s"]):
            best[result["tree"]] = result
    summary = print_table(best)
    out = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "args": vars(args),
           "pre_cp_commit": PRE_CP_COMMIT, "rows": results, "best": best, **summary}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
    return 0 if len(best) == 2 else 1


if __name__ == "__main__":
    sys.exit(main())
