"""Start a module under torchrun: the one place that knows how ranks are launched (convert, finetune).

    run_torchrun("omni_model.train", ["--settings", "s.json"], nproc_per_node=2, log=Path("logs/finetune.log"))

All ranks write to one log (stdout + stderr inherited from torchrun, appended). When a rank fails, the exception raised here carries that rank's traceback (the
first `Traceback` block in the log written by this launch), so Snakemake's console shows the real error.
Multi-node: `nnodes > 1` needs `rdzv_endpoint` (host:port of the first node); each node runs the same command.
"""

from __future__ import annotations

import os
import subprocess
import sys
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


def run_torchrun(module: str, args: Sequence[str], nproc_per_node: int, log: Optional[Path] = None, *,
                 nnodes: int = 1, rdzv_endpoint: str = "", env: Optional[dict] = None) -> None:
    """Run `python -m module args` on `nproc_per_node` ranks (times `nnodes`); raise RankFailed on failure."""
    cmd = torchrun_command(module, args, nproc_per_node, nnodes, rdzv_endpoint)
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    full_env.setdefault("OMP_NUM_THREADS", "1")
    if log is None:
        proc = subprocess.run(cmd, env=full_env, capture_output=True, text=True)
        output = proc.stdout + proc.stderr
        sys.stdout.write(output)
    else:
        log = Path(log)
        log.parent.mkdir(parents=True, exist_ok=True)
        start = log.stat().st_size if log.exists() else 0
        with open(log, "ab") as sink:
            proc = subprocess.run(cmd, env=full_env, stdout=sink, stderr=subprocess.STDOUT)
        with open(log, "rb") as source:
            source.seek(start)
            output = source.read().decode(errors="replace")
    if proc.returncode != 0:
        raise RankFailed(f"{module} failed on {nproc_per_node * nnodes} rank(s) (exit {proc.returncode}):\n"
                         f"{first_traceback(output)}")
