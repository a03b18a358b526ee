"""Start a module under torchrun: the one place that knows how ranks are launched (convert, finetune).

    run_torchrun("omni_model.train", ["--settings", "s.json"], nproc_per_node=2, log=Path("logs/finetune.log"))

All ranks' output (stdout + stderr) goes, line by line and timestamped, to one log. When a rank fails, the exception
raised here names that rank's error in its first line and carries its traceback (the first `Traceback` block of this
launch's output), so the stage's one console line shows the real error and the log the whole story.
Multi-node: inside a Slurm job (SLURM_JOB_ID set), `nnodes > 1` starts one torchrun agent per node through
`srun --overlap` (the job's first step, the Snakemake job itself, already holds the allocation), with the c10d
rendezvous on the allocation's first node. Outside Slurm, `nnodes > 1` needs `rdzv_endpoint` (host:port of the first
node) and every node runs the same torchrun command (docs/cluster.md).
"""

from __future__ import annotations

import collections
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence


class RankFailed(RuntimeError):
    """A torchrun rank exited with an error; the message holds its traceback."""


def torchrun_command(module: str, args: Sequence[str], nproc_per_node: int, nnodes: int = 1,
                     rdzv_endpoint: str = "", rdzv_id: str = "omni") -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc_per_node}", f"--nnodes={nnodes}"]
    if nnodes > 1:
        if not rdzv_endpoint:
            raise ValueError("a multi-node run needs train.rdzv_endpoint (host:port of the first node)")
        cmd += ["--rdzv_backend=c10d", f"--rdzv_endpoint={rdzv_endpoint}", f"--rdzv_id={rdzv_id}"]
    else:
        cmd += ["--standalone"]
    return cmd + ["-m", module, *args]


