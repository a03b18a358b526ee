"""Start a module under torchrun: the one place that knows how ranks are launched (convert, finetune).

    run_torchrun("omni_model.train", ["--settings", "s.json"], nproc_per_node=2, log=Path("logs/finetune.log"))

All ranks' output (stdout + stderr) goes, line by line and timestamped, to one log. Each rank runs its module under
this module's `__main__` (`torchrun ... -m omni_model.runtime.launch MODULE ARGS`), which writes the exception that
ends a rank, with its traceback and time, to a file of its own. When ranks fail, the exception raised here names the
rank that failed first and its exception line, and carries its traceback: the stage's one console line is the rank's
own error, whatever order the ranks' output lines came in (they interleave) and whatever torchrun prints after.

No process of a launch outlives the Snakemake job that started it: the torchrun agent gets SIGTERM from the kernel
when the launching process dies (PR_SET_PDEATHSIG; it stops its ranks, which die with the agent in turn:
runtime.parallel), and a watchdog stops the agent when a Snakemake process above the launcher is gone (a SIGKILLed
`snakemake` leaves its job's processes running otherwise). `writer_lock` refuses a second writer on one folder.
Multi-node: inside a Slurm job (SLURM_JOB_ID set), `nnodes > 1` starts one torchrun agent per node through
`srun --overlap` (the job's first step, the Snakemake job itself, already holds the allocation), with the c10d
rendezvous on the allocation's first node. Outside Slurm, `nnodes > 1` needs `rdzv_endpoint` (host:port of the first
node) and every node runs the same torchrun command (docs/cluster.md).
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Iterator, Optional, Sequence

from .logs import exception_line


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
    return cmd + ["-m", __name__, module, *args]  # the rank runs `module` under this file's __main__ (rank errors)


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


# -- a rank's failure, recorded by the rank ----------------------------------------------------------------------
RANK_ERRORS_ENV = "OMNI_RANK_ERRORS"  # the folder where each failing rank writes rank<N>.json


def run_rank(module: str, args: Sequence[str]) -> None:
    """A rank's main: `python -m module args`; an exception ending it is first written to
    `$OMNI_RANK_ERRORS/rank<RANK>.json` (exception line, traceback, time), then raised as usual."""
    import runpy

    sys.argv = [module, *args]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except BaseException as exc:
        if not (isinstance(exc, SystemExit) and exc.code in (0, None)):
            _record_rank_error(exc)
        raise


def _record_rank_error(exc: BaseException) -> None:
    folder = os.environ.get(RANK_ERRORS_ENV)
    if not folder:
        return
    rank = os.environ.get("RANK", "0")
    text = traceback.format_exc().rstrip()
    record = {"rank": int(rank), "time": time.time(), "line": exception_line(exc), "traceback": text}
    with contextlib.suppress(OSError):
        tmp = Path(folder) / f"rank{rank}.json.tmp"
        tmp.write_text(json.dumps(record))
        os.replace(tmp, tmp.with_suffix(""))


def first_rank_error(folder: Path) -> Optional[dict]:
    """The failure recorded first (the cause; other ranks fail after it, e.g. on a closed connection), or None."""
    records = []
    for path in sorted(Path(folder).glob("rank*.json")):
        with contextlib.suppress(OSError, ValueError):
            records.append(json.loads(path.read_text()))
    return min(records, key=lambda r: (r["time"], r["rank"])) if records else None


def _failure_message(module: str, ranks: int, returncode: int, errors: Path, tail: Sequence[str]) -> str:
    """RankFailed's text: first line `<module> failed on N rank(s) (exit C): rank R: <its exception line>`, then the
    rank's traceback; when no rank raised (a rank killed by a signal, the agent failing), the launch's last lines."""
    head = f"{module} failed on {ranks} rank(s) (exit {returncode})"
    error = first_rank_error(errors)
    if error is not None:
        return f"{head}: rank {error['rank']}: {error['line']}\n{error['traceback']}"
    last = [line.rstrip() for line in tail if line.strip()]
    return f"{head}: no rank raised an exception (killed by a signal?): {last[-1] if last else 'no output'}\n" + \
        "\n".join(last)


# -- the launch dies with its Snakemake job ------------------------------------------------------------------------
def die_with_parent(sig: int = signal.SIGTERM, parent: Optional[int] = None):
    """A function that arms PR_SET_PDEATHSIG (Linux; None elsewhere): the calling process gets `sig` from the kernel
    when `parent` dies, and exits at once if that happened before it was armed. Default `parent`: this process, for
    a `preexec_fn` (the child arms it between fork and exec); a process arms itself with parent=os.getppid()."""
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child only calls it
    except (OSError, AttributeError):
        return None
    parent = os.getpid() if parent is None else parent

    def arm() -> None:
        prctl(1, int(sig), 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return arm


def _process(pid: int) -> Optional[tuple[int, str, str]]:
    """(parent pid, start time, state) of a process from /proc, or None when it is gone (or not Linux)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), fields[19], fields[0]


def snakemake_ancestors() -> list[tuple[int, str]]:
    """(pid, start time) of every Snakemake process above this one: the job's and the `snakemake` the user ran."""
    found, pid = [], os.getppid()
    while pid > 1:
        info = _process(pid)
        if info is None:
            break
        with contextlib.suppress(OSError):
            if b"snakemake" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append((pid, info[1]))
        pid = info[0]
    return found


