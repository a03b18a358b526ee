"""The finetune run on a GPU: bf16, mcore's distributed optimizer (the CPU tests use the plain optimizer), the same
kill-after-the-step-5-checkpoint-and-resume as tests/test_finetune.py. The resume path of the distributed optimizer
is GPU-only, and failed there before (a fresh DistributedOptimizer has no Adam state to build the load request)."""

from __future__ import annotations

import pytest

from test_finetune import REFERENCE, kill_after_steps, metrics, run, start, write_settings

pytestmark = [pytest.mark.gpu, pytest.mark.slow]
ON_ONE_GPU = dict(REFERENCE, gpus_per_node=1)  # train.gpus_per_node > 0 is what selects bf16 + the distributed optimizer


@pytest.fixture(scope="module")
def gpu_inputs(tiny_hf_dir, tmp_path_factory):
    from dist.finetune_setup import make_checkpoint, make_shards

    root = tmp_path_factory.mktemp("finetune_gpu")
    return {"hf": tiny_hf_dir, "checkpoint": make_checkpoint(tiny_hf_dir, root / "checkpoint"),
            "shards": make_shards(tiny_hf_dir, root / "data", n_samples=16, max_seq_len=1024), "root": root}


def test_distributed_optimizer_kill_and_resume(gpu_inputs):
    """Uninterrupted 10 steps vs SIGKILL after the step-5 checkpoint + rerun: the same steps and, after the resume,
    the uninterrupted run's losses."""
    root = gpu_inputs["root"]
    reference_dir = root / "reference"
    run(write_settings(gpu_inputs, reference_dir, **ON_ONE_GPU), root / "reference.log")
    expected = metrics(reference_dir)

    train_dir = root / "killed"
    settings = write_settings(gpu_inputs, train_dir, **ON_ONE_GPU)
    kill_after_steps(start(settings, root / "killed.log"), train_dir, 6)
    assert (train_dir / "iter_0000005").is_dir() and not (train_dir / "iter_0000010").exists()
    (train_dir / "metrics.jsonl").unlink()

    output = run(settings, root / "killed.log")
    assert "resuming from" in output and "iter_0000005" in output
    resumed = metrics(train_dir)
    assert [r["step"] for r in resumed] == list(range(1, 11))
    for a, b in zip(resumed, expected):
        print(f"step {a['step']:2d}: resumed {a['loss']!r} uninterrupted {b['loss']!r}")
    worst = max(abs(a["loss"] - b["loss"]) / abs(b["loss"]) for a, b in zip(resumed, expected))
    # Two runs agreed bit for bit in steps 1-6 on the H200; with the shared Adam step (fixed since) steps 7-10 were off
    # by 1.3e-3..1.9e-3: the tolerance sits well below that and above bf16 reduction-order noise
    assert worst < 1e-4, f"resumed losses differ from the uninterrupted run by up to {worst:.2e} (relative)"
    assert resumed[-1]["loss"] < resumed[0]["loss"]
