"""The Snakemake DAG itself: config validated before any job, plan, lint, and reruns of nothing stale."""

from __future__ import annotations

import pytest
import yaml

from workflow_utils import snakemake, workflow_copy

STAGES_SO_FAR = ("download", "datajuicer", "shards")


@pytest.fixture()
def wf(tmp_path):
    return workflow_copy(tmp_path / "wf")


def _with_config(wf, **sections):
    config = yaml.safe_load((wf / "config" / "config.yaml").read_text())
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(config.get(section), dict):
            config[section].update(values)
        else:
            config[section] = values
    path = wf / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize(
    "sections, must_name",
    [
        ({"model": {"source": "bogus"}}, ["model.source = 'bogus'", "tiny, random, modelscope, huggingface, local"]),
        ({"train": {"iters": "ten"}}, ["train.iters = 'ten': expected an integer"]),
        ({"parallel": {"tp": 0}}, ["parallel.tp = 0: must be >= 1"]),
        ({"modell": {"source": "tiny"}}, ["modell: unknown key; did you mean 'model'?"]),
        ({"model": {"source": "local"}}, ["model.path: required"]),
        ({"model": {"id": "not a repo id"}}, ["model.id = 'not a repo id': must match"]),
    ],
)
def test_bad_config_fails_before_any_job_and_names_the_key(wf, sections, must_name):
    result = snakemake(wf, "-n", "--configfile", str(_with_config(wf, **sections)))
    assert result.returncode != 0
    message = result.stdout + result.stderr
    for word in must_name:
        assert word in message, f"{word!r} not in: {message[-2000:]}"
    assert not (wf / "results").exists() and not (wf / "logs").exists()
    # finding 6: the message, not the schema and config (356 lines before)
    assert "Config error (nothing was run)" in message and "additionalProperties" not in message
    assert len(message.splitlines()) < 8, message


def test_dry_run_plans_every_stage(wf):
    result = snakemake(wf, "-n", "report_data")
    assert result.returncode == 0, result.stderr
    for rule in STAGES_SO_FAR:
        assert rule in result.stdout


def test_lint_is_clean(wf):
    result = snakemake(wf, "--lint")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Lints for" not in result.stdout + result.stderr


def test_download_runs_then_nothing_is_stale(wf):
    first = snakemake(wf, "--cores", "2", "download")
    assert first.returncode == 0, first.stderr[-3000:]
    assert (wf / "results/model/hf/MANIFEST.json").is_file()
    assert (wf / "logs/download.log").is_file() and (wf / "benchmarks/download.tsv").is_file()
    second = snakemake(wf, "--cores", "2", "download")
    assert second.returncode == 0
    assert "Nothing to be done" in second.stdout + second.stderr


def test_profile_slurm_resolves_from_repo_root(wf):
    (wf / "slurm").symlink_to("profiles/slurm")
    result = snakemake(wf, "--profile", "slurm", "-n", "download")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "download" in result.stdout


@pytest.mark.slow
def test_data_stages_run_on_the_default_then_nothing_is_stale(wf):
    first = snakemake(wf, "--cores", "2", "report_data")
    assert first.returncode == 0, first.stderr[-4000:]
    for stage in STAGES_SO_FAR:
        assert (wf / "logs" / f"{stage}.log").is_file()
        assert (wf / "benchmarks" / f"{stage}.tsv").is_file()
    assert (wf / "results/data/shards/.nv-meta/dataset.yaml").is_file()
    second = snakemake(wf, "--cores", "2", "report_data")
    assert second.returncode == 0
    assert "Nothing to be done" in second.stdout + second.stderr
    # touching the config of one stage reruns that stage and what follows, not the download
    plan = snakemake(wf, "-n", "report_data", "--configfile", str(_with_config(wf, data={"shard_max_samples": 16})))
    assert plan.returncode == 0, plan.stderr[-2000:]
    assert "shards" in plan.stdout and "download" not in plan.stdout
