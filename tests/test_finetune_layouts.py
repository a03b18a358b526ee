"""Resuming at another layout: a checkpoint written by a tp1 run continues under torchrun at tp2 + SP (2 ranks,
gloo): model and optimizer reshard on load, the data stream continues (same data-parallel size), and the losses
of the continued steps equal the tp1 run's to fp32 reduction-order noise."""

from __future__ import annotations

import json
import shutil

import pytest

from dist.finetune_setup import make_checkpoint, make_shards
from test_finetune import REFERENCE, metrics, run, write_settings

SETTINGS = dict(REFERENCE, iters=6, save_interval=3, eval_interval=0)


@pytest.fixture(scope="module")
def inputs(tiny_hf_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune_layouts")
    return {"hf": tiny_hf_dir, "checkpoint": make_checkpoint(tiny_hf_dir, root / "checkpoint"),
            "shards": make_shards(tiny_hf_dir, root / "data", n_samples=16, max_seq_len=1024), "root": root}


@pytest.mark.slow
def test_tp1_checkpoint_resumes_at_tp2(inputs):
    from omni_model.runtime.launch import run_torchrun

    root = inputs["root"]
    tp1 = root / "tp1"
    run(write_settings(inputs, tp1, **SETTINGS), root / "tp1.log")
    reference = metrics(tp1)

    tp2 = root / "tp2"
    tp2.mkdir()
    shutil.copytree(tp1 / "iter_0000003", tp2 / "iter_0000003")  # what the tp1 run had written at step 3
    settings = write_settings(inputs, tp2, **dict(SETTINGS, cpu_procs=2))
    data = json.loads(settings.read_text())
    data["parallel"] = {"tp": 2}
    settings.write_text(json.dumps(data))
    run_torchrun("omni_model.train", ["--settings", str(settings)], nproc_per_node=2, log=root / "tp2.log")
    log = (root / "tp2.log").read_text()
    assert "resuming from" in log and "resumed at another layout" in log and "the data stream continues" in log

    resumed = metrics(tp2)
    assert [r["step"] for r in resumed] == list(range(1, 7))
    assert [r["loss"] for r in resumed[:3]] == [r["loss"] for r in reference[:3]]  # history from the checkpoint
    worst = 0.0
    for mine, theirs in zip(resumed[3:], reference[3:]):
        rel = abs(mine["loss"] - theirs["loss"]) / abs(theirs["loss"])
        worst = max(worst, rel)
        print(f"step {mine['step']}: tp2 {mine['loss']!r} vs tp1 {theirs['loss']!r} (rel {rel:.1e}); grad norm "
              f"{mine['grad_norm']:.6f} vs {theirs['grad_norm']:.6f}")
        assert mine["tokens"] == theirs["tokens"]  # the same batches
        assert mine["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-4)
    print(f"tp1 -> tp2 resume: worst relative loss difference over steps 4-6: {worst:.1e}")
    assert worst < 1e-5
    assert (tp2 / "latest").read_text().strip() == "iter_0000006"
