"""Resuming at another layout: a checkpoint written by a tp1 run continues under torchrun at tp2 + SP (2 ranks,
gloo): model and optimizer reshard on load, the data stream continues (same data-parallel size), and the losses
of the continued steps equal the tp1 run's to fp32 reduction-order noise. And pipeline parallelism with the deepstack
layers on the first stage (parallel.first_stage_layers) trains the same steps as one process."""

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


@pytest.mark.slow
def test_pp2_with_the_deepstack_layers_on_the_first_stage_equals_pp1(inputs):
    """parallel.pp 2 with parallel.first_stage_layers 3 (the tiny model's 4 layers as 3 + 1: its 3 deepstack layers
    sit with the vision tower on stage 0) trains under torchrun on 2 ranks (gloo): the first step's loss equals the
    one-process pp1 run's to 1e-5 (same batches: data-parallel size 1 in both), and so does the step after it."""
    root = inputs["root"]
    settings = dict(SETTINGS, iters=2, lr_warmup_iters=1, save_interval=0)
    pp1 = root / "pp1"
    run(write_settings(inputs, pp1, **settings), root / "pp1.log")
    pp2 = root / "pp2"
    path = write_settings(inputs, pp2, **dict(settings, cpu_procs=2))
    data = json.loads(path.read_text())
    data["parallel"] = {"pp": 2, "first_stage_layers": 3}
    path.write_text(json.dumps(data))
    from omni_model.runtime.launch import run_torchrun

    run_torchrun("omni_model.train", ["--settings", str(path)], nproc_per_node=2, log=root / "pp2.log")
    reference, piped = metrics(pp1), metrics(pp2)
    assert [r["step"] for r in piped] == [1, 2]
    for mine, theirs in zip(piped, reference):
        rel = abs(mine["loss"] - theirs["loss"]) / abs(theirs["loss"])
        print(f"step {mine['step']}: pp2 (3 + 1 layers) loss {mine['loss']!r} vs pp1 {theirs['loss']!r} (rel {rel:.1e}),"
              f" grad norm {mine['grad_norm']:.6f} vs {theirs['grad_norm']:.6f}, aux {mine['moe_aux_loss']!r} vs "
              f"{theirs['moe_aux_loss']!r}")
        assert mine["tokens"] == theirs["tokens"] and mine["label_tokens"] == theirs["label_tokens"]
        assert rel <= 1e-5
        assert mine["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-4)
        assert mine["moe_aux_loss"] == pytest.approx(theirs["moe_aux_loss"], rel=1e-5)  # stages' layers add up
    assert (pp2 / "latest").read_text().strip() == "iter_0000002"
