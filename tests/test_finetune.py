"""The finetune stage's training run (omni_model.train) on CPU, fp32, through the real pieces: the tiny model's
torch_dist checkpoint, Energon shards of the generated demo set, Megatron-Core DDP + optimizer + scheduler + schedule,
dist checkpoints. Each run is `python -m omni_model.train --settings FILE` in a subprocess, as the rule starts it.

One 10-step run is the reference: its loss goes down, its metrics are complete and follow the LR formula, and a run
killed with SIGKILL after its step-5 checkpoint, then restarted, reproduces its per-step losses exactly.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dist.finetune_setup import REPO, clean_env, make_checkpoint, make_shards, settings_dict
from train_helpers import scheduled_lr

RUN_TIMEOUT = 600
REFERENCE = dict(iters=10, lr=2e-3, min_lr=2e-4, lr_warmup_iters=2, lr_decay_style="cosine", save_interval=5,
                 eval_interval=5, eval_iters=1, global_batch_size=2, micro_batch_size=1, seq_len=1024,
                 packing_buffer_size=8, shuffle_buffer_size=16)


@pytest.fixture(scope="module")
def inputs(tiny_hf_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    return {"hf": tiny_hf_dir, "checkpoint": make_checkpoint(tiny_hf_dir, root / "checkpoint"),
            "shards": make_shards(tiny_hf_dir, root / "data", n_samples=16, max_seq_len=1024), "root": root}


def write_settings(inputs, train_dir: Path, **train) -> Path:
    settings = settings_dict(inputs["hf"], inputs["checkpoint"], inputs["shards"], train_dir, max_seq_len=1024,
                             **train)
    path = Path(str(train_dir) + ".json")
    path.write_text(json.dumps(settings))
    return path


def start(settings: Path, log: Path) -> subprocess.Popen:
    sink = open(log, "ab")
    return subprocess.Popen([sys.executable, "-m", "omni_model.train", "--settings", str(settings)], cwd=REPO,
                            env=clean_env(), stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)


def run(settings: Path, log: Path) -> str:
    proc = start(settings, log)
    code = proc.wait(timeout=RUN_TIMEOUT)
    text = log.read_text(errors="replace")
    assert code == 0, text[-4000:]
    return text


def kill_after_steps(proc: subprocess.Popen, train_dir: Path, steps: int) -> None:
    """SIGKILL the run (its whole process group) once metrics.jsonl has `steps` lines."""
    deadline = time.time() + RUN_TIMEOUT
    while time.time() < deadline and proc.poll() is None:
        path = train_dir / "metrics.jsonl"
        if path.exists() and len(path.read_text().splitlines()) >= steps:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def metrics(train_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (train_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def reference(inputs):
    train_dir = inputs["root"] / "reference"
    output = run(write_settings(inputs, train_dir, **REFERENCE), inputs["root"] / "reference.log")
    return {"dir": train_dir, "metrics": metrics(train_dir), "output": output}


def test_loss_goes_down_on_repeated_data(reference):
    losses = [r["loss"] for r in reference["metrics"]]
    print(f"per-step loss: {[round(x, 4) for x in losses]}")
    assert len(losses) == REFERENCE["iters"]
    assert all(math.isfinite(x) for x in losses)
    # the demo set's 13 train samples are seen several times; the random model first learns the token statistics
    assert losses[-1] < losses[0] - 0.3, losses
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3
    assert "loss first" in reference["output"] and "-> last" in reference["output"]


def test_metrics_fields_and_values(reference):
    records = reference["metrics"]
    assert [r["step"] for r in records] == list(range(1, REFERENCE["iters"] + 1))
    for record in records:
        assert record["tokens"] > 0 and record["tokens_per_s"] > 0 and record["step_s"] > 0
        assert record["label_tokens"] > 0 and record["label_tokens"] <= record["tokens"] <= record["padded_tokens"]
        assert record["grad_norm"] is not None and record["grad_norm"] > 0
        assert record["tflops"] > 0 and record["mfu"] is None  # CPU: no peak known, MFU not made up
        assert record["mem_gib"] > 0 and record["updated"] is True
    for record in records:  # the LR each step used: exactly the schedule formula, warmup and decay
        expected = scheduled_lr(record["step"], REFERENCE)
        assert record["lr"] == pytest.approx(expected, rel=1e-12, abs=1e-15), (record["step"], record["lr"], expected)
    print(f"lr per step: {[r['lr'] for r in records]}")
    evals = {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}
    assert set(evals) == {5, 10} and all(math.isfinite(v) for v in evals.values())
    assert evals[10] < evals[5]
    print(f"eval loss: {evals}; tokens/s {[round(r['tokens_per_s']) for r in records]}")


def test_tensorboard_scalars(reference):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(reference["dir"] / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/tflops", "eval/loss"} <= tags
    logged = [e.value for e in events.Scalars("train/loss")]
    assert logged == pytest.approx([r["loss"] for r in reference["metrics"]], rel=1e-6)


def test_checkpoints_and_latest(reference):
    from omni_model.train.checkpointing import read_latest

    train_dir = reference["dir"]
    assert read_latest(train_dir) == (train_dir / "iter_0000010").resolve()
    assert sorted(p.name for p in train_dir.glob("iter_*")) == ["iter_0000005", "iter_0000010"]
    for name in ("iter_0000005", "iter_0000010"):
        state = json.loads((train_dir / name / "train_state.json").read_text())
        assert state["iteration"] == int(name[-7:])
        kept = [json.loads(line) for line in (train_dir / name / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in kept] == list(range(1, state["iteration"] + 1))


def test_kill_and_resume_reproduces_the_loss_sequence(inputs, reference):
    """SIGKILL after the step-5 checkpoint (the step-6 line is written), rerun: steps 6..10 equal the uninterrupted
    run's bit for bit; a half-written checkpoint never counts."""
    train_dir = inputs["root"] / "killed"
    settings = write_settings(inputs, train_dir, **REFERENCE)
    log = inputs["root"] / "killed.log"
    kill_after_steps(start(settings, log), train_dir, 6)
    assert (train_dir / "iter_0000005").is_dir() and not (train_dir / "iter_0000010").exists()
    # what a kill during a save leaves: a .tmp dir; it must be ignored and cleared
    (train_dir / "iter_0000008.tmp").mkdir()
    # Snakemake deletes the rule's declared outputs before rerunning it
    (train_dir / "latest").unlink(missing_ok=True)
    (train_dir / "metrics.jsonl").unlink()

    output = run(settings, log)
    assert "resuming from" in output and "iter_0000005" in output
    resumed = metrics(train_dir)
    expected = reference["metrics"]
    assert [r["step"] for r in resumed] == list(range(1, 11))
    pairs = [(a["loss"], b["loss"]) for a, b in zip(resumed, expected)]
    print("step: resumed vs uninterrupted loss")
    for step, (a, b) in enumerate(pairs, 1):
        print(f"  {step:2d}: {a!r} {b!r}")
    assert [a for a, _ in pairs] == [b for _, b in pairs]  # exact, fp32
    assert [r["grad_norm"] for r in resumed] == [r["grad_norm"] for r in expected]
    assert [r.get("eval_loss") for r in resumed] == [r.get("eval_loss") for r in expected]
    assert not (train_dir / "iter_0000008.tmp").exists()


