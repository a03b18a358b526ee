"""data.executor: ray — the datajuicer stage through Data-Juicer's Ray executor gives the same kept samples and the
same drops (id, stage, op, reason; duplicates naming the sample they duplicate) as the default executor.

A Ray head with 2 CPUs is started by the tests in a process of its own (stopped with ``ray.shutdown``, which stops
exactly the processes it started), and the local-Ray path (``ray_address: null``) starts and stops its own.
The 5,000-row comparison with timings is bench/data_executors.py (about 4 min for both executors on 2 free cores);
here the same generator makes 600 rows.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest

from executor_rows import make_rows

RECIPE = Path("config/datajuicer_recipe.yaml")


# A Ray head in its own process, as a cluster the stage attaches to: `ray.init` there starts the head (2 CPUs, no
# dashboard), prints its address and keeps it until stdin closes; `ray.shutdown` then stops exactly what it started.
HEAD = """
import sys, ray
ray.init(num_cpus=2, include_dashboard=False, _temp_dir=sys.argv[1])
print(ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()
ray.shutdown()
"""


@pytest.fixture(scope="module")
def ray_head():
    import psutil

    temp = tempfile.mkdtemp(prefix="rayt-", dir="/tmp")  # Ray's socket paths must stay under 107 characters
    head = subprocess.Popen([sys.executable, "-c", HEAD, temp], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        address = head.stdout.readline().strip()
        assert address, "the Ray head did not start"
        started = psutil.Process(head.pid).children(recursive=True)
        yield address
    finally:
        head.stdin.close()
        head.wait(timeout=120)
        shutil.rmtree(temp, ignore_errors=True)
    _, alive = psutil.wait_procs(started, timeout=30)
    for process in alive:
        process.kill()
    assert not alive, f"the Ray head left {[p.name() for p in alive]} running"


def _ray_detached(local: bool, auth_mode: str | None = None) -> None:
    """After a Ray run: this process is disconnected, Data-Juicer's Ray-mode switch is back off (later default runs in
    the process stay local) and, when the run started its own local Ray, none of its processes is left."""
    import psutil
    import ray

    from data_juicer.utils.constant import RAY_JOB_ENV_VAR

    assert not ray.is_initialized()
    assert RAY_JOB_ENV_VAR not in os.environ
    assert os.environ.get("RAY_AUTH_MODE") == auth_mode  # a local ray.init sets it process-wide
    if local:
        leftovers = [p.name() for p in psutil.Process().children(recursive=True)]
        assert not [name for name in leftovers if "ray" in name or "gcs" in name], leftovers


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
    """The demo set through the datajuicer stage with each executor: {executor: (out dir, summary)}. data.ray_address
    null: the Ray run starts a local Ray (2 CPUs) and stops it. (The default executor runs with one process, as the
    other data tests do: the result must not depend on np.)"""
    from omni_model.data.datajuicer import run_stage
    from omni_model.data.demo import generate_demo

    tmp_path = tmp_path_factory.mktemp("dm")  # short: multiprocessing sockets go under the DJ work dir (AF_UNIX)
    raw = generate_demo(tmp_path / "raw", 16, seed=3)  # as tests/test_data_pipeline.py
    runs = {}
    for executor, procs in (("default", 1), ("ray", 2)):
        out = tmp_path / executor
        started = time.time()
        summary = run_stage(raw, RECIPE, out / "processed.jsonl", out / "drops.jsonl", num_proc=procs,
                            executor=executor)
        print(f"demo set, {executor} executor: {time.time() - started:.1f} s")
        if executor == "ray":
            _ray_detached(local=True)
        runs[executor] = (out, summary)
    return runs


def test_demo_set_same_outputs_with_a_local_ray(demo_runs):
    """The stage's own outputs, byte for byte."""
    from omni_model.data.demo import BAD_KINDS

    (out_d, sum_d), (out_r, sum_r) = demo_runs["default"], demo_runs["ray"]
    assert (out_r / "processed.jsonl").read_text() == (out_d / "processed.jsonl").read_text()
    drops_r = (out_r / "drops.jsonl").read_text()
    assert drops_r == (out_d / "drops.jsonl").read_text()
    assert {k: sum_r[k] for k in ("input", "kept", "dropped", "by_stage_op")} == \
        {k: sum_d[k] for k in ("input", "kept", "dropped", "by_stage_op")}
    drops = {d["id"]: d for d in map(json.loads, drops_r.splitlines()) if d["stage"] == "datajuicer"}
    assert set(drops) == {f"bad-{kind}" for kind, stage in BAD_KINDS.items() if stage == "datajuicer"}
    assert drops["bad-exact_duplicate"]["reason"] == "omni_document_media_deduplicator: duplicate of demo-0000"
    assert drops["bad-near_duplicate"]["reason"] == "omni_minhash_media_deduplicator: duplicate of demo-0008"
    assert sum_r["input"] == sum_r["kept"] + sum_r["dropped"]


def _tar_members(shards_dir: Path) -> dict:
    """{tar name: [(member name, bytes), ...] in tar order}."""
    out = {}
    for path in sorted(shards_dir.glob("*.tar")):
        with tarfile.open(path) as tar:
            out[path.name] = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]
    return out


