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