def test_a_finished_run_is_not_repeated(inputs, reference):
    """Rerunning a finished run (e.g. after Snakemake deleted `latest` and metrics.jsonl for a param change that
    does not touch the numbers, like train.log_interval) restores both from the last checkpoint without a step."""
    train_dir = inputs["root"] / "finished"
    shutil.copytree(reference["dir"], train_dir)
    (train_dir / "latest").unlink()
    (train_dir / "metrics.jsonl").unlink()
    output = run(write_settings(inputs, train_dir, **dict(REFERENCE, log_interval=5)), inputs["root"] / "fin.log")
    assert "step 1/" not in output
    assert [r["loss"] for r in metrics(train_dir)] == [r["loss"] for r in reference["metrics"]]
    assert (train_dir / "latest").read_text().strip() == "iter_0000010"


def test_changed_settings_start_afresh(inputs, reference):
    """Another lr = another run: the old checkpoints are not resumed from, and are cleared. With keep_checkpoints 1
    the run's own older checkpoint goes once the newer one is complete."""
    from omni_model.train.checkpointing import read_latest

    train_dir = inputs["root"] / "changed"
    shutil.copytree(reference["dir"], train_dir)
    changed = dict(REFERENCE, iters=2, lr_warmup_iters=1, lr=1e-3, save_interval=1, keep_checkpoints=1)
    output = run(write_settings(inputs, train_dir, **changed), inputs["root"] / "changed.log")
    assert "starting from" in output and "saved" in output and "iter_0000001" in output
    assert sorted(p.name for p in train_dir.glob("iter_*")) == ["iter_0000002"]
    assert read_latest(train_dir) == (train_dir / "iter_0000002").resolve()
    assert [r["step"] for r in metrics(train_dir)] == [1, 2]
    assert metrics(train_dir)[0]["loss"] == reference["metrics"][0]["loss"]  # same data, same start


