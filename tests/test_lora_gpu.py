"""LoRA on a GPU (the lead's device run): bf16 frozen base, mcore's distributed optimizer over the adapters only,
fused Adam with the folded grad scale, and a kill-after-the-step-3-checkpoint resume through the distributed
optimizer's load path (which the CPU tests never reach)."""

from __future__ import annotations

import json

import pytest

from test_finetune import kill_after_steps, metrics, run, start, write_settings
from test_lora_finetune import SETTINGS, inputs  # noqa: F401 - the module fixture: fp32 HF + manifest + checkpoint

pytestmark = [pytest.mark.gpu, pytest.mark.slow]
ON_ONE_GPU = dict(SETTINGS, gpus_per_node=1, lora=dict(SETTINGS["lora"], rank=8, alpha=16.0))  # rank % 8: grouped GEMM


def test_lora_on_gpu_trains_adapters_only_and_resumes(inputs):  # noqa: F811
    from megatron.core import dist_checkpointing

    root = inputs["root"]
    reference_dir = root / "gpu_reference"
    run(write_settings(inputs, reference_dir, **ON_ONE_GPU), root / "gpu_reference.log")
    expected = metrics(reference_dir)
    keys = dist_checkpointing.load_tensors_metadata(str(reference_dir / "iter_0000003")).keys()
    assert not [k for k in keys if k.startswith(("language_model.", "vision_model.", "audio_model."))]
    assert json.loads((reference_dir / "iter_0000003" / "train_state.json").read_text())["lora"]["rank"] == 8

    train_dir = root / "gpu_killed"
    settings = write_settings(inputs, train_dir, **ON_ONE_GPU)
    kill_after_steps(start(settings, root / "gpu_killed.log"), train_dir, 4)
    (train_dir / "metrics.jsonl").unlink()
    output = run(settings, root / "gpu_killed.log")
    assert "resuming from" in output and "iter_0000003" in output
    resumed = metrics(train_dir)
    for a, b in zip(resumed, expected):
        print(f"step {a['step']}: resumed {a['loss']!r} uninterrupted {b['loss']!r}, peak memory "
              f"{a.get('max_memory_gib', a.get('memory_gib'))}")
    worst = max(abs(a["loss"] - b["loss"]) / abs(b["loss"]) for a, b in zip(resumed, expected))
    assert [r["step"] for r in resumed] == list(range(1, 7)) and worst < 1e-4
    assert expected[-1]["loss"] < expected[0]["loss"]
