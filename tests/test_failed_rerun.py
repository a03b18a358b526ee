"""A failed rerun destroys nothing (issue 26, finding 5; README: "Nothing good is destroyed by a failure"): the real
Snakemake CLI on a clone of the session's converted workflow. Snakemake deletes a job's declared outputs before the job
runs, so `shards`, `convert`, `finetune` and `export` each declare a marker beside their folder (`<folder>.done`) and
swap their new output in only on success. A failure deletes only the marker, so the next plan reruns the failed stage
(and the stages after it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_finetune_workflow import planned_jobs
from workflow_utils import clone_workflow, snakemake

NO_TRAINING = ("train={iters: 0}", "train_talker={iters: 0}")


def _files(folder: Path) -> dict:
    """{relative name: (size, mtime)} of every file under folder."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _damage_the_model(wf: Path) -> None:
    """A corrupted input: convert and export check results/model/hf against its manifest first."""
    with open(wf / "results/model/hf/config.json", "a") as config:
        config.write(" ")


def _failed(result, message: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode != 0 and message in output, output[-3000:]


def _plans(wf: Path, target: str, *args: str) -> dict:
    plan = snakemake(wf, "-n", target, *args)
    assert plan.returncode == 0, plan.stderr[-3000:]
    return planned_jobs(plan.stdout + plan.stderr)


@pytest.mark.slow
def test_a_data_set_whose_every_row_is_bad_leaves_the_previous_shards(converted_workflow, tmp_path):
    wf = clone_workflow(converted_workflow, tmp_path / "wf")
    shards = wf / "results/data/shards"
    before = _files(shards)
    assert any(name.endswith(".tar") for name in before)
    bad = tmp_path / "bad.jsonl"  # every row names an image that is not there: all dropped, nothing to shard
    bad.write_text("".join(json.dumps({
        "messages": [{"role": "user", "content": f"<image>What is in picture {i}?"},
                     {"role": "assistant", "content": "A cat."}],
        "images": [str(tmp_path / f"gone-{i}.png")]}) + "\n" for i in range(3)))
    bad_data = f"data={{raw: {bad}}}"

    _failed(snakemake(wf, "--cores", "2", "shards", "--config", bad_data), "no sample survived")
    assert _files(shards) == before  # every tar, the Energon metadata, report.json and drops.jsonl, untouched
    assert not list(shards.parent.glob("*.staging"))
    # the failed stage is not taken for done: the same settings plan it again (and so fail again, saying why)
    assert _plans(wf, "shards", "--config", bad_data) == {"shards": 1}


@pytest.mark.slow
def test_a_failed_convert_rerun_leaves_the_previous_checkpoint_complete(converted_workflow, tmp_path):
    wf = clone_workflow(converted_workflow, tmp_path / "wf")
    mcore = wf / "results/model/mcore"
    before = _files(mcore)
    assert {"convert.json", "parity.json", "checkpoint/metadata.json", "tokenizer.json"} <= before.keys()
    _damage_the_model(wf)

    _failed(snakemake(wf, "--cores", "2", "convert", "--forcerun", "convert"), "is incomplete or corrupted")
    assert _files(mcore) == before  # the checkpoint with its convert.json and parity report
    assert not list(mcore.parent.glob("*.staging"))
    assert _plans(wf, "finetune") == {"convert": 1, "finetune": 1}


@pytest.mark.slow
def test_failed_export_and_finetune_reruns_leave_their_outputs(converted_workflow, tmp_path):
    from omni_model.runtime.launch import writer_lock

    wf = clone_workflow(converted_workflow, tmp_path / "wf")
    done = snakemake(wf, "--cores", "2", "export", "--config", *NO_TRAINING, timeout=1800)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    export, train = wf / "results/export/hf", wf / "results/train"
    exported, trained = _files(export), _files(train)
    assert "MANIFEST.json" in exported and {"latest", "metrics.jsonl"} <= trained.keys()

    _damage_the_model(wf)
    _failed(snakemake(wf, "--cores", "2", "export", "--forcerun", "export", "--config", *NO_TRAINING),
            "is incomplete or corrupted")
    assert _files(export) == exported  # every shard, the index, the side files and MANIFEST.json
    with writer_lock(train, "test"):  # a second writer: refused when the job starts, after Snakemake's clean-up
        _failed(snakemake(wf, "--cores", "2", "finetune", "--forcerun", "finetune", "--config", *NO_TRAINING),
                "is being written by another")
    assert {name: trained[name] for name in ("latest", "metrics.jsonl")} == \
        {name: _files(train)[name] for name in ("latest", "metrics.jsonl")}
    assert _plans(wf, "export", "--config", *NO_TRAINING) == {"finetune": 1, "finetune_talker": 1, "export": 1}
