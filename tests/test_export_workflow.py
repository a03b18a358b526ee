"""`snakemake --cores 2 export` with `train.iters: 0` on the default config: the whole DAG runs and
results/export/hf gives back results/model/hf bit for bit, as a complete checkpoint with its manifest."""

from __future__ import annotations

import json

import pytest

from test_export import hf_tensor_differences
from workflow_utils import snakemake, workflow_copy

NO_TRAINING = ("--config", "train={iters: 0}")


@pytest.mark.slow
def test_dag_export_without_training_gives_back_the_source_bit_for_bit(tmp_path):
    from omni_model.download import verify_manifest

    wf = workflow_copy(tmp_path / "wf")
    result = snakemake(wf, "--cores", "2", "export", *NO_TRAINING, timeout=1800)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert (wf / "results/train/latest").read_text().strip() == "../model/mcore/checkpoint"

    source, export = wf / "results/model/hf", wf / "results/export/hf"
    count, problems = hf_tensor_differences(source, export)
    print(f"DAG export (train.iters 0): {count} tensors, differences: {problems}")
    assert count > 500 and not problems
    assert verify_manifest(export) == []
    index = json.loads((export / "model.safetensors.index.json").read_text())
    assert any(name.startswith("talker.") for name in index["weight_map"])
    assert any(name.startswith("code2wav.") for name in index["weight_map"])
    assert "talker/code2wav tensors copied unchanged" in (wf / "logs/export.log").read_text()

    again = snakemake(wf, "-n", "export", *NO_TRAINING)
    assert "Nothing to be done" in again.stdout + again.stderr
