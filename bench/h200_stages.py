"""The second half of the DAG on one GPU, at the real Qwen3-Omni-30B-A3B layer shapes (reduced depth, real towers).

    python bench/h200_stages.py --shards results/data/shards --work /tmp/h200 --out $OUT --layers 4 --iters 30

Steps, each through the same package entry points the Snakemake rules call (the device machine has no Snakemake):
  1. random HF checkpoint (model.source random: released 30B-A3B values, `--layers` thinker layers, a 2-layer talker)
  2. convert (python -m omni_model.convert, bf16) + the parity gate on the GPU (bf16 vs transformers' own bf16)
  3. finetune under torchrun (bf16, distributed optimizer, packing, seq 4096); killed with SIGKILL once the first
     checkpoint is complete, then started again with the same settings: it must resume from that checkpoint
  4. export (omni_model.convert.export.export_to_hf) and a transformers from_pretrained of the export
Prints a table and writes stages.json (+ metrics.jsonl) under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from omni_model.configs import released_30b_a3b_config  # noqa: E402


def run(cmd: list[str], log: Path, env: dict | None = None) -> float:
    start = time.time()
    with open(log, "ab") as sink:
        proc = subprocess.run(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env)
    if proc.returncode:
        sys.stdout.write(log.read_text()[-6000:])
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return time.time() - start


def child_peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2


def py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", required=True)
    ap.add_argument("--work", default="/tmp/h200")
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--save-interval", type=int, default=10)
    ap.add_argument("--global-batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--freeze-towers", action="store_true", help="train the LLM only (towers run, no optimizer state)")
    ap.add_argument("--train-dir", default="", help="default: /dev/shm or --work, whichever has more free space")
    args = ap.parse_args()
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    # a training checkpoint with optimizer state is ~14 bytes per trained parameter and two coexist while the newer
    # one is written: put the run where the space is
    candidates = [Path("/dev/shm/h200_train"), work / "train"]
    free = {c: shutil.disk_usage(c.parent).free for c in candidates if c.parent.exists()}
    train_dir = Path(args.train_dir) if args.train_dir else max(free, key=free.get)
    print("free GB:", {str(c.parent): round(f / 1e9, 1) for c, f in free.items()}, "-> train dir", train_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "stages.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    rows, facts = [], {}

    hf, mcore, export = work / "hf", work / "mcore", work / "export"
    # the released deepstack feeds LLM layers 0..2 from vision layers 8/16/24; a shallower thinker keeps as many as
    # it has layers (our thinker requires every deepstack layer on the first stage)
    deepstack = released_30b_a3b_config()["thinker_config"]["vision_config"]["deepstack_visual_indexes"][:args.layers]
    overrides = {"thinker_config": {"text_config": {"num_hidden_layers": args.layers},
                                    "vision_config": {"deepstack_visual_indexes": deepstack}},
                 "talker_config": {"text_config": {"num_hidden_layers": 2}}}
    seconds = run(py(
        "from omni_model.random_checkpoint import write_random_checkpoint as w; "
        f"w({str(hf)!r}, 'released-30b-a3b', overrides={overrides!r}, seed=0)"), log, env)
    size = sum(p.stat().st_size for p in hf.glob("*.safetensors"))
    rows.append(("random checkpoint", seconds, f"{size / 1e9:.2f} GB, host peak {child_peak_gib():.1f} GiB"))

    seconds = run([sys.executable, "-m", "omni_model.convert", "--hf", str(hf), "--out", str(mcore),
                   "--dtype", "bf16", "--parity"], log, env)
    parity = json.loads((mcore / "parity.json").read_text())
    facts["parity"] = parity
    rows.append(("convert + parity gate", seconds,
                 f"parity max abs {parity.get('max_abs_error')}, ours/hf-bf16 tolerance {parity.get('tolerance')}, "
                 f"pass={parity.get('pass')}; host peak {child_peak_gib():.1f} GiB"))

    settings = {
        "hf_dir": str(mcore), "init_checkpoint": str(mcore / "checkpoint"), "shards": str(Path(args.shards).resolve()),
        "train_dir": str(train_dir), "use_te": False, "parallel": {},
        "data": {"max_seq_len": 4096, "use_audio_in_video": False},  # the demo shards' settings (config defaults)
        "train": {"iters": args.iters, "lr": 1e-4, "min_lr": 1e-5, "lr_warmup_iters": 3,
                  "global_batch_size": args.global_batch, "micro_batch_size": 1, "seq_len": args.seq_len,
                  "packing": True, "eval_interval": args.save_interval, "eval_iters": 2,
                  "save_interval": args.save_interval, "gpus_per_node": 1, "seed": 1234, "keep_checkpoints": 1,
                  "freeze_vision": args.freeze_towers, "freeze_audio": args.freeze_towers},
    }
    settings_path = work / "settings.json"
    settings_path.write_text(json.dumps(settings, indent=1))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                "-m", "omni_model.train", "--settings", str(settings_path)]

    # first run: SIGKILL once the first checkpoint is complete (a rename publishes it)
    start = time.time()
    with open(log, "ab") as sink:
        proc = subprocess.Popen(torchrun, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        target = train_dir / f"iter_{args.save_interval:07d}"
        while proc.poll() is None and not (target / "metadata.json").exists():
            time.sleep(0.5)
        time.sleep(2.0)
        killed = proc.poll() is None
        if killed:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    rows.append(("finetune, killed after 1st ckpt", time.time() - start, f"SIGKILL sent: {killed}"))
    steps_before = [r for r in map(json.loads, (train_dir / "metrics.jsonl").read_text().splitlines())
                    if "loss" in r]

    seconds = run(torchrun, log, env)
    metrics = [json.loads(line) for line in (train_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in metrics if "loss" in r]
    (out / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in metrics) + "\n")
    timed = steps[3:] or steps
    mean = lambda key: sum(r[key] for r in timed if r.get(key) is not None) / max(1, len(timed))  # noqa: E731
    facts["train"] = {"steps_before_kill": len(steps_before), "steps_total": len(steps),
                      "loss_first": steps[0]["loss"], "loss_last": steps[-1]["loss"],
                      "tokens_per_s": mean("tokens_per_s"), "tflops": mean("tflops"), "mfu": mean("mfu"),
                      "mem_gib": max(r.get("mem_gib") or 0 for r in steps), "step_s": mean("step_s")}
    rows.append(("finetune resumed to the end", seconds,
                 f"steps {len(steps_before)} before kill, {len(steps)} in all; loss {steps[0]['loss']:.3f} -> "
                 f"{steps[-1]['loss']:.3f}; {facts['train']['tokens_per_s']:.0f} tok/s, "
                 f"{facts['train']['tflops']:.1f} TFLOP/s, MFU {facts['train']['mfu']}, "
                 f"peak {facts['train']['mem_gib']:.1f} GiB"))

    seconds = run(py(
        "from omni_model.convert.export import export_to_hf; from omni_model.train.checkpointing import read_latest; "
        f"print(export_to_hf(read_latest({str(train_dir)!r}), {str(hf)!r}, {str(export)!r}))"), log, env)
    rows.append(("export", seconds, f"host peak {child_peak_gib():.1f} GiB"))
    seconds = run(py(
        "import torch, transformers as t; "
        f"m = t.Qwen3OmniMoeForConditionalGeneration.from_pretrained({str(export)!r}, dtype=torch.bfloat16, "
        "use_kernels=False); "
        "print('loaded', sum(p.numel() for p in m.parameters()))"), log, env)
    rows.append(("transformers from_pretrained(export)", seconds, "loaded"))

    facts["rows"] = [{"step": s, "seconds": round(t, 1), "figures": f} for s, t, f in rows]
    (out / "stages.json").write_text(json.dumps(facts, indent=1))
    print(f"{'step':38s} {'s':>8s}  figures")
    for step, t, figures in rows:
        print(f"{step:38s} {t:8.1f}  {figures}")


if __name__ == "__main__":
    main()