def test_a_changed_run_that_fails_before_its_first_checkpoint_keeps_the_old_ones(inputs, reference):
    """A rerun with a changed setting that fails (here: killed after its first step, before its first checkpoint)
    leaves the previous run's checkpoints and TensorBoard events in place (issue 26: they were removed when the new
    run started); going back to the old settings then restores the finished run without a step."""
    train_dir = inputs["root"] / "failed_rerun"
    shutil.copytree(reference["dir"], train_dir)
    before = sorted(str(p.relative_to(train_dir)) for p in train_dir.rglob("iter_*/**/*") if p.is_file())
    changed = write_settings(inputs, train_dir, **dict(REFERENCE, lr=1e-3, save_interval=0))  # saves at step 10 only
    (train_dir / "latest").unlink()  # Snakemake deletes the rule's declared outputs before the job
    (train_dir / "metrics.jsonl").unlink()
    kill_after_steps(start(changed, inputs["root"] / "failed_rerun.log"), train_dir, 1)
    after = sorted(str(p.relative_to(train_dir)) for p in train_dir.rglob("iter_*/**/*") if p.is_file())
    assert after == before and "iter_0000010/train_state.json" in after
    assert list((train_dir / "tb.previous").iterdir())  # the old run's events, set aside

    output = run(write_settings(inputs, train_dir, **REFERENCE), inputs["root"] / "failed_rerun.log")
    assert "resuming from" in output and "step 1/" not in output.split("resuming from")[-1]
    assert [r["loss"] for r in metrics(train_dir)] == [r["loss"] for r in reference["metrics"]]
    assert (train_dir / "latest").read_text().strip() == "iter_0000010"


def test_iters_zero_points_latest_at_the_converted_checkpoint(inputs, tmp_path):
    from omni_model.train.checkpointing import read_latest
    from omni_model.train.loop import no_training
    from omni_model.train.settings import TrainSettings

    settings = TrainSettings(**settings_dict(inputs["hf"], inputs["checkpoint"], inputs["shards"], tmp_path / "train",
                                             iters=0))
    no_training(settings)
    assert read_latest(tmp_path / "train") == Path(inputs["checkpoint"]).resolve()
    assert (tmp_path / "train" / "metrics.jsonl").read_text() == ""
    assert not list((tmp_path / "train").glob("iter_*"))


@pytest.mark.parametrize("parallel, train, message", [
    ({"cp": 2}, {"cpu_procs": 2, "packing": False}, "parallel.cp = 2 needs train.packing: true"),
    ({"cp": 2, "ep": 4}, {"cpu_procs": 2}, "parallel.ep x etp = 4 must divide data-parallel x tp x cp = 2"),
    ({"tp": 2}, {"cpu_procs": 3}, "not a multiple of parallel.tp x pp x cp = 2"),
    ({}, {"cpu_procs": 2, "global_batch_size": 3}, "train.global_batch_size = 3 is not a multiple"),
    ({}, {"iters": 2, "lr_warmup_iters": 2}, "train.lr_warmup_iters = 2 must be below train.iters = 2"),
    ({}, {"freeze_llm": True, "freeze_vision": True, "freeze_audio": True}, "nothing to train"),
])
def test_settings_refused_with_a_clear_message(parallel, train, message):
    from omni_model.train.settings import SettingsError, check_config

    with pytest.raises(SettingsError, match=message.replace(".", r"\.").replace("(", r"\(").replace(")", r"\)")):
        check_config(train, parallel)


@pytest.mark.parametrize("parallel, message", [
    ({"pp": 2}, "parallel.pp = 2 puts 2 of the 4 decoder layers on the first pipeline stage, but the vision tower's 3 "
                "deepstack features are added to decoder layers 0..2, which must sit on that stage with the tower: set "
                "parallel.first_stage_layers >= 3 (values that work here: 3)"),
    ({"pp": 2, "first_stage_layers": 2}, "parallel.first_stage_layers >= 3"),
    ({"pp": 2, "first_stage_layers": 4}, "parallel.first_stage_layers = 4: the other 0 of the 4 decoder layers must "
                                         "split evenly over the other 1 pipeline stage(s)"),
    ({"first_stage_layers": 3}, "parallel.first_stage_layers = 3 needs parallel.pp > 1"),
])
def test_pipeline_split_refused_naming_the_key(tiny_hf_dir, parallel, message):
    """The tiny model's 3 deepstack layers do not fit mcore's even 2 + 2 split: refused before any rank starts (the
    finetune rule runs this at planning), naming parallel.first_stage_layers; 3 + 1 is accepted."""
    from omni_model.train.settings import SettingsError, check_config

    hf_config = json.loads((Path(tiny_hf_dir) / "config.json").read_text())
    with pytest.raises(SettingsError) as error:
        check_config({"cpu_procs": 2}, parallel, hf_config=hf_config)
    assert message in str(error.value)
    check_config({"cpu_procs": 2}, {"pp": 2, "first_stage_layers": 3}, hf_config=hf_config)