def _alive(pid: int, started: str) -> bool:
    info = _process(pid)
    return info is not None and info[1] == started and info[2] != "Z"


class _Watchdog(threading.Thread):
    """Stops the launch (SIGTERM to the torchrun agent) once a Snakemake process above it is gone."""

    def __init__(self, proc: subprocess.Popen, interval: float = 1.0):
        super().__init__(daemon=True, name="snakemake-watchdog")
        self.proc, self.interval = proc, interval
        self.watched, self.gone, self.done = snakemake_ancestors(), None, threading.Event()

    def run(self) -> None:
        while self.watched and not self.done.wait(self.interval):
            gone = [pid for pid, started in self.watched if not _alive(pid, started)]
            if gone:
                self.gone = gone[0]
                with contextlib.suppress(ProcessLookupError):
                    self.proc.terminate()
                return


# -- one writer per folder -----------------------------------------------------------------------------------------
class WriterBusy(RuntimeError):
    """Another process is writing into the folder (a stage still running, or what a killed one left)."""


_held_locks: list[int] = []  # lock fds a launch passes on to its agent: the lock lives as long as the agent does


@contextlib.contextmanager
def writer_lock(folder: Path, stage: str) -> Iterator[None]:
    """Hold `<folder>/.writer.lock` (flock) while the block runs, and while any agent started inside it lives;
    raise WriterBusy naming the holder when another process holds it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ".writer.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = path.read_text().strip() or "unknown"
        os.close(fd)
        raise WriterBusy(f"{folder} is being written by another {stage} ({holder}), still running: stop it first "
                         f"(Snakemake's --unlock does not stop it) or wait for it to end") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
    _held_locks.append(fd)
    try:
        yield
    finally:
        _held_locks.remove(fd)
        os.close(fd)


# -- the launch ----------------------------------------------------------------------------------------------------
def rank_environment(env: Optional[dict], errors: Path, under_srun: bool = False) -> dict:
    """The ranks' environment: ours, `env` over it, and defaults a user's own setting overrides. Expandable segments:
    packed rows of varying lengths and the MoE's per-step token counts change tensor sizes every step, which
    fragments the caching allocator's fixed segments; on an 80 GB card the 30B-A3B LoRA run fits with ~1 GiB spare."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}), **{RANK_ERRORS_ENV: str(errors)})
    full_env.setdefault("OMP_NUM_THREADS", "1")
    full_env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    if under_srun:
        full_env = {k: v for k, v in full_env.items() if not k.startswith("SLURM_") or k in SLURM_IDENTITY}
    return full_env


def _stamped(line: str) -> str:
    return f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n"


def run_torchrun(module: str, args: Sequence[str], nproc_per_node: int, log: Optional[Path] = None, *,
                 nnodes: int = 1, rdzv_endpoint: str = "", env: Optional[dict] = None) -> None:
    """Run `python -m module args` on `nproc_per_node` ranks (times `nnodes`); raise RankFailed on failure.
    The ranks' output is streamed line by line, each line timestamped, to `log` (appended) or, without one, to
    sys.stdout: inside `stage_logging` that is the rule's log (and its history), so every stage logs one way."""
    cmd = launch_command(module, args, nproc_per_node, nnodes, rdzv_endpoint)
    # the ranks' error files: in the working folder, on the workflow's shared file system (a multi-node run's ranks
    # on other nodes write there too); removed when the launch ends
    errors = Path(tempfile.mkdtemp(prefix=f".rank-errors-{module}-", dir=Path.cwd()))
    full_env = rank_environment(env, errors, under_srun=cmd[0] == "srun")
    if log is not None:
        Path(log).parent.mkdir(parents=True, exist_ok=True)
    sink = open(log, "a", buffering=1, encoding="utf-8") if log is not None else sys.stdout
    tail = collections.deque(maxlen=20)  # what a failure names when no rank raised (a rank killed by a signal)
    sink.write(_stamped(f"[launch] {shlex.join(cmd)}"))
    # a session of its own: a Ctrl-C on the terminal reaches this process, which stops the agent (one console line)
    proc = subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, preexec_fn=die_with_parent(), pass_fds=tuple(_held_locks))
    watchdog = _Watchdog(proc)
    watchdog.start()
    try:
        for raw in proc.stdout:  # bytes, split at \n only: a carriage return stays inside its line
            line = raw.decode(errors="replace")
            if "\r" in line.rstrip("\r\n"):  # a library's progress bar frames (e.g. Energon's): terminal-only
                continue
            tail.append(line)
            sink.write(_stamped(line.rstrip("\r\n")))
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
        watchdog.done.set()
        proc.stdout.close()
        if log is not None:
            sink.close()
        message = _failure_message(module, nproc_per_node * nnodes, proc.returncode, errors, tail) \
            if proc.returncode else ""
        shutil.rmtree(errors, ignore_errors=True)
    if watchdog.gone is not None:
        raise RankFailed(f"{module} stopped: the Snakemake process that started this job (pid {watchdog.gone}) is "
                         f"gone, so are its ranks")
    if proc.returncode != 0:
        raise RankFailed(message)


if __name__ == "__main__":  # a rank: python -m omni_model.runtime.launch MODULE ARGS (what torchrun_command runs)
    run_rank(sys.argv[1], sys.argv[2:])
