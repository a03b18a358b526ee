"""Write a stage's outputs into a staging folder, move them into place only when the stage succeeded.

    with staged_outputs({"processed": out.processed, "drops": out.drops}) as staged:
        write(staged["processed"]); write(staged["drops"])
    # here every output is in place; on an exception none was touched and the staging folder is gone

Each output moves with one rename (files and folders alike), so a reader never sees a half-written output; a killed
job leaves only `<first output's folder>/<stage>.staging`, which the next run removes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator, Mapping


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
            replace(path, outputs[name])
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def replace(src: Path, dst: Path) -> None:
    """Move src to dst; an old dst (file or folder) is removed only after the new one is in place."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_dir() and not dst.is_symlink():
        old = dst.with_name(dst.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)
