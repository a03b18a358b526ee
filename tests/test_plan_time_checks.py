"""Everything `snakemake -n` can check, it checks (issue 26, findings 7 and 9): through the real Snakemake CLI on a
private copy of the workflow, dry runs only (no job runs, nothing is downloaded)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from workflow_utils import REPO, snakemake, workflow_copy

# Pipeline configs shipped in config/ (the schema and the Data-Juicer recipe are not): every one must plan.
NOT_PIPELINE_CONFIGS = ("schema.yaml", "datajuicer_recipe.yaml")
SHIPPED_CONFIGS = sorted(p for p in REPO.glob("config/*.yaml") if p.name not in NOT_PIPELINE_CONFIGS)
TWO_LAYER_RANDOM = {"model": {"source": "random", "overrides": {"thinker_config": {"text_config": {
    "num_hidden_layers": 2}}}}}


def _console(result) -> str:
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def wf(tmp_path_factory):
    wf = workflow_copy(tmp_path_factory.mktemp("plan_checks") / "wf")
    (wf / "slurm").symlink_to("profiles/slurm")
    (wf / "data").mkdir()  # the data.raw the 30B example configs name
    (wf / "data" / "train.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}, '
                                            '{"role": "assistant", "content": "hello"}]}\n')
    return wf


@pytest.fixture()
def no_cuda(monkeypatch):
    """A machine without a usable CUDA torch, also where the tests run on a GPU box."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


def test_gpus_per_node_without_cuda_is_refused_when_finetune_would_run_here(wf, no_cuda):
    """Finding 7: `train.gpus_per_node: 1` on a CPU torch planned fine; finetune then failed inside torch
    (`Wrapped parameters must be one of torch.cuda.FloatTensor`) after download, data stages and convert."""
    gpu = "train={gpus_per_node: 1}"
    for args in (["-n"], ["--cores", "1", "finetune"]):
        refused = snakemake(wf, *args, "--config", gpu)
        print(_console(refused)[-600:])
        assert refused.returncode == 1
        assert "finetune cannot run with this config (nothing was run):" in refused.stderr
        assert "train.gpus_per_node = 1, but this torch" in refused.stderr
        assert "can use 0 GPU(s) here, and finetune would run on this machine" in refused.stderr
        assert not (wf / "results").exists()  # a run stopped before its first job
    # what does not run finetune here is not held up: the data stages, and a Slurm plan (finetune goes to GPU nodes)
    assert snakemake(wf, "-n", "shards", "--config", gpu).returncode == 0
    slurm = snakemake(wf, "--profile", "slurm", "-n", "finetune", "--config", gpu)
    assert slurm.returncode == 0, _console(slurm)[-2000:]
    assert "rule finetune:" in slurm.stdout


def test_a_layout_the_memory_planner_refuses_stops_the_dry_run(wf):
    """Finding 7: the planner's refusal appeared only when finetune started, after download and convert."""
    refused = snakemake(wf, "-n", "--config", "train={gpu_memory_gib: 0.01}")
    print(refused.stderr[-1500:])
    assert refused.returncode == 1
    assert "needs ~" in refused.stderr and "above train.gpu_memory_gib = 0.01" in refused.stderr
    assert "Layouts that fit" in refused.stderr
    assert snakemake(wf, "-n", "shards", "--config", "train={gpu_memory_gib: 0.01}").returncode == 0


def test_the_planner_and_the_workflow_refuse_a_model_too_small_for_its_deepstack_layers(wf, tmp_path):
    """Finding 7: `model.source: random` with 2 layers was refused with a message about parallel.pp /
    first_stage_layers (with pp 1) while `python -m omni_model.plan` accepted it."""
    config = tmp_path / "two_layers.yaml"
    config.write_text(yaml.safe_dump(TWO_LAYER_RANDOM))
    expected = ("the model has 2 decoder layers but its vision tower adds 3 deepstack features to decoder layers "
                "0..2: give it at least 3 layers")
    dry = snakemake(wf, "-n", "--configfile", str(config))
    assert dry.returncode == 1 and expected in dry.stderr, dry.stderr[-1500:]
    assert "parallel.pp" not in dry.stderr
    env = dict(os.environ, PYTHONPATH=str(REPO))
    planned = subprocess.run([sys.executable, "-m", "omni_model.plan", "--config", str(config)], cwd=wf, env=env,
                             capture_output=True, text=True, timeout=300)
    print(planned.stdout[-800:])
    assert planned.returncode == 1 and "REFUSED:" in planned.stdout and expected in planned.stdout


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_plans(wf, path):
    """Finding 9: config/qwen3-omni-30b-a3b.yaml no longer planned (`parallel.ep x etp = 8 must divide
    data-parallel x tp = 2`: it set no train.gpus_per_node). A Slurm dry run of finetune, as its comment says."""
    dry = snakemake(wf, "--profile", "slurm", "-n", "finetune", "--configfile", str(path))
    assert dry.returncode == 0, _console(dry)[-3000:]
    assert "rule finetune:" in dry.stdout


