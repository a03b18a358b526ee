"""The ranks' environment (runtime.launch.rank_environment): the allocator default that lets the 30B-A3B LoRA run fit
an 80 GB card, a user's own setting kept, and a Slurm step's per-task variables left out under srun."""

from pathlib import Path

from omni_model.runtime.launch import RANK_ERRORS_ENV, rank_environment


def test_ranks_get_expandable_segments_unless_the_user_chose(monkeypatch):
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    env = rank_environment(None, Path("/tmp/errors"))
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert env[RANK_ERRORS_ENV] == "/tmp/errors"

    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512")
    assert rank_environment(None, Path("/tmp/errors"))["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:512"
    assert rank_environment({"PYTORCH_CUDA_ALLOC_CONF": "backend:native"},
                            Path("/tmp/errors"))["PYTORCH_CUDA_ALLOC_CONF"] == "backend:native"


def test_under_srun_only_the_allocations_identity_is_passed_on(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    env = rank_environment(None, Path("/tmp/errors"), under_srun=True)
    assert env["SLURM_JOB_ID"] == "42" and "SLURM_NTASKS" not in env
    assert rank_environment(None, Path("/tmp/errors"))["SLURM_NTASKS"] == "1"
