"""Shared fixtures: the tiny checkpoint is built once per test session (deterministic, ~5 s)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# Two cores here: keep each test process to one intra-op thread so parallel work does not thrash.
torch.set_num_threads(int(os.environ.get("OMNI_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory) -> Path:
    from omni_model.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_hf") / "hf", seed=0)


@pytest.fixture(scope="session")
def converted_workflow(tmp_path_factory) -> Path:
    """A workflow copy where `snakemake --cores 2 convert shards` has run on the default config (download, demo data,
    Data-Juicer, shards, convert + parity gate: every input of finetune): the starting point of the DAG tests of
    finetune and export, which clone it (workflow_utils.clone_workflow) instead of running those stages again each.
    Built once per test run: under pytest-xdist the workers share it (the first to ask builds it, under a file lock,
    in the run's common temp dir; it took each worker ~2 minutes of the suite's two cores)."""
    from filelock import FileLock
    from workflow_utils import snakemake, workflow_copy

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # this run's directory, above the workers' own
    wf, done, failed = (root / "converted" / name for name in ("wf", "DONE", "FAILED"))
    with FileLock(str(root / "converted.lock")):
        if not (done.exists() or failed.exists()):
            shutil.rmtree(wf, ignore_errors=True)  # a build that a killed worker left half done
            workflow_copy(wf)
            result = snakemake(wf, "--cores", "2", "convert", "shards", timeout=1800)
            (done if result.returncode == 0 else failed).write_text((result.stdout + result.stderr)[-4000:])
    assert not failed.exists(), failed.read_text()
    return wf


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