def _finetune_job(console: str) -> dict:
    block = console.split("rule finetune:", 1)[1].split("\n\n", 1)[0]
    threads = re.search(r"threads: (\d+)", block)
    resources = dict(item.split("=", 1) for item in re.search(r"resources: (.*)", block).group(1).split(", "))
    return {"threads": int(threads.group(1)) if threads else 1, "mem_mb": int(resources["mem_mb"]),
            "gpu": int(resources["gpu"])}


def test_finetune_asks_slurm_for_cpus_and_memory_per_gpu(wf):
    """Finding 9: finetune asked for mem_mb=16000 and train.cpu_procs threads whatever the GPUs per node; now per
    GPU rank 32 GB and 1 + train.data_workers (4 on GPU) CPUs."""
    jobs = {}
    for gpus in (1, 8):
        dry = snakemake(wf, "--profile", "slurm", "-n", "--cores", "256", "finetune", "--configfile",
                        "config/qwen3-omni-30b-a3b-8gpu-h200.yaml", "--config",
                        f"train={{gpus_per_node: {gpus}, global_batch_size: 64, gpu_memory_gib: null}}",
                        "parallel={tp: 1, ep: 1}")
        assert dry.returncode == 0, _console(dry)[-2000:]
        jobs[gpus] = _finetune_job(dry.stdout)
    print(jobs)
    assert jobs == {1: {"threads": 5, "mem_mb": 32000, "gpu": 1}, 8: {"threads": 40, "mem_mb": 256000, "gpu": 8}}


def test_the_snakefile_runs_the_default_from_another_directory(wf, tmp_path):
    """Finding 9: `snakemake -s /path/to/Snakefile` from another directory failed on config/config.yaml (docs/data.md
    says it runs the default config)."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    dry = snakemake(elsewhere, "-s", str(wf / "Snakefile"), "-n")
    assert dry.returncode == 0, _console(dry)[-2000:]
    assert "rule export:" in dry.stdout
    ran = snakemake(elsewhere, "-s", str(wf / "Snakefile"), "--cores", "1", "download")
    assert ran.returncode == 0, _console(ran)[-2000:]
    assert (elsewhere / "results/model/hf/MANIFEST.json").is_file() and not (wf / "results").exists()


@pytest.mark.slow
def test_the_report_refuses_items_older_than_the_data_they_show(converted_workflow, tmp_path):
    """Finding 9: after `snakemake shards` reran on its own, `snakemake --report` showed the previous data's report
    items. Now it stops, naming the rule that remakes them; after that rule the table holds the new counts."""
    from workflow_utils import clone_workflow

    wf = clone_workflow(converted_workflow, tmp_path / "wf")
    made = snakemake(wf, "--cores", "2", "report_data")
    assert made.returncode == 0, _console(made)[-2000:]
    changed = "data={val_fraction: 0.3}"
    rerun = snakemake(wf, "--cores", "2", "shards", "--config", changed)
    assert rerun.returncode == 0, _console(rerun)[-2000:]
    refused = snakemake(wf, "--report", "report.html", "report_data", "--config", changed)
    print(refused.stderr[-800:])
    assert refused.returncode == 1 and not (wf / "report.html").exists()
    assert "The report items of report_data are missing or older than what they report on" in refused.stderr
    assert "Run `snakemake --cores all --force report_data`" in refused.stderr
    assert snakemake(wf, "--cores", "2", "report_data", "--config", changed).returncode == 0
    reported = snakemake(wf, "--report", "report.html", "report_data", "--config", changed)
    assert reported.returncode == 0, _console(reported)[-2000:]
    val = json.loads((wf / "results/data/shards/report.json").read_text())["val"]
    table = (wf / "results/report/data_summary.html").read_text()
    assert f"<td>kept (val)</td><td class='n'>{val}</td>" in table, table


def test_a_setting_change_names_the_changed_keys_as_the_rerun_reason(tmp_path):
    """Finding 9: changing one setting printed the whole section before and after as the rerun reason."""
    wf = workflow_copy(tmp_path / "wf")
    ran = snakemake(wf, "--cores", "1", "download")
    assert ran.returncode == 0, _console(ran)[-2000:]
    dry = snakemake(wf, "-n", "download", "--config", "model={seed: 1}")
    reason = dry.stdout.split("rule download:", 1)[1].split("reason:", 1)[1].splitlines()[0]
    print(reason)
    assert reason.endswith("before: 'model.seed = 0' now: 'model.seed = 1' ")
    assert "model.source" not in reason and "'source'" not in reason


def test_a_data_setting_change_names_the_key_as_the_rerun_reason(tmp_path):
    """The data rules took single values as params: a change read `before: 200 now: 20`, naming no key."""
    wf = workflow_copy(tmp_path / "wf")
    ran = snakemake(wf, "--cores", "1", "demo_data", "--config", "data={demo_samples: 8}")
    assert ran.returncode == 0, _console(ran)[-2000:]
    dry = snakemake(wf, "-n", "demo_data", "--config", "data={demo_samples: 8, seed: 1}")
    reason = dry.stdout.split("rule demo_data:", 1)[1].split("reason:", 1)[1].splitlines()[0]
    print(reason)
    assert reason.endswith("before: 'data.seed = 0' now: 'data.seed = 1' ")
    assert "demo_samples" not in reason