def slurm_hosts() -> list[str]:
    """The hostnames of this Slurm job's allocation, first node first (empty outside a Slurm job)."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return []
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or subprocess.run(
        ["squeue", "-h", "-j", job, "-o", "%N"], capture_output=True, text=True, check=True).stdout.strip()
    return subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                          check=True).stdout.split()


def slurm_torchrun_command(module: str, args: Sequence[str], nproc_per_node: int, nnodes: int, hosts: list[str],
                           rdzv_port: str = "") -> list[str]:
    """srun starting `nnodes` torchrun agents spread evenly over the allocation's `hosts` (one per node when the job
    has `nnodes` nodes), meeting at a c10d rendezvous on hosts[0]. --overlap: the Snakemake job step holds the
    allocation's CPUs; --whole: each agent gets all of the job's CPUs and GPUs on its node, not one CPU."""
    if nnodes % len(hosts):
        raise ValueError(f"train.nnodes {nnodes} torchrun agents cannot be spread evenly over the {len(hosts)} "
                         f"node(s) of Slurm job {os.environ['SLURM_JOB_ID']} ({' '.join(hosts)})")
    job = os.environ["SLURM_JOB_ID"]
    # one port per job unless train.rdzv_endpoint names one: two jobs whose first node is the same do not meet
    port = rdzv_port or str(29500 + int(job) % 1000)
    srun = ["srun", "--overlap", "--whole", "--kill-on-bad-exit=1", "--label", f"--jobid={job}",
            f"--nodes={len(hosts)}", f"--ntasks={nnodes}", f"--ntasks-per-node={nnodes // len(hosts)}"]
    return srun + torchrun_command(module, args, nproc_per_node, nnodes, f"{hosts[0]}:{port}", f"slurm-{job}")


def launch_command(module: str, args: Sequence[str], nproc_per_node: int, nnodes: int = 1,
                   rdzv_endpoint: str = "") -> list[str]:
    """The command that starts the ranks: srun + one torchrun per node inside a multi-node Slurm job (the
    rendezvous host is the allocation's first node, only the port of `rdzv_endpoint` is used), else torchrun."""
    hosts = slurm_hosts() if nnodes > 1 else []
    if hosts:
        return slurm_torchrun_command(module, args, nproc_per_node, nnodes, hosts, rdzv_endpoint.rpartition(":")[2])
    return torchrun_command(module, args, nproc_per_node, nnodes, rdzv_endpoint)


# srun reads the SLURM_* variables of the step it runs in (the Snakemake job: 1 task, its CPUs and memory) as the
# defaults of a new step; only the allocation's identity is passed on (as the Slurm executor plugin does).
SLURM_IDENTITY = ("SLURM_JOB_ID", "SLURM_JOBID", "SLURM_CONF", "SLURM_CLUSTER_NAME")


def first_traceback(text: str, limit: int = 60) -> str:
    """The first Python traceback in `text` (up to `limit` lines), or its last lines if there is none."""
    lines = text.splitlines()
    for index, line in enumerate(lines):
        if "Traceback (most recent call last)" in line:
            block = [line]
            for follow in lines[index + 1:index + limit]:
                block.append(follow)
                # the exception line ends the block: not indented, not a chained-exception banner
                if follow and not follow.startswith((" ", "\t", "[")) and "Traceback" not in follow \
                        and "During handling" not in follow and "The above exception" not in follow:
                    break
            return "\n".join(block)
    return "\n".join(lines[-limit:])


class FailureExcerpt:
    """What `first_traceback` needs of a launch's output, kept as it streams by: the first traceback (its first
    `limit` lines) or, while there is none, the last `limit` lines. A run's whole output is never held (a week of
    training prints millions of lines)."""

    def __init__(self, limit: int = 60):
        self.limit, self.tail, self.block = limit, collections.deque(maxlen=limit), None

    def add(self, line: str) -> None:
        if self.block is None:
            if "Traceback (most recent call last)" in line:
                self.block = [line]
            else:
                self.tail.append(line)
        elif len(self.block) < self.limit:
            self.block.append(line)

    def traceback(self) -> str:
        return first_traceback("".join(self.block if self.block is not None else self.tail), self.limit)


def run_torchrun(module: str, args: Sequence[str], nproc_per_node: int, log: Optional[Path] = None, *,
                 nnodes: int = 1, rdzv_endpoint: str = "", env: Optional[dict] = None) -> None:
    """Run `python -m module args` on `nproc_per_node` ranks (times `nnodes`); raise RankFailed on failure.
    The ranks' output is streamed line by line, each line timestamped, to `log` (appended) or, without one, to
    sys.stdout: inside `stage_logging` that is the rule's log (and its history), so every stage logs one way."""
    cmd = launch_command(module, args, nproc_per_node, nnodes, rdzv_endpoint)
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    full_env.setdefault("OMP_NUM_THREADS", "1")
    if cmd[0] == "srun":
        full_env = {k: v for k, v in full_env.items() if not k.startswith("SLURM_") or k in SLURM_IDENTITY}
    if log is not None:
        Path(log).parent.mkdir(parents=True, exist_ok=True)
    sink = open(log, "a", buffering=1, encoding="utf-8") if log is not None else sys.stdout
    # srun --label prefixes each line with its task ("1: "); the excerpt reads without it
    label = re.compile(r"^ *\d+: ") if cmd[0] == "srun" else None
    excerpt = FailureExcerpt()
    sink.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} [launch] {shlex.join(cmd)}\n")
    proc = subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        for raw in proc.stdout:  # bytes, split at \n only: a carriage return stays inside its line
            line = raw.decode(errors="replace")
            if "\r" in line.rstrip("\r\n"):  # a library's progress bar frames (e.g. Energon's): terminal-only
                continue
            excerpt.add(label.sub("", line) if label else line)
            sink.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line.rstrip(chr(13) + chr(10))}\n")
        sink.flush()
        proc.wait()
    except BaseException:  # interrupted (Ctrl-C, the job stopped): torchrun passes SIGTERM on to the ranks
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
    finally:
        proc.stdout.close()
        if log is not None:
            sink.close()
    if proc.returncode != 0:
        block = excerpt.traceback()
        raise RankFailed(f"{module} failed on {nproc_per_node * nnodes} rank(s) (exit {proc.returncode}): "
                         f"{block.splitlines()[-1].strip() if block else 'no output'}\n{block}")
