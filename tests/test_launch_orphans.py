"""A torchrun worker must not outlive its agent: a SIGKILLed launcher (cancelled job step, `kill -9`) would otherwise
leave ranks training on, and the resumed run would share the training directory with them (seen on the H200)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

WORKER = """
import os, sys, time
from omni_model.runtime.parallel import init_parallel
init_parallel()
open(sys.argv[1], "w").write(str(os.getpid()))
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    """True while the process runs; a zombie (dead, not yet reaped by init) counts as gone."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.slow
def test_worker_dies_with_a_sigkilled_torchrun_agent(tmp_path):
    script, pid_file = tmp_path / "worker.py", tmp_path / "worker.pid"
    script.write_text(WORKER)
    agent = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                              str(script), str(pid_file)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        deadline = time.time() + 240
        while not pid_file.exists() or not pid_file.read_text():
            assert agent.poll() is None and time.time() < deadline, "the worker never started"
            time.sleep(0.2)
        worker = int(pid_file.read_text())
        assert _alive(worker)
        os.kill(agent.pid, signal.SIGKILL)  # the agent only: the worker lives in a session of its own
        agent.wait()
        deadline = time.time() + 10
        while _alive(worker) and time.time() < deadline:
            time.sleep(0.1)
        assert not _alive(worker), "the torchrun worker outlived its SIGKILLed agent"
    finally:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)


SNAKEFILE = """
rule train:
    output: "done"
    log: "train.log"
    script: "train.py"
"""

# what workflow/scripts/finetune.py does: the job's own process holds the lock and launches the ranks
TRAIN_SCRIPT = """
import os
from omni_model.runtime.launch import run_torchrun, writer_lock
path = os.pathsep.join([os.getcwd(), os.environ["PYTHONPATH"]])
with writer_lock("train_dir", "train"):
    run_torchrun("worker", [], nproc_per_node=1, log=snakemake.log[0], env={"PYTHONPATH": path})
open(snakemake.output[0], "w").close()
"""

WORKER_WRITING = """
import os, time
with open("train_dir/pids", "a") as f:
    f.write(f"{os.getpid()}\\n")
time.sleep(120)
"""


def _launch_processes(workdir: Path) -> list[int]:
    """The processes running in `workdir` (this test's Snakemake, its job, the torchrun agent, the rank)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if Path(os.readlink(entry / "cwd")) == workdir:
                    found.append(int(entry.name))
            except OSError:
                continue
    return [pid for pid in found if _alive(pid)]


@pytest.mark.slow
def test_a_sigkilled_snakemake_takes_its_launch_with_it_and_a_second_writer_is_refused(tmp_path):
    """`kill -9` of snakemake (issue 26, finding 6): its job, the torchrun agent and the rank stop within seconds, so
    a rerun never writes beside an orphan; while a writer holds the folder, another is refused with a clear message.
    Real Snakemake, real torchrun, a sleeping rank."""
    from omni_model.runtime.launch import WriterBusy, writer_lock

    from workflow_utils import SNAKEMAKE

    (tmp_path / "Snakefile").write_text(SNAKEFILE)
    (tmp_path / "worker.py").write_text(WORKER_WRITING)
    (tmp_path / "train.py").write_text(TRAIN_SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                       os.environ.get("PYTHONPATH", "")]))
    snakemake = subprocess.Popen([SNAKEMAKE, "--cores", "1", "done"], cwd=tmp_path, env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    started = []
    try:
        pids = tmp_path / "train_dir" / "pids"
        deadline = time.time() + 240
        while not pids.exists() or not pids.read_text():
            assert snakemake.poll() is None and time.time() < deadline, "the rank never started"
            time.sleep(0.2)
        started = _launch_processes(tmp_path)
        assert len(started) >= 4  # snakemake, its job, the agent, the rank
        with pytest.raises(WriterBusy, match=r"train_dir is being written by another train \(pid \d+ on .*"
                                             r"still running: stop it first"):
            with writer_lock(tmp_path / "train_dir", "train"):
                pass
        os.kill(snakemake.pid, signal.SIGKILL)  # snakemake only, as `kill -9 <snakemake>` does
        snakemake.wait()
        deadline = time.time() + 60
        while _launch_processes(tmp_path) and time.time() < deadline:
            time.sleep(0.2)
        assert _launch_processes(tmp_path) == [], "processes of the launch outlived the SIGKILLed snakemake"
        with writer_lock(tmp_path / "train_dir", "train"):  # the folder is free again
            pass
    finally:
        for pid in _launch_processes(tmp_path):
            if pid in started or pid == snakemake.pid:
                os.kill(pid, signal.SIGKILL)
