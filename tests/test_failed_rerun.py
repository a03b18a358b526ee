"""A failed rerun destroys nothing (issue 26, finding 5; README: "Nothing good is destroyed by a failure"): the real
Snakemake CLI on a clone of the session's converted workflow. Snakemake deletes a job's declared outputs before the job
runs, so `shards` declares a marker beside its folder and swaps the folder in only on success."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from workflow_utils import clone_workflow, snakemake


def _files(folder: Path) -> dict:
    """{relative name: (size, mtime)} of every file under folder."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_a_data_set_whose_every_row_is_bad_leaves_the_previous_shards(converted_workflow, tmp_path):
    wf = clone_workflow(converted_workflow, tmp_path / "wf")
    shards, marker = wf / "results/data/shards", wf / "results/data/shards.done"
    before, marker_text = _files(shards), marker.read_text()
    assert any(name.endswith(".tar") for name in before)
    bad = tmp_path / "bad.jsonl"  # every row names an image that is not there: all dropped, nothing to shard
    bad.write_text("".join(json.dumps({
        "messages": [{"role": "user", "content": f"<image>What is in picture {i}?"},
                     {"role": "assistant", "content": "A cat."}],
        "images": [str(tmp_path / f"gone-{i}.png")]}) + "\n" for i in range(3)))

    result = snakemake(wf, "--cores", "2", "shards", "--config", f"data={{raw: {bad}}}")
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "no sample survived" in output, output[-3000:]
    assert _files(shards) == before  # every tar, the Energon metadata, report.json and drops.jsonl, untouched
    assert marker.read_text() == marker_text
    assert not list(shards.parent.glob("*.staging"))
