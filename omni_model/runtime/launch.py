"""Start a module under torchrun: the one place that knows how ranks are launched (convert, finetune).

    run_torchrun("omni_model.train", ["--settings", "s.json"], nproc_per_node=2, log=Path("logs/finetune.log"))

All ranks' output (stdout + stderr) goes, line by line and timestamped, to one log. When a rank fails, the exception
raised here names that rank's error in its first line and carries its traceback (the first `Traceback` block of this
launch's output), so the stage's one console line shows the real error and the log the whole story.
Multi-node: `nnodes > 1` needs `rdzv_endpoint` (host:port of the first node); each node runs the same command.
"""

from __future__ import annotations

import os
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
    """Run `python -m module args` on `nproc_per_node` ranks (times `nnodes`); raise RankFailed on failure.
    The ranks' output is streamed line by line, each line timestamped, to `log` (appended) or, without one, to
    sys.stdout: inside `stage_logging` that is the rule's log (and its history), so every stage logs one way."""
    cmd = torchrun_command(module, args, nproc_per_node, nnodes, rdzv_endpoint)
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    full_env.setdefault("OMP_NUM_THREADS", "1")
    if log is not None:
        Path(log).parent.mkdir(parents=True, exist_ok=True)
    sink = open(log, "a", buffering=1, encoding="utf-8") if log is not None else sys.stdout
    output = []
    proc = subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", bufsize=1)
    try:
        for line in proc.stdout:
            output.append(line)
            sink.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}")
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
        block = first_traceback("".join(output))
        raise RankFailed(f"{module} failed on {nproc_per_node * nnodes} rank(s) (exit {proc.returncode}): "
                         f"{block.splitlines()[-1].strip() if block else 'no output'}\n{block}")
