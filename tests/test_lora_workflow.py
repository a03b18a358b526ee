"""The LoRA path of the tiny model through the real Snakemake DAG: finetune + export with
`--configfile config/lora-demo.yaml`, started from the shared converted workflow (download, data, shards and convert
already done). Short: 3 steps."""

from __future__ import annotations

import json

import pytest

from test_export import hf_tensor_differences
from workflow_utils import clone_workflow, snakemake

SHORT = "train={iters: 3, lr_warmup_iters: 1, eval_interval: 0, save_interval: 0}"


@pytest.mark.slow
def test_dag_lora_demo_finetunes_adapters_and_exports_both(converted_workflow, tmp_path):
    from peft import LoraConfig

    from omni_model.convert.checkpoint import manifest_digest

    wf = clone_workflow(converted_workflow, tmp_path / "wf")
    result = snakemake(wf, "--cores", "2", "export", "--configfile", "config/lora-demo.yaml", "--config", SHORT,
                       timeout=1800)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]

    latest = wf / "results/train" / (wf / "results/train/latest").read_text().strip()
    state = json.loads((latest / "train_state.json").read_text())
    assert state["iteration"] == 3 and state["lora"]["rank"] == 8
    assert state["base_digest"] == manifest_digest(wf / "results/model/hf")

    adapter = LoraConfig.from_pretrained(str(wf / "results/export/adapter"))
    assert adapter.r == 8 and adapter.lora_alpha == 16 and adapter.target_parameters
    count, problems = hf_tensor_differences(wf / "results/model/hf", wf / "results/export/hf")
    adapted = [p for p in problems if p.endswith(": values differ")]
    print(f"DAG LoRA export: {count} tensors, {len(adapted)} merged with adapters, all others bit-identical; "
          f"adapter folder {sorted(p.name for p in (wf / 'results/export/adapter').iterdir())}")
    assert adapted == problems  # nothing missing, extra or re-typed
    assert adapted and all(p.startswith("thinker.model.layers.") and (".self_attn." in p or ".mlp.experts." in p)
                           for p in adapted)
