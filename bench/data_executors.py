"""The datajuicer stage's recipe through Data-Juicer's default executor and its Ray executor, on the same input.

    .venv/bin/python bench/data_executors.py [--rows 5000] [--procs 2] [--seed 0] [--shards]

Input: the generated rows of tests/executor_rows.py (text-mostly, planted duplicates / near duplicates / media reuse /
filter drops), validated once. Each executor runs the default recipe (config/datajuicer_recipe.yaml) with ``procs``
processes / Ray CPUs; the Ray row attaches to a local Ray started beforehand (its start time is printed apart).
With ``--shards`` the shards stage then writes each executor's kept rows with that executor (tiny checkpoint's
encoder). Checks that kept ids and drops (id, stage, op, reason) and the shards reports are identical, then prints a
markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

RECIPE = REPO / "config" / "datajuicer_recipe.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shards", action="store_true", help="also the shards stage on the kept rows")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("omni_model.data.datajuicer").setLevel(logging.INFO)  # per-op seconds, on stderr

    import ray

    from executor_rows import make_rows
    from omni_model.data.datajuicer import run_recipe, validate
    from omni_model.data.shards import write_shards

    with tempfile.TemporaryDirectory(prefix="dje-", dir="/tmp") as tmp:  # short: AF_UNIX socket paths under it
        tmp = Path(tmp)
        path, _ = make_rows(tmp / "rows", args.rows, args.seed)
        records, invalid, _ = validate(path)
        assert not invalid, invalid[:3]
        if args.shards:
            from omni_model.tiny import write_tiny_checkpoint

            hf = write_tiny_checkpoint(tmp / "hf")
        rows, outcome, load, ray_start = [], {}, [os.getloadavg()[0]], 0.0
        for executor in ("default", "ray"):
            if executor == "ray":
                started = time.time()
                ray.init(num_cpus=args.procs, include_dashboard=False, logging_level=logging.WARNING)
                ray_start = time.time() - started
            try:
                started = time.time()
                with contextlib.redirect_stdout(sys.stderr):  # Data-Juicer prints its config table: keep stdout clean
                    kept, drops = run_recipe(records, RECIPE, tmp / executor, num_proc=args.procs, executor=executor)
                rows.append(("datajuicer", executor, len(records), time.time() - started))
                outcome[executor] = [[r["id"] for r in kept], drops]
                if args.shards:
                    processed = tmp / executor / "processed.jsonl"
                    processed.write_text("".join(json.dumps(r) + "\n" for r in kept))
                    started = time.time()
                    report = write_shards(processed, tmp / executor / "shards", hf, workers=args.procs,
                                          executor=executor)
                    rows.append(("shards", executor, len(kept), time.time() - started))
                    outcome[executor].append({k: v for k, v in report.items() if k != "seconds"})
            finally:
                if executor == "ray":
                    ray.shutdown()
            load.append(os.getloadavg()[0])
    same = outcome["ray"] == outcome["default"]
    print(f"{len(records)} rows, {args.procs} processes / Ray CPUs; kept ids, drops (and shards reports) identical: "
          f"{same}; 1-min load average {', '.join(f'{x:.1f}' for x in load)} (before, after default, after ray)\n")
    print("| stage | executor | samples in | seconds | samples/s | vs default |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    base = {stage: n / seconds for stage, executor, n, seconds in rows if executor == "default"}
    for stage, executor, n, seconds in rows:
        print(f"| {stage} | {executor} | {n} | {seconds:.1f} | {n / seconds:.1f} | {n / seconds / base[stage]:.2f}x |")
    print(f"\nkept {len(outcome['ray'][0])}, dropped {len(outcome['ray'][1])} by the recipe; local Ray start (not in "
          f"the ray rows): {ray_start:.1f} s")
    if not same:
        sys.exit("executors disagree")


if __name__ == "__main__":
    main()
