"""Shared fixtures: the tiny checkpoint is built once per test session (deterministic, ~5 s)."""

from __future__ import annotations

import os
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
    finetune and export, which clone it (workflow_utils.clone_workflow) instead of running those stages again each."""
    from workflow_utils import snakemake, workflow_copy

    wf = workflow_copy(tmp_path_factory.mktemp("converted") / "wf")
    result = snakemake(wf, "--cores", "2", "convert", "shards", timeout=1800)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return wf


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
