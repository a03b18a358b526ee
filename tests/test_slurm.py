"""`snakemake --profile` against a real Slurm (issue 11 items 1 + 2): slurm-wlm 22.05 from Debian, one node on loopback
with 2 CPUs and two partitions (tests/slurm_cluster.py), snakemake-executor-plugin-slurm, no mock of any Slurm command.

The test profile is profiles/slurm/config.yaml with the site's partition names swapped for the test cluster's, plus
what this cluster needs (squeue for job status: no accounting daemon; logs of successful jobs kept to check them).
The node has no GPUs: the `gpu` partition is a CPU partition here, what is checked is that the profile sends
convert/finetune there. finetune runs with train.nnodes 2 x cpu_procs 1: one Slurm job with 2 tasks whose srun starts
two torchrun agents meeting at one c10d rendezvous on the allocation's first node, the stand-in for two nodes.

Runs only when RUN_SLURM_TESTS=1 (`make test-slurm`; installs the Debian packages with apt-get when missing): 7.5-15 min
on a 2-core box, which `make test` (~25 min) cannot also carry within its 30-minute budget.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from slurm_cluster import SlurmCluster, system_conf_taken
from workflow_utils import REPO, SNAKEMAKE, workflow_copy


def needs_slurm(test):
    for mark in (
        pytest.mark.slurm, pytest.mark.slow,
        pytest.mark.skipif(os.environ.get("RUN_SLURM_TESTS") != "1",
                           reason="a real Slurm cluster takes 7.5-15 min: RUN_SLURM_TESTS=1 (make test-slurm)"),
        pytest.mark.skipif(os.geteuid() != 0, reason="the test cluster's munged/slurmd run as root"),
        pytest.mark.skipif(system_conf_taken(), reason="/etc/slurm/slurm.conf belongs to a real cluster"),
    ):
        test = mark(test)
    return test


PARTITIONS = {"cpu": "debug_cpu", "gpu": "debug_gpu"}  # site name in profiles/slurm -> the test cluster's
CPU_RULES = ("demo_data", "fetch_model", "datajuicer", "shards", "export")
GPU_RULES = ("convert", "finetune")


def write_test_profile(wf: Path) -> Path:
    """profiles/slurm with the test cluster's partitions (every other site setting as shipped)."""
    profile = yaml.safe_load((REPO / "profiles/slurm/config.yaml").read_text())
    for resources in [profile["default-resources"], *profile["set-resources"].values()]:
        if "slurm_partition" in resources:
            resources["slurm_partition"] = PARTITIONS[resources["slurm_partition"]]
    # one node: finetune's 2 torchrun agents (train.nnodes 2) share it instead of asking for 2 nodes
    profile["set-resources"]["finetune"]["nodes"] = 1
    profile.update({
        "slurm-status-command": "squeue",            # no slurmdbd: sacct has no records
        "slurm-init-seconds-before-status-checks": 2,
        "seconds-between-status-checks": 2,
        "slurm-keep-successful-logs": True,          # read below: which job ran which rule
        "latency-wait": 5,
    })
    (wf / "profiles/slurm_test").mkdir(exist_ok=True)
    (wf / "profiles/slurm_test/config.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    return wf / "profiles/slurm_test"


def run_snakemake(wf: Path, cluster: SlurmCluster, *args: str, timeout: int = 1500) -> subprocess.CompletedProcess:
    env = dict(cluster.env(), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run([SNAKEMAKE, "--profile", "profiles/slurm_test", *args], cwd=wf, env=env,
                          capture_output=True, text=True, timeout=timeout)


def slurm_jobs_by_rule(wf: Path) -> dict[str, list[str]]:
    """rule -> Slurm job ids, from the plugin's log files .snakemake/slurm_logs/rule_<name>/<jobid>.log."""
    jobs: dict[str, list[str]] = {}
    for log in (wf / ".snakemake/slurm_logs").glob("rule_*/**/*.log"):
        rule = log.relative_to(wf / ".snakemake/slurm_logs").parts[0].removeprefix("rule_")
        jobs.setdefault(rule, []).append(log.stem)
    return jobs


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm") / "cluster", cpus=2,
                           partitions=tuple(PARTITIONS.values()))
    try:
        yield cluster.start()
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def wf(tmp_path_factory, cluster):
    """The tiny DAG (16 demo samples, 3 training steps) through `snakemake --profile`: every job a Slurm job."""
    wf = workflow_copy(tmp_path_factory.mktemp("slurm_wf") / "wf")
    config = yaml.safe_load((wf / "config/config.yaml").read_text())
    config["data"]["demo_samples"] = 16
    config["train"].update(iters=3, lr_warmup_iters=1, eval_interval=0, save_interval=0, nnodes=2, cpu_procs=1)
    (wf / "config/config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    write_test_profile(wf)
    start = time.time()
    result = run_snakemake(wf, cluster, "all")
    console = result.stdout + result.stderr
    (wf / "console.txt").write_text(console)
    print(f"the DAG through Slurm: {time.time() - start:.0f} s")
    assert result.returncode == 0, console[-5000:] + cluster.logs()
    return wf


@needs_slurm
def test_every_rule_runs_as_a_slurm_job_on_its_partition(wf, cluster):
    console = (wf / "console.txt").read_text()
    ran = set(re.findall(r"^rule (\w+):", console, re.M))
    by_rule = slurm_jobs_by_rule(wf)
    finished = cluster.finished_jobs()
    print({rule: [(j, finished[j]["Partition"], finished[j]["JobState"]) for j in ids]
           for rule, ids in by_rule.items()})
    assert set(CPU_RULES + GPU_RULES) <= ran
    assert set(by_rule) == ran  # every (non-local) job Snakemake ran was one Slurm job, and nothing else was
    for rule in ran:
        (job,) = by_rule[rule]
        record = finished[job]
        assert record["JobState"] == "COMPLETED", (rule, record)
        assert record["Partition"] == PARTITIONS["gpu" if rule in GPU_RULES else "cpu"], (rule, record)
        assert Path(record["WorkDir"]) == wf
    assert cluster.queue() == []


@needs_slurm
def test_finetune_is_one_job_of_two_tasks_running_two_torchrun_agents(wf, cluster):
    (job,) = slurm_jobs_by_rule(wf)["finetune"]
    record = cluster.finished_jobs()[job]
    assert record["ProcCnt"] == "2" and record["NodeCnt"] == "1", record
    log = (wf / "logs/finetune.log").read_text()
    launch = re.search(r"\[launch\] (srun .*)", log)
    assert launch, log[-3000:]
    command = launch.group(1)
    print(command)
    # srun inside the job (overlapping the job step that runs Snakemake), 2 tasks, torchrun with nnodes 2 x nproc 1
    for option in ("--overlap", f"--jobid={job}", "--ntasks=2", "--nproc_per_node=1", "--nnodes=2",
                   "--rdzv_backend=c10d", f"--rdzv_endpoint={cluster.node}:{29500 + int(job) % 1000}",
                   f"--rdzv_id=slurm-{job}"):
        assert option in command.split(), option
    # both tasks wrote to the log (srun --label) and the two agents formed one world of 2 ranks
    tasks = {int(m) for m in re.findall(r"^\S+ \S+ +(\d+): ", log, re.M)}
    assert tasks == {0, 1}, log[-3000:]
    # one data-parallel world of 2 ranks (1 per agent: torchrun starts no rank before both agents have joined)
    assert "[plan] tp1 pp1 ep1 etp1 dp2:" in log
    metrics = [line for line in (wf / "results/train/metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(metrics) == 3


def _processes_in(workdir: Path, needle: str) -> list[str]:
    """Command lines of live processes whose working directory is `workdir` and whose command line has `needle`."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            if needle in cmdline and Path(os.readlink(proc / "cwd")) == workdir:
                found.append(cmdline)
        except OSError:  # exited meanwhile, or not ours to read
            continue
    return found


@needs_slurm
def test_ctrl_c_cancels_the_slurm_jobs_and_their_ranks(wf, cluster):
    """SIGINT (Ctrl-C) to Snakemake: the plugin scancels its jobs; the srun-started torchrun agents and their ranks
    go with them. (SIGTERM is Snakemake's graceful stop: no new jobs, running ones finish.)"""
    env = dict(cluster.env(), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    log = wf / "logs/finetune.log"
    log.unlink()
    proc = subprocess.Popen([SNAKEMAKE, "--profile", "profiles/slurm_test", "--forcerun", "finetune", "finetune"],
                            cwd=wf, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        # training has started: srun's two tasks run torchrun (rank output has reached the rule's log)
        while not (log.exists() and re.search(r"^\S+ \S+ +1: ", log.read_text(), re.M)):
            assert proc.poll() is None and time.time() < deadline, (proc.communicate()[0] or "")[-3000:]
            time.sleep(1)
        (running,) = cluster.queue()
        job = running.split("|")[0]
        assert "|RUNNING|" in running and _processes_in(wf, "omni_model.train")
        proc.send_signal(signal.SIGINT)
        console = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    print(console[-1500:])
    assert "Terminating processes on user request" in console
    assert cluster.wait_empty(timeout=60) == []
    assert cluster.finished_jobs()[job]["JobState"] == "CANCELLED"
    deadline = time.time() + 30
    while _processes_in(wf, "omni_model.train") and time.time() < deadline:
        time.sleep(1)
    assert _processes_in(wf, "omni_model.train") == []


@needs_slurm
def test_a_failed_job_points_to_its_slurm_log(wf, cluster, tmp_path):
    """A job that fails inside Slurm (a local model whose files disagree with its MANIFEST.json): Snakemake's error
    names the job's Slurm log next to the rule's log; the Slurm log has the stage's error line (stage_logging keeps
    tracebacks out of the console, which is what the Slurm log records), the rule's log the traceback."""
    damaged = tmp_path / "damaged"
    shutil.copytree(wf / "results/model/hf", damaged)
    with open(damaged / "merges.txt", "r+b") as handle:
        handle.write(b"X")
    result = run_snakemake(wf, cluster, "download", "--config", f"model={{source: local, path: '{damaged}'}}")
    console = result.stdout + result.stderr
    print(console[-2500:])
    assert result.returncode != 0
    found = re.search(r"log: logs/download\.log, (\S+/slurm_logs/rule_fetch_model/(\d+)\.log)", console)
    assert found, console[-3000:]
    slurm_log, job = Path(found.group(1)), found.group(2)
    assert f"SLURM-job '{job}' failed, SLURM status is: 'FAILED'" in console
    assert cluster.finished_jobs()[job]["JobState"] == "FAILED"
    # the job's Slurm log: the stage's one-line error, pointing to the rule's log, which has the traceback
    text = slurm_log.read_text()
    assert re.search(r"^\[download\] FAILED: CheckpointError: model\.path \S+damaged does not match its "
                     r"MANIFEST\.json: merges\.txt: sha256 mismatch \(corrupted\)\s+\(full log: logs/download\.log\)$",
                     text, re.M), text[-3000:]
    rule_log = (wf / "logs/download.log").read_text()
    assert "Traceback (most recent call last)" in rule_log and "CheckpointError" in rule_log


def test_multi_node_launch_inside_a_slurm_job(monkeypatch):
    """The command for 2 real nodes (what the one-node test above cannot show): one agent per node, the rendezvous on
    the allocation's first node, the port of train.rdzv_endpoint when it names one; an uneven spread is refused."""
    from omni_model.runtime.launch import slurm_torchrun_command

    monkeypatch.setenv("SLURM_JOB_ID", "4711")
    command = slurm_torchrun_command("omni_model.train", ["--settings", "s.json"], 8, 2, ["gpu07", "gpu08"])
    python = command.index(sys.executable)  # srun's options, then torchrun's
    srun, torchrun = command[:python], command[python:]
    assert srun[:2] == ["srun", "--overlap"] and "--whole" in srun
    for option in ("--jobid=4711", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1"):
        assert option in srun, option
    for option in ("--nproc_per_node=8", "--nnodes=2", "--rdzv_backend=c10d", "--rdzv_endpoint=gpu07:30211",
                   "--rdzv_id=slurm-4711"):
        assert option in command, option
    assert torchrun[1:3] == ["-m", "torch.distributed.run"]
    # each rank runs the module under runtime.launch, which records the exception that ends it
    assert torchrun[-5:] == ["-m", "omni_model.runtime.launch", "omni_model.train", "--settings", "s.json"]
    assert "--rdzv_endpoint=gpu07:6000" in slurm_torchrun_command("m", [], 8, 2, ["gpu07", "gpu08"], rdzv_port="6000")
    with pytest.raises(ValueError, match="train.nnodes 3 torchrun agents cannot be spread evenly over the 2 node"):
        slurm_torchrun_command("m", [], 8, 3, ["gpu07", "gpu08"])
