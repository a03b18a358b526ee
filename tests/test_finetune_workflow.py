"""`snakemake --cores 2 finetune` on the default config, as a user runs it (the real CLI on a copy of the workflow):
the tiny model trains 20 steps on the demo set and its loss drops; then the plan for a changed train.lr reruns only
finetune (and export after it), an unchanged config has nothing to do, parallel.cp 2 plans a finetune job (and is
refused at planning without packing); a pipeline split without the deepstack layers on the first stage is refused."""

from __future__ import annotations

import json
import re

import pytest

from workflow_utils import clone_workflow, snakemake, workflow_copy


def planned_jobs(output: str) -> dict:
    """{rule: count} from a dry run's 'Job stats' table."""
    jobs = {}
    table = output.split("Job stats:", 1)[-1] if "Job stats:" in output else ""
    for line in table.splitlines():
        match = re.fullmatch(r"\s*([A-Za-z_]\w*)\s+(\d+)\s*", line)
        if match and match.group(1) != "total":
            jobs[match.group(1)] = int(match.group(2))
    return jobs


def _jobs_run(result) -> set:
    """The rules Snakemake ran (its 'rule NAME:' headers)."""
    return set(re.findall(r"^(?:local)?rule (\w+):", result.stdout + result.stderr, flags=re.M))


@pytest.fixture(scope="module")
def trained(converted_workflow, tmp_path_factory):
    wf = clone_workflow(converted_workflow, tmp_path_factory.mktemp("finetune_dag") / "wf")
    result = snakemake(wf, "--cores", "2", "finetune", timeout=2400)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "datajuicer" not in _jobs_run(result) and "convert" not in _jobs_run(result)  # started from the clone
    return wf, result


@pytest.mark.slow
def test_default_config_trains_and_the_loss_drops(trained):
    wf, result = trained
    records = [json.loads(line) for line in (wf / "results/train/metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    seconds = float((wf / "benchmarks/finetune.tsv").read_text().splitlines()[1].split("\t")[0])
    print(f"demo finetune: {len(losses)} steps, loss first {losses[0]:.4f} -> last {losses[-1]:.4f}, "
          f"eval {[r['eval_loss'] for r in records if 'eval_loss' in r]}, {seconds:.0f} s")
    assert len(losses) == 20 and losses[-1] < losses[0] - 0.5
    assert (wf / "results/train/latest").read_text().strip() == "iter_0000020"
    assert "loss first" in result.stdout + result.stderr  # the rule's closing line on the console
    assert (wf / "results/train/tb").is_dir() and (wf / "logs/finetune.log").read_text().count("step 20/20") == 1


@pytest.mark.slow
def test_changing_lr_reruns_only_finetune_the_talker_and_export(trained):
    wf, _ = trained
    unchanged = snakemake(wf, "-n", "finetune")
    assert unchanged.returncode == 0 and "Nothing to be done" in unchanged.stdout + unchanged.stderr
    changed = snakemake(wf, "-n", "export", "--config", "train={lr: 2.0e-3}")
    assert changed.returncode == 0, changed.stderr[-3000:]
    jobs = planned_jobs(changed.stdout + changed.stderr)
    print(f"planned after train.lr changed: {jobs}")
    assert jobs == {"finetune": 1, "finetune_talker": 1, "export": 1}  # the talker learns from the tuned thinker


@pytest.mark.slow
def test_context_parallel_plans_a_cp2_run(trained):
    wf, _ = trained
    planned = snakemake(wf, "-n", "finetune", "--config", "parallel={cp: 2}", "train={cpu_procs: 2}")
    assert planned.returncode == 0, (planned.stdout + planned.stderr)[-3000:]
    assert planned_jobs(planned.stdout + planned.stderr) == {"finetune": 1}
    refused = snakemake(wf, "-n", "finetune", "--config", "parallel={cp: 2}", "train={cpu_procs: 2, packing: false}")
    output = refused.stdout + refused.stderr
    assert refused.returncode != 0 and "parallel.cp = 2 needs train.packing: true" in output
    assert "nothing was run" in output


@pytest.mark.slow
def test_pipeline_split_is_checked_when_planning(tmp_path):
    """parallel.pp 2 on the tiny model (4 decoder layers, 3 deepstack features): mcore's even 2 + 2 split is refused
    before any job, naming parallel.first_stage_layers; with first_stage_layers 3 the finetune job is planned."""
    wf = workflow_copy(tmp_path / "wf")
    refused = snakemake(wf, "-n", "finetune", "--config", "parallel={pp: 2}")
    output = refused.stdout + refused.stderr
    assert refused.returncode != 0 and "nothing was run" in output
    assert "parallel.first_stage_layers >= 3" in output and "deepstack" in output
    planned = snakemake(wf, "-n", "finetune", "--config", "parallel={pp: 2, first_stage_layers: 3}")
    assert planned.returncode == 0, (planned.stdout + planned.stderr)[-3000:]
    assert planned_jobs(planned.stdout + planned.stderr)["finetune"] == 1