# -- switches -------------------------------------------------------------------------------------------------------
def _part(key: str) -> str:
    name = key.removeprefix("optimizer.state.exp_avg_sq.").removeprefix("optimizer.state.exp_avg.")
    return name.split(".")[0]


def _switch_run(inputs, name: str, **switches) -> tuple[dict, dict]:
    """(initial tensors, tensors after 2 steps) of a 3-step run with the given switches."""
    from dist.finetune_setup import checkpoint_tensors

    train_dir = inputs["root"] / name
    run(write_settings(inputs, train_dir, **dict(REFERENCE, iters=3, save_interval=0, eval_interval=0, **switches)),
        inputs["root"] / f"{name}.log")
    before = checkpoint_tensors(inputs["checkpoint"], inputs["root"] / f"{name}-before.pt")
    after = checkpoint_tensors(train_dir / "iter_0000003", inputs["root"] / f"{name}-after.pt")
    return before, after


def _changed(before: dict, after: dict, part: str) -> tuple[int, int]:
    keys = [k for k in before if _part(k) == part]
    return sum(not __import__("torch").equal(before[k], after[k]) for k in keys), len(keys)


def test_freeze_audio_and_zero_lr_vision(inputs):
    """freeze_audio: the audio tower comes back bit-identical and has no optimizer state. lr_mult_vision 0: the
    vision tower has optimizer state (its grads flowed) but its LR group is 0, so it is bit-identical too. The LLM
    trains."""
    before, after = _switch_run(inputs, "freeze_audio", freeze_audio=True, lr_mult_vision=0.0)
    optimizer_parts = {_part(k) for k in after if k.startswith("optimizer.state.exp_avg.")}
    assert optimizer_parts == {"language_model", "vision_model"}, optimizer_parts
    changed = {part: _changed(before, after, part) for part in ("audio_model", "vision_model", "language_model")}
    print(f"tensors changed after 3 steps (changed, total): {changed}")
    assert changed["audio_model"][0] == 0 and changed["audio_model"][1] > 0
    assert changed["vision_model"][0] == 0 and changed["vision_model"][1] > 0
    assert changed["language_model"][0] == changed["language_model"][1]
    vision_moments = [after[k].abs().max().item() for k in after if k.startswith("optimizer.state.exp_avg.vision")]
    assert max(vision_moments) > 0  # gradients reached the vision tower; only its LR is 0


def test_freeze_llm_trains_the_towers(inputs):
    before, after = _switch_run(inputs, "freeze_llm", freeze_llm=True)
    optimizer_parts = {_part(k) for k in after if k.startswith("optimizer.state.exp_avg.")}
    assert optimizer_parts == {"audio_model", "vision_model"}, optimizer_parts
    changed = {part: _changed(before, after, part) for part in ("audio_model", "vision_model", "language_model")}
    print(f"tensors changed after 3 steps (changed, total): {changed}")
    assert changed["language_model"][0] == 0
    assert changed["vision_model"][0] > 0 and changed["audio_model"][0] > 0


@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_recompute_gives_the_same_steps(inputs, reference, recompute):
    train_dir = inputs["root"] / f"recompute_{recompute}"
    run(write_settings(inputs, train_dir, **dict(REFERENCE, iters=3, save_interval=0, eval_interval=0,
                                                   recompute=recompute)), inputs["root"] / f"{train_dir.name}.log")
    got = metrics(train_dir)
    # same warmup: steps 1-3 use the same LRs as the 10-step reference
    for mine, theirs in zip(got, reference["metrics"][:3]):
        print(f"recompute {recompute} step {mine['step']}: loss {mine['loss']!r} vs {theirs['loss']!r}, "
              f"grad norm {mine['grad_norm']!r} vs {theirs['grad_norm']!r}")
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-6)
        assert mine["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-5)
