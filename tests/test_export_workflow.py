"""`snakemake --cores 2 export` on the default config, as a user runs it, from the converted workflow that the DAG
tests share: with `train.iters: 0` results/export/hf gives back results/model/hf bit for bit; after a short training
run with frozen towers (and a short finetune_talker run on the demo's spoken answers) the export carries the trained
LLM and talker, while the towers and code2wav come back bit-identical, and MANIFEST.json says what was trained."""

from __future__ import annotations

import json

import pytest

from test_export import hf_tensor_differences
from workflow_utils import clone_workflow, snakemake

NO_TRAINING = ("train={iters: 0}", "train_talker={iters: 0}")
FROZEN_TOWERS = ("train={iters: 3, lr_warmup_iters: 1, eval_interval: 0, save_interval: 0, "
                 "freeze_vision: true, freeze_audio: true}", "train_talker={iters: 2, lr_warmup_iters: 1}")


@pytest.fixture(scope="module")
def wf(converted_workflow, tmp_path_factory):
    return clone_workflow(converted_workflow, tmp_path_factory.mktemp("export_dag") / "wf")


def _run(wf, config: tuple):
    result = snakemake(wf, "--cores", "2", "export", "--config", *config, timeout=1800)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result


@pytest.mark.slow
def test_dag_export_without_training_gives_back_the_source_bit_for_bit(wf):
    from omni_model.download import verify_manifest

    _run(wf, NO_TRAINING)
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
    assert "its speech was NOT re-aligned to the tuned thinker" in (wf / "logs/finetune_talker.log").read_text()
    assert not (wf / "results/train_talker/latest").exists()

    again = snakemake(wf, "-n", "export", "--config", *NO_TRAINING)
    assert "Nothing to be done" in again.stdout + again.stderr


@pytest.mark.slow
def test_dag_export_after_training_with_frozen_towers(wf):
    """Reuses the DAG above: only finetune (3 steps, vision + audio frozen) and export run again."""
    _run(wf, FROZEN_TOWERS)
    assert (wf / "results/train/latest").read_text().strip() == "iter_0000003"
    count, problems = hf_tensor_differences(wf / "results/model/hf", wf / "results/export/hf")
    changed = sorted(p.split(":")[0] for p in problems)
    print(f"DAG export after 3 steps with frozen towers: {len(changed)} of {count} tensors changed, e.g. "
          f"{changed[:3]}")
    assert all(p.endswith(": values differ") for p in problems)  # same names, dtypes and shapes
    assert changed and all(name.startswith(("thinker.model.", "thinker.lm_head.", "talker.")) for name in changed)
    assert "thinker.lm_head.weight" in changed
    assert "talker.codec_head.weight" in changed and "talker.code_predictor.lm_head.0.weight" in changed
    assert (wf / "results/train_talker/latest").read_text().strip() == "iter_0000002"
    manifest = json.loads((wf / "results/export/hf/MANIFEST.json").read_text())["source"]
    assert manifest["trained"] == {"thinker": {"llm": True, "vision": False, "audio": False},
                                   "talker": {"decoder": True, "predictor": True, "projections": True},
                                   "code2wav": False}
