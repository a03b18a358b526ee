"""Resuming at another layout: a checkpoint written by a tp1 run continues under torchrun at tp2 + SP (2 ranks,
gloo): model and optimizer reshard on load, the data stream continues (same data-parallel size), and the losses
of the continued steps equal the tp1 run's to fp32 reduction-order noise. Checkpoints reshard across context
parallelism the same way: a cp2 run's checkpoint continues at cp1 and a cp1 run's at cp2, step for step like the
uninterrupted cp1 run (losses, gradient norms, the final weights). And pipeline parallelism with the deepstack
layers on the first stage (parallel.first_stage_layers) trains the same steps as one process."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dist.finetune_setup import checkpoint_tensors, make_checkpoint, make_shards
from test_finetune import REFERENCE, metrics, run, write_settings

# adam_eps 1e-4 (default 1e-8): Adam's update lr * g / (|g| + eps) turns fp32 reduction-order noise in a gradient
# that is ~0 into an lr-sized move at eps 1e-8 (the sign of noise decides), so two layouts' runs part by ~1e-6 in the
# loss within a few steps (measured cp2 vs cp1 at eps 1e-8: 5.5e-9 at step 1, 3.9e-6 at step 6) whatever the
# checkpoint did; at 1e-4 such an element moves by ~lr * noise / eps and the comparison sees the resharding itself
SETTINGS = dict(REFERENCE, iters=6, save_interval=3, eval_interval=0, adam_eps=1e-4)


@pytest.fixture(scope="module")
def inputs(tiny_hf_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune_layouts")
    return {"hf": tiny_hf_dir, "checkpoint": make_checkpoint(tiny_hf_dir, root / "checkpoint"),
            "shards": make_shards(tiny_hf_dir, root / "data", n_samples=16, max_seq_len=1024), "root": root}


@pytest.fixture(scope="module")
def tp1(inputs):
    """The uninterrupted one-process run (tp1, cp1): 6 steps, checkpoints at steps 3 and 6."""
    root = inputs["root"]
    run(write_settings(inputs, root / "tp1", **SETTINGS), root / "tp1.log")
    return root / "tp1"


def run_at_layout(inputs, name: str, parallel: dict, nproc: int, resume_from=None) -> Path:
    """A run of SETTINGS at `parallel` on `nproc` gloo ranks (torchrun when > 1); with `resume_from`, its train dir
    starts with that checkpoint, as a killed run at another layout would have left it."""
    from omni_model.runtime.launch import run_torchrun

    root = inputs["root"]
    train_dir = root / name
    train_dir.mkdir()
    if resume_from is not None:
        shutil.copytree(resume_from, train_dir / resume_from.name)
    settings = write_settings(inputs, train_dir, **dict(SETTINGS, cpu_procs=nproc))
    data = json.loads(settings.read_text())
    data["parallel"] = parallel
    settings.write_text(json.dumps(data))
    if nproc == 1:
        run(settings, root / f"{name}.log")
    else:
        run_torchrun("omni_model.train", ["--settings", str(settings)], nproc_per_node=nproc, log=root / f"{name}.log")
    return train_dir


@pytest.mark.slow
def test_tp1_checkpoint_resumes_at_tp2(inputs, tp1):
    from omni_model.runtime.launch import run_torchrun

    root = inputs["root"]
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


def _worst_relative(mine: list, theirs: list, key: str) -> float:
    return max(abs(a[key] - b[key]) / abs(b[key]) for a, b in zip(mine, theirs))


def _weights_worst_relative(train_dir: Path, reference_dir: Path, scratch: Path) -> tuple:
    """The worst relative difference (max abs / max abs of the reference tensor) over every model tensor of the
    step-6 checkpoints, and how many tensors were compared."""
    mine = checkpoint_tensors(train_dir / "iter_0000006", scratch / f"{train_dir.name}.pt")
    theirs = checkpoint_tensors(reference_dir / "iter_0000006", scratch / f"{reference_dir.name}.pt")
    model_keys = sorted(k for k in theirs if not k.startswith("optimizer."))
    assert sorted(k for k in mine if not k.startswith("optimizer.")) == model_keys
    by_tensor = {k: float((mine[k] - theirs[k]).abs().max() / theirs[k].abs().max().clamp_min(1e-30))
                 for k in model_keys}
    worst = max(by_tensor.values())
    print(f"  worst tensor {max(by_tensor, key=by_tensor.get)}")
    moved = sum(not bool((theirs[k] == mine[k]).all()) for k in model_keys)
    return worst, len(model_keys), moved


@pytest.mark.slow
def test_checkpoints_reshard_across_context_parallelism(inputs, tp1):
    """cp2 (2 gloo ranks, data-parallel size 1 like the one-process run: the same batches) trains 6 steps; its
    step-3 checkpoint continues at cp1 in one process, and the cp1 run's step-3 checkpoint continues at cp2. Every
    run's per-step losses equal the uninterrupted cp1 run's to 1e-6 relative, gradient norms to 1e-5, and the
    weights after step 6 to 1e-5 of each tensor's largest element (the CP split only reorders fp32 sums)."""
    reference = metrics(tp1)
    cp2 = run_at_layout(inputs, "cp2", {"cp": 2}, nproc=2)
    cp2_to_cp1 = run_at_layout(inputs, "cp2_to_cp1", {}, nproc=1, resume_from=cp2 / "iter_0000003")
    cp1_to_cp2 = run_at_layout(inputs, "cp1_to_cp2", {"cp": 2}, nproc=2, resume_from=tp1 / "iter_0000003")
    root = inputs["root"]
    for name in ("cp2_to_cp1", "cp1_to_cp2"):
        log = (root / f"{name}.log").read_text()
        assert "resuming from" in log and "resumed at another layout" in log and "the data stream continues" in log
        saved_cp = 2 if name == "cp2_to_cp1" else 1
        assert f"'cp': {saved_cp}, 'dp': 1}}" in log  # the layout the checkpoint names
    for train_dir in (cp2, cp2_to_cp1, cp1_to_cp2):
        runs = metrics(train_dir)
        assert [r["step"] for r in runs] == list(range(1, 7)), train_dir.name
        assert [r["tokens"] for r in runs] == [r["tokens"] for r in reference]  # the same batches
        assert [r["label_tokens"] for r in runs] == [r["label_tokens"] for r in reference]
        continued = slice(0, 6) if train_dir is cp2 else slice(3, 6)
        loss_rel = _worst_relative(runs[continued], reference[continued], "loss")
        norm_rel = _worst_relative(runs[continued], reference[continued], "grad_norm")
        weights_rel, tensors, moved = _weights_worst_relative(train_dir, tp1, root)
        print(f"{train_dir.name}: steps {continued.start + 1}-6 loss worst rel {loss_rel:.1e}, grad norm worst rel "
              f"{norm_rel:.1e}; step-6 weights worst rel {weights_rel:.1e} over {tensors} tensors "
              f"({moved} not bit-equal)")
        assert loss_rel <= 1e-6 and norm_rel <= 1e-5 and weights_rel <= 1e-5, train_dir.name
    assert metrics(cp2_to_cp1)[:3] == metrics(cp2)[:3]  # the history comes from the cp2 checkpoint


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