def test_shards_same_samples_with_ray_tasks(demo_runs, ray_head, tiny_hf_dir, tmp_path_factory, monkeypatch):
    """The shards stage's per-sample work (decode, token count, canonical media) in Ray tasks on the 2-CPU head:
    the same tars member for member (json and media bytes per key), the same drops (the demo's over-long sample)
    and the same report."""
    from omni_model.data.shards import write_shards

    out_dj = demo_runs["default"][0]
    tmp_path = tmp_path_factory.mktemp("sh")
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # see test_generated_set_same_decisions_on_a_ray_cluster
    reports = {}
    for executor, address in (("default", None), ("ray", ray_head)):
        started = time.time()
        reports[executor] = write_shards(out_dj / "processed.jsonl", tmp_path / executor, tiny_hf_dir,
                                         previous_drops=out_dj / "drops.jsonl", max_samples=6, workers=2,
                                         executor=executor, ray_address=address)
        print(f"shards of the demo set, {executor}: {time.time() - started:.1f} s")
    _ray_detached(local=False, auth_mode="token")
    members = {executor: _tar_members(tmp_path / executor) for executor in reports}
    assert members["ray"] == members["default"]
    assert sum(len(m) for m in members["ray"].values()) > 2 * reports["ray"]["kept"]  # json + media members
    assert (tmp_path / "ray" / "drops.jsonl").read_text() == (tmp_path / "default" / "drops.jsonl").read_text()
    assert {k: v for k, v in reports["ray"].items() if k != "seconds"} == \
        {k: v for k, v in reports["default"].items() if k != "seconds"}
    assert {d["op"] for d in map(json.loads, (tmp_path / "ray" / "drops.jsonl").read_text().splitlines())
            if d["stage"] == "shards"} == {"max_seq_len"}  # undecodable media: dropped by validation


def test_generated_set_same_decisions_on_a_ray_cluster(ray_head, tmp_path_factory, monkeypatch):
    """600 generated rows on the 2-CPU head: kept ids and drops equal the default executor's, and they are the
    planted ones (each duplicate names its original; same text over other media and same media under other text kept)."""
    from omni_model.data.datajuicer import run_recipe, validate

    tmp_path = tmp_path_factory.mktemp("gr")
    path, plan = make_rows(tmp_path / "rows", 600, seed=1)
    records, invalid, _ = validate(path)
    assert not invalid
    # the head has Ray's default token authentication (token in ~/.ray/auth_token); a client attaching by address
    # opts in as Ray documents
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    results = {}
    for executor, procs, address in (("default", 1, None), ("ray", 2, ray_head)):
        started = time.time()
        kept, drops = run_recipe(records, RECIPE, tmp_path / executor, num_proc=procs, executor=executor,
                                 ray_address=address)
        print(f"{len(records)} generated rows, {executor} executor: {time.time() - started:.1f} s")
        results[executor] = ([r["id"] for r in kept], drops)
    _ray_detached(local=False, auth_mode="token")
    assert results["ray"] == results["default"]

    kept, drops = results["ray"]
    by_id = {d["id"]: d for d in drops}
    outcome = Counter()
    for sid, (kind, original) in plan.items():
        drop = by_id.get(sid)
        if original and kind != "near":  # exact text (case/spacing) or same prompt over the same medium (or a copy)
            assert drop and drop["reason"] == f"omni_document_media_deduplicator: duplicate of {original}", (sid, drop)
        elif kind in ("short", "tiny_image", "short_audio"):
            op = {"short": "text_length_filter", "tiny_image": "image_shape_filter",
                  "short_audio": "omni_audio_duration_filter"}[kind]
            assert drop and drop["op"] == op and "outside bounds" in drop["reason"], (sid, drop)
        elif kind != "near":  # fresh rows and first occurrences of a (text, medium) pair
            assert drop is None, (sid, drop)
        outcome[kind, "dropped" if drop else "kept"] += 1
    print(dict(outcome))
    assert outcome["near", "dropped"] >= 0.6 * (outcome["near", "dropped"] + outcome["near", "kept"])
    assert min(outcome["exact", "dropped"], outcome["image", "dropped"], outcome["image", "kept"],
               outcome["audio", "dropped"], outcome["audio", "kept"]) > 0


def test_an_op_failing_on_one_sample_drops_it_on_ray_too(ray_head, tmp_path, monkeypatch):
    """As with the default executor (tests/test_video_decode.py): the sample an op fails on is dropped with the
    error, found by the op's per-sample work in Ray tasks; the op then runs on the others."""
    from dedup_media import failing_op_case
    from omni_model.data.datajuicer import run_recipe

    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # see test_generated_set_same_decisions_on_a_ray_cluster
    recipe, records, check = failing_op_case(tmp_path)
    check(*run_recipe(records, recipe, tmp_path / "work", num_proc=2, executor="ray", ray_address=ray_head))
    _ray_detached(local=False, auth_mode="token")


def test_unknown_executor_is_refused(tmp_path):
    from omni_model.data.datajuicer import run_recipe

    record = {"id": "a", "messages": [{"role": "user", "content": "hello there"}], "images": [], "audios": [],
              "videos": []}
    with pytest.raises(ValueError, match="data.executor must be one of default, ray, got 'spark'"):
        run_recipe([record], RECIPE, tmp_path, executor="spark")
