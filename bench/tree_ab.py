"""One training step, two omni_model trees: the current tree against a BASELINE tree (and, where the baseline ran on
other package versions, those packages), alternating in fresh processes on the same GPU, back to back.

Baselines (`--baseline`):
  pre_cp       issue 25 item 5: omni_model before context parallelism landed (be69012); measured in session 9 when
               both trees ran on megatron-core 0.16.1; since the upgrade it too needs `--old-site` (0.16.1).
  pre_upgrade  issue 24 item 2: omni_model before the megatron-core 0.16.1 -> 0.19.2 / transformers 5.24.0 -> 5.25.0
               upgrade (7fe98a4), run on those older packages: `--old-site DIR` names a folder holding them
               (megatron-core 0.16.1 and transformers 5.24.0 unpacked from their cp312 wheels), put first on the
               baseline row's sys.path.

    python bench/tree_ab.py --baseline pre_upgrade --old-site /tmp/oldsite      # GPU: 4-layer thinker, 30B-A3B shapes
    python bench/tree_ab.py --baseline pre_upgrade --old-site /tmp/oldsite --tiny --cpu --steps 3 --warmup 1
                                                                                # CPU smoke run (tiny model, fp32)

On a lent GPU machine (no registry, no .git: the wheels of envs/device-wheels.txt carried in .whl/):
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site:$PWD python3 bench/tree_ab.py --baseline pre_upgrade --old-site /tmp/oldsite \
        --json $OUT/tree_ab.json

A baseline tree is `bench/<baseline>_omni_model.tar.gz`, the omni_model package at its commit (~250 kB), made on a
machine with the history by

    git archive --format=tar.gz -o bench/pre_upgrade_omni_model.tar.gz 7fe98a4 omni_model config/schema.yaml

(config/schema.yaml too where the tree reads its defaults from it)
and unpacked at run time into a temporary folder (`--old-tree DIR` takes an unpacked one instead). Each row runs in
its own process (bench/train_throughput.py's run_child) that puts its tree (and the baseline's site) first on
sys.path, so `omni_model`, `megatron.core` and `transformers` are that row's (the row records the files it imported);
the bench's own code is the same for both. Both trees take the same constructor calls used here (TrainSettings,
build_training, loop.Run / loop.step, FlopCounter, EncodedSample / pack / collate), which is why the step is built
from them.

The step: omni_model.train.loop.step (mcore's schedule over forward_step, DDP, the distributed optimizer, bf16 with
fp32 masters) on build_training's objects at cp1, towers frozen, random weights drawn in the same order from the same
seed (planner_check.init_weights: both trees build the same parameters, so the same weights and the same MoE
routing; the first step's loss of the two rows is printed as the check), on the same packed text rows (random token
ids, sequences of 256..2048 tokens packed into rows of --seq-len). Per row: the median step time of --steps timed
steps after --warmup, their spread ((max - min) / median), tokens/s, peak memory. Rows alternate baseline/current
--repeats times; the table gives each row's best repeat (lowest median) and the ratio current / baseline of those
medians (1.00 = unchanged; the repeats' spread says what difference is noise).
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
# the commit each baseline tree was archived from (bench/<name>_omni_model.tar.gz); both were written for
# megatron-core 0.16.1, so both run on the --old-site packages
BASELINES = {
    "pre_cp": "be69012",  # fae0e9a^1: main just before "Merge branch 'cp'" (measured on 0.16.1 in session 9)
    "pre_upgrade": "7fe98a4",  # main just before "Merge upgrade"
}


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
    """One row in this process: `spec["tree"]` (and `spec["site"]`, if any, before it) first on sys.path, then the
    training step of that omni_model."""
    sys.path.insert(0, spec["tree"])
    if spec.get("site"):
        sys.path.insert(0, spec["site"])
    import torch
    import megatron.core
    import transformers

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
    return {"tree": spec["name"], "omni_model": imported, "megatron_core": megatron.core.__version__,
            "transformers": transformers.__version__, "median_step_s": median,
            "spread": (max(seconds) - min(seconds)) / median, "step_s": seconds,
            "tokens_per_s": statistics.median(r["tokens"] / r["step_s"] for r in timed),
            "first_loss": records[0]["loss"], "last_loss": records[-1]["loss"],
            "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if on_gpu else None}


# -- driver --------------------------------------------------------------------------------------------------------
def old_tree(args, work: Path) -> str:
    if args.old_tree:
        return str(Path(args.old_tree).resolve())
    tarball = REPO / "bench" / f"{args.baseline}_omni_model.tar.gz"
    if not tarball.exists():
        raise SystemExit(f"{tarball} is missing: make it with `git archive --format=tar.gz -o "
                         f"{tarball.relative_to(REPO)} {BASELINES[args.baseline]} omni_model config/schema.yaml` "
                         f"(or pass --old-tree DIR)")
    target = work / args.baseline
    with tarfile.open(tarball) as archive:
        archive.extractall(target, filter="data")
    return str(target)


def print_table(best: dict, baseline: str) -> dict:
    old, new = best.get(baseline), best.get("current")
    header = ("tree", "mcore", "median step s", "spread", "tokens/s", "peak GiB", "first loss")
    print("\n{:12s} {:>16s} {:>14s} {:>8s} {:>10s} {:>9s} {:>11s}".format(*header))
    for name, r in best.items():
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        print(f"{name:12s} {r['megatron_core']:>16s} {r['median_step_s']:14.4f} {r['spread']:8.1%} "
              f"{r['tokens_per_s']:10.0f} {peak:>9s} {r['first_loss']:11.5f}")
    if old and new:
        ratio = new["median_step_s"] / old["median_step_s"]
        print(f"current / {baseline} step time: {ratio:.3f} (first-step losses {new['first_loss']:.6f} vs "
              f"{old['first_loss']:.6f})")
        return {"ratio_current_vs_baseline": ratio}
    return {}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tiny", action="store_true", help="the embedded tiny config instead of the 30B shapes")
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--global-batch", type=int, default=4, help="rows per step (micro-batches of one row)")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per row (>= 10 for the GPU figure)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="each tree's row this many times, alternating")
    parser.add_argument("--baseline", choices=sorted(BASELINES), required=True)
    parser.add_argument("--old-tree", help="an unpacked baseline tree (a folder holding omni_model/)")
    parser.add_argument("--old-site", required=True,
                        help="the baseline's packages, megatron-core 0.16.1 + transformers 5.24.0 (a folder put first "
                             "on its row's sys.path)")
    parser.add_argument("--timeout", type=int, default=900)
    parser.add_argument("--json", help="default: bench/results/tree_ab_<baseline>.json")
    if "--one" in sys.argv:
        print("RESULT " + json.dumps(run_row(json.loads(sys.argv[sys.argv.index("--one") + 1]))), flush=True)
        return 0
    args = parser.parse_args()

    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "bench"))
    import torch
    from train_throughput import run_child, write_hf_dir

    device = "cpu" if args.cpu or not torch.cuda.is_available() else "cuda"
    work = Path(tempfile.mkdtemp(prefix="tree_ab_"))
    hf_dir = write_hf_dir(work, args.tiny, args.layers)
    config = json.loads((hf_dir / "config.json").read_text())
    vocab = config["thinker_config"]["text_config"]["vocab_size"]
    rows_path = work / "rows.json"
    rows = text_rows(args.global_batch * (args.warmup + args.steps), args.seq_len, min(vocab, 150000), seed=0)
    rows_path.write_text(json.dumps(rows))
    trees = {args.baseline: old_tree(args, work), "current": str(REPO)}
    sites = {args.baseline: str(Path(args.old_site).resolve()), "current": None}
    base = {"hf_dir": str(hf_dir), "rows": str(rows_path), "device": device, "seq_len": args.seq_len,
            "global_batch": args.global_batch, "steps": args.steps, "warmup": args.warmup, "pad_id": 151643}
    results = []
    for repeat in range(args.repeats):
        order = list(trees) if repeat % 2 == 0 else list(reversed(trees))  # alternate which runs first
        for name in order:
            spec = dict(base, name=name, tree=trees[name], site=sites[name], work=str(work / f"{name}{repeat}"))
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
    summary = print_table(best, args.baseline)
    out = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "args": vars(args),
           "baseline": args.baseline, "baseline_commit": BASELINES[args.baseline], "rows": results,
           "best": best, **summary}
    json_path = Path(args.json or REPO / "bench" / "results" / f"tree_ab_{args.baseline}.json")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(out, indent=1))
    return 0 if len(best) == 2 else 1


if __name__ == "__main__":
    sys.exit(main())
