"""The one way outputs are published: written into a staging folder, moved into place only when complete.

    with staged_outputs({"processed": out.processed, "drops": out.drops}) as staged:
        write(staged["processed"]); write(staged["drops"])
    # here every output is in place; on an exception none was touched and the staging folder is gone

    staging = fresh_staging(out_dir)      # a single folder output (download, convert, export)
    ...write into staging...
    publish(staging, out_dir)

Each output moves with one rename (files and folders alike), so a reader never sees a half-written output, and the
old output is removed only after the new one is in place (a failed rename puts the old one back). A killed job
leaves only `<output>.staging` (or `<first output's folder>/<stage>.staging`), which the next run removes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Iterator, Mapping


def staging_path(out_dir: Path) -> Path:
    """Where out_dir is built before it is published: `<out_dir>.staging`, beside it (the same file system)."""
    return Path(out_dir).with_name(Path(out_dir).name + ".staging")


def fresh_staging(out_dir: Path) -> Path:
    """An empty staging folder for out_dir (what an earlier killed run left there is removed)."""
    staging = staging_path(out_dir)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def publish(src: Path, dst: Path) -> None:
    """Move src (a finished file or folder) to dst. An old dst is renamed aside first and removed only once src is
    in place; if that rename fails, the old dst is put back, so dst is at every moment the old or the new output."""
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not os.path.lexists(dst) or (not src.is_dir() and not dst.is_dir()):  # os.replace swaps files in one step
        os.replace(src, dst)
        return
    old = dst.with_name(dst.name + ".old")
    _remove(old)
    os.replace(dst, old)
    try:
        os.replace(src, dst)
    except BaseException:
        os.replace(old, dst)
        raise
    _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        path.unlink()


@contextlib.contextmanager
def staged_outputs(outputs: Mapping[str, Path], stage: str = "stage") -> Iterator[dict[str, Path]]:
    outputs = {name: Path(path) for name, path in outputs.items()}
    first = next(iter(outputs.values()))
    staging = first.parent / f"{stage}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    staged = {name: staging / name / path.name for name, path in outputs.items()}
    for path in staged.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield staged
        missing = [str(outputs[name]) for name, path in staged.items() if not path.exists()]
        if missing:
            raise FileNotFoundError(f"the stage did not write {', '.join(missing)}")
        for name, path in staged.items():
            publish(path, outputs[name])
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_marker(marker: Path, summary: str) -> None:
    """The declared output of a stage whose folder is published beside it (`results/data/shards.done` for
    `results/data/shards`), written last. It names this run (time and a random id) besides `summary`: Snakemake
    decides whether a later job is stale by the checksum of a small input file, not its time, so a marker that read
    the same after a rerun with other results (e.g. the same sample counts, the same `latest` name) would leave the
    stages after it on the old folder."""
    Path(marker).write_text(f"{summary}\nrun {time.strftime('%Y-%m-%dT%H:%M:%S')} {uuid.uuid4().hex}\n")
