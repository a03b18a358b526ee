"""A real single-node Slurm for tests/test_slurm.py: munged + slurmctld + slurmd on loopback, all state in one dir.

    cluster = SlurmCluster(tmp / "cluster", partitions=("debug_cpu", "debug_gpu")).start()
    env = cluster.env()          # SLURM_CONF: every client (sbatch, squeue, scancel, srun) finds this cluster
    ...
    cluster.stop()               # cancels what is left, then stops the daemons (by the pids they wrote)

Debian's packages (slurm-wlm 22.05: slurmctld, slurmd, slurm-client; munge) are installed with apt-get when missing.
The config is linked from the packages' default path, /etc/slurm/slurm.conf, for the job's own commands: the
executor plugin's job step drops SLURM_CONF from the environment of the `srun` it runs the job with (a real cluster
keeps its config there, or serves it configless). A slurm.conf already there that is not ours: the cluster refuses to
start. No accounting daemon: AccountingStorageType=accounting_storage/none, so `sacct` answers "accounting storage is
disabled"; job status comes from squeue (the executor plugin's `status_command: squeue`, which needs
MinJobAge >= 3 x its first status delay) and every finished job is written to the jobcomp/filetxt file that
`finished_jobs()` reads (id, name, partition, state, node count, CPU count).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
DAEMONS = ("slurmctld", "slurmd", "munged", "sbatch", "squeue")
SYSTEM_CONF = Path("/etc/slurm/slurm.conf")


def system_conf_taken() -> bool:
    """A slurm.conf of a real cluster (not a link left by this helper) is at the default path."""
    return SYSTEM_CONF.exists() and not SYSTEM_CONF.is_symlink()


def slurm_installed() -> bool:
    return all(shutil.which(name) or Path("/usr/sbin", name).exists() for name in DAEMONS)


def install_slurm() -> None:
    """apt-get install the Debian packages (root, Debian/Ubuntu); raise with apt's output when that fails."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]
    for cmd in (["apt-get", "update", "-qq"], install):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class SlurmCluster:
    def __init__(self, root: Path, cpus: int = 2, partitions: tuple[str, ...] = ("cpu", "gpu"),
                 memory_mb: int = 64000):
        self.root = Path(root).resolve()
        self.cpus, self.partitions, self.memory_mb = cpus, partitions, memory_mb
        self.node = socket.gethostname()
        self.conf = self.root / "slurm.conf"
        self.system_conf = SYSTEM_CONF
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.jobcomp = self.root / "log" / "jobcomp.txt"

    # ------------------------------------------------------------------------------------------------ set-up
    def _write_conf(self) -> None:
        r = self.root
        lines = [
            "ClusterName=omnitest",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={r}/state", f"SlurmdSpoolDir={r}/spool",
            f"SlurmctldPidFile={r}/slurmctld.pid", f"SlurmdPidFile={r}/slurmd.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log", f"SlurmdLogFile={r}/log/slurmd.log",
            # no cgroups in a container: processes are tracked by parent pid, tasks are not bound
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "MpiDefault=none", "SwitchType=switch/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
            "AccountingStorageType=accounting_storage/none", "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/filetxt", f"JobCompLoc={self.jobcomp}",
            # finished jobs stay visible to squeue for 5 min: the plugin's squeue status needs >= 3 x its first delay
            "MinJobAge=300", "ReturnToService=2", "KillWait=5",
            # trust the node line below (RealMemory may exceed the machine: memory is not enforced here)
            "SlurmdParameters=config_overrides",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.memory_mb} State=UNKNOWN",
        ]
        for index, name in enumerate(self.partitions):
            lines.append(f"PartitionName={name} Nodes={self.node} Default={'YES' if index == 0 else 'NO'} "
                         "MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")

    def _start_munge(self) -> None:
        munge_dir = self.munge_socket.parent
        munge_dir.mkdir(parents=True, exist_ok=True)
        munge_dir.chmod(0o711)  # munged wants its socket dir reachable by every user
        key = munge_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        # --force: munged runs as root here (a throwaway test daemon with its own key and socket)
        subprocess.run([_sbin("munged"), "--force", f"--socket={self.munge_socket}", f"--key-file={key}",
                        f"--pid-file={munge_dir}/munged.pid", f"--log-file={munge_dir}/munged.log",
                        f"--seed-file={munge_dir}/munged.seed"], check=True, capture_output=True, text=True)

    def env(self) -> dict:
        return dict(os.environ, SLURM_CONF=str(self.conf))

    def start(self, timeout: float = 60) -> "SlurmCluster":
        if not slurm_installed():
            install_slurm()
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._write_conf()
        if system_conf_taken():
            raise RuntimeError(f"{SYSTEM_CONF} belongs to another Slurm: not starting a test cluster over it")
        self.system_conf.parent.mkdir(parents=True, exist_ok=True)
        self.system_conf.unlink(missing_ok=True)  # a link left by an interrupted run
        self.system_conf.symlink_to(self.conf)
        self._start_munge()
        env = self.env()
        for daemon in ("slurmctld", "slurmd"):  # both fork into the background and write their pid file
            subprocess.run([_sbin(daemon), "-f", str(self.conf)], env=env, check=True, capture_output=True, text=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            state = self.run("sinfo", "-h", "-N", "-o", "%t", check=False).stdout.split()
            if state and all(s == "idle" for s in state):
                return self
            time.sleep(1)
        raise RuntimeError(f"the test Slurm did not come up in {timeout:.0f} s:\n{self.logs()}")

    # ------------------------------------------------------------------------------------------------ queries
    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env=self.env(), capture_output=True, text=True, check=check, timeout=60)

    def queue(self) -> list[str]:
        """Jobs that are pending, running or being cancelled (`JOBID|STATE|PARTITION|NAME`)."""
        out = self.run("squeue", "-h", "-t", "PENDING,RUNNING,CONFIGURING,COMPLETING,SUSPENDED",
                       "-o", "%i|%T|%P|%j").stdout
        return [line for line in out.splitlines() if line.strip()]

    def finished_jobs(self) -> dict[str, dict[str, str]]:
        """The jobcomp/filetxt records by job id: JobState, Partition, Name, NodeCnt, ProcCnt, WorkDir, ..."""
        jobs = {}
        if self.jobcomp.exists():
            for line in self.jobcomp.read_text().splitlines():
                record = dict(item.split("=", 1) for item in line.split() if "=" in item)
                jobs[record["JobId"]] = record
        return jobs

    def wait_empty(self, timeout: float = 60) -> list[str]:
        deadline = time.time() + timeout
        while (left := self.queue()) and time.time() < deadline:
            time.sleep(1)
        return left

    def logs(self) -> str:
        return "\n".join(f"--- {path.name}\n{path.read_text()[-3000:]}"
                         for path in sorted((self.root / "log").glob("*.log")))

    # ------------------------------------------------------------------------------------------------ tear-down
    def stop(self) -> None:
        if self.conf.exists() and (self.root / "slurmctld.pid").exists():
            self.run("scancel", "--user=root", check=False)
            self.wait_empty(timeout=30)
        for pid_file in (self.root / "slurmd.pid", self.root / "slurmctld.pid",
                         self.munge_socket.parent / "munged.pid"):
            _stop_pid(pid_file)
        if self.system_conf.is_symlink() and Path(os.readlink(self.system_conf)) == self.conf:
            self.system_conf.unlink()


def _stop_pid(pid_file: Path, timeout: float = 20) -> None:
    """SIGTERM the daemon named by its pid file, SIGKILL it if it has not exited after `timeout` s."""
    try:
        pid = int(pid_file.read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)
